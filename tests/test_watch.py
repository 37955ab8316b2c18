"""GradWatch and History: recorded norms, accumulation, hooks, syncs, bad input."""

import copy

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwatch as gw
from gradwatch.norms import HOOK_MIN_NUMEL


def train(model, steps, watch=None, opt_cls=torch.optim.SGD, batches=None, **opt_kw):
    opt = opt_cls(model.parameters(), lr=0.05, **opt_kw)
    if watch is not None:
        watch.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 8, generator=g, dtype=next(model.parameters()).dtype)
        model(x).square().sum().backward()
        opt.step()
    return opt


def reference_norms(model):
    return [torch.linalg.vector_norm(p.grad).item() for p in model.parameters()]


@pytest.mark.parametrize("measure", ["hook", "step"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-6)])
def test_norms_equal_vector_norm(measure, dtype, rtol):
    model = mlp(dtype=dtype)
    watch = gw.GradWatch(model, measure=measure)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch.attach(opt)
    expected = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, dtype=dtype)).square().sum().backward()
        # the reference for half precision: the norm accumulated in float64
        expected.append([torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()])
        opt.step()
    h = watch.history
    assert h.norms.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_allclose(h.norms, expected, rtol=rtol)
    np.testing.assert_allclose(h.total, np.linalg.norm(np.array(expected), axis=1), rtol=max(rtol, 1e-6))
    assert h.steps.tolist() == [0, 1, 2]
    assert h.names == [n for n, _ in model.named_parameters()]


def test_auto_measures_large_gradients_in_backward_hooks_and_small_ones_at_the_step():
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Linear(256, 3))
    assert model[0].weight.numel() >= HOOK_MIN_NUMEL > model[1].weight.numel()
    watch = gw.GradWatch(model)  # measure="auto"
    model(torch.randn(4, 512)).square().sum().backward()
    truth = np.array([torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()])
    for p in model.parameters():
        p.grad.mul_(2.0)  # changed after backward: a norm taken in the hook still has backward's value
    watch.step()
    norms = watch.history.norms[0]
    np.testing.assert_allclose(norms[0], truth[0], rtol=1e-6)  # the hooked weight, measured during backward
    np.testing.assert_allclose(norms[1:], 2 * truth[1:], rtol=1e-6)  # the rest, measured at the step


def test_step_mode_total_has_the_bits_of_clip_grad_norm():
    model = mlp()
    watch = gw.GradWatch(model, measure="step")
    model(torch.randn(4, 8)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    watch.step()
    h = watch.history
    assert h.total[0] == torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
    np.testing.assert_allclose(h.norms[0], [torch.linalg.vector_norm(g.double()).item() for g in grads], rtol=1e-6)


@pytest.mark.parametrize("measure", ["hook", "step"])
def test_accumulation_records_one_row_with_the_accumulated_norm(measure):
    model = mlp()
    watch = gw.GradWatch(model, measure=measure)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        for _ in range(4):
            model(torch.randn(4, 8)).square().sum().backward()
        expected = reference_norms(model)
        opt.step()
    h = watch.history
    assert len(h) == 2
    np.testing.assert_allclose(h.norms[-1], expected, rtol=1e-6)


def test_tied_parameters_are_counted_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    watch = gw.GradWatch(model)
    assert watch.names == ["0.weight"]
    model(torch.tensor([1, 2, 3])).sum().backward()
    watch.step()
    np.testing.assert_allclose(watch.history.norms[0], [emb.weight.grad.norm().item()], rtol=1e-6)


def test_frozen_parameters_are_ignored_and_missing_grads_recorded_as_zero():
    model = mlp()
    model[0].weight.requires_grad_(False)
    watch = gw.GradWatch(model)
    assert "0.weight" not in watch.names
    model(torch.randn(2, 8)).sum().backward()
    model[2].bias.grad = None  # a parameter without a gradient this step
    watch.step()
    h = watch.history
    j = h.names.index("2.bias")
    assert h.norms[0, j] == 0.0 and np.isfinite(h.norms[0]).all()
    assert h.grad_missing[0].tolist() == [n == "2.bias" for n in h.names]


def test_parameter_never_given_a_grad_does_not_crash():
    model = mlp()
    unused = torch.nn.Linear(8, 8)
    named = [*model.named_parameters(), ("unused.weight", unused.weight)]
    watch = gw.GradWatch(named)
    opt = torch.optim.SGD([p for _, p in named], lr=0.1)
    watch.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    h = watch.history
    assert h.grad_missing[:, -1].all() and (h.norms[:, -1] == 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"clipper": gw.ClipByGlobalNorm(0.1)},
        {"clipper": gw.Chain(gw.ClipByNorm(1.0), gw.AutoClip()), "detectors": [gw.NonFinite(), gw.Spike()]},
        {"clipper": gw.ZClip(warmup_steps=3), "detectors": [gw.Vanishing(), gw.Threshold(1.0, action="ignore")]},
        {"measure": "step", "clipper": gw.AGC(), "every": 2},
    ],
)
def test_zero_host_syncs_per_step(kwargs):
    model = mlp()
    watch = gw.GradWatch(model, flush_every=1000, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch.attach(opt)
    x = torch.randn(4, 8)
    with gw.count_host_syncs() as counter:
        for _ in range(10):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert counter.syncs == 0
    assert counter.host_copies == 0  # nothing leaves the device between flushes
    with gw.count_host_syncs() as counter:
        watch.flush()
    assert counter.syncs == 0
    assert counter.host_copies == 1  # exactly one device-to-host copy per flush


def test_flush_every_and_every():
    model = mlp()
    flushed = []

    class Probe:
        def open(self, names, meta):
            pass

        def write(self, chunk):
            flushed.append(chunk.steps.tolist())

        def close(self):
            pass

    watch = gw.GradWatch(model, every=3, flush_every=2, sinks=[Probe()])
    train(model, 10, watch)
    assert flushed == [[0, 3], [6, 9]]
    assert watch.history.steps.tolist() == [0, 3, 6, 9]


def test_close_leaves_model_training_exactly_as_unwatched():
    a = mlp()
    b = copy.deepcopy(a)
    watch = gw.GradWatch(a, detectors=[gw.NonFinite()])
    train(a, 3, watch)
    watch.close()
    train(b, 3)
    train(a, 5)
    train(b, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(not p._post_accumulate_grad_hooks for p in a.parameters())
    assert len(watch.history) == 3


def test_watching_without_clipper_does_not_change_training():
    a = mlp()
    b = copy.deepcopy(a)
    with gw.GradWatch(a, detectors=[gw.NonFinite(), gw.Spike(), gw.Vanishing()]) as watch:
        train(a, 5, watch, opt_cls=torch.optim.Adam)
    train(b, 5, opt_cls=torch.optim.Adam)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_attach_twice_does_not_double_record():
    model = mlp()
    watch = gw.GradWatch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch.attach(opt).attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    assert watch.history.steps.tolist() == [0, 1, 2]


def test_manual_step_while_attached_records_once():
    model = mlp()
    watch = gw.GradWatch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        watch.step()
        opt.step()
    assert len(watch.history) == 3


def test_history_property_flushes_and_save_load_round_trip(tmp_path):
    model = mlp()
    watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(0.5), detectors=[gw.Threshold(0.1, action="ignore")])
    train(model, 7, watch)
    h = watch.history
    assert len(h) == 7 and len(h.events) > 0
    h.save(tmp_path / "run.npz")
    g = gw.History.load(tmp_path / "run.npz")
    assert g.names == h.names and g.events == h.events and g.meta == h.meta
    for key in ("steps", "norms", "norms_clipped", "grad_missing", "total", "total_clipped", "clip_coef", "scale"):
        a, b = getattr(h, key), getattr(g, key)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_nan_is_recorded_as_nan_and_survives_save(tmp_path):
    model = mlp()
    watch = gw.GradWatch(model)
    model[2].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    model(torch.randn(2, 8)).sum().backward()
    watch.step()
    h = watch.history
    assert np.isnan(h["2.weight"][0]) and np.isnan(h.total[0])
    h.save(tmp_path / "nan.npz")
    assert np.isnan(gw.History.load(tmp_path / "nan.npz")["2.weight"][0])


def test_unknown_name_lists_closest():
    h = gw.History(["rnn_model.W", "rnn_model.U", "rnn_model.b"])
    with pytest.raises(KeyError, match=r"rnn_model\.W"):
        h["rnn_model.w"]


def test_load_rejects_foreign_file(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a gradwatch history"):
        gw.History.load(tmp_path / "x.npz")


def test_tap_records_activation_gradient_norms():
    lin = torch.nn.Linear(3, 3)
    watch = gw.GradWatch(lin)
    hs = []
    x = torch.randn(2, 3)
    h = x
    for t in range(3):
        h = watch.tap(torch.tanh(lin(h)), f"h{t}")
        h.retain_grad()
        hs.append(h)
    h.sum().backward()
    watch.step()
    hist = watch.history
    assert hist.tap_names == ["h0", "h1", "h2"]
    for t in range(3):
        np.testing.assert_allclose(hist[f"h{t}"], [hs[t].grad.norm().item()], rtol=1e-6)


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        gw.GradWatch(42)
    with pytest.raises(TypeError, match="model"):
        gw.GradWatch([1, 2])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        gw.GradWatch(frozen)
    for arg in ("every", "flush_every"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match=arg):
                gw.GradWatch(mlp(), **{arg: bad})
        for bad in (1.5, 3.0, True):
            with pytest.raises(TypeError, match=arg):
                gw.GradWatch(mlp(), **{arg: bad})
    with pytest.raises(ValueError, match="measure"):
        gw.GradWatch(mlp(), measure="fast")
    with pytest.raises(TypeError, match="clipper"):
        gw.GradWatch(mlp(), clipper=torch.nn.utils.clip_grad_norm_)
    with pytest.raises(TypeError, match="optimizer"):
        gw.GradWatch(mlp()).attach("sgd")
    watch = gw.GradWatch(mlp())
    watch.close()
    watch.close()  # twice is fine
    with pytest.raises(RuntimeError, match="after close"):
        watch.step()


def test_named_parameter_iterable_and_state_dict_round_trip():
    model = mlp()
    watch = gw.GradWatch(model.named_parameters(), clipper=gw.AutoClip(), detectors=[gw.Spike()])
    train(model, 4, watch)
    state = watch.state_dict()
    other = gw.GradWatch(model.named_parameters(), clipper=gw.AutoClip(), detectors=[gw.Spike()])
    other.load_state_dict(state)
    assert other.state_dict()["step"] == 4
    torch.testing.assert_close(other.clipper.state_dict()["history"], state["clipper"]["history"])


def test_auto_measures_large_tensors_in_hooks_and_is_accurate():
    big = torch.nn.Linear(1024, 1024)  # 1M weights: hooked under measure="auto"
    watch = gw.GradWatch(big)
    assert watch._meter.hooked == [True, False]
    big(torch.randn(8, 1024)).square().sum().backward()
    watch.step()
    truth = [torch.linalg.vector_norm(p.grad.double()).item() for p in big.parameters()]
    np.testing.assert_allclose(watch.history.norms[0], truth, rtol=2e-6)


def test_gradients_changed_after_backward_need_measure_step():
    """Documented: hooks see the gradient backward produced; "step" sees the current one."""
    for measure, factor in (("hook", 1.0), ("step", 0.5)):
        lin = torch.nn.Linear(4, 4)
        watch = gw.GradWatch(lin, measure=measure)
        lin(torch.randn(2, 4)).sum().backward()
        before = lin.weight.grad.norm().item()
        lin.weight.grad.mul_(0.5)  # e.g. a user's own clipping between backward and step
        watch.step()
        assert watch.history["weight"][0] == pytest.approx(before * factor, rel=1e-6)
