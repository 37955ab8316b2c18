"""Sinks, plots and the command line."""

import json
import sys

import matplotlib
import numpy as np
import pytest
import torch

import gradwatch as gw
import gradwatch.cli

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def watched_run(tmp_path, sinks=(), steps=12, flush_every=5, nan_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(
        model,
        clipper=gw.ClipByGlobalNorm(0.5),
        detectors=[gw.Threshold(0.8, action="ignore"), gw.NonFinite(action="ignore")],
        sinks=list(sinks),
        flush_every=flush_every,
    )
    watch.attach(opt)
    for s in range(steps):
        opt.zero_grad()
        out = model(torch.randn(3, 4))
        if s == nan_at:
            out.register_hook(lambda g: g * float("nan"))
        out.square().sum().backward()
        opt.step()
    watch.close()
    return watch.history


def assert_same(a, b, rtol=0.0):
    assert a.names == b.names
    np.testing.assert_array_equal(a.steps, b.steps)
    for key in ("norms", "total", "total_clipped", "clip_coef"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=rtol, equal_nan=True)


def test_csv_round_trip(tmp_path):
    path = tmp_path / "run.csv"
    h = watched_run(tmp_path, [gw.CSVSink(path)], nan_at=4)
    back = gw.read_csv(path)
    assert_same(h, back)  # repr(float) round-trips float32 values exactly
    assert back.norms.dtype == h.norms.dtype == np.float32  # every number is a float32: read back as one
    assert np.isnan(back.total[4])


def test_truncated_csv_and_jsonl_are_read_to_the_last_complete_row(tmp_path):
    csv_path, jsonl_path = tmp_path / "run.csv", tmp_path / "run.jsonl"
    h = watched_run(tmp_path, [gw.CSVSink(csv_path), gw.JSONLSink(jsonl_path)])
    for path, reader in ((csv_path, gw.read_csv), (jsonl_path, gw.read_jsonl)):
        text = path.read_text()
        path.write_text(text[: text.rstrip("\n").rfind("\n") + 15])  # cut inside the last line
        back = reader(path)
        assert 0 < len(back) < len(h) + 1
        np.testing.assert_allclose(back.norms, h.norms[: len(back)], rtol=1e-7)


def test_jsonl_round_trip_with_events_and_nan(tmp_path):
    path = tmp_path / "run.jsonl"
    h = watched_run(tmp_path, [gw.JSONLSink(path)], nan_at=3)
    back = gw.read_jsonl(path)
    assert_same(h, back)
    assert [str(e) for e in back.events] == [str(e) for e in h.events]  # NaN != NaN, so compare text
    np.testing.assert_array_equal([e.value for e in back.events], [e.value for e in h.events])
    assert any(e.kind == "nonfinite" for e in back.events)
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON: NaN is written as a string


def test_tensorboard_sink_read_back_with_event_accumulator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = watched_run(tmp_path, [gw.TensorBoardSink(tmp_path / "tb", histogram=True)])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"grad_norm/total", "grad_norm/total_clipped", "clip/coef", "grad_norm/0.weight"} <= set(tags["scalars"])
    total = acc.Scalars("grad_norm/total")
    assert [s.step for s in total] == h.steps.tolist()
    np.testing.assert_allclose([s.value for s in total], h.total, rtol=1e-6)
    np.testing.assert_allclose([s.value for s in acc.Scalars("clip/coef")], h.clip_coef, rtol=1e-6)
    assert "grad_norm/histogram" in tags["histograms"]
    assert any("events" in t for t in tags["tensors"])  # text summaries


def test_callback_sink_and_group_by(tmp_path):
    chunks = []
    h = watched_run(tmp_path, [gw.CallbackSink(chunks.append, group_by=1)], steps=7, flush_every=3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert chunks[0].names == ["0", "2"]
    g = h.grouped(1)
    expected = np.sqrt(h.norms[:, 0].astype(np.float64) ** 2 + h.norms[:, 1] ** 2)
    np.testing.assert_allclose(g["0"], expected, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([c["0"] for c in chunks]), g["0"], rtol=1e-7)
    with pytest.raises(ValueError, match="by"):
        h.grouped(0)


def _ys(ax):
    return [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]


def _drawn(ax, column):
    """Whether one of the Axes' lines draws ``column`` (NaN where a log axis leaves a value out)."""
    column = np.asarray(column, dtype=float)
    return any(
        y.shape == column.shape and np.allclose(y[np.isfinite(y)], column[np.isfinite(y)]) and np.isfinite(y).any()
        for y in _ys(ax)
    )


@pytest.mark.parametrize(
    ("fn", "kwargs", "drawn"),
    [
        (gw.plot_norms, {"names": ["0.weight", "2.weight"]}, lambda h: [h["0.weight"], h["2.weight"]]),
        (
            gw.plot_norms,
            {"names": ["0.weight"], "clipped": True, "log": True},
            lambda h: [h["0.weight"], h.norms_clipped[:, h.names.index("0.weight")]],
        ),
        (gw.plot_clipping, {}, lambda h: [h.total, h.total_clipped]),
    ],
)
def test_plots_draw_the_recorded_columns(tmp_path, fn, kwargs, drawn):
    h = watched_run(tmp_path)
    assert h.clip_fraction > 0  # the post-clip columns differ from the pre-clip ones
    fig, ax = plt.subplots()
    assert fn(h, ax=ax, **kwargs) is ax
    for column in drawn(h):
        assert _drawn(ax, column)
    fig.savefig(tmp_path / "f.png")  # renders
    plt.close(fig)


def test_heatmap_draws_one_cell_per_parameter_and_step(tmp_path):
    h = watched_run(tmp_path)
    fig, ax = plt.subplots()
    assert gw.plot_heatmap(h, ax=ax) is ax
    cells = np.asarray(ax.images[0].get_array(), dtype=float)
    assert cells.shape in ((len(h.names), len(h)), (len(h), len(h.names)))
    grid = cells if cells.shape == (len(h.names), len(h)) else cells.T
    np.testing.assert_allclose(np.argsort(grid[:, -1]), np.argsort(h.norms[-1]))  # the same order as the norms
    plt.close(fig)


def test_plot_norms_steps_window_and_events(tmp_path):
    h = watched_run(tmp_path, steps=20)
    ax = gw.plot_norms(h, names=["0.weight"], steps=range(5))
    assert ax.lines[0].get_xdata().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="did you mean"):
        gw.plot_norms(h, names=["0.weigth"])
    plt.close("all")


def test_heatmap_labels_stay_readable_for_many_parameters():
    names = [f"layers.{i}.weight" for i in range(300)]
    h = gw.History(names)
    h.append(np.arange(5), np.random.default_rng(0).random((5, 300)) + 1e-3)
    ax = gw.plot_heatmap(h, max_labels=30)
    assert len(ax.get_yticklabels()) <= 30
    assert ax.images[0].get_array().shape == (300, 5)
    plt.close("all")


def test_plot_compare_and_taps():
    a = gw.History(["w"])
    a.append([0, 1, 2], [[1.0], [2.0], [3.0]], taps={"h1": [0.1, 0.2, 0.3], "h2": [1, 2, 3]})
    ax = gw.plot_compare({"a": a, "b": a})
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    ax = gw.plot_taps(a, steps=[0, 2])
    assert len(ax.lines) == 2 and ax.lines[1].get_ydata().tolist() == [0.3, 3.0]
    plt.close("all")


def test_plot_without_matplotlib_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install .*gradwatch\[plot\]"):
        gw.plot_norms(gw.History(["w"]))


def cli(capsys, *args):
    code = gw.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_summary_plot_compare_on_every_format(tmp_path, capsys):
    h = watched_run(tmp_path, [gw.CSVSink(tmp_path / "r.csv"), gw.JSONLSink(tmp_path / "r.jsonl")], nan_at=2)
    h.save(tmp_path / "r.npz")
    for run in ("r.npz", "r.csv", "r.jsonl"):
        code, out, err = cli(capsys, "summary", tmp_path / run)
        assert code == 0, err
        assert "0.weight" in out and f"clipping bound on {h.clip_fraction:.1%} of steps" in out
    assert "nonfinite" in cli(capsys, "summary", tmp_path / "r.npz")[1]
    for kind in ("norms", "heatmap", "clipping"):
        out = tmp_path / f"{kind}.png"
        code, _, err = cli(capsys, "plot", tmp_path / "r.npz", "-o", out, "--kind", kind, "--log")
        assert code == 0 and out.stat().st_size > 1000, err
    code, _, err = cli(capsys, "plot", tmp_path / "r.csv", "-o", tmp_path / "n.png", "--names", "2.bias")
    assert code == 0, err
    code, _, err = cli(capsys, "compare", tmp_path / "r.npz", tmp_path / "r.csv", "-o", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").exists(), err


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "truncated-npz", "foreign-npz", "foreign-text", "directory", "no-rows"]
)
def test_cli_bad_files_are_one_line_errors(tmp_path, kind, capsys):
    path = tmp_path / "bad.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-npz":
        watched_run(tmp_path).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "foreign-npz":
        np.savez(path, x=np.ones(2))
    elif kind == "foreign-text":
        path = tmp_path / "notes.csv"
        path.write_text("hello, world\n")
    elif kind == "directory":
        path = tmp_path
    elif kind == "no-rows":
        path = tmp_path / "empty.csv"
        path.write_text("step,total,total_clipped,clip_coef,w\n")
    for sub in (["summary", path], ["plot", path, "-o", tmp_path / "x.png"]):
        code, out, err = cli(capsys, *sub)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("gradwatch: error:"), err
        assert "Traceback" not in err


def test_cli_unknown_name_is_an_error(tmp_path, capsys):
    watched_run(tmp_path).save(tmp_path / "r.npz")
    code, _, err = cli(capsys, "plot", tmp_path / "r.npz", "-o", tmp_path / "x.png", "--names", "nope")
    assert code == 2 and "nope" in err and "Traceback" not in err
