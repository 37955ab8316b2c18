"""Operations per training step, as regression guards (counts from benchmarks/ops.py, not timings).

On a GPU every tensor operation is a kernel launch, so these bounds guard the
cost of a step. Targets (issues #15, #20): recording adds at most 3 operations
to a plain step; every clipper and detector adds at most 24 (``ops.TARGET``),
whatever the number of parameter tensors and of their shapes; no host sync.
Each bound below is today's count, so that no count can grow unnoticed; where
it is above the target the entry says so (see docs/performance.rst).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ops

#: operations inside clip_ alone (given the watch's norms), today's counts
CLIP_OPS = {
    "ClipByValue": 7,
    "ClipByNorm": 8,
    "ClipByGlobalNorm": 6,
    "ClipByGlobalNorm(norm_type=1)": 9,
    "AutoClip (exact phase)": 15,
    "AutoClip (histogram phase)": 25,  # over the target: two-level histogram update + two binary searches
    "AutoClip(window=100)": 15,
    "ZClip": 23,  # over the target: z-score, bound, table-driven update, coefficient (~20 dependent steps)
    "AGC": 18,  # one buffer and one segment_reduce for all units, whatever the shapes
    "Chain(ClipByGlobalNorm, AutoClip)": 24,  # the sum of its two clippers
}
#: operations a watch with the clipper or detector adds to the plain step, today's counts
ADDED_OPS = {
    **{f"+ {name}": n + 5 for name, n in CLIP_OPS.items()},  # recording (3) + the clipper's row (stack, cat)
    "+ NonFinite": 3,
    "+ Threshold": 3,
    "+ Spike": 18,
    "+ Spike(per_param=True)": 20,
    "+ Vanishing": 11,
}
OVER_TARGET = {"+ AutoClip (histogram phase)", "+ ZClip", "+ Chain(ClipByGlobalNorm, AutoClip)"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Op counts do not depend on threads; one thread keeps these steps quick on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("model", list(ops.MODELS))
def test_recording_adds_at_most_three_ops_and_no_sync(model):
    base_ops, base_syncs, _ = ops.step_ops(model, "plain", warmup=3)
    rec_ops, rec_syncs, _ = ops.step_ops(model, "recording", warmup=3)
    assert rec_ops - base_ops <= 3
    assert rec_syncs == base_syncs


@pytest.mark.parametrize("name", list(ops.CLIPPERS))
def test_clipper_ops_are_bounded_and_independent_of_the_number_of_tensors_and_shapes(name):
    """4 or 64 tensors of 2 shapes, or a transformer's 24 tensors of 5 shapes: the same ops, within the bound."""
    counts = {model: ops.clipper_ops(model, name) for model in ops.MODELS}
    assert len(set(counts.values())) == 1, counts
    for model, (n, syncs) in counts.items():
        assert syncs == 0, (model, syncs)
        assert n <= CLIP_OPS[name], (model, n)


@pytest.mark.parametrize("variant", list(ADDED_OPS))
def test_each_clipper_and_detector_adds_at_most_its_bound_to_a_step_flat_and_sync_free(variant):
    added = {}
    for model in ops.MODELS:
        base_ops, base_syncs, _ = ops.step_ops(model, "plain")
        n, syncs, _ = ops.step_ops(model, variant)
        assert syncs == base_syncs, (model, syncs)
        added[model] = n - base_ops
    assert len(set(added.values())) == 1, added  # any number of tensors and shapes
    assert added["mlp-4"] <= ADDED_OPS[variant], added
    if variant not in OVER_TARGET:
        assert added["mlp-4"] <= ops.TARGET, added


@pytest.mark.parametrize("name", ["NonFinite", "Threshold", "Spike", "Spike(per_param=True)", "Vanishing"])
def test_detector_ops_are_bounded_and_independent_of_the_number_of_tensors(name):
    """A detector adds at most 24 ops on top of recording, for 4 or 64 parameter tensors alike."""
    added = {}
    for model in ("mlp-4", "mlp-64"):
        rec_ops, _, _ = ops.step_ops(model, "recording")
        n, syncs, _ = ops.step_ops(model, f"+ {name}")
        assert syncs == 0
        added[model] = n - rec_ops
    assert added["mlp-4"] == added["mlp-64"], added
    assert added["mlp-4"] <= ops.TARGET, added
