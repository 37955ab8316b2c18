"""gradwatch.distributed: full per-parameter norms from local shards, against single-process references.

Spawned CPU ranks with gloo (tests/_dist_harness.py): one spawn of 2 ranks for
the engine, DDP, FSDP2, tensor parallel and the pipeline override, one spawn of
4 ranks for HSDP (2x2) and FSDP2 + tensor parallel. Every scenario returns its
numbers; the assertions run here, against references computed in this process.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _dist_harness import (
    MLP,
    batch,
    fsdp2_mlp,
    fsdp_tp_mlp,
    full,
    grads_of,
    local_batch,
    loss_fn,
    mesh,
    reference_clipped_training,
    reference_grads,
    reference_norms,
    result_of,
    run_scenarios,
    tp_mlp,
)
from torch import nn

import gradwatch as gw
from gradwatch.distributed import (
    DistributedMeter,
    NormReducer,
    check_process_group,
    combine_norms,
    count_collectives,
    full_norms,
    get_rank,
    get_world_size,
    is_ddp,
    local_tensor,
    rank_path,
    row_norms,
    unwrap_ddp,
)
from gradwatch.syncs import count_host_syncs

P_TYPES = (2.0, 1.0, 3.0, math.inf)
MAX_NORM = 0.1  # binds at every step of the reference run (asserted below)
CLIP_STEPS = 3


def engine_clip_(params: list[nn.Parameter], max_norm: float, reducer: NormReducer) -> torch.Tensor:
    """A standalone global-norm clip built on the engine: the semantics of ``clip_grad_norm_``."""
    grads = [p.grad for p in params]
    total = reducer.total(reducer.norms(grads))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:  # every rank scales its own shard by the same coefficient
        if g is not None:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(coef)
    return total


def _placements(grads) -> list[str]:
    return [str(getattr(g, "placements", "plain")) for g in grads]


# --------------------------------------------------------------------------- rank functions (2 ranks)


def _engine_tensors(rank: int, world: int):
    """Hand-made DTensors of every placement, with their full values (the same on every rank)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dm = mesh((world,))
    g = torch.Generator().manual_seed(5)
    shard0, shard1, repl, vec = (torch.randn(s, generator=g) for s in [(5, 3), (4, 6), (7,), (5,)])
    part = [torch.randn(3, 2, generator=g) for _ in range(world)]
    avg = [torch.randn(2, 2, generator=g) for _ in range(world)]
    plain = torch.randn(3, generator=g)
    tensors = [
        distribute_tensor(shard0, dm, [Shard(0)]),
        distribute_tensor(shard1, dm, [Shard(1)]),
        distribute_tensor(repl, dm, [Replicate()]),
        distribute_tensor(vec, dm, [Shard(0)]),
        None,
        plain,
        DTensor.from_local(part[rank], dm, [Partial("sum")]),
        DTensor.from_local(avg[rank], dm, [Partial("avg")]),
    ]
    fulls = [shard0, shard1, repl, vec, None, plain, sum(part), sum(avg) / world]
    return tensors, fulls


def s_engine(rank: int, world: int):
    tensors, fulls = _engine_tensors(rank, world)
    names = ["shard0", "shard1", "repl", "vec", "missing", "plain", "partial_sum", "partial_avg"]
    out = {"fulls": fulls, "norms": {}, "counts": {}}
    for p in P_TYPES:
        reducer = NormReducer(names, norm_type=p)
        with count_collectives() as c:
            norms = reducer.norms(tensors)
            total = reducer.total(norms)
        out["norms"][p] = (norms, total)
        out["counts"][p] = (dict(c.counts), reducer.last_collectives)
    # without Partial gradients: exactly one all-reduce for the mesh, also on the second (cached-plan) call
    reducer = NormReducer(names[:6])
    reducer.norms(tensors[:6])
    with count_collectives() as c:
        out["no_partial"] = reducer.norms(tensors[:6])
    out["no_partial_counts"] = (dict(c.counts), reducer.last_collectives)
    from torch.distributed.tensor import Replicate, distribute_tensor

    bad = distribute_tensor(torch.tensor([1.0, math.inf, 2.0]), tensors[0].device_mesh, [Replicate()])
    nan = distribute_tensor(torch.tensor([1.0, math.nan]), tensors[0].device_mesh, [Replicate()])
    out["non_finite"] = (full_norms([bad, nan]), row_norms([bad, nan]))
    return out


def s_rows(rank: int, world: int):
    tensors, fulls = _engine_tensors(rank, world)
    ts = [tensors[i] for i in (0, 1, 2, 3, 6)]
    with count_collectives() as c:
        rows = row_norms(ts)
    return {"rows": rows, "fulls": [fulls[i] for i in (0, 1, 2, 3, 6)], "counts": dict(c.counts), "rank": rank}


def s_mixed_meshes(rank: int, world: int):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dm = mesh((world,))
    own, _ = dist.new_subgroups(group_size=1)  # a one-rank mesh per rank, like a pipeline stage's own mesh
    stage_mesh = DeviceMesh.from_group(own, "cpu")
    a = distribute_tensor(torch.arange(4.0), dm, [Shard(0)])
    b = DTensor.from_local(torch.full((3,), float(rank + 1)), stage_mesh, [Replicate()])
    try:
        full_norms([a, b], names=["enc.weight", "stage.weight"])
        err = None
    except ValueError as e:
        err = str(e)
    norms = full_norms([a, b], names=["enc.weight", "stage.weight"], process_group=dist.group.WORLD)
    try:
        NormReducer(process_group=[0, 1])
        type_err = None
    except TypeError as e:
        type_err = str(e)
    return {"err": err, "norms": norms, "type_err": type_err, "mesh": str(stage_mesh)}


def s_pipeline(rank: int, world: int):
    """Pipeline stages: rank r holds a disjoint part of the model; process_group combines the global norm."""
    grads = reference_grads(0)
    names = list(grads)
    mine = [n for i, n in enumerate(names) if i % world == rank]
    out = {"mine": mine}
    for p in (2.0, math.inf):
        reducer = NormReducer(mine, norm_type=p, process_group=dist.group.WORLD)
        norms = reducer.norms([grads[n] for n in mine])
        with count_collectives() as c:
            out[p] = reducer.total(norms)
        out[("counts", p)] = dict(c.counts)
    out["mesh_group"] = combine_norms(full_norms([grads[n] for n in mine]), process_group=mesh((world,)))
    return out


def s_ddp(rank: int, world: int):
    torch.manual_seed(0)
    model = MLP()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = local_batch(0, rank, world)
    (x0, x1), (y0, y1) = x.chunk(2), y.chunk(2)
    with ddp.no_sync():  # accumulation: the first micro-batch stays local
        (loss_fn(ddp, x0, y0) / 2).backward()
    (loss_fn(ddp, x1, y1) / 2).backward()
    names, grads = grads_of(unwrap_ddp(ddp))
    with count_collectives() as c:
        norms = full_norms(grads, names=names)
        total = combine_norms(norms)
    return {
        "names": names,
        "norms": norms,
        "total": total,
        "counts": dict(c.counts),
        "is_ddp": (is_ddp(ddp), is_ddp(model)),
    }


def s_fsdp2(rank: int, world: int):
    dm = mesh((world,))
    model = fsdp2_mlp(dm)
    loss_fn(model, *local_batch(0, rank, world)).backward()
    names, grads = grads_of(model)
    params = list(model.parameters())
    reducer = NormReducer(names)
    with count_collectives() as c:
        norms = reducer.norms(grads)
        total = reducer.total(norms)
    out = {"names": names, "norms": norms, "total": total, "counts": dict(c.counts), "placements": _placements(grads)}
    # the watch's meter interface, writing into a row of a [rows, P + 1] device buffer
    meter = DistributedMeter(params, names)
    buf = torch.zeros(3, len(params) + 1)
    meter.measure(grads, [], buf[1, :-1])
    meter.total(buf[1, :-1], out=buf[1, -1])
    out["meter_buf"] = buf
    # AGC's unit-wise norms of gradients and weights: Shard(0) rows are local, only the biases reduce
    with count_collectives() as c:
        rows = row_norms(grads + params)
    out["rows"], out["row_counts"] = rows, dict(c.counts)
    out["local_rows"] = [local_tensor(t).shape[0] if t.ndim >= 2 else 0 for t in grads]
    # a global clip on the engine vs torch.nn.utils.clip_grad_norm_ on the same sharded gradients
    saved = [g.detach().clone() for g in grads]
    with count_collectives() as c:
        ours_total = engine_clip_(params, MAX_NORM, reducer)
    out["clip_counts"] = dict(c.counts)
    for p, s in zip(params, saved):
        p.grad = s.clone()
    with count_host_syncs() as hs:  # a separate call: a dispatch mode inside the profiler double-counts
        engine_clip_(params, MAX_NORM, reducer)
    out["clip_syncs"] = hs.syncs
    ours = [local_tensor(p.grad).clone() for p in params]
    for p, s in zip(params, saved):
        p.grad = s.clone()
    with count_collectives() as c:
        torch_total = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    out["torch_clip_counts"] = dict(c.counts)
    out["clip"] = (ours_total, full(torch_total), ours, [local_tensor(p.grad).clone() for p in params])
    return out


def s_fsdp2_training(rank: int, world: int):
    """Several SGD steps with the engine's global clip on FSDP2; returns the full weights."""
    model = fsdp2_mlp(mesh((world,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names, _ = grads_of(model)
    reducer = NormReducer(names)
    totals = []
    for step in range(CLIP_STEPS):
        opt.zero_grad()
        loss_fn(model, *local_batch(step, rank, world)).backward()
        totals.append(engine_clip_(list(model.parameters()), MAX_NORM, reducer))
        opt.step()
    return {"weights": {n: full(p.detach()) for n, p in model.named_parameters()}, "totals": totals}


def s_tp(rank: int, world: int):
    model = tp_mlp(mesh((world,)))
    loss_fn(model, *batch(0)).backward()  # tensor parallel: the same batch on every rank
    names, grads = grads_of(model)
    with count_collectives() as c:
        norms = full_norms(grads, names=names)
        total = combine_norms(norms)
    out = {"names": names, "norms": norms, "total": total, "counts": dict(c.counts), "placements": _placements(grads)}
    with count_collectives() as c:
        out["rows"] = row_norms(grads)
    out["row_counts"] = dict(c.counts)
    return out


# --------------------------------------------------------------------------- rank functions (4 ranks)


def s_hsdp(rank: int, world: int):
    dm = mesh((2, world // 2), ("replicate", "shard"))
    model = fsdp2_mlp(dm)
    loss_fn(model, *local_batch(0, rank, world)).backward()
    names, grads = grads_of(model)
    with count_collectives() as c:
        norms = full_norms(grads, names=names)
        total = combine_norms(norms)
    # what reducing every rank's local sum over all ranks gives (the over-count the engine avoids)
    naive = torch.stack([local_tensor(g).square().sum() for g in grads])
    dist.all_reduce(naive)
    out = {"names": names, "norms": norms, "total": total, "counts": dict(c.counts), "naive": naive.sqrt()}
    with count_collectives() as c:
        out["rows"] = row_norms(grads)
    out["row_counts"] = dict(c.counts)
    out["torch_total"] = full(torch.nn.utils.get_total_norm(grads))
    out["placements"] = _placements(grads)
    return out


def s_fsdp_tp(rank: int, world: int):
    dm = mesh((2, world // 2), ("dp", "tp"))
    model = fsdp_tp_mlp(dm)
    dp_rank = dm.get_local_rank("dp")
    loss_fn(model, *local_batch(0, dp_rank, 2)).backward()
    names, grads = grads_of(model)
    with count_collectives() as c:
        norms = full_norms(grads, names=names)
        total = combine_norms(norms)
    meshes = {str(g.device_mesh) for g in grads if hasattr(g, "device_mesh")}
    out = {"names": names, "norms": norms, "total": total, "counts": dict(c.counts), "meshes": len(meshes)}
    with count_collectives() as c:
        rows = row_norms(grads)
    out["rows"] = dict(zip(names, rows))
    out["row_counts"] = dict(c.counts)
    out["placements"] = _placements(grads)
    return out


def s_pipeline_hsdp(rank: int, world: int):
    """Pipeline stages over HSDP sub-meshes: mesh (pp=2, replicate=1, shard=2); stage s holds its own tensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dm = mesh((2, 1, world // 2), ("pp", "rep", "shard"))
    stage = dm.get_local_rank("pp")
    sub = dm["rep", "shard"]  # 2-D, spanning only this stage's ranks: reduced through a flattened group
    fulls = [torch.randn(5, 3, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    g = distribute_tensor(fulls[stage], sub, [Replicate(), Shard(0)])
    reducer = NormReducer([f"stage{stage}.weight"], process_group=dm["pp"])
    with count_collectives() as c:
        norms = reducer.norms([g])
        total = reducer.total(norms)
    return {"stage": stage, "fulls": fulls, "norms": norms, "total": total, "counts": dict(c.counts)}


# --------------------------------------------------------------------------- GradWatch end to end

WATCH_STEPS = 3
CLIPPERS = {
    "ClipByGlobalNorm": lambda: gw.ClipByGlobalNorm(MAX_NORM),
    "ClipByNorm": lambda: gw.ClipByNorm(0.3),
    "ClipByValue": lambda: gw.ClipByValue(0.05),
    "AutoClip": lambda: gw.AutoClip(percentile=50.0),
    "ZClip": lambda: gw.ZClip(warmup_steps=2, z_thresh=0.5),
    "AGC": lambda: gw.AGC(clipping=0.05),
    "Chain": lambda: gw.Chain(gw.ClipByValue(0.2), gw.ClipByGlobalNorm(MAX_NORM)),
}
#: all-reduces per watch step: one for the norms; clippers that change gradients element- or unit-wise
#: measure the post-clip norms again (one more); AGC's units one more (rows of Shard(1), whole biases)
WATCH_COLLECTIVES = {"ClipByValue": 2, "Chain": 2, "AGC": 3}


def watch_run(model, data, wrapped=None, accumulate=False, clipper="ClipByGlobalNorm", **kw):
    """WATCH_STEPS attached SGD steps under a watch with ``clipper``: its history, the full weights, the counts."""
    wrapped = model if wrapped is None else wrapped
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    watch = gw.GradWatch(wrapped, clipper=CLIPPERS[clipper](), **kw)
    watch.attach(opt)
    out = {}
    for step in range(WATCH_STEPS):
        opt.zero_grad()
        x, y = data(step)
        if accumulate:  # DDP: the first micro-batch under no_sync
            (x0, x1), (y0, y1) = x.chunk(2), y.chunk(2)
            with wrapped.no_sync():
                (loss_fn(wrapped, x0, y0) / 2).backward()
            (loss_fn(wrapped, x1, y1) / 2).backward()
        else:
            loss_fn(wrapped, x, y).backward()
        if step == 1:  # the watch's own step, counted (syncs and collectives on separate steps)
            with count_host_syncs() as hs:
                watch.step()
            out["syncs"] = hs.syncs
        elif step == 2:
            with count_collectives() as c:
                watch.step()
            out["collectives"] = dict(c.counts)
        opt.step()
    h = watch.history
    watch.close()
    out.update(
        names=h.names,
        **{k: torch.from_numpy(getattr(h, k).copy()) for k in ("norms", "total", "clip_coef", "norms_clipped")},
        total_clipped=torch.from_numpy(h.total_clipped.copy()),
        weights={n: full(p.detach()).clone() for n, p in model.named_parameters()},
    )
    return out


def s_watch_ddp(rank: int, world: int):
    model = MLP()
    ddp = nn.parallel.DistributedDataParallel(model)
    return watch_run(model, lambda s: local_batch(s, rank, world), ddp, accumulate=True)


def s_watch_fsdp2(rank: int, world: int):
    dm = mesh((world,))
    return {k: watch_run(fsdp2_mlp(dm), lambda s: local_batch(s, rank, world), clipper=k) for k in CLIPPERS}


def s_watch_tp(rank: int, world: int):
    dm = mesh((world,))
    return {k: watch_run(tp_mlp(dm), batch, clipper=k) for k in CLIPPERS}


def s_watch_hsdp(rank: int, world: int):
    return watch_run(fsdp2_mlp(mesh((2, world // 2), ("replicate", "shard"))), lambda s: local_batch(s, rank, world))


def s_watch_skip(rank: int, world: int):
    """A NaN in one rank's local shard only: every rank skips the step and names the same parameter."""
    model = fsdp2_mlp(mesh((world,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")])
    watch.attach(opt)
    weights = []
    for step in range(3):
        opt.zero_grad()
        loss_fn(model, *local_batch(step, rank, world)).backward()
        if step == 1 and rank == 1:
            local_tensor(model.down.weight.grad)[0, 0] = math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip's warning
            opt.step()
        weights.append({n: full(p.detach()).clone() for n, p in model.named_parameters()})
    h = watch.history
    watch.close()
    return {"weights": weights, "events": [(e.step, e.kind, e.name) for e in h.events]}


def s_watch_pipeline(rank: int, world: int):
    """Pipeline stages: each rank watches its own part of the model; process_group combines the global norm."""
    model = MLP()
    loss_fn(model, *batch(0)).backward()  # every rank computes the full gradients; each watches its part
    mine = [(n, p) for i, (n, p) in enumerate(model.named_parameters()) if i % world == rank]
    with gw.GradWatch(mine, clipper=gw.ClipByGlobalNorm(MAX_NORM), process_group=dist.group.WORLD) as w:
        w.step()
    h = w.history
    return {"names": h.names, "total": h.total, "coef": h.clip_coef, "norms": h.norms}


def s_watch_sinks(rank: int, world: int):
    d = Path(tempfile.gettempdir()) / f"gradwatch_sinks_{os.environ['MASTER_PORT']}"
    d.mkdir(exist_ok=True)
    model = fsdp2_mlp(mesh((world,)))
    loss_fn(model, *local_batch(0, rank, world)).backward()
    with gw.GradWatch(model, sinks=[gw.CSVSink(d / "run.csv", mode="w")]) as w:  # rank 0 only
        w.step()
    with gw.GradWatch(model, sinks=[gw.CSVSink(rank_path(d / "all.csv"), mode="w")], sinks_rank=None) as w:
        w.step()
    try:
        gw.GradWatch(model, param_norms=True)
        refused = None
    except NotImplementedError as e:
        refused = str(e)
    dist.barrier()
    files = sorted(p.name for p in d.iterdir())
    try:  # the default mode="x" on a file rank 0 already wrote: only rank 0, which would open it, refuses
        gw.CSVSink(d / "run.csv")
        refuses_existing = False
    except FileExistsError:
        refuses_existing = True
    dist.barrier()
    if rank == 0:
        shutil.rmtree(d)
    return {"files": files, "refused": refused, "refuses_existing": refuses_existing}


TWO = [
    s_engine,
    s_rows,
    s_mixed_meshes,
    s_pipeline,
    s_ddp,
    s_fsdp2,
    s_fsdp2_training,
    s_tp,
    s_watch_ddp,
    s_watch_fsdp2,
    s_watch_tp,
    s_watch_skip,
    s_watch_sinks,
    s_watch_pipeline,
]
FOUR = [s_hsdp, s_fsdp_tp, s_pipeline_hsdp, s_watch_hsdp]


@pytest.fixture(scope="module")
def two():
    return run_scenarios(TWO, 2)


@pytest.fixture(scope="module")
def four():
    return run_scenarios(FOUR, 4)


def close(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol)


def ref_norms(fulls, p):
    zero = torch.tensor(0.0, dtype=torch.float64)
    return torch.stack([zero if f is None else torch.linalg.vector_norm(f.double(), p) for f in fulls])


def identical_on_all_ranks(values):
    for v in values[1:]:
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(values[0])), (v, values[0])


def check_engine(res: list[dict], names_ref: dict[str, torch.Tensor]):
    """Norms equal the single-process reference within 1e-5, bit-identical across ranks."""
    ref, ref_total = reference_norms(names_ref)
    for r in res:
        assert r["names"] == list(names_ref)
        close(r["norms"], ref)
        close(r["total"], ref_total)
    identical_on_all_ranks([r["norms"] for r in res])
    identical_on_all_ranks([r["total"] for r in res])


# --------------------------------------------------------------------------- tests: one process


def test_plain_tensors_match_torch_without_collectives():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 3, generator=g), None, torch.randn(4, generator=g, dtype=torch.float64)]
    for p in P_TYPES:
        with count_collectives() as c:
            got = full_norms(ts, p)
        ref = torch.stack([torch.linalg.vector_norm(t.double(), p) if t is not None else torch.tensor(0.0) for t in ts])
        assert got.dtype == torch.float64
        close(got, ref, rtol=1e-6)  # float32 tensors are reduced in float32
        close(combine_norms(got, p), torch.linalg.vector_norm(ref, p), rtol=1e-6)
        assert c.total == 0


def test_half_precision_is_accumulated_in_float32():
    t = torch.randn(1000).to(torch.bfloat16)
    got = full_norms([t])
    assert got.dtype == torch.float32
    close(got[0], torch.linalg.vector_norm(t.double()), rtol=1e-6)


def test_row_norms_plain_match_loop():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, 2, generator=g), torch.randn(4, generator=g)
    rows, whole = row_norms([w, b])
    close(rows, torch.stack([torch.linalg.vector_norm(w[i]) for i in range(4)]), rtol=1e-6)
    close(whole, torch.linalg.vector_norm(b), rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"process_group must be None, a torch\.distributed\.ProcessGroup"):
        NormReducer(process_group="world")
    with pytest.raises(TypeError, match="my_group"):
        check_process_group(0, "my_group")
    with pytest.raises(ValueError, match="norm_type"):
        full_norms([torch.ones(1)], norm_type=0.0)
    with pytest.raises(ValueError, match="norm_type"):
        row_norms([torch.ones(1)], norm_type=float("nan"))


def test_single_process_helpers():
    lin = nn.Linear(2, 2)
    assert not is_ddp(lin) and unwrap_ddp(lin) is lin
    assert (get_rank(), get_world_size()) == (0, 1)
    assert rank_path("a/run.jsonl", 2) == "a/run.rank2.jsonl"


# --------------------------------------------------------------------------- tests: 2 ranks


def test_engine_every_placement_and_norm_type(two):
    res = result_of(two, "s_engine")
    fulls = res[0]["fulls"]
    for p in P_TYPES:
        ref = ref_norms(fulls, p)
        for r in res:
            norms, total = r["norms"][p]
            close(norms, ref)
            close(total, torch.linalg.vector_norm(ref, p))
        identical_on_all_ranks([r["norms"][p][0] for r in res])
        # one all-reduce for the mesh + one per Partial kind (sum, avg): no gather, nothing else
        counts, reported = res[0]["counts"][p]
        assert counts == {"all_reduce": 3} and reported == 3
    for r in res:
        assert r["no_partial_counts"] == ({"all_reduce": 1}, 1)
        close(r["no_partial"], ref_norms(fulls[:6], 2.0))
        # a replicated copy that does not contribute must not turn inf into NaN (inf * 0)
        norms, (rows_inf, rows_nan) = r["non_finite"]
        assert norms[0].isposinf() and norms[1].isnan()
        assert rows_inf.isposinf() and rows_nan.isnan()


def test_row_norms_local_for_shard0_reduced_for_shard1(two):
    for r in result_of(two, "s_rows"):
        shard0, shard1, repl, vec, part = r["fulls"]
        rows = r["rows"]
        ref0 = torch.linalg.vector_norm(shard0, dim=1).chunk(2)[r["rank"]]  # this rank's rows of Shard(0)
        close(rows[0], ref0, rtol=1e-6)
        close(rows[1], torch.linalg.vector_norm(shard1, dim=1), rtol=1e-6)  # full rows of a Shard(1) tensor
        close(rows[2], torch.linalg.vector_norm(repl), rtol=1e-6)  # 1-D: the whole tensor is the unit
        close(rows[3], torch.linalg.vector_norm(vec), rtol=1e-6)
        close(rows[4], torch.linalg.vector_norm(part, dim=1), rtol=1e-6)
        # one all-reduce for the Shard(1) rows and the sharded vector together, one to resolve the Partial
        assert r["counts"] == {"all_reduce": 2}


def test_mixed_meshes_need_an_override(two):
    for rank, r in enumerate(result_of(two, "s_mixed_meshes")):
        assert "'stage.weight'" in r["err"] and "enc.weight" in r["err"] and "process_group=" in r["err"]
        assert r["mesh"] in r["err"]
        close(r["norms"], [math.sqrt(14.0), math.sqrt(3.0) * (rank + 1)], rtol=1e-6)
        assert "process_group must be" in r["type_err"]


def test_pipeline_override_combines_stages(two):
    ref = reference_grads(0)
    res = result_of(two, "s_pipeline")
    assert sorted(n for r in res for n in r["mine"]) == sorted(ref)
    for p in (2.0, math.inf):
        _, ref_total = reference_norms(ref, p)
        for r in res:
            close(r[p], ref_total)
            assert r[("counts", p)] == {"all_reduce": 1}
    for r in res:
        close(r["mesh_group"], reference_norms(ref)[1])


def test_ddp_no_sync_accumulation(two):
    res = result_of(two, "s_ddp")
    check_engine(res, reference_grads(0))
    for r in res:
        assert r["counts"] == {}  # DDP gradients are already averaged: nothing to reduce
        assert r["is_ddp"] == (True, False)


def test_fsdp2_full_norms_one_all_reduce(two):
    res = result_of(two, "s_fsdp2")
    check_engine(res, reference_grads(0))
    for r in res:
        assert all("Shard(dim=0)" in p for p in r["placements"]), r["placements"]
        assert r["counts"] == {"all_reduce": 1}
        buf = r["meter_buf"]
        assert torch.equal(buf[1, :-1], r["norms"]) and torch.equal(buf[1, -1], r["total"])
        assert not buf[0].any() and not buf[2].any()  # nothing written outside the row


def test_fsdp2_row_norms(two):
    ref = reference_grads(0)
    weights = dict(MLP().named_parameters())
    for rank, r in enumerate(result_of(two, "s_fsdp2")):
        P = len(ref)
        for i, name in enumerate(ref):
            for rows, full_t in ((r["rows"][i], ref[name]), (r["rows"][P + i], weights[name].detach())):
                if full_t.ndim >= 2:  # Shard(0): this rank's rows, full row norms
                    expect = torch.linalg.vector_norm(full_t, dim=1).chunk(2)[rank]
                else:
                    expect = torch.linalg.vector_norm(full_t)
                close(rows, expect)
        assert r["row_counts"] == {"all_reduce": 1}  # only the biases' whole-tensor norms


def test_fsdp2_global_clip_matches_clip_grad_norm(two):
    _, ref_total = reference_norms(reference_grads(0))
    assert ref_total > MAX_NORM  # the clip binds
    for r in result_of(two, "s_fsdp2"):
        ours_total, torch_total, ours, theirs = r["clip"]
        close(ours_total, torch_total, rtol=1e-6)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        assert r["clip_counts"] == {"all_reduce": 1}
        assert r["clip_syncs"] == 0
        assert r["torch_clip_counts"].get("all_gather", 0) == 0


def test_fsdp2_clipped_training_matches_reference(two):
    ref = reference_clipped_training(CLIP_STEPS, MAX_NORM)
    res = result_of(two, "s_fsdp2_training")
    for r in res:
        assert all(t > MAX_NORM for t in r["totals"])  # clipped at every step
        for name, w in ref.items():
            torch.testing.assert_close(r["weights"][name], w, rtol=1e-5, atol=1e-6)
    for name in ref:
        identical_on_all_ranks([r["weights"][name] for r in res])


def test_tensor_parallel(two):
    res = result_of(two, "s_tp")
    ref = reference_grads(0)
    check_engine(res, ref)
    for rank, r in enumerate(res):
        assert r["counts"] == {"all_reduce": 1}
        rows = dict(zip(r["names"], r["rows"]))
        # up.weight is Shard(0): this rank's rows; down.weight is Shard(1): rows reduced across the mesh
        close(rows["up.weight"], torch.linalg.vector_norm(ref["up.weight"], dim=1).chunk(2)[rank])
        close(rows["down.weight"], torch.linalg.vector_norm(ref["down.weight"], dim=1))
        close(rows["head.weight"], torch.linalg.vector_norm(ref["head.weight"], dim=1))
        assert r["row_counts"] == {"all_reduce": 1}


# --------------------------------------------------------------------------- tests: 4 ranks


def test_hsdp_2x2_no_over_count(four):
    res = result_of(four, "s_hsdp")
    ref = reference_grads(0)
    check_engine(res, ref)
    rnorms, ref_total = reference_norms(ref)
    for r in res:
        assert r["counts"] == {"all_reduce": 1}
        close(r["torch_total"], ref_total)
        close(r["naive"], rnorms * math.sqrt(2))  # what summing over the replicate dim would record
        assert all("Replicate()" in p and "Shard(dim=0)" in p for p in r["placements"]), r["placements"]
    for rank, r in enumerate(res):
        shard = rank % 2  # mesh (replicate, shard): the shard coordinate
        for (
            name,
            rows,
        ) in zip(r["names"], r["rows"]):
            g = ref[name]
            expect = torch.linalg.vector_norm(g, dim=1).chunk(2)[shard] if g.ndim >= 2 else torch.linalg.vector_norm(g)
            close(rows, expect)


def test_fsdp2_with_tensor_parallel(four):
    res = result_of(four, "s_fsdp_tp")
    ref = reference_grads(0)
    check_engine(res, ref)
    for r in res:
        assert r["counts"] == {"all_reduce": r["meshes"]} and r["meshes"] <= 2, (r["counts"], r["placements"])
    for rank, r in enumerate(res):
        # down.weight is (Shard(0) on dp, Shard(1) on tp): this dp rank's rows, reduced over tp
        dp = rank // 2
        close(r["rows"]["down.weight"], torch.linalg.vector_norm(ref["down.weight"], dim=1).chunk(2)[dp])
        close(r["rows"]["down.bias"], torch.linalg.vector_norm(ref["down.bias"]))
        close(r["rows"]["up.bias"], torch.linalg.vector_norm(ref["up.bias"]))
        # whole-tensor units of the 2-D mesh share one all-reduce; tp rows one; the dp-mesh head bias one
        assert r["row_counts"] == {"all_reduce": 3}


def test_pipeline_over_hsdp_submeshes(four):
    for r in result_of(four, "s_pipeline_hsdp"):
        fulls = r["fulls"]
        close(r["norms"], [torch.linalg.vector_norm(fulls[r["stage"]])])
        close(r["total"], torch.linalg.vector_norm(torch.cat([f.reshape(-1) for f in fulls])))
        assert r["counts"] == {"all_reduce": 2}  # the stage's mesh, then the global norm over the stages


def watch_reference(clipper: str = "ClipByGlobalNorm"):
    torch.manual_seed(0)
    return watch_run(MLP(), batch, clipper=clipper)


def check_watch(res, ref, collectives):
    """Rows and weights equal the single-process watch's; identical on every rank; no host sync."""
    assert bool((ref["clip_coef"] < 1).any())  # the clipper acted
    for r in res:
        assert r["names"] == ref["names"]
        for key in ("norms", "total", "clip_coef", "norms_clipped", "total_clipped"):
            torch.testing.assert_close(r[key], ref[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
        for n, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][n], w, rtol=1e-5, atol=1e-6)
        assert r["syncs"] == 0
        if collectives is not None:
            assert r["collectives"] == collectives
    for key in ("norms", "total", "clip_coef"):
        identical_on_all_ranks([r[key] for r in res])
    for n in ref["weights"]:
        identical_on_all_ranks([r["weights"][n] for r in res])


def test_watch_ddp_no_sync_accumulation(two):
    check_watch(result_of(two, "s_watch_ddp"), watch_reference(), {})


@pytest.mark.parametrize("clipper", list(CLIPPERS))
def test_watch_fsdp2_every_clipper(two, clipper):
    res = [r[clipper] for r in result_of(two, "s_watch_fsdp2")]
    check_watch(res, watch_reference(clipper), {"all_reduce": WATCH_COLLECTIVES.get(clipper, 1)})


@pytest.mark.parametrize("clipper", list(CLIPPERS))
def test_watch_tensor_parallel_every_clipper(two, clipper):
    res = [r[clipper] for r in result_of(two, "s_watch_tp")]
    check_watch(res, watch_reference(clipper), {"all_reduce": WATCH_COLLECTIVES.get(clipper, 1)})


def test_watch_hsdp(four):
    check_watch(result_of(four, "s_watch_hsdp"), watch_reference(), {"all_reduce": 1})


def test_watch_skip_on_every_rank(two):
    res = result_of(two, "s_watch_skip")
    assert res[0]["events"] == res[1]["events"] == [(1, "nonfinite", "down.weight")]
    for r in res:
        for n, w in r["weights"][1].items():
            assert torch.equal(w, r["weights"][0][n])  # step 1 skipped on every rank
            assert not torch.equal(r["weights"][2][n], w)  # step 2 ran
    for n in res[0]["weights"][2]:
        identical_on_all_ranks([r["weights"][2][n] for r in res])


def test_watch_sinks_write_on_rank_zero(two):
    res = result_of(two, "s_watch_sinks")
    assert res[0]["files"] == res[1]["files"] == ["all.rank0.csv", "all.rank1.csv", "run.csv"]
    # the same script builds its sinks on every rank: a rank that will not open the file must not refuse it
    assert [r["refuses_existing"] for r in res] == [True, False]


def test_watch_refuses_weight_norms_of_dtensors(two):
    for r in result_of(two, "s_watch_sinks"):  # rather than the local shards' norms, silently
        assert "param_norms" in r["refused"] and "DTensor" in r["refused"]


def test_watch_pipeline_stages_share_one_global_norm(two):
    ref = reference_grads(0)
    rnorms, ref_total = reference_norms(ref)
    res = result_of(two, "s_watch_pipeline")
    assert sorted(n for r in res for n in r["names"]) == sorted(ref)
    for r in res:
        close(r["total"], [ref_total])  # the whole model's, on every stage
        close(r["coef"], [min(1.0, MAX_NORM / (float(ref_total) + 1e-6))])
        close(r["norms"][0], [rnorms[list(ref).index(n)] for n in r["names"]])  # this stage's own
