"""The flagship example: NNDL practice 6.2 (gradient explosion in a simple RNN) and the LSTM of 6.3.

The unclipped SRN is chaotic: the same seed follows a different path with
other float kernels (AVX-512, AVX2, scalar), so these tests never pin one
trajectory's value. They assert properties that hold for every seed and every
kernel -- the explosion is orders of magnitude above the clip bound, ``‖∇U‖``
collapses on a large share of steps, the clipped runs keep ``‖∇U‖`` alive, the
tight global clip beats no clipping on average over five seeds. Checked with
the native kernels (AVX-512 here) and with ``ATEN_CPU_CAPABILITY=avx2`` and
``ATEN_CPU_CAPABILITY=default`` (scalar).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "srn_digit_sum"
sys.path.insert(0, str(EXAMPLE))

import data  # noqa: E402
import train  # noqa: E402
from model import LSTM, SRNClassifier  # noqa: E402

import gradwatch as gw  # noqa: E402

BOOK_SHA256 = {
    "train": "60acd43edbd569d2befba492b9be3c4fc7487b631c1492f8f456dfc162fdde40",
    "dev": "355c8598debbf3cd31b2a3a6aae5cec8e79a379cc2e86231dfa79d35bfc74e5f",
    "test": "93da6b804adce3a7c8b33674cde53b59f2e33eb1d9a11b6a80408a0d1ac6f90f",
}
SEEDS = (0, 1, 2, 3, 4)
BOUND = 5.0  # the book's ClipByNorm(5)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digit_sum")
    data.write(root, [20])
    return root, data.load(root, 20)


def test_data_files_are_byte_identical_to_the_book(splits):
    root, _ = splits
    for split, digest in BOOK_SHA256.items():
        assert hashlib.sha256((root / "20" / f"{split}.txt").read_bytes()).hexdigest() == digest


def test_data_shapes_and_labels(splits):
    _, sp = splits
    assert [len(sp[s][0]) for s in ("train", "dev", "test")] == [300, 100, 100]
    x, y = sp["train"]
    assert x.shape == (300, 20) and (y == x[:, 0] + x[:, 1]).all()


def test_model_shapes_and_parameter_names():
    model = SRNClassifier()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == {
        "rnn_model.W": (32, 32),
        "rnn_model.U": (32, 32),
        "rnn_model.b": (1, 32),
        "embedding.W": (10, 32),
        "linear.weight": (19, 32),
        "linear.bias": (19,),
    }
    assert model(torch.zeros(4, 20, dtype=torch.long)).shape == (4, 19)
    assert (model.linear.bias == 0).all()


def test_lstm_has_the_srn_sizes_and_a_parameter_per_gate():
    model = SRNClassifier(cell="lstm")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for g in "ifoc":
        assert shapes.pop(f"rnn_model.W_{g}") == (32, 32)
        assert shapes.pop(f"rnn_model.U_{g}") == (32, 32)
        assert shapes.pop(f"rnn_model.b_{g}") == (1, 32)
    assert shapes == {"embedding.W": (10, 32), "linear.weight": (19, 32), "linear.bias": (19,)}
    with pytest.raises(ValueError, match="cell must be one of"):
        SRNClassifier(cell="gru")


@pytest.mark.parametrize("tapped", [False, True])
def test_lstm_matches_torch_nn_lstm(tapped):
    """Both code paths (torch.lstm without a tap, the Python loop with one) against nn.LSTM, values and grads."""
    torch.manual_seed(0)
    ours = LSTM(32, 32).double()
    ref = torch.nn.LSTM(32, 32, batch_first=True).double()
    order = "ifco"  # nn.LSTM stacks the gates as input, forget, cell, output
    with torch.no_grad():
        ref.weight_ih_l0.copy_(torch.cat([getattr(ours, f"W_{g}") for g in order], 1).t())
        ref.weight_hh_l0.copy_(torch.cat([getattr(ours, f"U_{g}") for g in order], 1).t())
        ref.bias_ih_l0.copy_(torch.cat([getattr(ours, f"b_{g}") for g in order], 1).view(-1))
        ref.bias_hh_l0.zero_()
    x = torch.randn(6, 20, 32, dtype=torch.float64)
    seen = []
    out = ours(x, tap=(lambda t, name: seen.append(name) or t) if tapped else None)
    ref_out = ref(x)[0][:, -1]
    torch.testing.assert_close(out, ref_out)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    torch.testing.assert_close(ours.U_f.grad, ref.weight_hh_l0.grad[32:64].t())
    torch.testing.assert_close(ours.W_c.grad, ref.weight_ih_l0.grad[64:96].t())
    torch.testing.assert_close(ours.b_o.grad.view(-1), ref.bias_ih_l0.grad[96:])
    assert seen == ([f"h{t}" for t in range(1, 21)] + [f"c{t}" for t in range(1, 21)] if tapped else [])


@pytest.fixture(scope="module")
def sweep(splits):
    """The 6.2 configuration (50 epochs) over five seeds: unclipped, ClipByNorm(5), ClipByGlobalNorm(1)."""
    _, sp = splits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and does not stall on a busy machine
    try:
        runs = {}
        for clipper in ("none", "ClipByNorm(5)", "ClipByGlobalNorm(1)"):
            seeds = SEEDS if clipper != "ClipByNorm(5)" else SEEDS[:3]
            runs[clipper] = [train.run(train.Config(clipper=clipper, seed=s), sp) for s in seeds]
    finally:
        torch.set_num_threads(threads)
    return runs


def test_unclipped_srn_explodes_early_on_every_seed(sweep):
    peaks = []
    for r in sweep["none"]:
        w = r.history["rnn_model.W"]
        assert len(w) == 250
        assert np.nanmax(w) > 40 * BOUND  # every seed: far above the book's clip bound
        assert np.flatnonzero(w > 20 * BOUND)[0] < 30  # within the first steps
        peaks.append(np.nanmax(w))
    assert np.median(peaks) > 200 * BOUND  # typically thousands: orders of magnitude above the bound


def test_unclipped_srn_saturates_and_learns_nothing(sweep):
    frac = [np.mean(r.history["rnn_model.U"] < 1e-3) for r in sweep["none"]]
    assert min(frac) > 0.3 and np.mean(frac) > 0.45  # tanh saturates: ‖∇U‖ collapses on many steps
    assert max(r.test_acc for r in sweep["none"]) < 0.15  # at chance (1/19) or the majority class (0.10)


def test_clip_by_norm_keeps_the_gradients_alive_on_every_seed(sweep):
    for r in sweep["ClipByNorm(5)"]:
        h = r.history
        assert (h["rnn_model.U"] > 1e-2).all()
        assert (h.norms_clipped <= BOUND * (1 + 1e-5)).all()  # the per-tensor clip held
        # pre-clip, the clipped run's typical ‖∇W‖ stays far below the unclipped runs' peaks
        assert np.median(h["rnn_model.W"]) < 40 * BOUND


def test_vanishing_detector_fires_on_every_unclipped_seed_only(sweep):
    for r in sweep["none"]:
        assert any(e.name == "rnn_model.U" for e in r.history.events_of("vanishing"))
    for clipper in ("ClipByNorm(5)", "ClipByGlobalNorm(1)"):
        assert all(r.history.events_of("vanishing") == [] for r in sweep[clipper])


def test_tight_global_clip_beats_no_clipping_over_seeds(sweep):
    none = np.array([r.test_acc for r in sweep["none"]])
    tight = np.array([r.test_acc for r in sweep["ClipByGlobalNorm(1)"]])
    assert tight.mean() > none.mean() + 0.05
    assert np.median(tight) > 0.12
    for r in sweep["ClipByGlobalNorm(1)"]:
        assert (r.history.total_clipped <= 1.0 + 1e-5).all()


def test_runs_are_deterministic(splits):
    _, sp = splits
    cfg = train.Config(clipper="none", epochs=4)
    h1, h2 = train.run(cfg, sp).history, train.run(cfg, sp).history
    np.testing.assert_array_equal(h1.norms, h2.norms)


def test_gradient_through_time_taps(splits):
    _, sp = splits
    r = train.run(train.Config(clipper="ClipByNorm(5)", epochs=2, tap_steps=(0, 3)), sp)
    h = r.history
    assert h.tap_names == [f"h{t}" for t in range(1, 21)]
    rows = np.isfinite(h.taps).all(axis=1)
    assert h.steps[rows].tolist() == [0, 3]
    # the loss reads only h_20, so its gradient is the largest; earlier states get less
    assert (h.taps[rows, -1] >= h.taps[rows, 0]).all()


def test_lstm_run_records_gates_and_taps(splits):
    _, sp = splits
    r = train.run(train.Config(model="lstm", epochs=2, tap_steps=(0, 5)), sp)
    h = r.history
    assert [n for n in h.names if n.startswith("rnn_model.U_")] == [f"rnn_model.U_{g}" for g in "ifoc"]
    assert h.tap_names == [f"h{t}" for t in range(1, 21)] + [f"c{t}" for t in range(1, 21)]
    rows = np.isfinite(h.taps).all(axis=1)
    assert h.steps[rows].tolist() == [0, 5]
    assert (h.taps[rows] > 0).all()  # gradient reaches every h_t and c_t
    s = r.summary()
    assert s["model"] == "lstm" and s["peak_U"] > 0


@pytest.mark.slow
def test_quick_command_writes_every_artefact(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--quick", "--out", str(out), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    figures = ("fig_6_8", "fig_6_8_log", "fig_6_9", "fig_6_9_log", "grad_through_time", "lstm_gates")
    for name in (*figures, "clipping", "accuracy"):
        assert (out / f"{name}.png").stat().st_size > 500, name
    results = json.loads((out / "results.json").read_text())
    assert {r["clipper"] for r in results["table"] if r["model"] == "srn"} == set(train.CLIPPERS)
    assert {r["clipper"] for r in results["table"] if r["model"] == "lstm"} == {"none", "ClipByGlobalNorm(1)"}
    assert len(results["runs"]) == 2 * (len(train.CLIPPERS) + 2)
    assert results["meta"]["kernel"] == torch.backends.cpu.get_cpu_capability()
    md = (out / "results.md").read_text()
    assert "| SRN | ClipByGlobalNorm(1) |" in md and "| LSTM | none |" in md and "ddof=1" in md
    for label, first in (("A", "rnn_model.W"), ("C", "rnn_model.W_i")):
        assert gw.History.load(out / f"run_{label}.npz").names[0] == first
    assert str(out.resolve()) in res.stdout
    assert "CPU kernel:" in res.stdout
