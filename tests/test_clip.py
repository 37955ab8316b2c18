"""Clippers against their references: torch, PaddlePaddle's formula, numpy, the papers."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwatch as gw


def params_with_grads(shapes, dtypes=None, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtypes = dtypes or [torch.float32] * len(shapes)
    ps = []
    for shape, dt in zip(shapes, dtypes):
        p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dt))
        p.grad = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dt)
        ps.append(p)
    return ps


def twin(ps):
    """An independent copy of parameters and their gradients."""
    out = []
    for p in ps:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def grads_of(ps):
    return [p.grad.clone() for p in ps]


SHAPES = [(16, 8), (8,), (4, 3, 3, 3), ()]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_global_norm_is_bit_identical_to_torch(norm_type, max_norm):
    a = params_with_grads(SHAPES, scale=3.0)
    b = twin(a)
    ours = gw.ClipByGlobalNorm(max_norm, norm_type)(a)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm, norm_type, foreach=True)
    assert torch.equal(ours, ref)
    for pa, pb in zip(a, b):
        assert torch.equal(pa.grad, pb.grad)


def test_global_norm_mixed_float32_float64_is_bit_identical():
    dts = [torch.float32, torch.float64, torch.float32, torch.float64]
    a = params_with_grads(SHAPES, dts, scale=3.0)
    b = twin(a)
    assert torch.equal(gw.ClipByGlobalNorm(1.0)(a), torch.nn.utils.clip_grad_norm_(b, 1.0))
    for pa, pb in zip(a, b):
        assert pa.grad.dtype == pb.grad.dtype and torch.equal(pa.grad, pb.grad)


def train_side_by_side(watch_kwargs, clip_b, steps):
    """Train a watched model and a twin clipped by ``clip_b(twin)`` on the same data."""
    a = mlp()
    b = copy.deepcopy(a)
    watch = gw.GradWatch(a, **watch_kwargs)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    watch.attach(oa)
    for _ in range(steps):
        x = torch.randn(4, 8)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().sum().backward()
            if m is b:
                clip_b(b)
            o.step()
    return a, b, watch


def test_global_norm_inside_watch_matches_torch_training_bit_for_bit():
    # measure="step" measures with torch's own kernels: bit-identical norms and clipping
    clip = gw.ClipByGlobalNorm(0.3)
    a, b, watch = train_side_by_side(
        {"clipper": clip, "measure": "step"}, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3), 5
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    h = watch.history
    assert (h.clip_coef < 1).all() and h.clip_fraction == 1.0
    np.testing.assert_allclose(h.total_clipped, 0.3, rtol=1e-5)


def test_clip_by_value_equals_torch():
    a = params_with_grads(SHAPES, scale=2.0)
    b = twin(a)
    gw.ClipByValue(0.7)(a)
    torch.nn.utils.clip_grad_value_(b, 0.7)
    for pa, pb in zip(a, b):
        assert torch.equal(pa.grad, pb.grad)


def clip_by_norm_reference(g, clip_norm):
    """paddle.nn.ClipGradByNorm as a float64 numpy loop: a tensor above the bound is rescaled to it."""
    x = g.double().numpy()
    n = math.sqrt(sum(float(v) * float(v) for v in x.reshape(-1)))
    return x * (clip_norm / n) if n > clip_norm else x


def test_clip_by_norm_equals_paddle_reference_and_per_tensor_clip_grad_norm():
    a = params_with_grads(SHAPES, scale=2.0)
    before = grads_of(a)
    b = twin(a)
    total = gw.ClipByNorm(3.0)(a)
    assert total.item() == pytest.approx(np.linalg.norm(np.concatenate([g.numpy().ravel() for g in before])), rel=1e-6)
    clipped = 0
    for p, q, g in zip(a, b, before):
        np.testing.assert_allclose(p.grad.double().numpy(), clip_by_norm_reference(g, 3.0), rtol=1e-6, atol=0)
        # one tensor at a time, torch's global clip is the per-tensor clip (up to its +1e-6 in the divisor)
        torch.nn.utils.clip_grad_norm_([q], 3.0)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
        clipped += bool(g.norm() > 3.0)
    assert 0 < clipped < len(a)  # some tensors above the bound, some below


def agc_reference(p, g, clipping, eps):
    """A plain per-unit loop, written from the paper's formula."""
    out = g.clone()
    units = [...] if p.ndim <= 1 else range(p.shape[0])
    for u in units:
        w_norm = max(p[u].norm().item(), eps)
        g_norm = g[u].norm().item()
        if g_norm / w_norm > clipping:
            out[u] = g[u] * (clipping * w_norm / max(g_norm, 1e-6))
    return out


@pytest.mark.parametrize("clipping", [0.01, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shapes",
    [[(6, 3, 3, 3), (5, 4), (5,), ()], [(6, 3, 3, 3), (5, 4), (5,), (4, 7)]],
    ids=["with-a-scalar", "one-buffer"],  # the second: every unit from one buffer and one segment_reduce
)
def test_agc_equals_per_unit_loop(clipping, dtype, shapes):
    ps = params_with_grads(shapes, [dtype] * len(shapes), scale=0.3)
    ps[1].data[2] = 0.0  # a dead unit: weight norm floored at eps
    before = grads_of(ps)
    named = [(f"p{i}", p) for i, p in enumerate(ps)]
    gw.AGC(clipping=clipping, eps=1e-3)(named)
    for p, g in zip(ps, before):
        torch.testing.assert_close(p.grad, agc_reference(p.detach(), g, clipping, 1e-3), rtol=1e-5, atol=1e-7)


def test_agc_exclude_by_name_and_pattern():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 10
    gw.AGC(exclude=["1.*"])(model)
    assert (model[1].weight.grad == 10).all() and (model[1].bias.grad == 10).all()
    assert (model[0].weight.grad < 10).all()
    with pytest.raises(ValueError, match="exclude"):
        gw.AGC(exclude=["head.weight"])(model)
    with pytest.raises(ValueError, match="exclude"):
        gw.GradWatch(model, clipper=gw.AGC(exclude=["nope"]))


def run_autoclip(norms, percentile, window):
    clip = gw.AutoClip(percentile, window)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    thresholds = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clip([p])
        thresholds.append(clip.threshold().item())
    return thresholds, p


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("percentile", [10.0, 50.0, 73.3, 100.0])
def test_autoclip_threshold_equals_numpy_percentile(window, percentile):
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(size=300)) * 3
    thresholds, _ = run_autoclip(norms, percentile, window)
    for t in range(len(norms)):
        hist = norms[: t + 1] if window is None else norms[max(0, t + 1 - window) : t + 1]
        assert thresholds[t] == pytest.approx(np.percentile(hist, percentile), rel=1e-12)


def test_autoclip_skips_nonfinite_norms_and_clips_like_clip_grad_norm():
    norms = [1.0, 2.0, math.nan, 3.0, math.inf, 4.0]
    thresholds, p = run_autoclip(norms, 50.0, None)
    finite = [1.0, 2.0, 3.0, 4.0]
    assert thresholds[-1] == np.percentile(finite, 50.0)
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    q.grad = torch.tensor([4.0], dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([q], float(np.percentile(finite, 50.0)))
    assert p.grad.item() == pytest.approx(q.grad.item(), rel=1e-12) and p.grad.item() < 4.0


def zclip_reference(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6, max_norm=None):
    """Step by step scalar ZClip (the algorithm of arXiv:2504.02507, zscore/adaptive; package zclip 1.0.0).

    With ``max_norm`` as the package's ``max_grad_norm``: ``clip_grad_norm_(max_norm)`` at every warm-up
    step, after it the norm is scaled only when it is above ``min(bound, max_norm)``.
    """
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if not math.isfinite(g):
            out.append(g)
            continue
        if mean is None:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(g if max_norm is None else g * min(max_norm / (g + 1e-6), 1.0))
            continue
        std = var**0.5
        z = (g - mean) / (std + eps)
        v = g
        if z > z_thresh:
            v = mean + z_thresh * std / (z / z_thresh)
        cap = v if max_norm is None else min(v, max_norm)
        out.append(g * (cap / (g + 1e-6)) if g > cap else g)
        mean = alpha * mean + (1 - alpha) * v
        var = alpha * var + (1 - alpha) * (v - mean) ** 2
    return out


def test_zclip_equals_scalar_reference_with_spikes():
    rng = np.random.default_rng(1)
    norms = list(1.0 + 0.1 * rng.normal(size=200))
    for t, k in [(40, 30.0), (41, 50.0), (90, 8.0), (150, 100.0)]:
        norms[t] *= k
    norms[60] = math.nan
    expected = zclip_reference(norms)
    clip = gw.ZClip()
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    got = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clip([p])
        got.append(p.grad.item())
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[40] < 3 and got[150] < 3  # the spikes were clipped


def test_zclip_max_norm_caps_during_warmup():
    # the reference package applies clip_grad_norm_(max_grad_norm) at every warm-up step
    clip = gw.ZClip(max_norm=1.0)
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    for g in ([3.0, 4.0], [0.3, 0.4]):
        p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        clip([p])
        torch.nn.utils.clip_grad_norm_([q], 1.0)
        assert torch.equal(p.grad, q.grad)
    assert p.grad.tolist() == pytest.approx([0.3, 0.4], rel=1e-5)  # below the cap: untouched


def test_zclip_max_norm_after_warmup_scales_only_a_norm_above_the_cap():
    norms = [2.0, 1.9, 2.1, 2.0, 2.05, 2.0, 1.95, 1.0, 40.0, 2.0]  # warm-up of 3; then at, above, below the cap
    expected = zclip_reference(norms, warmup=3, max_norm=2.0)
    clip = gw.ZClip(warmup_steps=3, max_norm=2.0)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    got = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clip([p])
        got.append(p.grad.item())
    for t in (3, 5, 9):  # exactly at the cap after the warm-up: untouched, bit for bit
        assert got[t] == 2.0, t
    assert got[0] < 2.0  # in the warm-up the reference's clip_grad_norm_(2.0) scales a norm at the cap
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[4] < 2.0  # above it: clipped (to the reference's value, checked above)
    assert got[8] < 2.0  # the spike


def test_chain_applies_in_order_and_reports_first_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([30.0, 40.0])
    out = gw.Chain(gw.ClipByGlobalNorm(10.0), gw.AutoClip(percentile=100.0))([p])
    assert out.item() == pytest.approx(50.0)
    assert p.grad.norm().item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize(
    "clipper",
    [
        gw.ClipByValue(0.05),
        gw.ClipByNorm(0.5),
        gw.ClipByGlobalNorm(0.5),
        gw.ClipByGlobalNorm(0.5, norm_type=1.0),
        gw.AutoClip(50.0),
        gw.AGC(0.05),
        gw.ZClip(warmup_steps=2),
        gw.Chain(gw.ClipByGlobalNorm(1.0), gw.AutoClip()),
    ],
    ids=repr,
)
def test_clipper_inside_watch_equals_clipper_alone(clipper):
    """The watch's reused norms give the same clipping as the clipper measuring itself."""
    a, b, watch = train_side_by_side({"clipper": clipper}, copy.deepcopy(clipper), 6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    h = watch.history
    # post-clip norms recorded by the watch equal the norms of the clipped gradients
    np.testing.assert_allclose(
        h.norms_clipped[-1], [p.grad.norm().item() for p in a.parameters()], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(h.total_clipped, np.linalg.norm(h.norms_clipped, axis=1), rtol=1e-5)
    np.testing.assert_allclose(h.clip_coef, h.total_clipped / h.total, rtol=1e-5)


def batch(i):
    """The data of global step ``i``: the same whichever run asks for it."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 8, generator=g) * (1 + torch.rand(1, generator=g))


def run_steps(model, opt, start, stop):
    grads = []
    for i in range(start, stop):
        opt.zero_grad()
        spike = 50.0 if i in (7, 8) else 1.0  # gradient spikes for the adaptive clippers
        (model(batch(i)).square().sum() * spike).backward()
        opt.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize(
    "make", [lambda: gw.AutoClip(25.0, window=5), lambda: gw.AutoClip(), lambda: gw.ZClip(warmup_steps=3)]
)
def test_resume_from_checkpoint_is_bit_identical(make):
    full = mlp()
    watch = gw.GradWatch(full, clipper=make(), detectors=[gw.Spike(warmup_steps=2, action="ignore")])
    opt = torch.optim.Adam(full.parameters(), lr=0.01)
    watch.attach(opt)
    run_steps(full, opt, 0, 4)
    ckpt = copy.deepcopy({"model": full.state_dict(), "opt": opt.state_dict(), "watch": watch.state_dict()})
    expected = run_steps(full, opt, 4, 10)

    resumed = mlp()
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.01)
    opt2.load_state_dict(ckpt["opt"])
    watch2 = gw.GradWatch(resumed, clipper=make(), detectors=[gw.Spike(warmup_steps=2, action="ignore")])
    watch2.load_state_dict(ckpt["watch"])
    watch2.attach(opt2)
    got = run_steps(resumed, opt2, 4, 10)

    for ga, gb in zip(expected, got):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert watch2.history.steps.tolist() == list(range(4, 10))
    np.testing.assert_array_equal(watch2.history.clip_coef, watch.history.clip_coef[4:])
    assert (watch2.history.clip_coef < 1).any()  # the clipper's state mattered


@pytest.mark.parametrize(
    "clipper",
    [gw.ClipByValue(1.0), gw.ClipByNorm(1.0), gw.ClipByGlobalNorm(1.0), gw.AutoClip(), gw.ZClip(), gw.AGC()],
    ids=repr,
)
def test_nonfinite_gradients_propagate_like_torch(clipper):
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, math.nan, 2.0])
    q.grad = torch.tensor([5.0, 5.0, 5.0])
    total = clipper([p, q])
    assert torch.isnan(total)
    assert torch.isnan(p.grad).any()  # NaN is never hidden by clipping


def test_adaptive_state_is_not_poisoned_by_a_nonfinite_step():
    p = torch.nn.Parameter(torch.zeros(1))
    auto, z = gw.AutoClip(50.0), gw.ZClip(warmup_steps=2)
    for g in [1.0, 1.0, 1.0, math.nan, math.inf, 1.0, 1.0]:
        for clip in (auto, z):
            p.grad = torch.tensor([g])
            clip([p])
    hist = auto.state_dict()["history"]
    assert torch.isfinite(hist).sum() == 5 and auto.threshold().item() == 1.0
    assert torch.isfinite(z.mean) and torch.isfinite(z.var)
    assert z.mean.item() == pytest.approx(1.0) and z.var.item() == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    max_norm=st.floats(1e-3, 1e3),
    scale=st.floats(1e-4, 1e4),
    seed=st.integers(0, 2**16),
)
def test_property_global_clip(max_norm, scale, seed):
    ps = params_with_grads([(7, 3), (5,)], scale=scale, seed=seed)
    before = grads_of(ps)
    total = gw.ClipByGlobalNorm(max_norm)(ps)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps]))
    assert after <= max_norm * (1 + 1e-5)
    if total <= max_norm:  # below the threshold: untouched
        for p, g in zip(ps, before):
            assert torch.equal(p.grad, g)
    for p, g in zip(ps, before):  # direction preserved
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0)
        assert cos > 1 - 1e-5
    again = grads_of(ps)
    gw.ClipByGlobalNorm(max_norm)(ps)  # clipping twice changes nothing but torch's +1e-6
    for p, g in zip(ps, again):  # in the coefficient max_norm / (total + 1e-6)
        torch.testing.assert_close(p.grad, g, rtol=2e-6 + 1.01e-6 / max_norm, atol=0)


@settings(max_examples=40, deadline=None)
@given(clip_norm=st.floats(1e-2, 1e2), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_property_per_tensor_clip(clip_norm, scale, seed):
    ps = params_with_grads([(4, 4), (3,)], scale=scale, seed=seed)
    before = grads_of(ps)
    gw.ClipByNorm(clip_norm)(ps)
    for p, g in zip(ps, before):
        assert p.grad.norm() <= clip_norm * (1 + 1e-5)
        if g.norm() <= clip_norm:
            assert torch.equal(p.grad, g)


def test_bad_arguments_name_the_argument():
    cases = [
        (lambda: gw.ClipByValue(0), "clip_value"),
        (lambda: gw.ClipByValue(-1.0), "clip_value"),
        (lambda: gw.ClipByNorm(0.0), "clip_norm"),
        (lambda: gw.ClipByGlobalNorm(-2.0), "max_norm"),
        (lambda: gw.ClipByGlobalNorm(1.0, norm_type=0), "norm_type"),
        (lambda: gw.ClipByGlobalNorm(1.0, norm_type=-math.inf), "norm_type"),
        (lambda: gw.AutoClip(percentile=0), "percentile"),
        (lambda: gw.AutoClip(percentile=100.5), "percentile"),
        (lambda: gw.AutoClip(window=0), "window"),
        (lambda: gw.AGC(clipping=0), "clipping"),
        (lambda: gw.AGC(eps=-1), "eps"),
        (lambda: gw.ZClip(alpha=1.0), "alpha"),
        (lambda: gw.ZClip(alpha=0.0), "alpha"),
        (lambda: gw.ZClip(z_thresh=0), "z_thresh"),
        (lambda: gw.ZClip(warmup_steps=0), "warmup_steps"),
        (lambda: gw.ZClip(max_norm=0), "max_norm"),
        (lambda: gw.Chain(), "at least one"),
    ]
    for make, word in cases:
        with pytest.raises(ValueError, match=word):
            make()
    with pytest.raises(TypeError, match="Clipper"):
        gw.Chain(gw.ClipByNorm(1.0), "x")


def test_clipper_runs_on_every_step_even_when_only_every_third_is_recorded():
    clip = gw.ClipByGlobalNorm(0.2)
    a, b, watch = train_side_by_side(
        {"clipper": clip, "measure": "step", "every": 3},
        lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.2),
        7,
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert watch.history.steps.tolist() == [0, 3, 6]


# --------------------------------------------------------------------------- AGC, batched


def agc_loop(params, grads, clipping, eps, excluded=()):
    """The per-unit reference (timm's adaptive_clip_grad) applied to copies, one parameter at a time."""
    return [
        g if i in excluded or g.numel() == 0 else agc_reference(p.detach(), g, clipping, eps)
        for i, (p, g) in enumerate(zip(params, grads))
    ]


@pytest.mark.parametrize("clipping", [0.05, 1e-4])  # 1e-4 * eps < 1e-6: the branch that compares first
@pytest.mark.parametrize("batch_numel", [1 << 16, 1])  # batched (concatenated) and in-place reductions
def test_agc_batched_equals_per_unit_loop_on_mixed_shapes(batch_numel, clipping):
    shapes = [(6, 3, 3, 3), (4, 3, 3, 3), (5, 4), (7, 4), (3, 4), (4, 7), (5,), (7,), (), (0, 3), (3, 0), (0,)]
    ps = params_with_grads(shapes, scale=0.3, seed=3)
    ps[2].data[1] = 0.0  # a dead unit: weight norm floored at eps
    ps[3].grad[2] *= 1e-9  # a unit far below its bound
    before = grads_of(ps)
    clip = gw.AGC(clipping=clipping, eps=1e-3, exclude=["p4"])
    clip.batch_numel = batch_numel
    clip([(f"p{i}", p) for i, p in enumerate(ps)])
    for i, (p, ref) in enumerate(zip(ps, agc_loop(ps, before, clipping, 1e-3, excluded={4}))):
        torch.testing.assert_close(p.grad, ref, rtol=2e-6, atol=1e-9, msg=f"parameter {i} {tuple(p.shape)}")
    assert torch.equal(ps[4].grad, before[4])  # excluded


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_agc_zero_element_parameters_in_a_watch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 0), torch.nn.Linear(0, 3), torch.nn.Linear(3, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = grads_of(model.parameters())
    gw.AGC(0.01)(model)
    for p, ref in zip(model.parameters(), agc_loop(list(model.parameters()), before, 0.01, 1e-3)):
        torch.testing.assert_close(p.grad, ref, rtol=2e-6, atol=1e-9)
    watch = gw.GradWatch(model, clipper=gw.AGC(0.01))
    model(torch.randn(2, 3)).sum().backward()
    watch.step()
    assert np.isfinite(watch.history.total_clipped).all()


def test_agc_complex_and_bfloat16_parameters():
    ps = params_with_grads([(4, 3), (3,)], [torch.complex64, torch.complex64], scale=0.5, seed=1)
    before = grads_of(ps)
    gw.AGC(0.02)(ps)
    for p, ref in zip(ps, agc_loop(ps, before, 0.02, 1e-3)):
        torch.testing.assert_close(p.grad, ref, rtol=2e-6, atol=1e-8)
    half = params_with_grads([(6, 5), (5,)], [torch.bfloat16] * 2, scale=0.5, seed=2)
    before = grads_of(half)
    gw.AGC(0.02)(half)
    for p, g in zip(half, before):
        ref = agc_reference(p.detach().float(), g.float(), 0.02, 1e-3).to(torch.bfloat16)
        torch.testing.assert_close(p.grad, ref, rtol=1e-2, atol=1e-3)


# --------------------------------------------------------------------------- AutoClip after the exact phase


def feed(clip, norms, dtype=torch.float64):
    p = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    out = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=dtype)
        clip([p])
        out.append(clip.threshold().item())
    return out


@pytest.mark.parametrize("percentile", [10.0, 50.0, 99.0, 100.0])
def test_autoclip_histogram_within_documented_error_of_numpy(percentile):
    from gradwatch.clip import SKETCH_RELATIVE_ERROR

    assert SKETCH_RELATIVE_ERROR < 1e-3
    rng = np.random.default_rng(4)
    norms = np.exp(rng.normal(scale=3.0, size=600)) * 1e-2  # spans ~8 decades
    norms[[50, 300]] = [math.nan, math.inf]
    norms[100] = 0.0
    clip = gw.AutoClip(percentile)
    clip.exact_limit = 64  # switch to the histogram early
    got = feed(clip, norms)
    for t in range(len(norms)):
        hist = norms[: t + 1]
        ref = np.percentile(hist[np.isfinite(hist)], percentile)
        tol = 1e-12 if t + 1 < 64 else SKETCH_RELATIVE_ERROR
        assert got[t] == pytest.approx(ref, rel=tol, abs=1e-300), t


def test_autoclip_state_restores_exactly_in_both_phases():
    rng = np.random.default_rng(5)
    norms = list(np.exp(rng.normal(size=120)))
    for cut in (30, 100):  # exact phase, histogram phase
        full = gw.AutoClip(25.0)
        full.exact_limit = 64
        feed(full, norms[:cut])
        state = copy.deepcopy(full.state_dict())
        resumed = gw.AutoClip(25.0)
        resumed.exact_limit = 64
        resumed.load_state_dict(state)
        assert feed(resumed, norms[cut:]) == feed(full, norms[cut:])
    # a long exact history loaded into AutoClip() goes to the histogram at once, within the bound
    hist = np.exp(rng.normal(size=3000))
    clip = gw.AutoClip(10.0)
    clip.load_state_dict({"type": "AutoClip", "window": None, "count": 3000, "history": torch.from_numpy(hist)})
    assert clip.threshold().item() == pytest.approx(np.percentile(hist, 10.0), rel=1e-3)
    assert "counts" in clip.state_dict() and clip.state_dict()["count"] == 3000


def test_autoclip_all_nonfinite_history_does_not_zero_the_gradients():
    clip = gw.AutoClip(50.0)
    clip.exact_limit = 4
    p = torch.nn.Parameter(torch.zeros(1))
    for g in [math.nan] * 6:
        p.grad = torch.tensor([g])
        clip([p])
    assert clip.threshold().item() == math.inf
    p.grad = torch.tensor([3.0])
    clip([p])
    # the first finite norm is its own percentile (as the histogram represents it): kept, not zeroed
    assert p.grad.item() == pytest.approx(3.0, rel=1e-3)


# --------------------------------------------------------------------------- ZClip


def test_zclip_skips_nonfinite_norms_during_warmup_like_the_reference():
    rng = np.random.default_rng(2)
    norms = list(1.0 + 0.1 * rng.normal(size=80))
    norms[2], norms[7] = math.nan, math.inf  # inside the warm-up
    norms[40] *= 20
    expected = zclip_reference(norms, warmup=10)
    clip = gw.ZClip(warmup_steps=10)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    got = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clip([p])
        got.append(p.grad.item())
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[40] < 3


def test_zclip_float32_statistics_within_1e6_of_the_float64_reference():
    rng = np.random.default_rng(7)
    norms = list(np.exp(0.2 * rng.normal(size=150)))
    norms[60] *= 40
    expected = zclip_reference(norms, warmup=25)
    clip = gw.ZClip()
    p = torch.nn.Parameter(torch.zeros(1))
    got = []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float32)
        clip([p])
        got.append(p.grad.item())
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# --------------------------------------------------------------------------- measure / decide / act


def test_a_custom_global_clipper_implements_only_decide():
    from gradwatch.clip import GlobalClipper

    class Fixed(GlobalClipper):
        def decide(self, norm):
            coef = torch.clamp(2.0 / (norm + 1e-6), max=1.0)
            return coef, torch.full_like(norm, 2.0)

    a, b, watch = train_side_by_side(
        {"clipper": Fixed(), "measure": "step"}, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0), 4
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    h = watch.history
    np.testing.assert_allclose(h.clip_threshold, 2.0)
    np.testing.assert_allclose(h.total_clipped, np.minimum(h.total, 2.0), rtol=1e-5)


# --------------------------------------------------------------------------- arguments and states


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: gw.ClipByValue(math.inf), "clip_value"),
        (lambda: gw.ClipByValue(math.nan), "clip_value"),
        (lambda: gw.ClipByNorm(-math.inf), "clip_norm"),
        (lambda: gw.ClipByGlobalNorm(math.nan), "max_norm"),
        (lambda: gw.ClipByGlobalNorm(1.0, norm_type=math.nan), "norm_type"),
        (lambda: gw.ClipByGlobalNorm(1.0, norm_type="fro"), "norm_type"),
        (lambda: gw.AutoClip(percentile=math.nan), "percentile"),
        (lambda: gw.AutoClip(window=3.0), "window"),
        (lambda: gw.AutoClip(window=True), "window"),
        (lambda: gw.AutoClip(window=-1), "window"),
        (lambda: gw.AutoClip(window=math.inf), "window"),
        (lambda: gw.AGC(clipping=math.inf), "clipping"),
        (lambda: gw.AGC(eps=math.nan), "eps"),
        (lambda: gw.AGC(exclude=None), "exclude"),
        (lambda: gw.AGC(exclude=[3]), "exclude"),
        (lambda: gw.ZClip(alpha=math.nan), "alpha"),
        (lambda: gw.ZClip(z_thresh=math.inf), "z_thresh"),
        (lambda: gw.ZClip(warmup_steps=3.0), "warmup_steps"),
        (lambda: gw.ZClip(warmup_steps=math.inf), "warmup_steps"),
        (lambda: gw.ZClip(eps=-1e-3), "eps"),
        (lambda: gw.ZClip(eps=math.inf), "eps"),
        (lambda: gw.ZClip(max_norm=math.nan), "max_norm"),
    ],
)
def test_every_bad_argument_names_itself(make, word):
    with pytest.raises((TypeError, ValueError), match=word):
        make()


def stepped_norms(clipper, norms):
    """Feed ``clipper`` one single-element gradient per norm."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        clipper([p])


def test_integer_arguments_reject_floats_consistently():
    for make in (lambda v: gw.AutoClip(window=v), lambda v: gw.ZClip(warmup_steps=v)):
        with pytest.raises(TypeError, match="integer"):
            make(3.0)
    norms = [1.0, 2.0, 4.0, 8.0, 16.0]
    for v in (3, np.int64(3)):  # Python and numpy integers are accepted, stored as int, and take effect
        auto, z = gw.AutoClip(window=v), gw.ZClip(warmup_steps=v)
        assert type(auto.window) is int and type(z.warmup_steps) is int
        assert repr(auto) == "AutoClip(percentile=10.0, window=3)"
        feed(auto, norms)
        assert sorted(auto.state_dict()["history"].tolist()) == norms[-3:]  # a ring of the last 3
        assert auto.threshold().item() == pytest.approx(np.percentile(norms[-3:], 10.0))
        stepped_norms(z, norms[:3])  # exactly the warm-up: population mean and variance of the 3 norms
        assert z.mean.item() == pytest.approx(np.mean(norms[:3])) and z.var.item() == pytest.approx(np.var(norms[:3]))


def stepped(clipper, steps=6):
    p = torch.nn.Parameter(torch.zeros(2))
    for i in range(steps):
        p.grad = torch.tensor([1.0 + i, 2.0])
        clipper([p])
    return clipper.state_dict()


@pytest.mark.parametrize(
    "saved, target, word",
    [
        (lambda: gw.AutoClip(window=50), lambda: gw.AutoClip(window=10), "window"),
        (lambda: gw.AutoClip(), lambda: gw.AutoClip(window=10), "window"),
        (lambda: gw.ZClip(warmup_steps=25), lambda: gw.ZClip(warmup_steps=5), "warmup_steps"),
        (lambda: gw.ZClip(), lambda: gw.AutoClip(), "ZClip"),
        (lambda: gw.AutoClip(), lambda: gw.ZClip(), "AutoClip"),
        (lambda: gw.ClipByNorm(1.0), lambda: gw.ClipByValue(1.0), "ClipByNorm"),
        (lambda: gw.ZClip(), lambda: gw.ClipByGlobalNorm(1.0), "ZClip"),
        (lambda: gw.Chain(gw.ClipByGlobalNorm(1.0), gw.AutoClip()), lambda: gw.Chain(gw.AutoClip()), "2 clippers"),
        (lambda: gw.Chain(gw.ZClip(), gw.AutoClip()), lambda: gw.Chain(gw.AutoClip(), gw.ZClip()), "ZClip"),
    ],
)
def test_load_state_from_a_differently_configured_clipper_fails_at_load_time(saved, target, word):
    state = stepped(saved())
    clip = target()
    with pytest.raises(ValueError, match=word):
        clip.load_state_dict(state)


def test_malformed_states_are_rejected():
    with pytest.raises(ValueError, match="history"):
        gw.AutoClip().load_state_dict({"count": 5, "history": torch.ones(3)})
    with pytest.raises(ValueError, match="unknown keys"):
        gw.ZClip().load_state_dict({"warm": torch.zeros(25), "seen": torch.tensor(3)})
    with pytest.raises(ValueError, match="stats"):
        gw.ZClip().load_state_dict({"stats": torch.zeros(4)})
    with pytest.raises(TypeError, match="dict"):
        gw.ClipByNorm(1.0).load_state_dict([1, 2])


def test_watch_state_with_a_mismatched_clipper_fails_when_loaded():
    model = mlp()
    watch = gw.GradWatch(model, clipper=gw.ZClip(warmup_steps=25))
    model(torch.randn(2, 8)).sum().backward()
    watch.step()
    state = watch.state_dict()
    other = gw.GradWatch(mlp(), clipper=gw.ZClip(warmup_steps=5))
    with pytest.raises(ValueError, match="warmup_steps"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- sparse and complex gradients


class EmbedLinear(torch.nn.Module):
    """An embedding (sparse or dense gradients) followed by a dense linear layer."""

    def __init__(self, sparse):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4, sparse=sparse)
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, idx):
        return (self.lin(self.emb(idx)) * 5).square().sum()


def sparse_pair(seed=0):
    torch.manual_seed(seed)
    a, b = EmbedLinear(True), EmbedLinear(False)
    b.load_state_dict(a.state_dict())
    idx = torch.tensor([1, 3, 3, 7, 19])
    for m in (a, b):
        m(idx).backward()
    return a, b


@pytest.mark.parametrize(
    "make",
    [lambda: gw.ClipByGlobalNorm(1.0), lambda: gw.ClipByNorm(1.0), lambda: gw.AutoClip(50.0), lambda: gw.ZClip()],
    ids=["ClipByGlobalNorm", "ClipByNorm", "AutoClip", "ZClip"],
)
def test_sparse_gradients_are_clipped_like_their_dense_twins(make):
    a, b = sparse_pair()
    assert a.emb.weight.grad.is_sparse
    ca, cb = make(), make()
    for _ in range(3):
        na, nb = ca(a), cb(b)
    torch.testing.assert_close(na, nb, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.emb.weight.grad.to_dense(), b.emb.weight.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.lin.weight.grad, b.lin.weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clipper", [gw.ClipByValue(1.0), gw.AGC()], ids=repr)
def test_sparse_gradients_raise_naming_the_parameter(clipper):
    a, _ = sparse_pair()
    with pytest.raises(NotImplementedError, match=r"sparse gradients; parameter 'emb.weight'"):
        clipper(a)


def test_complex_gradients_follow_torch():
    a = params_with_grads([(3, 4), (5,)], [torch.complex64] * 2, scale=2.0)
    b = twin(a)
    assert torch.equal(gw.ClipByGlobalNorm(1.0)(a), torch.nn.utils.clip_grad_norm_(b, 1.0))
    for pa, pb in zip(a, b):
        assert torch.equal(pa.grad, pb.grad)
    c = params_with_grads([(3, 4)], [torch.complex64], scale=2.0)
    before = c[0].grad.numpy().astype(np.complex128)
    gw.ClipByNorm(0.5)(c)
    np.testing.assert_allclose(c[0].grad.numpy(), before * 0.5 / np.linalg.norm(before), rtol=1e-6)
    with pytest.raises(NotImplementedError, match="complex"):
        gw.ClipByValue(1.0)(c)
