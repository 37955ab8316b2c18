"""Unusual but legitimate training set-ups: create_graph, sparse gradients, converted models, odd parameters."""

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwatch as gw

MODES = ["auto", "hook", "step"]


def torch_norms(model):
    out = []
    for p in model.parameters():
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        out.append(torch.linalg.vector_norm(g.detach().double()).item())
    return out


@pytest.mark.parametrize("measure", MODES)
def test_create_graph_gradients_are_measured_and_clipped_like_torch(measure):
    """Gradient penalties and second-order methods run backward(create_graph=True)."""
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Tanh(), torch.nn.Linear(300, 1))
    watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(0.5), measure=measure)
    x = torch.randn(8, 300)
    model(x).square().sum().backward(create_graph=True)
    expected = torch_norms(model)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for r, p in zip(ref, model.parameters()):
        r.grad = p.grad.detach().clone()
    torch.nn.utils.clip_grad_norm_(ref, 0.5)  # torch clips such gradients (under no_grad); so must we
    watch.step()
    np.testing.assert_allclose(watch.history.norms[0], expected, rtol=1e-5)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad.detach(), r.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("measure", MODES)
def test_sparse_gradients_are_recorded(measure):
    emb = torch.nn.Embedding(70_000, 4, sparse=True)  # big enough to be hooked in "auto"
    head = torch.nn.Linear(4, 1)
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    watch = gw.GradWatch(model, measure=measure)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    watch.attach(opt)
    for _ in range(3):
        model.zero_grad()
        head(emb(torch.tensor([1, 1, 5, 69_999]))).sum().backward()
        expected = torch_norms(model)
        opt.step()
    np.testing.assert_allclose(watch.history.norms[-1], expected, rtol=1e-6)


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("measure", MODES)
def test_a_model_converted_after_the_watch_was_built_still_records(convert, measure):
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 2))  # 90,000-element weight
    watch = gw.GradWatch(model, measure=measure)
    getattr(model, convert)()
    dtype = next(model.parameters()).dtype
    model(torch.randn(4, 300, dtype=dtype)).square().sum().backward()
    expected = torch_norms(model)
    watch.step()
    np.testing.assert_allclose(watch.history.norms[0], expected, rtol=1e-2 if convert != "double" else 1e-6)


def test_a_model_moved_to_another_device_is_a_clear_error():
    model = mlp()
    watch = gw.GradWatch(model)
    model.to("meta")
    with pytest.raises(RuntimeError, match="build the GradWatch after moving"):
        watch.step()


def test_zero_element_and_complex_parameters():
    model = torch.nn.Module()
    model.empty = torch.nn.Linear(3, 0)
    model.z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    watch = gw.GradWatch(model, detectors=[gw.Vanishing(min_norm=1e-3, patience=1, action="ignore")])
    for _ in range(3):
        model.zero_grad()
        (model.empty(torch.ones(2, 3)).sum() + (model.z * model.z.conj()).real.sum()).backward()
        watch.step()
    h = watch.history
    assert h.names == ["z", "empty.weight", "empty.bias"]
    np.testing.assert_allclose(h["z"], [torch.linalg.vector_norm(model.z.grad).item()] * 3, rtol=1e-6)
    assert (h["empty.weight"] == 0).all() and h.events == []  # an empty parameter is not "vanishing"


def test_unused_parameter_with_zeroed_grads_is_not_vanishing():
    """zero_grad(set_to_none=False) leaves all-zero gradients on unused parameters."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2), "unused": torch.nn.Linear(2, 2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, detectors=[gw.Vanishing(min_norm=1e-3, patience=2, action="ignore")])
    watch.attach(opt)
    for p in model.parameters():  # as after a step that used every parameter, or DDP's find_unused_parameters
        p.grad = torch.zeros_like(p)
    for _ in range(5):
        opt.zero_grad(set_to_none=False)
        model["used"](torch.ones(1, 2)).sum().backward()
        opt.step()
    assert watch.history.events_of("vanishing") == []
    # a live parameter whose gradient then dies is reported
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        (0 * model["used"](torch.ones(1, 2)).sum()).backward()
        opt.step()
    assert {e.name for e in watch.history.events_of("vanishing")} == {"used.weight", "used.bias"}


def test_bad_arguments_name_the_argument():
    bad = [({"detectors": None}, "detectors"), ({"sinks": None}, "sinks"), ({"flush_every": 2**62}, "flush_every")]
    for kw, word in bad:
        with pytest.raises((TypeError, ValueError), match=word):
            gw.GradWatch(mlp(), **kw)
    with pytest.raises(TypeError, match="names"):
        gw.Threshold(1.0, names=5)
    for make, word in [
        (lambda: gw.Spike(alpha=float("nan")), "alpha"),
        (lambda: gw.Spike(warmup_steps=float("inf")), "warmup_steps"),
        (lambda: gw.Spike(eps=-1.0), "eps"),
        (lambda: gw.Vanishing(min_norm=float("inf")), "min_norm"),
        (lambda: gw.Vanishing(patience=3.0), "patience"),
        (lambda: gw.Threshold(float("nan")), "max_norm"),
    ]:
        with pytest.raises((TypeError, ValueError), match=word):
            make()


def test_huge_flush_every_allocates_lazily():
    model = mlp()
    watch = gw.GradWatch(model, flush_every=10**9)  # would be 10**9 rows if allocated up front
    for _ in range(70):
        model.zero_grad()
        model(torch.ones(1, 8)).sum().backward()
        watch.step()
    assert len(watch.history) == 70


def test_detector_state_from_another_configuration_is_rejected_at_load():
    a = gw.GradWatch(mlp(), detectors=[gw.Spike(per_param=True)])
    b = gw.GradWatch(mlp(depth=2), detectors=[gw.Spike(per_param=True)])
    m = a.params
    for p in m:
        p.grad = torch.ones_like(p)
    a.step()
    with pytest.raises(ValueError, match="values"):
        b.load_state_dict(a.state_dict())
    c = gw.GradWatch(mlp(), detectors=[gw.Vanishing()])
    with pytest.raises(ValueError, match=r"Spike|Vanishing"):
        c.load_state_dict(a.state_dict())


def test_a_sink_that_refuses_to_open_closes_the_ones_opened_before_it(tmp_path):
    a = gw.JSONLSink(tmp_path / "a.jsonl")
    with pytest.raises(FileExistsError):
        gw.GradWatch(mlp(), sinks=[a, _RefusingSink()])
    assert a.closed


class _RefusingSink(gw.Sink):
    def open(self, names, meta):
        raise FileExistsError("refused")

    def _write(self, chunk):
        raise AssertionError("never written")
