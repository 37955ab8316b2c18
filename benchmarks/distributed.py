"""Full per-parameter norms + global clipping on FSDP2 vs torch's clip_grad_norm_, 2 CPU ranks with gloo.

    python benchmarks/distributed.py                       # ~1 min on 2 cores
    python benchmarks/distributed.py --width 512 --rounds 60

Each variant trains its own FSDP2 copy of an MLP (``--depth`` Linear layers of
``--width``, each ``fully_shard``-ed) on 2 spawned ranks; one round runs one step
of every variant in a new order each round (the same order on both ranks: the
collectives must match), so slow drifts of the machine hit all variants alike.
Reported, from rank 0: the median step time, the median over rounds of the
ratio to the plain step of the same round, and what each variant adds per step
in collectives (counted with ``gradwatch.distributed.count_collectives`` over
one extra step, minus the plain step's own FSDP all-gathers and
reduce-scatters), in host syncs and in dispatched ops other than views (counted with
``gradwatch.syncs.count_host_syncs`` over the added work alone: a DTensor op
counts once, at the top level, whatever it runs inside).

Variants:

* ``plain``: forward, backward, SGD step;
* ``gradwatch norms + global clip``: the full norm of every parameter's gradient
  (``NormReducer.norms``: one all-reduce of P numbers), the global norm from them
  and a global clip with one coefficient on every rank -- what a watch with
  ``ClipByGlobalNorm`` does;
* ``GradWatch + ClipByGlobalNorm``: the same through a watch (``watch.step()``
  before the optimizer step), rows kept on the device (``flush_every=10_000``);
* ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_(foreach=True)`` -- global
  clipping only, no per-parameter norms;
* ``per-param full_tensor() norms``: the naive way to get full per-parameter norms
  (gather each gradient, then its norm) -- what hook-based measurement cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

MAX_NORM = 1.0
#: aliasing ops (``DTensor.to_local()`` is one): metadata only, no kernel, left out of the op count
VIEWS = {"view", "alias", "_unsafe_view"}


def build(width: int, depth: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def variants():
    from gradwatch.distributed import NormReducer, local_tensor

    def engine(model, state):
        params = state.setdefault("params", list(model.parameters()))
        reducer = state.setdefault("reducer", NormReducer([n for n, _ in model.named_parameters()]))
        grads = [p.grad for p in params]
        norms = reducer.norms(grads)  # [P] full per-parameter norms: the row a watch records
        total = reducer.total(norms)
        coef = (MAX_NORM / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([local_tensor(g) for g in grads if g is not None], coef)

    def watch(model, state):
        import gradwatch as gw

        if "watch" not in state:
            state["watch"] = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(MAX_NORM), flush_every=10_000)
        state["watch"].step()

    def torch_clip(model, state):
        nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)

    def naive(model, state):
        torch.stack([torch.linalg.vector_norm(p.grad.full_tensor()) for p in model.parameters()])

    return {
        "plain": None,
        "gradwatch norms + global clip": engine,
        "GradWatch + ClipByGlobalNorm": watch,
        "clip_grad_norm_": torch_clip,
        "per-param full_tensor() norms": naive,
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh

    from gradwatch.distributed import count_collectives
    from gradwatch.syncs import count_host_syncs

    mesh = init_device_mesh("cpu", (world,))
    extra = variants()
    models = {name: build(args.width, args.depth, mesh) for name in extra}
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}
    states: dict[str, dict] = {name: {} for name in extra}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.width, generator=g), torch.randn(args.batch, args.width, generator=g)

    def step(name: str, counter=None) -> None:
        model, opt = models[name], opts[name]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        if extra[name] is not None:
            if counter is None:
                extra[name](model, states[name])
            else:
                with counter:
                    extra[name](model, states[name])
        opt.step()

    for _ in range(3):
        for name in extra:
            step(name)
    collectives, syncs = {}, {}
    for name in extra:  # separate steps: a dispatch mode inside the profiler would count collectives twice
        with count_collectives() as c:
            step(name)
        hs = count_host_syncs()
        step(name, hs)
        ops = sum(n for op, n in hs.ops.items() if op not in VIEWS)
        collectives[name], syncs[name] = c.counts, (hs.syncs, ops)
    times: dict[str, list[float]] = {name: [] for name in extra}
    order = list(extra)
    for r in range(args.rounds):
        random.Random(r).shuffle(order)  # the same order on every rank
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    # the step time of a round is the slowest rank's
    all_times = torch.tensor([times[name] for name in extra], dtype=torch.float64)
    dist.all_reduce(all_times, op=dist.ReduceOp.MAX)
    if rank == 0:
        report(list(extra), all_times, collectives, syncs, args)
    dist.destroy_process_group()


def report(names, all_times, collectives, syncs, args) -> None:
    plain = all_times[names.index("plain")]
    base = collectives["plain"]
    print(
        f"FSDP2 on 2 CPU ranks (gloo): {args.depth} x Linear({args.width}), batch {args.batch} per rank, "
        f"{args.rounds} interleaved rounds, torch {torch.__version__}\n"
    )
    head = (
        f"{'variant':32} {'median step':>12} {'vs plain':>9}  {'collectives added per step':44} "
        f"{'host syncs':>10} {'ops':>5}"
    )
    print(head)
    print("-" * len(head))
    for i, name in enumerate(names):
        t = all_times[i]
        med = statistics.median(t.tolist()) * 1e3
        ratio = statistics.median((t / plain).tolist())
        added = {k: v - base.get(k, 0) for k, v in collectives[name].items() if v - base.get(k, 0)}
        coll = ", ".join(f"{v} {k}" for k, v in sorted(added.items())) or "none"
        if name == "plain":
            coll = "FSDP's own: " + ", ".join(f"{v} {k}" for k, v in sorted(base.items()))
        n_syncs, n_ops = syncs[name]
        print(f"{name:32} {med:9.2f} ms {ratio:8.3f}x  {coll:44} {n_syncs:>10} {n_ops:>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
