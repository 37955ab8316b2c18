"""The contributor protocol: GradWatch(stats=[...]), History.stats, files and the CLI, against explicit references."""

import json
import math

import matplotlib
import numpy as np
import pytest
import torch

import gradwatch as gw
from gradwatch.cli import main as cli_main

matplotlib.use("Agg")


class GradCosine(gw.Contributor):
    """cos(g_t, g_{t-1}) over all watched gradients, and the dot product: the extending guide's statistic."""

    prefix = "cos"

    def __init__(self):
        self.closed = 0
        self.observed = 0

    def bind(self, binding):
        super().bind(binding)
        self.prev = None

    def columns(self):
        return {"prev": gw.SCALAR, "parts": 2}

    def observe(self, view):
        self.observed += 1
        g = torch.cat([x.reshape(-1) for x in view.grads if x is not None])
        if self.prev is None:
            cos = torch.full((), math.nan)
            parts = torch.full((2,), math.nan)
        else:
            cos = torch.nn.functional.cosine_similarity(g, self.prev, dim=0)
            parts = torch.stack([g.dot(self.prev), g.norm() * self.prev.norm()])
        self.prev = g.clone()
        return {"prev": cos, "parts": parts}

    def state_dict(self):
        return {"prev": None if self.prev is None else self.prev.clone()}

    def load_state_dict(self, state):
        self.prev = state["prev"]

    def close(self):
        self.closed += 1


def train(watch, model, steps=5, seed=0, every_grad=None):
    """Plain SGD steps; returns the flat gradient of each step (the reference's input)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watch.attach(opt)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().numpy())
        opt.step()
    return grads


def reference_cosines(grads):
    return [math.nan] + [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(grads[1:], grads)]


def test_a_statistic_lands_in_history_stats_equal_to_a_numpy_reference():
    model = torch.nn.Linear(4, 2)
    stat = GradCosine()
    with gw.GradWatch(model, stats=[stat], clipper=gw.ClipByGlobalNorm(0.1)) as watch:
        grads = train(watch, model)
    h = watch.history
    cos = h.stats["cos.prev"]
    assert cos.shape == (5,) and h.stats["cos.parts"].shape == (5, 2)
    # observed after the clipper: the gradients it sees are the clipped ones, a scale that cosine ignores
    np.testing.assert_allclose(cos, reference_cosines(grads), rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(h["cos.prev"], cos, equal_nan=True)  # h[name] reads a statistic too
    assert stat.closed == 1  # close() released it once
    assert h.meta["stats"] == {"cos.prev": 0, "cos.parts": 2}


@pytest.mark.parametrize("clipper", [None, gw.ClipByGlobalNorm(0.1)])
def test_every_n_observes_only_recorded_steps_and_hot_says_which_backward_counts(clipper):
    """A clipper runs every step; a statistic is still hot only before recorded steps."""
    model = torch.nn.Linear(4, 2)
    stat = GradCosine()
    seen = []

    class Hot(gw.Contributor):
        prefix = "hot"

        def columns(self):
            return {"flag": gw.SCALAR}

        def observe(self, view):
            return {"flag": torch.tensor(float(self.hot))}

    hot = Hot()
    watch = gw.GradWatch(model, stats=[stat, hot], every=3, clipper=clipper)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch.attach(opt)
    for _ in range(7):
        seen.append(hot.hot)  # before the backward of this step
        opt.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
    h = watch.history
    assert h.steps.tolist() == [0, 3, 6] and stat.observed == 3
    assert seen == [True, False, False, True, False, False, True]


def test_stats_survive_save_load_csv_and_jsonl(tmp_path):
    model = torch.nn.Linear(4, 2)
    sinks = [gw.CSVSink(tmp_path / "r.csv"), gw.JSONLSink(tmp_path / "r.jsonl")]
    with gw.GradWatch(model, stats=[GradCosine()], sinks=sinks, flush_every=2) as watch:
        train(watch, model)
    h = watch.history
    h.save(tmp_path / "r.npz")
    header = open(tmp_path / "r.csv").readline().strip().split(",")
    assert header[-3:] == ["stats:cos.prev", "stats:cos.parts[0]", "stats:cos.parts[1]"]
    for back in (
        gw.History.load(tmp_path / "r.npz"),
        gw.read_csv(tmp_path / "r.csv"),
        gw.read_jsonl(tmp_path / "r.jsonl"),
    ):
        assert sorted(back.stats) == ["cos.parts", "cos.prev"]
        assert back.names == h.names  # the stats columns are not parameters
        for key, col in h.stats.items():
            np.testing.assert_array_equal(back.stats[key], col)
    first = [json.loads(line) for line in open(tmp_path / "r.jsonl")][1]
    assert first["stats"]["cos.prev"] == "nan" and first["stats"]["cos.parts"] == ["nan", "nan"]


def test_history_stats_rows_without_a_value_read_nan_and_wider_blocks_widen():
    h = gw.History(["w"])
    h.append([0], [[1.0]])
    h.append([1, 2], [[2.0], [3.0]], stats={"ex.norm": [[1.0, 2.0], [3.0, 4.0]], "ex.n": [2, 2]})
    h.append([3], [[4.0]], stats={"ex.norm": [[5.0, 6.0, 7.0]]})
    np.testing.assert_array_equal(h.stats["ex.n"], [np.nan, 2.0, 2.0, np.nan])
    np.testing.assert_array_equal(
        h.stats["ex.norm"], [[np.nan] * 3, [1.0, 2.0, np.nan], [3.0, 4.0, np.nan], [5.0, 6.0, 7.0]]
    )
    assert h.take([1, 3]).stats["ex.norm"].tolist()[1] == [5.0, 6.0, 7.0]
    other = gw.History(["w"])
    other.extend(h)
    np.testing.assert_array_equal(other.stats["ex.norm"], h.stats["ex.norm"])
    assert h.grouped(1).stats.keys() == h.stats.keys()
    with pytest.raises(ValueError, match=r"'<prefix>\.<column>'"):
        h.append([4], [[1.0]], stats={"nodot": [1.0]})
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        h.append([4], [[1.0]], stats={"ex.n": [1.0, 2.0]})


def test_state_dict_carries_the_statistics_state():
    model = torch.nn.Linear(4, 2)
    a = gw.GradWatch(model, stats=[GradCosine()])
    grads = train(a, model, steps=3)
    state = a.state_dict()
    a.close()
    b = gw.GradWatch(model, stats=[GradCosine()])
    b.load_state_dict(state)  # the previous gradient came back: the first cosine is not NaN
    more = train(b, model, steps=1, seed=1)
    expected = reference_cosines([grads[-1], more[0]])[1]
    assert b.history.stats["cos.prev"][0] == pytest.approx(expected, rel=1e-5)
    old = {k: v for k, v in state.items() if k != "stats"}  # a state saved before statistics existed
    gw.GradWatch(model, stats=[GradCosine()]).load_state_dict(old)
    with pytest.raises(ValueError, match="1 stats, this watch 0"):
        gw.GradWatch(model).load_state_dict(state)


def test_bad_statistics_are_refused_with_the_reason():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match="stats must be gradwatch Contributor objects"):
        gw.GradWatch(model, stats=[object()])
    with pytest.raises(ValueError, match="prefix 'cos'"):
        gw.GradWatch(model, stats=[GradCosine(), GradCosine()])
    clash = GradCosine()
    clash.prefix = "clip"  # the clipper's
    with pytest.raises(ValueError, match="a prefix must be a new identifier"):
        gw.GradWatch(model, stats=[clash], clipper=gw.ClipByNorm(1.0))

    class Sloppy(gw.Contributor):
        prefix = "sloppy"

        def columns(self):
            return {"a": gw.SCALAR}

        def observe(self, view):
            return {"a": view.total, "b": view.total}

    watch = gw.GradWatch(model, stats=[Sloppy()])
    model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(ValueError, match="returned 'b', a column its columns\\(\\) does not declare"):
        watch.step()


def test_a_statistic_adds_no_host_sync():
    model = torch.nn.Linear(4, 2)
    watch = gw.GradWatch(model, stats=[GradCosine()], flush_every=1000)
    for _ in range(2):
        model(torch.ones(1, 4)).sum().backward()
        watch.step()
    model(torch.ones(1, 4)).sum().backward()
    with gw.count_host_syncs() as count:
        watch.step()
    assert count.syncs == 0


def test_summary_and_plots_show_statistics(tmp_path, capsys):
    model = torch.nn.Linear(4, 2)
    with gw.GradWatch(model, stats=[GradCosine()]) as watch:
        grads = train(watch, model)
    h = watch.history
    h.save(tmp_path / "r.npz")
    assert cli_main(["summary", str(tmp_path / "r.npz")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("cos.prev"))
    ref = reference_cosines(grads)[1:]
    assert line.split()[1:] == [f"{ref[-1]:.4g}", f"{np.median(ref):.4g}", "4"]
    assert any(ln.startswith("cos.parts (max)") for ln in out.splitlines())
    ax = gw.plot_stats(h, ["cos.prev", "cos.parts"])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), h.stats["cos.prev"], equal_nan=True)
    np.testing.assert_allclose(ax.lines[1].get_ydata()[1:], h.stats["cos.parts"][1:].max(axis=1))
    img = gw.plot_stats_heatmap(h, "cos.parts").images[0].get_array()
    assert img.shape == (2, 5)
    with pytest.raises(KeyError, match="statistics are"):
        gw.plot_stats(h, ["nope.x"])
    with pytest.raises(ValueError, match="one number per step"):
        gw.plot_stats_heatmap(h, "cos.prev")


def test_a_failing_statistic_loses_only_its_own_share_of_a_flush():
    class Broken(gw.Contributor):
        prefix = "broken"

        def columns(self):
            return {"x": gw.SCALAR}

        def observe(self, view):
            return {"x": view.total}

        def to_history(self, cols):
            return {"broken.x": cols["x"][:1]}  # the wrong number of rows

    class Loud(Broken):
        prefix = "loud"

        def to_history(self, cols):
            return {"loud.x": cols["x"]}

        def events(self, rec):
            raise RuntimeError("loud events")

    model = torch.nn.Linear(4, 2)
    watch = gw.GradWatch(model, stats=[GradCosine(), Broken(), Loud()], flush_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(1, 4)).sum().backward()
        watch.step()
        opt.step()
    with pytest.raises(ValueError, match=r"broken\.x"):
        watch.flush()
    h = watch.history  # nothing left to flush: the rows were stored before the error was raised
    assert h.steps.tolist() == [0, 1] and np.isfinite(h.norms).all()
    assert sorted(h.stats) == ["cos.parts", "cos.prev", "loud.x"]  # the others' columns are kept
    np.testing.assert_allclose(h.stats["loud.x"], h.total)
