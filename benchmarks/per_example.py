"""What per-example gradient norms cost: PerExampleNorms beside the plain step and torch.func.

    python benchmarks/per_example.py                # MLP and tiny GPT-2 (seq 128), ~2 min on 2 cores
    python benchmarks/per_example.py --rounds 5 --models gpt2 --threads 1

Variants, one training step each (forward, backward, SGD step):

* ``plain``: no watch;
* ``watch``: ``GradWatch(model)`` (per-parameter norms);
* ``per-example``: ``GradWatch(model, stats=[PerExampleNorms()])``;
* ``torch.func``: the per-sample gradients of the same batch by
  ``vmap(grad(loss))`` and their norms alone (no optimizer step): what
  materialising per-sample gradients costs.

One round runs every variant once, in a new random order, so drifts of the
machine hit all alike. Printed: median wall-clock time and the median over
rounds of the ratio to the plain step of the same round, the same for the
process's CPU time (all threads; steadier than wall time on a shared machine);
then the cost of the per-example norms both ways, as the median over rounds
of their ratio: what ``PerExampleNorms`` adds (``per-example`` minus ``watch``,
the same watch without the statistic; also shown: minus ``plain``, the watch's
own cost included) against the ``torch.func`` computation. Targets (CPU):
``per-example`` at most 1.5x the plain step on the tiny GPT-2, and the
statistic at least 5x cheaper than torch.func. Also printed: the
floating-point operations of each variant's matrix products
(``torch.utils.flop_counter``), and their ratio -- torch.func's against what
the statistic adds --, which bounds the time ratio where both run their
products equally fast.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.flop_counter import FlopCounterMode

import gradwatch as gw


def mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x, y = torch.randn(64, 512), torch.randint(0, 10, (64,))

    def loss(m: nn.Module, params=None, xb=x, yb=y) -> torch.Tensor:
        out = m(xb) if params is None else functional_call(m, params, (xb,))
        return F.cross_entropy(out, yb)

    return model, loss, (x, y)


def gpt2_task(seq: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=2048, n_positions=seq, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    B = 8
    ids = torch.randint(0, 2048, (B, seq))
    pos = torch.arange(seq).expand(B, seq)

    def loss(m: nn.Module, params=None, xb=ids, pb=pos) -> torch.Tensor:
        if params is None:
            return m(xb, position_ids=pb, labels=xb).loss
        return functional_call(m, params, (xb,), {"position_ids": pb, "labels": xb}).loss

    return model, loss, (ids, pos)


TASKS = {"mlp": mlp_task, "gpt2": gpt2_task}


def variants(model: nn.Module, loss: Callable, batch: tuple) -> dict[str, Callable[[], None]]:
    """Each variant on its own copy of the model: a callable running one step."""
    out: dict[str, Callable[[], None]] = {}

    def stepper(m: nn.Module, watch: gw.GradWatch | None) -> Callable[[], None]:
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)
        if watch is not None:
            watch.attach(opt)

        def step() -> None:
            opt.zero_grad()
            loss(m).backward()
            opt.step()

        return step

    out["plain"] = stepper(copy.deepcopy(model), None)
    m = copy.deepcopy(model)
    out["watch"] = stepper(m, gw.GradWatch(m))
    m = copy.deepcopy(model)
    out["per-example"] = stepper(m, gw.GradWatch(m, stats=[gw.PerExampleNorms()]))

    m = copy.deepcopy(model)
    B = batch[0].shape[0]

    def one(params, *xs):
        return loss(m, params, *(x[None] for x in xs)) / B

    per_sample = vmap(grad(one), in_dims=(None, *([0] * len(batch))))

    def func_step() -> None:
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = per_sample(params, *batch)
        torch.sqrt(sum(v.reshape(B, -1).square().sum(1) for v in g.values()))

    out["torch.func"] = func_step
    return out


def matmul_flops(steps: dict[str, Callable[[], None]]) -> dict[str, int]:
    """Each variant's floating-point operations in matrix products (``FlopCounterMode``: mm, bmm, addmm, conv)."""
    out = {}
    for k, f in steps.items():
        with FlopCounterMode(display=False) as fc:
            f()
        out[k] = fc.get_total_flops()
    return out


def run(name: str, rounds: int) -> None:
    model, loss, batch = TASKS[name]()
    steps = variants(model, loss, batch)
    for f in steps.values():  # warm-up
        f()
    flops = matmul_flops(steps)
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        order = list(steps)
        random.shuffle(order)
        for k in order:
            t, c = time.perf_counter(), time.process_time()
            steps[k]()
            cpu[k].append(time.process_time() - c)
            times[k].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(v, times["plain"])) for k, v in times.items()}
    cpu_ratios = {k: statistics.median(a / b for a, b in zip(v, cpu["plain"])) for k, v in cpu.items()}
    n = sum(p.numel() for p in model.parameters())
    shape = "x".join(map(str, batch[0].shape))
    print(f"\n{name}: {n / 1e6:.2f}M parameters, batch {shape}, {rounds} rounds, {torch.get_num_threads()} threads")
    print(f"{'variant':<14}{'median ms':>12}{'x plain':>10}{'CPU ms':>10}{'x plain':>10}")
    for k, v in times.items():
        wall, proc = statistics.median(v) * 1e3, statistics.median(cpu[k]) * 1e3
        print(f"{k:<14}{wall:>12.1f}{ratios[k]:>10.2f}{proc:>10.1f}{cpu_ratios[k]:>10.2f}")
    func = statistics.median(times["torch.func"]) * 1e3
    extra = flops["per-example"] - flops["watch"]
    bound = f"at equal speed torch.func costs {flops['torch.func'] / extra:.1f}x" if extra else "none of them products"
    print(
        f"matrix-product GFLOP: plain {flops['plain'] / 1e9:.3f}, torch.func {flops['torch.func'] / 1e9:.3f}, "
        f"added by the statistic {extra / 1e9:.3f} -> {bound}"
    )
    for base, what in (("watch", "what the statistic adds to the watch"), ("plain", "statistic and watch together")):
        added = [a - b for a, b in zip(times["per-example"], times[base])]
        cheaper = statistics.median(f / max(a, 1e-9) for f, a in zip(times["torch.func"], added))
        print(
            f"per-example - {base:<5} ({what}): +{statistics.median(added) * 1e3:.1f} ms; "
            f"torch.func per-sample gradients {func:.1f} ms -> {cheaper:.1f}x cheaper"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(0)
    for name in args.models:
        run(name, args.rounds)


if __name__ == "__main__":
    main()
