"""``History.save`` and ``meta``: what JSON can hold round-trips exactly, anything else is a ``TypeError``
naming the key, and what gradwatch writes in ``meta`` itself always saves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradwatch as gw


def _history(meta: dict) -> gw.History:
    h = gw.History(["w", "b"], meta)
    h.append(steps=[0, 1], norms=[[3.0, 4.0], [1.0, 0.0]])
    return h


def test_numbers_numpy_scalars_and_one_element_tensors_round_trip(tmp_path):
    meta = {
        "lr": 0.1,
        "steps": 3,
        "flag": True,
        "none": None,
        "name": "run",
        "nested": {"betas": [0.9, 0.999], "eps": 1e-8},
        "np_float32": np.float32(0.1),
        "np_float64": np.float64(0.1),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "tensor": torch.tensor(0.1),
        "tensor_1": torch.tensor([2.5], dtype=torch.float64),
        "tensor_int": torch.tensor(5),
        "in_list": [torch.tensor(1.5), np.float64(2.0)],
    }
    path = tmp_path / "h.npz"
    _history(meta).save(path)
    got = gw.History.load(path).meta
    assert got["lr"] == 0.1 and got["steps"] == 3 and got["flag"] is True and got["none"] is None
    assert got["name"] == "run" and got["nested"] == {"betas": [0.9, 0.999], "eps": 1e-8}
    # numpy scalars and one-element tensors come back as the Python number .item() gives
    assert got["np_float32"] == float(np.float32(0.1)) and type(got["np_float32"]) is float
    assert got["np_float64"] == 0.1 and got["np_int"] == 7 and got["np_bool"] is True
    assert type(got["tensor"]) is float and got["tensor"] == torch.tensor(0.1).item()
    assert got["tensor_1"] == 2.5 and type(got["tensor_1"]) is float
    assert got["tensor_int"] == 5 and type(got["tensor_int"]) is int
    assert got["in_list"] == [1.5, 2.0]
    assert not any(isinstance(v, str) and v.startswith("tensor(") for v in got.values())


def test_a_value_json_cannot_hold_is_a_type_error_naming_the_key(tmp_path):
    path = tmp_path / "h.npz"
    with pytest.raises(TypeError, match=r"meta\['opt'\].*object"):
        _history({"lr": 0.1, "opt": object()}).save(path)
    with pytest.raises(TypeError, match=r"meta\['weights'\]"):
        _history({"weights": torch.ones(3)}).save(path)  # not one element
    with pytest.raises(TypeError, match=r"meta\['deep'\]"):
        _history({"deep": {"x": [1, {2, 3}]}}).save(path)  # a set, nested
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_a_failing_save_leaves_the_earlier_file_intact(tmp_path):
    path = tmp_path / "h.npz"
    _history({"lr": 0.1}).save(path)
    good = path.read_bytes()
    bad = _history({"lr": 0.1, "opt": object()})
    with pytest.raises(TypeError, match="opt"):
        bad.save(path)
    assert path.read_bytes() == good
    assert gw.History.load(path).meta == {"lr": 0.1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.npz"]


def test_what_gradwatch_writes_in_meta_saves(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(
        model,
        clipper=gw.ClipByGlobalNorm(1.0),
        detectors=[gw.NonFinite(action="ignore"), gw.Spike()],
        recorder=gw.FlightRecorder(before=2, after=1),
    )
    watch.attach(opt)
    for i in range(4):
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        (loss * math.nan if i == 2 else loss).backward()
        opt.step()
    watch.close()
    h = watch.history
    assert h.incidents
    path = tmp_path / "run.npz"
    h.save(path)
    assert gw.History.load(path).meta == h.meta
    assert {"clipper", "detectors", "every", "measure", "recorder"} <= set(h.meta)
    grouped = h.grouped(1)
    grouped.save(path)
    assert gw.History.load(path).meta == grouped.meta
    h.meta["incidents_dropped"] = np.int64(0)  # what a flight recorder may store
    h.save(path)
    assert gw.History.load(path).meta["incidents_dropped"] == 0
