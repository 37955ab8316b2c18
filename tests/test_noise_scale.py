"""gw.NoiseScale: the gradient noise scale against references that store every micro-batch gradient.

The references compute each micro-batch's mean-loss gradient G_j explicitly (on
detached copies of the parameters, so the watch's hooks never see them) and
apply the formulas of McCandlish et al. (2018), Appendix A.1, in float64:
s2 = mean_j |G_j|^2, b2 = |mean_j G_j|^2, grad_sq = (B_b b2 - B_s s2)/(B_b - B_s),
trace = (s2 - b2)/(1/B_s - 1/B_b), b_simple = EMA(trace)/EMA(grad_sq).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import gradwatch as gw

B_S = 4  # examples per micro-batch
ALPHA = 0.9
STEPS = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(x)))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).square().mean()


def micro_batches(step: int, k: int, bs: int = B_S) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(k * bs, 6, generator=g), torch.randn(k * bs, 3, generator=g)
    return list(zip(x.split(bs), y.split(bs)))


def micro_grads(model: nn.Module, mbs) -> list[np.ndarray]:
    """Each micro-batch's mean-loss gradient, flattened, in float64 -- computed on detached parameter copies."""
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    out = []
    for x, y in mbs:
        gs = torch.autograd.grad(mse(functional_call(model, params, (x,)), y), list(params.values()))
        out.append(torch.cat([g.reshape(-1) for g in gs]).double().numpy())
    return out


def reference(per_step: list[list[np.ndarray]], bs: int, alpha: float) -> dict[str, np.ndarray]:
    """The issue's formulas, step by step, in float64."""
    cols: dict[str, list[float]] = {"grad_sq": [], "trace": [], "b_simple": []}
    ema = None
    for gs in per_step:
        n = len(gs)
        s2 = np.mean([g @ g for g in gs])
        big = np.mean(gs, axis=0)
        b2 = big @ big
        Bs, Bb = bs, n * bs
        grad_sq = (Bb * b2 - Bs * s2) / (Bb - Bs)
        trace = (s2 - b2) / (1 / Bs - 1 / Bb)
        if np.isfinite(grad_sq) and np.isfinite(trace):
            x = np.array([grad_sq, trace])
            ema = x if ema is None else alpha * ema + (1 - alpha) * x
        cols["grad_sq"].append(grad_sq)
        cols["trace"].append(trace)
        cols["b_simple"].append(math.nan if ema is None else ema[1] / ema[0])
    return {k: np.array(v) for k, v in cols.items()}


def train(
    k: int,
    *,
    convention: str = "mean",
    scaler=None,
    steps: int = STEPS,
    every: int = 1,
    clipper=None,
    groups: dict | None = None,
):
    """``steps`` SGD steps with ``k`` accumulated micro-batches; the micro-batch gradients of each step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = gw.NoiseScale(batch_size=B_S, alpha=ALPHA, groups=groups)
    watch = gw.GradWatch(model, stats=[noise], scaler=scaler, every=every, clipper=clipper)
    watch.attach(opt)
    per_step = []
    for step in range(steps):
        mbs = micro_batches(step, k)
        per_step.append(micro_grads(model, mbs))
        opt.zero_grad()
        for x, y in mbs:
            loss = mse(model(x), y) / (k if convention == "mean" else 1)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return watch.history, per_step, watch


def assert_matches(stats, ref: dict[str, np.ndarray], factor: float = 1.0) -> None:
    """``History.stats``-like columns against the reference (float32 tolerance); ``factor`` scales grad_sq and trace."""
    for key in ("grad_sq", "trace"):
        got = stats[f"noise.{key}"].astype(np.float64)
        np.testing.assert_allclose(got, factor * ref[key], rtol=2e-4, atol=1e-6 * factor * np.abs(ref["trace"]).max())
    np.testing.assert_allclose(stats["noise.b_simple"], ref["b_simple"], rtol=2e-4)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_equals_stored_micro_batch_reference(k):
    h, per_step, _ = train(k)
    assert h.stats["noise.grad_sq"].shape == (STEPS,)
    assert h.stats["noise.b_simple"].dtype == np.float32
    assert_matches(h.stats, reference(per_step, B_S, ALPHA))


class MixedReads(nn.Module):
    """One parameter per read path: contiguous float32 (dot), strided float32 (vector_norm), float64 (copied in)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 3, generator=g))
        self.wt = nn.Parameter(torch.randn(3, 6, generator=g).t())  # its gradient is strided like it
        self.wide = nn.Parameter(torch.randn(6, 3, generator=g).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w + torch.tanh(x @ self.wt)
        return h + (x.double() @ self.wide).float()


def test_every_read_path_and_more_calls_than_the_table_rows():
    """dot into the table, vector_norm into it, a copy for another dtype; 6 calls outgrow the 4 rows it starts with."""
    torch.manual_seed(0)
    model, k = MixedReads(), 6
    assert not model.wt.is_contiguous()
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA)])
    per_step = []
    for step in range(3):
        mbs = micro_batches(step, k)
        per_step.append(micro_grads(model, mbs))
        model.zero_grad()
        for x, y in mbs:
            (mse(model(x), y) / k).backward()
        assert not model.wt.grad.is_contiguous()
        watch.step()
    ref = reference(per_step, B_S, ALPHA)
    assert_matches(watch.history.stats, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_read_into_writes_the_square_or_the_norm(dtype, strided):
    from gradwatch.stats.noise import _read_into

    g = torch.randn(40, 30, dtype=torch.float64).to(dtype)
    g = g.t() if strided else g
    square, norm = torch.zeros(()), torch.zeros(())  # a float32 table
    _read_into(g, square, norm)
    exact = g.double().square().sum()
    got = square.double() if square.item() else norm.double().square()
    assert (square.item() == 0) != (norm.item() == 0)  # one slot written
    assert square.item() == 0 or (dtype in (torch.float32, torch.float64) and not strided)
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=0)


def test_float64_model_is_recorded_in_float64():
    torch.manual_seed(0)
    model = Net().double()
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA)])
    per_step = []
    for step in range(3):
        mbs = [(x.double(), y.double()) for x, y in micro_batches(step, 4)]
        per_step.append(micro_grads(model, mbs))
        model.zero_grad()
        for x, y in mbs:
            (mse(model(x), y) / 4).backward()
        watch.step()
    h = watch.history
    ref = reference(per_step, B_S, ALPHA)
    assert h.stats["noise.trace"].dtype == np.float64
    for key in ("grad_sq", "trace", "b_simple"):
        np.testing.assert_allclose(h.stats[f"noise.{key}"], ref[key], rtol=1e-10)


def test_sum_convention_same_b_simple_grad_sq_in_step_gradient_units():
    """Backward of the un-divided loss: the step gradient is K G_big, so grad_sq and trace are K^2 larger."""
    k = 4
    h, per_step, _ = train(k, convention="sum")
    assert_matches(h.stats, reference(per_step, B_S, ALPHA), factor=k**2)


@pytest.mark.parametrize("convention", ["mean", "sum"])
def test_grad_scaler_on_cpu_is_unscaled(convention):
    k = 2
    scaler = torch.amp.GradScaler("cpu", init_scale=3000.0)  # not a power of two: the unscale is inexact
    h, per_step, _ = train(k, convention=convention, scaler=scaler, groups=GROUPS)
    assert np.all(h.scale == 3000.0)
    factor = 1.0 if convention == "mean" else k**2
    assert_matches(h.stats, reference(per_step, B_S, ALPHA), factor=factor)
    assert_groups_match(h.stats, per_step, group_slices(Net()), B_S, factor)  # the groups' sums unscaled alike


def test_one_backward_one_process_is_nan_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h, _, _ = train(1, steps=3, groups=GROUPS)
    assert len(h.stats) == 12
    for key in h.stats:  # overall and per group
        assert np.isnan(h.stats[key]).all()
    ours = [w for w in caught if "NoiseScale" in str(w.message)]
    assert len(ours) == 1
    assert "no second batch size" in str(ours[0].message)


def test_non_finite_steps_are_left_out_of_the_averages():
    """A step with an infinite gradient: its own columns are not finite, b_simple keeps the average before it."""
    torch.manual_seed(0)
    model = Net()
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA)])
    per_step = []
    for step in range(4):
        mbs = micro_batches(step, 2)
        gs = micro_grads(model, mbs)
        model.zero_grad()
        for j, (x, y) in enumerate(mbs):
            loss = mse(model(x), y) / 2
            if step == 2 and j == 1:
                loss = loss * math.inf
            loss.backward()
        watch.step()
        if step != 2:
            per_step.append(gs)
    h = watch.history
    assert not np.isfinite(h.stats["noise.grad_sq"][2])
    ref = reference(per_step, B_S, ALPHA)
    keep = [0, 1, 3]
    np.testing.assert_allclose(h.stats["noise.b_simple"][keep], ref["b_simple"], rtol=2e-4)
    np.testing.assert_allclose(h.stats["noise.b_simple"][2], ref["b_simple"][1], rtol=2e-4)


@pytest.mark.parametrize("clipper", [None, gw.ClipByGlobalNorm(1e9)])
def test_every_second_step(clipper):
    """Unrecorded steps neither count nor leak into the next recorded step (also when a clipper runs every step)."""
    h, per_step, _ = train(2, steps=5, every=2, clipper=clipper, groups=GROUPS)
    assert h.steps.tolist() == [0, 2, 4]
    assert_matches(h.stats, reference(per_step[::2], B_S, ALPHA))
    assert_groups_match(h.stats, per_step[::2], group_slices(Net()), B_S)


@pytest.mark.parametrize("groups", [None, {"up": "up.*", "head": "head.*"}])
def test_zero_host_syncs_and_hooks_removed_at_close(groups):
    torch.manual_seed(0)
    model = Net()
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, groups=groups)])
    for step in range(3):
        with gw.count_host_syncs() as c:
            model.zero_grad()
            for x, y in micro_batches(step, 4):
                (mse(model(x), y) / 4).backward()
            watch.step()
        assert c.syncs == 0
    watch.close()
    assert all(not p._backward_hooks for p in model.parameters())


GROUPS = {"up": "up.*", "head": ["head.weight", "head.bias"], "weights": "*.weight"}


def assert_groups_match(stats, per_step, slices: dict[str, np.ndarray], bs: int, factor: float = 1.0) -> None:
    """Each group's columns against the reference on the micro-batch gradients cut to the group's parameters."""
    for g, idx in slices.items():
        ref = reference([[gj[idx] for gj in gs] for gs in per_step], bs, ALPHA)
        cols = {f"noise.{key}": stats[f"noise.{g}.{key}"] for key in ("grad_sq", "trace", "b_simple")}
        assert_matches(cols, ref, factor)


def group_slices(model: nn.Module, groups: dict = GROUPS) -> dict[str, np.ndarray]:
    """Each group's positions in the flattened gradient (named_parameters order, as micro_grads flattens)."""
    import fnmatch

    pos, at = {}, 0
    for name, p in model.named_parameters():
        pos[name] = np.arange(at, at + p.numel())
        at += p.numel()
    out = {}
    for g, patterns in groups.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        out[g] = np.concatenate([pos[n] for n in pos if any(fnmatch.fnmatchcase(n, q) for q in patterns)])
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_groups_equal_the_reference_cut_to_their_parameters(k):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA, groups=GROUPS)]).attach(opt)
    per_step = []
    for step in range(STEPS):
        mbs = micro_batches(step, k)
        per_step.append(micro_grads(model, mbs))
        opt.zero_grad()
        for x, y in mbs:
            (mse(model(x), y) / k).backward()
        opt.step()
    stats = watch.history.stats
    assert_matches(stats, reference(per_step, B_S, ALPHA))  # the overall columns are unchanged
    assert_groups_match(stats, per_step, group_slices(model), B_S)
    state = watch.stats[0].state_dict()
    assert state["groups"] == list(GROUPS) and state["group_ema"].shape == (2, 3)


def test_groups_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model, csv, jsonl = Net(), tmp_path / "run.csv", tmp_path / "run.jsonl"
    sinks = [gw.CSVSink(csv), gw.JSONLSink(jsonl)]
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, groups=GROUPS)], sinks=sinks)
    for step in range(3):
        model.zero_grad()
        for x, y in micro_batches(step, 2):
            (mse(model(x), y) / 2).backward()
        watch.step()
    watch.close()
    h = watch.history
    assert set(h.stats) == {
        f"noise.{g}{k}" for g in ("", "up.", "head.", "weights.") for k in ("grad_sq", "trace", "b_simple")
    }
    for back in (gw.read_csv(csv), gw.read_jsonl(jsonl)):
        assert set(back.stats) == set(h.stats)
        for key in h.stats:
            np.testing.assert_array_equal(back.stats[key], h.stats[key])
    other = gw.NoiseScale(batch_size=B_S, groups={"up": "up.*"})
    gw.GradWatch(Net(), stats=[other])
    with pytest.raises(ValueError, match=r"state is of groups \['up', 'head', 'weights'\], this NoiseScale has"):
        other.load_state_dict(watch.stats[0].state_dict())
    with pytest.raises(ValueError, match=r"'nope\.\*' matches no parameter name"):
        gw.GradWatch(Net(), stats=[gw.NoiseScale(batch_size=B_S, groups={"x": "nope.*"})])


def test_state_dict_continues_the_averages():
    k, steps = 2, 4
    h_full, _, _ = train(k, steps=steps)
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA)]).attach(opt)
    for step in range(steps):
        if step == 2:
            state = first.state_dict()
            first.close()
            second = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S, alpha=ALPHA)]).attach(opt)
            second.load_state_dict(state)
        opt.zero_grad()
        for x, y in micro_batches(step, k):
            (mse(model(x), y) / k).backward()
        opt.step()
    np.testing.assert_allclose(second.history.stats["noise.b_simple"], h_full.stats["noise.b_simple"][2:], rtol=1e-5)
    with pytest.raises(ValueError, match=r"NoiseScale\.state_dict"):
        second.stats[0].load_state_dict({"ema": 1.0})


def test_csv_and_jsonl_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Net()
    csv, jsonl = tmp_path / "run.csv", tmp_path / "run.jsonl"
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=B_S)], sinks=[gw.CSVSink(csv), gw.JSONLSink(jsonl)])
    for step in range(3):
        model.zero_grad()
        for x, y in micro_batches(step, 2):
            (mse(model(x), y) / 2).backward()
        watch.step()
    watch.close()
    h = watch.history
    for back in (gw.read_csv(csv), gw.read_jsonl(jsonl)):
        for key in ("noise.grad_sq", "noise.trace", "noise.b_simple"):
            np.testing.assert_array_equal(back.stats[key], h.stats[key])


def test_plot_stats_draws_b_simple():
    import matplotlib

    matplotlib.use("Agg")
    h, _, _ = train(2, steps=3)
    ax = gw.plot_stats(h, ["noise.b_simple"])
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), h.stats["noise.b_simple"])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an integer in"),
        ({"batch_size": 8.0}, TypeError, "batch_size must be an integer"),
        ({"batch_size": True}, TypeError, "batch_size must be an integer"),
        ({"batch_size": 8, "alpha": 1.0}, ValueError, r"alpha must be a finite number >= 0 and < 1"),
        ({"batch_size": 8, "alpha": -0.1}, ValueError, r"alpha must be a finite number >= 0 and < 1"),
        ({"batch_size": 8, "alpha": "0.9"}, TypeError, "alpha must be a number"),
        ({"batch_size": 8, "process_group": [0, 1]}, TypeError, "process_group must be None"),
        ({"batch_size": 8, "groups": ["up.*"]}, TypeError, "groups must be a mapping"),
        ({"batch_size": 8, "groups": {}}, ValueError, "groups must name at least one group"),
        ({"batch_size": 8, "groups": {"a.b": "up.*"}}, ValueError, "a name must be letters, digits"),
        ({"batch_size": 8, "groups": {"up": 3}}, TypeError, r"groups\['up'\] must be a glob pattern"),
        ({"batch_size": 8, "groups": {"up": []}}, TypeError, r"groups\['up'\] must be a glob pattern"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gw.NoiseScale(**kwargs)


# --------------------------------------------------------------------------- statistics: a known noise scale


def linear_regression_run(k: int, bs: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """y = x.w* + eps, x ~ N(0, I_d), eps ~ N(0, sigma^2), loss 1/2 (x.w - y)^2, at the fixed point w = w* + delta.

    The per-example gradient is x (x.delta - eps): G = delta and (Isserlis)
    Sigma = (|delta|^2 + sigma^2) I + delta delta^T, so tr(Sigma) = d (|delta|^2 + sigma^2) + |delta|^2.
    """
    d, sigma = 8, 1.0
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen)
    delta = torch.zeros(d)
    delta[0] = 1.0
    lin = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_((w_star + delta)[None])
    watch = gw.GradWatch(lin, stats=[gw.NoiseScale(batch_size=bs, alpha=0.95)], flush_every=1000)
    x_all = torch.randn(steps, k * bs, d, generator=gen)
    y_all = x_all @ w_star + sigma * torch.randn(steps, k * bs, generator=gen)
    for step in range(steps):  # no optimizer: the same point at every step
        lin.zero_grad()
        for x, y in zip(x_all[step].split(bs), y_all[step].split(bs)):
            (0.5 * (lin(x).squeeze(1) - y).square().mean() / k).backward()
        watch.step()
    h = watch.history
    true_g2 = float(delta @ delta)
    true_tr = d * (true_g2 + sigma**2) + true_g2
    return {**{k_: h.stats[f"noise.{k_}"].astype(np.float64) for k_ in ("grad_sq", "trace")}, "true": true_tr / true_g2}


def test_statistically_right_on_linear_regression():
    """Over 600 steps at a fixed point: the estimates average to the true tr(Sigma)/|G|^2 = 17 within 10%."""
    run = linear_regression_run(k=8, bs=64, steps=600)
    assert run["true"] == pytest.approx(17.0)
    ratio = run["trace"] / run["grad_sq"]
    assert np.mean(ratio) == pytest.approx(run["true"], rel=0.10)  # time average of the per-step ratio
    assert np.mean(run["trace"]) / np.mean(run["grad_sq"]) == pytest.approx(run["true"], rel=0.05)


def test_variance_shrinks_as_the_big_batch_grows():
    """The spread of the per-step estimates falls as B_b = K B_s grows (B_s fixed): about as 1/B_b."""
    var = []
    for k in (2, 8, 32):
        run = linear_regression_run(k=k, bs=8, steps=500, seed=1)
        var.append(np.var(run["grad_sq"]))
    assert var[0] > 2 * var[1] > 4 * var[2]


# --------------------------------------------------------------------------- DDP on 2 gloo ranks

DDP_BS = 3  # rows per micro-batch per rank


DIST_GROUPS = {"up": "*up.*", "rest": ["*down.*", "*head.*"]}


def _ddp_run(rank: int, world: int, k: int, amp: bool = False, groups: dict | None = None) -> dict:
    from contextlib import nullcontext

    from _dist_harness import MLP, batch, loss_fn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradwatch.distributed import count_collectives

    ddp = DDP(MLP())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=3000.0) if amp else None
    noise = gw.NoiseScale(batch_size=DDP_BS, alpha=ALPHA, groups=groups)
    watch = gw.GradWatch(ddp, scaler=scaler, stats=[noise]).attach(opt)
    collectives = []
    for step in range(STEPS):
        x, y = batch(step, n=world * k * DDP_BS)
        mine = list(zip(x.split(DDP_BS), y.split(DDP_BS)))[rank * k : (rank + 1) * k]
        opt.zero_grad()
        for j, (xb, yb) in enumerate(mine):
            with ddp.no_sync() if j < k - 1 else nullcontext():
                loss = loss_fn(ddp, xb, yb) / k
                (scaler.scale(loss) if amp else loss).backward()
        with count_collectives() as c:  # the watch runs in the optimizer's step pre-hook
            if amp:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        collectives.append(c["all_reduce"])
    h = watch.history
    watch.close()
    return {"stats": {key: h.stats[key] for key in h.stats}, "collectives": collectives}


def ddp_k1(rank: int, world: int) -> dict:
    return _ddp_run(rank, world, 1)


def ddp_k2(rank: int, world: int) -> dict:
    return _ddp_run(rank, world, 2)


def ddp_k2_amp(rank: int, world: int) -> dict:
    return _ddp_run(rank, world, 2, amp=True)


def ddp_k2_groups(rank: int, world: int) -> dict:
    return _ddp_run(rank, world, 2, groups=DIST_GROUPS)


def ddp_reference(world: int, k: int) -> dict[str, np.ndarray]:
    """One process over all world x k micro-batches: their gradients stored, SGD on their mean."""
    return reference(ddp_micro_grads(world, k), DDP_BS, ALPHA)


def ddp_micro_grads(world: int, k: int) -> list[list[np.ndarray]]:
    """Per step, the world x k micro-batch gradients of the single-process run of :func:`ddp_reference`."""
    from _dist_harness import MLP, batch

    model = MLP()
    per_step = []
    for step in range(STEPS):
        x, y = batch(step, n=world * k * DDP_BS)
        gs = micro_grads(model, list(zip(x.split(DDP_BS), y.split(DDP_BS))))
        per_step.append(gs)
        big = torch.from_numpy(np.mean(gs, axis=0)).float()
        with torch.no_grad():
            for p, g in zip(model.parameters(), big.split([p.numel() for p in model.parameters()])):
                p -= 0.1 * g.view_as(p)
    return per_step


@pytest.fixture(scope="module")
def ddp_results():
    from _dist_harness import run_scenarios

    return run_scenarios([ddp_k1, ddp_k2, ddp_k2_amp, ddp_k2_groups], 2)


@pytest.mark.parametrize(("name", "k"), [("ddp_k1", 1), ("ddp_k2", 2), ("ddp_k2_amp", 2)])
def test_ddp_two_ranks_equal_the_single_process_reference(ddp_results, name, k):
    from _dist_harness import result_of

    r0, r1 = result_of(ddp_results, name)
    for key in ("noise.grad_sq", "noise.trace", "noise.b_simple"):
        np.testing.assert_array_equal(r0["stats"][key], r1["stats"][key])  # every rank's row is the same
    assert_matches(r0["stats"], ddp_reference(2, k))
    assert r0["collectives"] == [1] * STEPS  # one all-reduce of two numbers per step, nothing else


def test_ddp_groups_ride_the_same_all_reduce(ddp_results):
    from _dist_harness import MLP, result_of

    r0, r1 = result_of(ddp_results, "ddp_k2_groups")
    for key in r0["stats"]:
        np.testing.assert_array_equal(r0["stats"][key], r1["stats"][key])
    per_step = ddp_micro_grads(2, 2)
    assert_matches(r0["stats"], reference(per_step, DDP_BS, ALPHA))
    assert_groups_match(r0["stats"], per_step, group_slices(MLP(), DIST_GROUPS), DDP_BS)
    assert r0["collectives"] == [1] * STEPS  # the groups' sums travel in the same all-reduce


# --------------------------------------------------------------------------- FSDP2 (2 gloo ranks) and HSDP (2 x 2)


def _fsdp2_run(
    rank: int,
    world: int,
    k: int,
    shape: tuple[int, ...],
    no_sync: bool = False,
    warm: bool = False,
    groups: dict | None = None,
) -> dict:
    """As :func:`_ddp_run` on :func:`fsdp2_mlp` (1-D mesh: FSDP2, 2-D: HSDP); ``no_sync``: the
    non-final micro-batches under ``set_requires_gradient_sync(False)`` (accumulated unsharded);
    ``warm``: the watch is built after a forward (the unsharded parameters exist already)."""
    from _dist_harness import batch, fsdp2_mlp, loss_fn, mesh

    from gradwatch.distributed import count_collectives

    names = ("replicate", "shard") if len(shape) == 2 else None
    model = fsdp2_mlp(mesh(shape, names))
    if warm:
        with torch.no_grad():
            model(batch(0)[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = gw.NoiseScale(batch_size=DDP_BS, alpha=ALPHA, groups=groups)
    watch = gw.GradWatch(model, stats=[noise]).attach(opt)
    # before the first forward nothing is unsharded: a forward hook on up, down and head waits for it
    assert (len(noise._handles), len(noise._forward_handles)) == ((6, 0) if warm else (0, 3))
    collectives = []
    for step in range(STEPS):
        x, y = batch(step, n=world * k * DDP_BS)
        mine = list(zip(x.split(DDP_BS), y.split(DDP_BS)))[rank * k : (rank + 1) * k]
        opt.zero_grad()
        for j, (xb, yb) in enumerate(mine):
            if no_sync:
                model.set_requires_gradient_sync(j == k - 1)
            (loss_fn(model, xb, yb) / k).backward()
        with count_collectives() as c:  # the watch runs in the optimizer's step pre-hook
            opt.step()
        collectives.append(c["all_reduce"])
    hooked = (len(noise._handles), len(noise._forward_handles), len(noise._pending))
    h = watch.history
    watch.close()
    return {"stats": {key: h.stats[key] for key in h.stats}, "collectives": collectives, "hooked": hooked}


def fsdp2_k1(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 1, (world,))


def fsdp2_k2(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 2, (world,))


def fsdp2_k2_no_sync(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 2, (world,), no_sync=True)


def fsdp2_k2_warm(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 2, (world,), warm=True)


def fsdp2_k2_groups(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 2, (world,), groups=DIST_GROUPS)


def _refused(model) -> str:
    try:
        gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=2)])
    except NotImplementedError as e:
        return str(e)
    return "built"


def tp_refused(rank: int, world: int) -> str:
    from _dist_harness import mesh, tp_mlp

    return _refused(tp_mlp(mesh((world,))))


def fsdp_tp_refused(rank: int, world: int) -> str:
    from _dist_harness import fsdp_tp_mlp, mesh

    return _refused(fsdp_tp_mlp(mesh((1, world), ("dp", "tp"))))


@pytest.fixture(scope="module")
def fsdp2_results():
    from _dist_harness import run_scenarios

    scenarios = [fsdp2_k1, fsdp2_k2, fsdp2_k2_no_sync, fsdp2_k2_warm, fsdp2_k2_groups, tp_refused, fsdp_tp_refused]
    return run_scenarios(scenarios, 2)


def _check_fsdp(per_rank: list[dict], world: int, k: int) -> None:
    """Every rank's row identical, equal to the single-process reference over all ``world * k`` micro-batches."""
    r0 = per_rank[0]
    for r in per_rank[1:]:
        for key in ("noise.grad_sq", "noise.trace", "noise.b_simple"):
            np.testing.assert_array_equal(r["stats"][key], r0["stats"][key])
    ref = ddp_reference(world, k)
    for key in ("grad_sq", "trace", "b_simple"):
        np.testing.assert_allclose(r0["stats"][f"noise.{key}"], ref[key], rtol=1e-5)
    # the watch's norms (one all-reduce over the mesh) and NoiseScale's two numbers: nothing else
    assert all(r["collectives"] == [2] * STEPS for r in per_rank)
    assert all(r["hooked"] == (6, 0, 0) for r in per_rank)  # 6 unsharded parameters hooked, forward hooks gone


@pytest.mark.parametrize(
    ("name", "k"), [("fsdp2_k1", 1), ("fsdp2_k2", 2), ("fsdp2_k2_no_sync", 2), ("fsdp2_k2_warm", 2)]
)
def test_fsdp2_two_ranks_equal_the_single_process_reference(fsdp2_results, name, k):
    from _dist_harness import result_of

    _check_fsdp(result_of(fsdp2_results, name), 2, k)


def test_fsdp2_groups_equal_the_reference_cut_to_their_parameters(fsdp2_results):
    from _dist_harness import MLP, result_of

    per_rank = result_of(fsdp2_results, "fsdp2_k2_groups")
    _check_fsdp(per_rank, 2, 2)
    for key in per_rank[0]["stats"]:
        np.testing.assert_array_equal(per_rank[1]["stats"][key], per_rank[0]["stats"][key])
    per_step = ddp_micro_grads(2, 2)
    assert_groups_match(per_rank[0]["stats"], per_step, group_slices(MLP(), DIST_GROUPS), DDP_BS)


@pytest.mark.parametrize("name", ["tp_refused", "fsdp_tp_refused"])
def test_tensor_parallel_is_refused(fsdp2_results, name):
    from _dist_harness import result_of

    for message in result_of(fsdp2_results, name):
        assert message.startswith("NoiseScale supports parameters on one process, under DDP, and sharded by")
        assert "tensor parallel" in message and "parameter 'up.weight'" in message


def hsdp_k2_no_sync(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 2, (2, 2), no_sync=True)


def hsdp_k1(rank: int, world: int) -> dict:
    return _fsdp2_run(rank, world, 1, (2, 2))


def test_hsdp_two_by_two_equals_the_single_process_reference():
    """HSDP on a 2 x 2 (replicate x shard) mesh: R = 4 ranks, n = 4 K micro-batches."""
    from _dist_harness import result_of, run_scenarios

    results = run_scenarios([hsdp_k1, hsdp_k2_no_sync], 4)
    _check_fsdp(result_of(results, "hsdp_k1"), 4, 1)
    _check_fsdp(result_of(results, "hsdp_k2_no_sync"), 4, 2)
