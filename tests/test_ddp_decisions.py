"""Issue #20 (1-2): under DistributedDataParallel no watch decides from a rank's local gradients.

Parameter hooks fire before DDP's all-reduce, so a gradient measured in a hook
is the rank's own. Clippers and skip/raise detectors must decide from what the
optimizer applies -- the all-reduced gradient -- or every rank decides
differently and the replicas fork. Covered on 2 gloo ranks, one spawn:

* the watch built on the DDP model with ``measure="hook"`` forced: measured at
  the step instead (with a warning), so clipping and skipping agree on every rank;
* the watch built on the bare module and DDP wrapping it afterwards (the watch
  cannot see DDP): at the first step the meter finds the parameters whose
  gradients DDP's reducer owns and measures them at the step from then on;
* recording-only hook watches keep working (with a warning) and record the
  synchronized norms;
* without DDP (pipeline stages: world size 2, no reducer) the hooks stay.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _dist_harness import result_of, run_scenarios
from torch import nn

import gradwatch as gw
from gradwatch._compat import reduced_after_hooks
from gradwatch.norms import HOOK_MIN_NUMEL

WIDTH = 256  # the first layer's weight has WIDTH**2 = 65,536 elements: hooked under measure="auto"
STEPS = 4
MAX_NORM = 0.05
NAN_STEP = 1


def wide(seed: int = 0) -> nn.Sequential:
    """Linear(256, 256) -> tanh -> Linear(256, 4): one hooked weight under "auto", the rest fused."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def wide_batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, WIDTH, generator=g), torch.randn(n, 4, generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean()  # a mean over equal local batches: DDP's average is the global loss


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(rank: int, world: int, *, wrap_after: bool, measure: str, clipper=None, skip=False, nan=False):
    """STEPS attached SGD steps of DDP(wide()) under a watch built before or after the wrap."""
    model = wide()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detectors = [gw.NonFinite(action="skip")] if skip else []
        if wrap_after:
            watch = gw.GradWatch(model, clipper=clipper, detectors=detectors, measure=measure)
            ddp = nn.parallel.DistributedDataParallel(model)
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
            watch = gw.GradWatch(ddp, clipper=clipper, detectors=detectors, measure=measure)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        watch.attach(opt)
        weights = [weights_of(model)]
        for step in range(STEPS):
            opt.zero_grad()
            x, y = wide_batch(step)
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            if nan and step == NAN_STEP and rank == 1:
                x[0, 0] = math.nan  # one rank's batch: DDP's all-reduce spreads the NaN to every rank
            loss_of(ddp, x, y).backward()
            opt.step()
            weights.append(weights_of(model))
        h = watch.history
        watch.close()
    return {
        "weights": weights,
        "norms": torch.from_numpy(h.norms.copy()),
        "total": torch.from_numpy(h.total.copy()),
        "clip_coef": torch.from_numpy(h.clip_coef.copy()) if clipper is not None else None,
        "events": [(e.step, e.kind, e.name) for e in h.events],
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
    }


# --------------------------------------------------------------------------- scenarios (on each rank)


def s_before_hook_clip(rank, world):
    return train(rank, world, wrap_after=False, measure="hook", clipper=gw.ClipByGlobalNorm(MAX_NORM))


def s_before_step_clip(rank, world):
    return train(rank, world, wrap_after=False, measure="step", clipper=gw.ClipByGlobalNorm(MAX_NORM))


def s_before_hook_skip(rank, world):
    return train(rank, world, wrap_after=False, measure="hook", skip=True, nan=True)


def s_after_hook_skip(rank, world):
    return train(rank, world, wrap_after=True, measure="hook", skip=True, nan=True)


def s_after_auto_skip(rank, world):
    return train(rank, world, wrap_after=True, measure="auto", skip=True, nan=True)


def s_after_auto_clip(rank, world):
    return train(rank, world, wrap_after=True, measure="auto", clipper=gw.ClipByGlobalNorm(MAX_NORM))


def s_after_hook_clip(rank, world):
    return train(rank, world, wrap_after=True, measure="hook", clipper=gw.ClipByGlobalNorm(MAX_NORM))


def s_before_hook_record(rank, world):
    return train(rank, world, wrap_after=False, measure="hook")


def s_after_hook_record(rank, world):
    return train(rank, world, wrap_after=True, measure="hook")


def s_probe(rank, world):
    """Which parameters a reducer owns; a bare model on 2 ranks (a pipeline stage) keeps its hooks."""
    bare = wide()
    out = {"bare": reduced_after_hooks(list(bare.parameters()))}
    with gw.GradWatch(bare) as watch:  # measure="auto": the 256x256 weight in a hook
        loss_of(bare, *wide_batch(0)).backward()
        watch.step()
        out["bare_hooked"] = list(watch._meter.hooked)
    model = wide()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["2.bias"])
    ddp = nn.parallel.DistributedDataParallel(model)
    out["ddp"] = reduced_after_hooks(list(model.parameters()))
    del ddp
    out["released"] = reduced_after_hooks(list(model.parameters()))
    return out


SCENARIOS = [
    s_before_hook_clip,
    s_before_step_clip,
    s_before_hook_skip,
    s_after_hook_skip,
    s_after_auto_skip,
    s_after_auto_clip,
    s_after_hook_clip,
    s_before_hook_record,
    s_after_hook_record,
    s_probe,
]


@pytest.fixture(scope="module")
def two():
    return run_scenarios(SCENARIOS, 2)


# --------------------------------------------------------------------------- single-process references


def reference(clip: bool = True) -> dict:
    """The same training on the global batch in one process (``clip_grad_norm_``), and its gradient norms."""
    model = wide()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights, norms = [weights_of(model)], []
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, *wide_batch(step)).backward()
        norms.append(torch.stack([p.grad.double().norm() for p in model.parameters()]))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        weights.append(weights_of(model))
    return {"weights": weights, "norms": torch.stack(norms)}


def same_on_both_ranks(res: list[dict]) -> None:
    for w0, w1 in zip(res[0]["weights"], res[1]["weights"]):
        for n in w0:
            assert torch.equal(w0[n], w1[n]), f"replicas differ in {n}"
    torch.testing.assert_close(res[0]["norms"], res[1]["norms"], rtol=0, atol=0, equal_nan=True)
    assert res[0]["events"] == res[1]["events"]


def close_to(res: list[dict], ref: dict) -> None:
    for r in res:
        for w, wr in zip(r["weights"], ref["weights"]):
            for n in wr:
                torch.testing.assert_close(w[n], wr[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["norms"].double(), ref["norms"], rtol=1e-5, atol=1e-7)


def hook_warning(res: list[dict]) -> None:
    for r in res:
        assert any("measure='hook'" in w and "all-reduce" in w for w in r["warnings"]), r["warnings"]


# --------------------------------------------------------------------------- tests


def test_forced_hook_clipper_on_ddp_clips_the_synchronized_gradient(two):
    """Item 1: every rank clips by the global norm of the all-reduced gradients, as measure="step" does."""
    res, step_run = result_of(two, "s_before_hook_clip"), result_of(two, "s_before_step_clip")
    same_on_both_ranks(res)
    for r in res:
        assert (r["clip_coef"] < 1).all()  # the clipper binds at every step
        for w, ws in zip(r["weights"], step_run[0]["weights"]):
            for n in ws:
                assert torch.equal(w[n], ws[n])
    close_to(res, reference())
    hook_warning(res)


def test_forced_hook_skip_on_ddp_skips_on_every_rank(two):
    """Item 2: a NaN in one rank's batch reaches every rank through the all-reduce: every rank skips."""
    for name in ("s_before_hook_skip", "s_after_hook_skip", "s_after_auto_skip"):
        res = result_of(two, name)
        same_on_both_ranks(res)
        for r in res:
            before, after = r["weights"][NAN_STEP], r["weights"][NAN_STEP + 1]
            for n in before:
                assert torch.equal(after[n], before[n]), f"{name}: step {NAN_STEP} not skipped ({n})"
                assert torch.isfinite(r["weights"][-1][n]).all()
                assert not torch.equal(r["weights"][-1][n], after[n])  # the later steps ran
            assert [e[:2] for e in r["events"]] and all(e[:2] == (NAN_STEP, "nonfinite") for e in r["events"])


def test_wrapped_afterwards_auto_clips_by_the_global_norm(two):
    """Item 2, second part: the watch built before DDP wraps the module measures what DDP applies."""
    assert wide()[0].weight.numel() >= HOOK_MIN_NUMEL  # measured in a hook when the watch is built
    res = result_of(two, "s_after_auto_clip")
    same_on_both_ranks(res)
    close_to(res, reference())
    for r in res:
        assert (r["clip_coef"] < 1).all()
        assert r["warnings"] == []  # "auto" picks the step-time measurement silently, as for a DDP model


def test_wrapped_afterwards_forced_hook_clips_by_the_global_norm(two):
    res = result_of(two, "s_after_hook_clip")
    same_on_both_ranks(res)
    close_to(res, reference())
    hook_warning(res)


def test_recording_only_hook_watch_under_ddp_warns_and_records_the_synchronized_norms(two):
    ref = reference(clip=False)
    for name in ("s_before_hook_record", "s_after_hook_record"):
        res = result_of(two, name)
        same_on_both_ranks(res)
        close_to(res, ref)
        hook_warning(res)
        for r in res:
            assert sum("measure='hook'" in w for w in r["warnings"]) == 1  # once, not at every step


def test_reducer_owned_parameters_are_found_and_pipeline_stages_keep_their_hooks(two):
    for r in result_of(two, "s_probe"):
        assert r["bare"] == [False] * 4  # world size 2 without DDP (a pipeline stage): hooks are right
        assert r["bare_hooked"] == [True, False, False, False]
        assert r["ddp"] == [True, True, True, False]  # 2.bias is ignored by DDP: never reduced
        assert r["released"] == [False] * 4
