"""Detectors and actions: NaN/Inf localisation, spikes, vanishing, skip/raise/warn, AMP."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

import gradwatch as gw
from gradwatch.detect import Observation


def five_layer_mlp():
    layers = []
    for i in range(5):
        layers += [torch.nn.Linear(6, 6), torch.nn.Tanh()] if i < 4 else [torch.nn.Linear(6, 2)]
    return torch.nn.Sequential(*layers)


def poison(module, value):
    """Make the gradient flowing into ``module``'s output non-finite (a tensor hook)."""

    def fwd_hook(mod, inputs, out):
        out.register_hook(lambda g: g * value)

    return module.register_forward_hook(fwd_hook)


def one_step(model, opt, x=None):
    opt.zero_grad()
    model(torch.randn(3, 6) if x is None else x).square().sum().backward()
    opt.step()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_names_the_layer_where_it_entered_first(value):
    model = five_layer_mlp()
    middle = model[4]  # the third of five Linear layers
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="ignore")])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch.attach(opt)
    one_step(model, opt)
    handle = poison(middle, value)
    one_step(model, opt)
    handle.remove()
    events = watch.history.events
    assert events and all(e.kind == "nonfinite" and e.step == 1 for e in events)
    assert events[0].name.startswith("4.")  # where the non-finite value entered the backward pass
    offending = {e.name for e in events}
    assert offending == {n for n in watch.names if n.split(".")[0] in {"0", "2", "4"}}  # it flows backwards
    assert not math.isfinite(watch.history["4.weight"][1])  # recorded as it was, never dropped


def test_skip_leaves_weights_and_adam_state_bit_identical_and_next_step_trains():
    for fused in (False, True):
        model = five_layer_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
        watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")])
        watch.attach(opt)
        x = torch.randn(3, 6)
        one_step(model, opt, x)
        before = copy.deepcopy(model.state_dict())
        opt_before = copy.deepcopy(opt.state_dict())
        twin, twin_opt = copy.deepcopy(model), torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01, fused=fused)
        twin_opt.load_state_dict(opt_before)
        handle = poison(model[4], math.nan)
        with pytest.warns(gw.GradientWarning, match="skipped"):
            one_step(model, opt, x)
            watch.flush()
        handle.remove()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (fused, k)
        after = opt.state_dict()["state"]
        for i, st in opt_before["state"].items():
            for k, v in st.items():
                assert torch.equal(after[i][k], v), (fused, i, k)
        # the next finite step trains exactly as an unwatched copy does
        one_step(model, opt, x)
        one_step(twin, twin_opt, x)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
        assert [e.kind for e in watch.history.events] and watch.history.events[0].step == 1


def test_skipped_step_still_advances_the_lr_scheduler():
    model = five_layer_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")])
    watch.attach(opt)
    poison(model[4], math.nan)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(gw.GradientWarning):
        for _ in range(3):
            one_step(model, opt)
            sched.step()
        watch.flush()
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.125
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def syncs_per_run(detectors, opt, model, steps):
    watch = gw.GradWatch(model, detectors=detectors, flush_every=1000)
    watch.attach(opt)
    with gw.count_host_syncs() as c:
        for _ in range(steps):
            one_step(model, opt)
    return c.syncs


def test_fused_skip_is_sync_free():
    model = five_layer_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    assert syncs_per_run([gw.NonFinite(action="skip")], opt, model, 5) == 0


def test_raise_raises_before_the_weights_change():
    model = five_layer_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="raise")])
    watch.attach(opt)
    one_step(model, opt)
    before = copy.deepcopy(model.state_dict())
    poison(model[2], math.inf)
    with pytest.raises(gw.GradientAnomalyError) as info:
        one_step(model, opt)
    assert info.value.event.step == 1 and info.value.event.name.startswith("2.")
    assert info.value.event.name in str(info.value) and "step 1" in str(info.value)  # the message names both
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_warn_is_rate_limited_and_summarised():
    model = torch.nn.Linear(3, 1)
    watch = gw.GradWatch(model, detectors=[gw.Threshold(1e-9)], flush_every=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    watch.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            one_step(model, opt, torch.randn(2, 3))
        watch.close()
    texts = [str(w.message) for w in caught if issubclass(w.category, gw.GradientWarning)]
    assert len(watch.history.events) == 40
    assert len(texts) == 5 + 1 + 1  # five events, "reached 5", and the summary at close
    assert "35 more threshold events" in texts[-1]
    assert all(w.filename == __file__ for w in caught)  # warnings point at the user's code


def run_norms(norms, detector):
    p = torch.nn.Parameter(torch.zeros(1))
    watch = gw.GradWatch([("p", p)], detectors=[detector], flush_every=100)
    for n in norms:
        p.grad = torch.tensor([float(n)])
        watch.step()
    return watch.history.events


def test_spike_fires_on_a_100x_spike_and_not_on_a_smooth_run():
    rng = np.random.default_rng(0)
    smooth = np.exp(np.cumsum(rng.normal(0, 0.01, 1000))) * (1 + 0.05 * rng.normal(size=1000))
    assert run_norms(smooth, gw.Spike(action="ignore")) == []
    spiky = smooth.copy()
    spiky[500] *= 100
    events = run_norms(spiky, gw.Spike(action="ignore"))
    assert [e.step for e in events] == [500] and events[0].value == pytest.approx(spiky[500], rel=1e-6)
    assert events[0].threshold < spiky[500] / 10


def test_spike_per_param_names_the_parameter():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    watch = gw.GradWatch([("a", a), ("b", b)], detectors=[gw.Spike(per_param=True, warmup_steps=5, action="ignore")])
    for t in range(30):
        a.grad = torch.tensor([1.0 + 0.01 * (t % 3)])
        b.grad = torch.tensor([1000.0 if t == 20 else 1.0 + 0.01 * (t % 2)])
        watch.step()
    events = watch.history.events
    assert {(e.step, e.name) for e in events} == {(20, None), (20, "b")}


def test_vanishing_fires_once_per_run_of_small_norms():
    norms = [1.0] * 5 + [1e-8] * 12 + [1.0] + [1e-8] * 3
    events = run_norms(norms, gw.Vanishing(min_norm=1e-6, patience=10, action="ignore"))
    assert [(e.step, e.name, e.kind) for e in events] == [(14, "p", "vanishing")]


def test_vanishing_ignores_missing_gradients():
    p = torch.nn.Parameter(torch.zeros(1))
    watch = gw.GradWatch([("p", p)], detectors=[gw.Vanishing(patience=2, action="ignore")])
    for _ in range(5):
        p.grad = None
        watch.step()
    assert watch.history.events == []


def test_threshold_on_named_parameters_with_patterns():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    watch = gw.GradWatch(model, detectors=[gw.Threshold(0.5, names=["1.*"], action="ignore")])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    watch.step()
    assert {e.name for e in watch.history.events} == {"1.weight", "1.bias"}
    with pytest.raises(ValueError, match="names"):
        gw.GradWatch(model, detectors=[gw.Threshold(0.5, names=["2.weight"])])


def test_callable_action_receives_events_at_flush():
    seen = []
    run_norms([1.0, 5.0, 1.0, 7.0], gw.Threshold(2.0, action=seen.append))
    assert [(e.step, e.value) for e in seen] == [(1, 5.0), (3, 7.0)]


def test_warn_only_detectors_cost_no_host_sync():
    model = five_layer_mlp()
    detectors = [gw.NonFinite(), gw.Spike(), gw.Vanishing(), gw.Threshold(1e6, names=["0.*"])]
    assert syncs_per_run(detectors, torch.optim.SGD(model.parameters(), lr=0.01), model, 10) == 0


def test_amp_overflow_is_labelled_and_scale_recorded():
    model = five_layer_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    watch = gw.GradWatch(model, scaler=scaler, detectors=[gw.NonFinite(action="raise")])
    watch.attach(opt)
    x = torch.randn(3, 6)
    handle = None
    for step in range(3):
        if step == 1:
            handle = poison(model[6], math.inf)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().sum()
        scaler.scale(loss).backward()
        watch.step()  # unscales once through the scaler, measures the true norms
        scaler.step(opt)
        scaler.update()
        if handle is not None:
            handle.remove()
            handle = None
        if step == 0:
            expected = [torch.linalg.vector_norm(p.grad).item() for p in model.parameters()]
    h = watch.history
    assert len(h) == 3
    np.testing.assert_allclose(h.norms[0], expected, rtol=1e-6)  # unscaled, true norms
    assert h.scale.tolist() == [2.0**10, 2.0**10, 2.0**9]  # the scaler backed off after the overflow
    kinds = {e.kind for e in h.events}
    assert kinds == {"amp_overflow"} and all(e.step == 1 for e in h.events)
    assert h.events[0].name.startswith("6.")


def test_amp_needs_an_attached_optimizer():
    model = torch.nn.Linear(2, 1)
    watch = gw.GradWatch(model, scaler=torch.amp.GradScaler("cpu"))
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="attach"):
        watch.step()


def test_bad_input():
    for make, word in [
        (lambda: gw.NonFinite(action="explode"), "action"),
        (lambda: gw.Threshold(0.0), "max_norm"),
        (lambda: gw.Threshold(-1.0), "max_norm"),
        (lambda: gw.Spike(z_thresh=0), "z_thresh"),
        (lambda: gw.Spike(alpha=1.5), "alpha"),
        (lambda: gw.Spike(warmup_steps=0), "warmup_steps"),
        (lambda: gw.Vanishing(min_norm=0), "min_norm"),
        (lambda: gw.Vanishing(patience=0), "patience"),
    ]:
        with pytest.raises(ValueError, match=word):
            make()
    with pytest.raises(TypeError, match="patience"):  # an integer argument: 2.5 and 3.0 alike are the wrong type
        gw.Vanishing(patience=2.5)
    with pytest.raises(TypeError, match="Detector"):
        gw.GradWatch(torch.nn.Linear(2, 2), detectors=["nan"])


def test_event_str_and_error():
    e = gw.Event(3, "vanishing", "rnn.U", 1e-9, 1e-6)
    assert "rnn.U" in str(e) and "step 3" in str(e)
    assert gw.GradientAnomalyError(e).event is e


def test_spike_statistics_match_a_scalar_reference():
    """Warm-up: population mean/variance of the first finite values; then an EMA of the value capped at the bound."""
    rng = np.random.default_rng(0)
    values = list(rng.lognormal(0.0, 0.3, 40))
    values[3] = math.nan  # not an observation
    values[30] = 50.0  # a spike: capped before it enters the EMA
    spike = gw.Spike(alpha=0.9, z_thresh=3.0, warmup_steps=8, action="ignore")
    spike.bind(gw.Binding.of(["w"], [torch.zeros(1)]))
    got = []
    for v in values:
        t = torch.tensor(v, dtype=torch.float64)
        thr, _ = spike.observe(Observation(0, t.reshape(1), t, []))
        got.append(float(thr["threshold"][0]))
    finite = [v for v in values if math.isfinite(v)]
    mean, var = float(np.mean(finite[:8])), float(np.var(finite[:8]))
    want, seen = [], 0
    for v in values:
        thr = math.inf if seen < 8 else mean + 3.0 * (math.sqrt(var) + 1e-12)
        want.append(thr)
        if not math.isfinite(v):
            continue
        seen += 1
        if seen > 8:
            x = min(v, thr)
            mean = 0.9 * mean + 0.1 * x
            var = 0.9 * var + 0.1 * (x - mean) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-12)
