"""The trustworthy core: nothing recorded is lost, steps stay intact after errors, the optimizer gate.

Each test here failed on gradwatch 0.1.0 (commit 781628e) and passes now.
"""

import copy
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwatch as gw


def batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=g, dtype=dtype) for _ in range(n)]


def loss_of(model, x):
    return model(x).square().sum()


class Boom(gw.Sink):
    """A sink that fails on its first write."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def _write(self, chunk):
        self.calls += 1
        if self.calls == 1:
            raise OSError("disk full")


class Keep(gw.Sink):
    def __init__(self):
        super().__init__()
        self.steps = []

    def _write(self, chunk):
        self.steps += chunk.steps.tolist()


# -- no data loss -------------------------------------------------------------------------
def test_a_failing_sink_loses_no_rows_and_the_error_reaches_the_user():
    model = mlp()
    keep = Keep()
    watch = gw.GradWatch(model, sinks=[Boom(), keep], flush_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch.attach(opt)
    xs = batches(4)
    for i, x in enumerate(xs):
        opt.zero_grad()
        loss_of(model, x).backward()
        if i == 1:
            with pytest.raises(OSError, match="disk full"):
                opt.step()
        else:
            opt.step()
    assert watch.history.steps.tolist() == [0, 1, 2, 3]
    assert keep.steps == [0, 1, 2, 3]  # the other sink got every row, the failing one's too


@pytest.mark.parametrize("how", ["callback", "warning-as-error"])
def test_a_raising_reaction_loses_no_rows(how):
    model = mlp()
    keep = Keep()
    if how == "callback":
        det = gw.Threshold(1e-9, action=lambda e: (_ for _ in ()).throw(ValueError("callback failed")))
        err = ValueError
    else:
        det = gw.Threshold(1e-9, action="warn")
        err = gw.GradientWarning
    watch = gw.GradWatch(model, detectors=[det], sinks=[keep], flush_every=1)
    x = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_of(model, x).backward()
        with pytest.raises(err):
            watch.step()
    assert watch.history.steps.tolist() == [0] and keep.steps == [0]
    assert [e.kind for e in watch.history.events] == ["threshold"]


def test_interpreter_exit_after_an_uncaught_exception_flushes_pending_rows(tmp_path):
    path = tmp_path / "run.csv"
    script = f"""
import torch, gradwatch as gw
model = torch.nn.Linear(3, 1)
watch = gw.GradWatch(model, sinks=[gw.CSVSink({str(path)!r})], flush_every=1000)
for _ in range(5):
    model(torch.ones(2, 3)).sum().backward()
    watch.step()
raise SystemExit("crash") if False else RuntimeError("training crashed")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "training crashed" in proc.stderr
    assert gw.read_csv(path).steps.tolist() == [0, 1, 2, 3, 4]


def test_save_is_atomic_and_serialises_numpy_scalars(tmp_path, monkeypatch):
    path = tmp_path / "run.npz"
    h = gw.History(["w"])
    h.append([0], [[1.0]], events=[gw.Event(np.int64(0), "spike", "w", np.float32(4.5), np.float64(2.0))])
    h.save(path)
    good = path.read_bytes()
    back = gw.History.load(path)
    assert back.events == [gw.Event(0, "spike", "w", 4.5, 2.0)]

    def broken(*args, **kwargs):
        args[0].write(b"PK\x03\x04 half a file")
        raise OSError("no space left on device")

    monkeypatch.setattr(np, "savez_compressed", broken)
    h.append([1], [[2.0]])
    with pytest.raises(OSError, match="no space"):
        h.save(path)
    assert path.read_bytes() == good  # the earlier good file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]  # no temporary left behind


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_load_of_an_empty_or_truncated_file_is_a_value_error(tmp_path, content):
    path = tmp_path / "run.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a gradwatch history"):
        gw.History.load(path)


# -- step integrity after an exception ---------------------------------------------------
@pytest.mark.parametrize("failure", ["raise", "sink"])
def test_the_step_after_an_exception_is_measured_clipped_and_numbered(failure):
    model = mlp()
    ref = copy.deepcopy(model)
    kw = {"measure": "step", "clipper": gw.ClipByGlobalNorm(0.5), "flush_every": 1}
    if failure == "raise":
        watch = gw.GradWatch(model, detectors=[gw.Threshold(1e6, action="raise")], **kw)
    else:
        watch = gw.GradWatch(model, sinks=[Boom()], **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    watch.attach(opt)
    xs = batches(4)
    fails_at = 1 if failure == "raise" else 0  # the sink fails at its first write (after step 0 applied)
    for i, x in enumerate(xs):
        opt.zero_grad()
        scale = 1e7 if (failure == "raise" and i == 1) else 1.0
        (scale * loss_of(model, x)).backward()
        try:
            opt.step()
        except (gw.GradientAnomalyError, OSError):
            assert i == fails_at  # the user catches it and goes on
        if failure == "raise" and i == 1:
            continue  # raised before the update: the step was not applied
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
    h = watch.history
    assert h.steps.tolist() == [0, 1, 2, 3]
    assert (h.total_clipped[[0, 2, 3]] <= 0.5 + 1e-6).all()
    for p, q in zip(model.parameters(), ref.parameters()):  # every later step measured and clipped
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- closures --------------------------------------------------------------------------------
def test_closure_optimizer_records_and_clips_this_steps_gradients():
    model = mlp()
    ref = copy.deepcopy(model)
    watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(0.3), measure="step")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    watch.attach(opt)
    expected = []
    for x in batches(5):

        def closure(x=x):
            opt.zero_grad()
            loss = loss_of(model, x)
            loss.backward()
            return loss

        opt.step(closure)
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        expected.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3).item())
        ref_opt.step()
    h = watch.history
    assert len(h) == 5
    np.testing.assert_allclose(h.total, expected, rtol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lbfgs_records_one_row_per_step_after_the_first_evaluation():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    watch = gw.GradWatch(model, measure="step")
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    watch.attach(opt)
    firsts = []
    for _ in range(3):
        evaluations = []

        def closure(evaluations=evaluations):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            evaluations.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm().item())
            return loss

        opt.step(closure)
        assert len(evaluations) > 1  # LBFGS evaluated several times in this step ...
        firsts.append(evaluations[0])
    h = watch.history  # ... and the watch recorded each step once, at its first evaluation
    assert h.steps.tolist() == [0, 1, 2]
    np.testing.assert_allclose(h.total, firsts, rtol=1e-6)


# -- several optimizers ---------------------------------------------------------------------
def test_several_optimizers_give_one_row_and_one_clip_per_iteration():
    model = mlp()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    watch = gw.GradWatch(model, clipper=gw.AutoClip(percentile=50), measure="step")
    opts = [torch.optim.SGD(params[:2], lr=0.05), torch.optim.Adam(params[2:], lr=0.01)]
    for o in opts:
        watch.attach(o)
    ref_params = list(ref.parameters())
    ref_clip = gw.AutoClip(percentile=50)
    ref_opts = [torch.optim.SGD(ref_params[:2], lr=0.05), torch.optim.Adam(ref_params[2:], lr=0.01)]
    for x in batches(6):
        for o in opts:
            o.zero_grad()
        loss_of(model, x).backward()
        for o in opts:
            o.step()
        for o in ref_opts:
            o.zero_grad()
        loss_of(ref, x).backward()
        ref_clip(ref)
        for o in ref_opts:
            o.step()
    assert watch.history.steps.tolist() == list(range(6))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- skip never corrupts ------------------------------------------------------------------
FUSED = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.Adagrad, {"lr": 0.1}),
]


@pytest.mark.parametrize(("opt_cls", "kw"), FUSED, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("bad_step", [0, 2])
def test_skip_equals_a_run_where_that_step_never_happened(opt_cls, kw, bad_step):
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")], measure="step")
    opt = opt_cls(model.parameters(), fused=True, **kw)
    ref_opt = opt_cls(ref.parameters(), fused=True, **kw)
    watch.attach(opt)
    xs = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.GradientWarning)
        for i, x in enumerate(xs):
            opt.zero_grad()
            loss = loss_of(model, x)
            if i == bad_step:
                loss = loss * math.nan
            loss.backward()
            opt.step()
            if i != bad_step:
                ref_opt.zero_grad()
                loss_of(ref, x).backward()
                ref_opt.step()
        assert [e.step for e in watch.history.events_of("nonfinite")][:1] == [bad_step]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# -- detectors that cannot wedge training ----------------------------------------------------
def test_spike_whose_warmup_saw_only_nan_does_not_fire_forever():
    model = mlp()
    detectors = [gw.NonFinite(action="skip"), gw.Spike(warmup_steps=3, action="skip")]
    watch = gw.GradWatch(model, detectors=detectors, measure="step")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch.attach(opt)
    applied = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.GradientWarning)
        for i, x in enumerate(batches(12)):
            opt.zero_grad()
            (loss_of(model, x) * (math.nan if i < 4 else 1.0)).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            applied.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    assert applied == [False] * 4 + [True] * 8  # NaN steps skipped, every finite one applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert watch.history.events_of("spike") == []


def test_spike_per_param_does_not_learn_from_missing_gradients():
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
    spike = gw.Spike(alpha=0.5, warmup_steps=5, per_param=True, action="ignore")
    watch = gw.GradWatch(model, detectors=[spike])
    x = torch.randn(8, 4)
    for i in range(30):
        for p in model.parameters():
            p.grad = None
        out = model["a"](x).sum()
        if not 10 <= i < 20:  # b's gradient is None for ten steps, then the same as before
            out = out + model["b"](x).sum()
        out.backward()
        watch.step()
    h = watch.history
    assert h.grad_missing[:, 2].sum() == 10
    # the zeros recorded for the missing gradient are no observations: b's return is no spike
    # (the global norm, which really grows when b's gradient comes back, may fire)
    assert [e for e in h.events if e.name is not None] == []


# -- parameters that join later, duplicate names --------------------------------------------
def test_unfrozen_parameters_are_named_in_a_one_time_warning():
    model = mlp()
    model[0].requires_grad_(False)
    watch = gw.GradWatch(model, flush_every=1)
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"0\.weight.*0\.bias|0\.bias.*0\.weight") as rec:
        for x in batches(3):
            model.zero_grad()
            loss_of(model, x).backward()
            watch.step()
    assert sum("not watched" in str(w.message) for w in rec) == 1


def test_parameter_group_added_after_attach_is_warned_about():
    model = mlp()
    extra = torch.nn.Parameter(torch.ones(3))
    watch = gw.GradWatch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch.attach(opt)
    opt.add_param_group({"params": [extra]})
    with pytest.warns(UserWarning, match="not watched"):
        opt.zero_grad()
        (loss_of(model, batches(1)[0]) + extra.sum()).backward()
        opt.step()


def test_duplicate_names_are_rejected():
    enc, dec = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    pairs = [*enc.named_parameters(), *dec.named_parameters()]
    with pytest.raises(ValueError, match="'weight'"):
        gw.GradWatch(pairs)


def test_compiled_names_equal_eager_names():
    model = mlp()
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert gw.GradWatch(wrapped).names == gw.GradWatch(model).names


# -- History: O(new rows) reads, unknown columns -------------------------------------------
def test_reading_history_every_step_does_not_copy_earlier_rows():
    model = mlp()
    watch = gw.GradWatch(model, flush_every=1)
    x = batches(1)[0]
    views = []
    for _ in range(300):
        model.zero_grad()
        loss_of(model, x).backward()
        watch.step()
        views.append(watch.history.norms)
    # consecutive reads share memory until the store grows; it grew O(log S) times, not S times
    buffers = {v.__array_interface__["data"][0] for v in views}
    assert len(buffers) <= 25
    assert not views[-1].flags.writeable
    np.testing.assert_array_equal(views[100], views[-1][:101])


def test_unknown_columns_are_nan_and_known_says_so():
    h = gw.History(["w"], unknown=["norms_clipped"])
    h.append([0, 1], [[3.0], [4.0]], clip_coef=[0.5, 1.0])
    assert not h.known("norms_clipped") and h.known("clip_coef")
    assert np.isnan(h.norms_clipped).all()
    assert h.summary()[0]["clipped"] is None
    with pytest.raises(ValueError, match="unknown"):
        gw.History(["w"], unknown=["norms"])


# -- wrapped optimizers, AMP without attach -------------------------------------------------
def test_attach_unwraps_a_hookless_optimizer_wrapper():
    class AcceleratedLike(torch.optim.Optimizer):  # subclasses Optimizer without calling __init__
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self, closure=None):
            return self.optimizer.step(closure)

    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model).attach(AcceleratedLike(inner))
    loss_of(model, batches(1)[0]).backward()
    AcceleratedLike(inner).step()
    assert len(watch.history) == 1

    class Opaque(torch.optim.Optimizer):
        def __init__(self):
            pass

    with pytest.raises(TypeError, match="Opaque"):
        watch.attach(Opaque())


def test_scaler_without_attach_works_once_the_gradients_are_unscaled():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    watch = gw.GradWatch(model, scaler=scaler)
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    with pytest.raises(RuntimeError, match="unscale_"):
        watch.step()  # nothing attached and nothing unscaled: the norms would be 1024x too large
    scaler.unscale_(opt)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    watch.step()
    scaler.step(opt)
    scaler.update()
    h = watch.history
    assert h.steps.tolist() == [0]  # the failed attempt took no step index
    np.testing.assert_allclose(h.total, [expected], rtol=1e-6)
    assert h.scale.tolist() == [1024.0]


def test_an_optimizer_step_that_raises_loses_no_row_when_the_buffer_is_full():
    """The flush runs after the optimizer's step; if that step raises, the next watch step flushes first."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, flush_every=1)
    watch.attach(opt)

    def explode(*_):
        raise RuntimeError("optimizer failed")

    handle = opt.register_step_pre_hook(explode)  # runs after the watch's pre-hook
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="optimizer failed"):
        opt.step()
    handle.remove()
    for x in batches(2):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
    assert watch.history.steps.tolist() == [0, 1, 2]
