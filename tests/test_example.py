"""The flagship example: NNDL practice 6.2 (gradient explosion in a simple RNN)."""

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
from model import SRNClassifier  # noqa: E402

import gradwatch as gw  # noqa: E402

BOOK_SHA256 = {
    "train": "60acd43edbd569d2befba492b9be3c4fc7487b631c1492f8f456dfc162fdde40",
    "dev": "355c8598debbf3cd31b2a3a6aae5cec8e79a379cc2e86231dfa79d35bfc74e5f",
    "test": "93da6b804adce3a7c8b33674cde53b59f2e33eb1d9a11b6a80408a0d1ac6f90f",
}


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


@pytest.fixture(scope="module")
def book_runs(splits):
    _, sp = splits
    torch.set_num_threads(2)
    a = train.run(train.Config(clipper="none"), sp)
    b = train.run(train.Config(clipper="ClipByNorm(5)"), sp)
    return a, b


def test_exploding_configuration_explodes_then_saturates(book_runs):
    a, _ = book_runs
    h = a.history
    assert len(h) == 250
    assert np.nanmax(h["rnn_model.W"]) > 1000  # the explosion
    assert np.argmax(h["rnn_model.W"]) < 30  # early in training
    assert np.mean(h["rnn_model.U"] < 1e-3) > 0.4  # then tanh saturates
    assert a.test_acc < 0.15  # and nothing is learnt


def test_clip_by_norm_keeps_the_gradients_alive(book_runs):
    _, b = book_runs
    h = b.history
    assert (h["rnn_model.U"] > 1e-3).all()
    assert (h.norms_clipped <= 5.0 * (1 + 1e-5)).all()  # the per-tensor clip held


def test_vanishing_detector_fires_on_the_exploding_run_only(book_runs):
    a, b = book_runs
    assert any(e.name == "rnn_model.U" for e in a.history.events_of("vanishing"))
    assert b.history.events_of("vanishing") == []


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
    for name in ("fig_6_8.png", "fig_6_9.png", "grad_through_time.png", "clipping.png", "results.md", "results.json"):
        assert (out / name).stat().st_size > 500, name
    results = json.loads((out / "results.json").read_text())
    assert {r["clipper"] for r in results["table"]} == set(train.CLIPPERS)
    assert len(results["runs"]) == 2 * len(train.CLIPPERS)
    assert "| ClipByGlobalNorm(1) |" in (out / "results.md").read_text()
    h = gw.History.load(out / "run_A.npz")
    assert h.names[:3] == ["rnn_model.W", "rnn_model.U", "rnn_model.b"]
    assert str(out.resolve()) in res.stdout
