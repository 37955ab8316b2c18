"""Forensics: the flight recorder, onsets, parameter norms and update-to-weight ratios."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwatch as gw
from gradwatch import cli
from gradwatch.forensics import format_incidents

#: every per-step column a window holds
COLUMNS = (
    "steps",
    "norms",
    "norms_clipped",
    "grad_missing",
    "total",
    "total_clipped",
    "clip_coef",
    "clip_threshold",
    "param_norms",
    "update_norms",
)


def spike(step):
    return 30.0 if step in (17, 41) else 1.0


def run(steps=60, scale=spike, marks=(), opt_cls=torch.optim.SGD, **watch_kw):
    """A deterministic run of a fresh, seeded MLP; ``scale(step)`` multiplies the input."""
    torch.manual_seed(0)
    model = mlp()
    opt = opt_cls(model.parameters(), lr=0.01)
    detectors = [gw.Spike(warmup_steps=5, z_thresh=3.0, per_param=True, action="ignore"), gw.NonFinite("ignore")]
    watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(2.0), detectors=detectors, update_ratio=True, **watch_kw)
    watch.attach(opt)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g) * scale(step)).square().sum().backward()
        opt.step()
        if step in marks:
            watch.mark(f"mark {step}")
    watch.close()
    return watch.history


def rows_of(h, steps):
    idx = np.flatnonzero(np.isin(h.steps, steps))
    return {c: getattr(h, c)[idx] for c in COLUMNS}


def test_incident_windows_are_bit_identical_to_the_every_1_rows():
    dense = run()
    rec = gw.FlightRecorder(before=6, after=3)
    sparse = run(every=10, recorder=rec, flush_every=7, marks=(30,))
    assert sparse.steps.tolist() == list(range(0, 60, 10))
    for c in COLUMNS:  # the kept rows are the every=1 rows
        np.testing.assert_array_equal(getattr(sparse, c), rows_of(dense, sparse.steps)[c], err_msg=c)
    assert sparse.events == dense.events  # events of every step, also between kept rows
    kinds = {(i.step, i.kind) for i in sparse.incidents}
    assert (17, "spike") in kinds and (41, "spike") in kinds and (30, "mark") in kinds
    for inc in sparse.incidents:
        w = inc.history
        assert w.steps.tolist() == list(range(inc.start, inc.end + 1))  # every step of the window
        assert inc.start <= inc.step <= inc.end
        for c in COLUMNS:
            np.testing.assert_array_equal(getattr(w, c), rows_of(dense, w.steps)[c], err_msg=c)
        assert w.events == [e for e in dense.events if inc.start <= e.step <= inc.end]
    mark = next(i for i in sparse.incidents if i.kind == "mark")
    assert mark.reason == "mark 30" and math.isnan(mark.value)


def test_windows_span_flushes_and_the_open_incident_completes_at_close():
    rec = gw.FlightRecorder(before=5, after=20, kinds=[])  # marks only
    h = run(steps=45, every=50, recorder=rec, flush_every=4, marks=(10, 40))
    first, last = h.incidents
    assert (first.step, first.start, first.end) == (10, 5, 30)  # rows from 7 flushes of 4 steps
    assert (last.step, last.start, last.end) == (40, 35, 44)  # cut short at close()
    assert h.steps.tolist() == [0] and first.merged == last.merged == 0


def test_no_host_sync_per_step_with_a_recorder_and_update_ratio():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # Adam's own step reads .item() on CPU
    watch = gw.GradWatch(
        model,
        every=100,
        clipper=gw.ClipByGlobalNorm(1.0),
        detectors=[
            gw.Spike(per_param=True, action="ignore"),
            gw.NonFinite("ignore"),
            gw.Threshold(1.0, action="ignore"),
        ],
        recorder=gw.FlightRecorder(before=4, after=2),
        update_ratio=True,
        flush_every=1000,
    )
    watch.attach(opt)
    for i in range(12):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        if i >= 2:
            with gw.count_host_syncs() as c:
                opt.step()
            assert c.syncs == 0 and c.host_copies == 0
        else:
            opt.step()
        with gw.count_host_syncs() as c:
            watch.mark("loss spike")  # host only
        assert c.syncs == 0 and c.ops == {}
    assert watch.history.incidents == []  # still open: each mark extends it
    watch.close()
    (inc,) = watch.history.incidents
    assert (inc.start, inc.end, len(inc.history)) == (0, 11, 12) and inc.kind in ("threshold", "mark")


def test_an_event_storm_keeps_memory_bounded():
    rec = gw.FlightRecorder(before=4, after=2, max_incidents=3)
    torch.manual_seed(0)
    model = mlp(depth=2)
    watch = gw.GradWatch(model, every=50, detectors=[gw.Threshold(1e-12, names=["*"], action="ignore")], recorder=rec)
    watch.attach(opt := torch.optim.SGD(model.parameters(), lr=1e-4))
    held = []
    for _ in range(400):  # every parameter crosses the threshold at every step
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        held.append(rec.held)
    watch.close()
    h = watch.history
    assert len(h.incidents) == 3 and rec.dropped == math.ceil(400 / rec.max_steps) - 3
    assert h.meta["incidents_dropped"] == rec.dropped
    for inc in h.incidents:  # merged windows stop at max_steps, and never share a row
        assert len(inc.history) == rec.max_steps == 4 * (4 + 1 + 2)
        assert inc.merged == 4 * rec.max_steps - 1  # 4 events a step, the first opened it
    assert [i.start for i in h.incidents] == [0, 28, 56]
    assert max(held) <= rec.max_steps + watch.flush_every


# -- onsets -----------------------------------------------------------------------------------
def test_find_onsets_follows_its_definition():
    h = gw.History(["a", "b", "c", "d"])
    norms = np.ones((8, 4))
    norms[5:, 0] = [4.0, 40.0, 400.0]  # a: up at step 5
    norms[3:, 1] = [3.5, 9.0, 20.0, 30.0, 90.0]  # b: up at step 3
    norms[4, 2] = 0.2  # c: down at step 4 (x0.2 < 1/3)
    norms[6, 3] = np.nan  # d: non-finite at step 6
    missing = np.zeros((8, 4), bool)
    missing[3, 0] = True
    norms[3, 0] = 0.0  # a missing gradient is no departure
    h.append(range(8), norms, grad_missing=missing)
    got = gw.find_onsets(h, factor=3.0, alpha=0.9, direction="both")
    assert [(o.name, o.step) for o in got] == [("b", 3), ("c", 4), ("a", 5), ("d", 6)]
    assert got[0].ratio == pytest.approx(3.5) and got[1].ratio == pytest.approx(0.2) and math.isnan(got[3].ratio)
    up, down = gw.find_onsets(h), gw.find_onsets(h, direction="down")
    assert [o.name for o in up] == ["b", "a", "d"] and [o.name for o in down] == ["c", "d"]
    with pytest.raises(ValueError, match="direction"):
        gw.find_onsets(h, direction="sideways")
    # the reference level is an EMA: 3.5 after 1, 2 departs (x3.18) from a slow EMA, not from a fast one (x2.33)
    rise = gw.History(["w"])
    rise.append(range(4), [[1.0], [2.0], [3.5], [2.0]])
    assert gw.find_onsets(rise, alpha=0.9) == [gw.Onset("w", 2, pytest.approx(3.5 / 1.1))]
    assert gw.find_onsets(rise, alpha=0.5) == []


def test_the_layer_made_to_explode_first_leads_the_onset_ranking():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(6, 6) for _ in range(4)))
    x = torch.randn(5, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put: norms change only by the injection
    first, second = model[2].weight, model[0].bias

    def boost(step, start):
        return 1.0 if step < start else 10.0 ** (step - start + 1)

    watch = gw.GradWatch(
        model,
        every=100,
        detectors=[gw.Threshold(1e4, names=["*"], action="ignore")],
        recorder=gw.FlightRecorder(before=16, after=4),
    )
    watch.attach(opt)
    for step in range(40):
        opt.zero_grad()
        model(x).square().sum().backward()
        first.grad *= boost(step, 20)  # the 'explosion' starts in 2.weight at step 20 ...
        second.grad *= boost(step, 22)  # ... and reaches 0.bias two steps later
        opt.step()
    watch.close()
    inc = watch.history.incidents[0]
    assert [(o.name, o.step) for o in inc.onset[:2]] == [("2.weight", 20), ("0.bias", 22)]
    assert len(inc.onset) == 2 and inc.onset[0].ratio == pytest.approx(10.0, rel=1e-5)
    assert "started in: 2.weight@20 (x10), 0.bias@22 (x10)" in format_incidents(watch.history)


# -- parameter norms and update ratios ------------------------------------------------------------
@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "foreach": False}),
    ],
)
def test_update_ratio_is_the_update_the_optimizer_applied(opt_cls, kw):
    torch.manual_seed(0)
    model = mlp()
    opt = opt_cls(model.parameters(), **kw)
    watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(0.5), update_ratio=True, flush_every=3)
    watch.attach(opt)
    ref_w, ref_d = [], []
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        ref_w.append([torch.linalg.vector_norm(w).item() for w in before])
        ref_d.append([torch.linalg.vector_norm(p.detach() - w).item() for p, w in zip(model.parameters(), before)])
    h = watch.history
    ref_w, ref_d = np.array(ref_w), np.array(ref_d)
    np.testing.assert_allclose(h.param_norms, ref_w, rtol=1e-6)
    np.testing.assert_allclose(h.update_norms, ref_d, rtol=1e-6)
    np.testing.assert_allclose(h.update_ratio, ref_d / ref_w, rtol=2e-6)
    assert (h.update_ratio > 0).all()


def test_update_ratio_with_two_optimizers_and_every():
    torch.manual_seed(0)
    model = mlp(depth=2)
    a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    b = torch.optim.Adam(model[2].parameters(), lr=0.01)
    watch = gw.GradWatch(model, every=2, update_ratio=True)
    watch.attach(a).attach(b)
    ref = []
    for _ in range(6):
        a.zero_grad(), b.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        a.step(), b.step()
        ref.append([torch.linalg.vector_norm(p.detach() - w).item() for p, w in zip(model.parameters(), before)])
    h = watch.history
    assert h.steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(h.update_norms, np.array(ref)[::2], rtol=1e-6)


def test_param_norms_alone_and_grouped():
    torch.manual_seed(0)
    model = mlp(depth=2)
    watch = gw.GradWatch(model, param_norms=True)
    model(torch.randn(3, 8)).sum().backward()
    watch.step()
    h = watch.history
    ref = [torch.linalg.vector_norm(p).item() for p in model.parameters()]
    np.testing.assert_allclose(h.param_norms[0], ref, rtol=1e-6)
    assert np.isnan(h.update_norms).all() and np.isnan(h.update_ratio).all()
    g = h.grouped(1)
    np.testing.assert_allclose(g.param_norms[0], [math.hypot(*ref[:2]), math.hypot(*ref[2:])], rtol=1e-6)


def test_a_skipped_step_has_update_zero():
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, detectors=[gw.Threshold(1e-9, action="skip")], update_ratio=True)
    watch.attach(opt)
    model(torch.randn(3, 8)).sum().backward()
    with pytest.warns(gw.GradientWarning):
        opt.step()
        watch.flush()
    assert (watch.history.update_norms == 0).all()


# -- persistence and sinks ---------------------------------------------------------------------
def test_save_load_round_trip_keeps_incidents_and_weight_columns(tmp_path):
    h = run(every=10, recorder=gw.FlightRecorder(before=6, after=3), marks=(30,))
    h.save(tmp_path / "run.npz")
    back = gw.History.load(tmp_path / "run.npz")
    for c in (*COLUMNS, "update_ratio"):
        np.testing.assert_array_equal(getattr(back, c), getattr(h, c), err_msg=c)
    assert len(back.incidents) == len(h.incidents) >= 3
    for a, b in zip(back.incidents, h.incidents):
        assert (a.step, a.kind, a.name, a.threshold, a.reason, a.merged, a.onset) == (
            b.step,
            b.kind,
            b.name,
            b.threshold,
            b.reason,
            b.merged,
            b.onset,
        )
        assert a.value == b.value or (math.isnan(a.value) and math.isnan(b.value))
        for c in COLUMNS:
            np.testing.assert_array_equal(getattr(a.history, c), getattr(b.history, c), err_msg=c)
        assert a.history.events == b.history.events and a.history.norms.dtype == np.float32


def test_a_file_without_incidents_loads_with_an_empty_list(tmp_path):
    path = tmp_path / "old.npz"
    header = {"format": 2, "names": ["w"], "tap_names": [], "meta": {}, "events": [], "unknown": []}
    np.savez_compressed(path, gradwatch=np.array(json.dumps(header)), steps=np.array([0]), norms=np.ones((1, 1)))
    h = gw.History.load(path)
    assert h.incidents == [] and h.norms.tolist() == [[1.0]] and np.isnan(h.update_ratio).all()


def test_incidents_reach_the_sinks_and_a_companion_file(tmp_path):
    got = []
    csv = gw.CSVSink(tmp_path / "run.csv")
    sinks = [gw.CallbackSink(lambda chunk: got.extend(chunk.incidents)), csv]
    h = run(every=10, recorder=gw.FlightRecorder(before=6, after=3), sinks=sinks, flush_every=5)
    assert [i.step for i in got] == [i.step for i in h.incidents]
    companion = gw.History.load(tmp_path / "run.csv.incidents.npz")
    assert len(companion) == 0 and [i.step for i in companion.incidents] == [i.step for i in h.incidents]
    np.testing.assert_array_equal(companion.incidents[0].history.norms, h.incidents[0].history.norms)
    assert gw.read_csv(tmp_path / "run.csv").steps.tolist() == h.steps.tolist()


def test_cli_incidents(tmp_path, capsys):
    h = run(every=10, recorder=gw.FlightRecorder(before=6, after=3))
    h.save(tmp_path / "run.npz")
    assert cli.main(["incidents", str(tmp_path / "run.npz"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"{len(h.incidents)} incidents" in out
    first = h.incidents[0]
    assert f"started in: {', '.join(map(str, first.onset[:2]))}" in out
    assert cli.main(["incidents", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["incidents", str(tmp_path / "run.npz"), "--top", "0"]) == 2
    assert "--top" in capsys.readouterr().err


def test_plot_incident_marks_the_trigger_and_the_onsets():
    import matplotlib

    matplotlib.use("Agg")
    h = run(every=10, recorder=gw.FlightRecorder(before=6, after=3))
    inc = h.incidents[0]
    ax = gw.plot_incident(inc, top=3)
    labels = [line.get_label() for line in ax.lines]
    assert labels[: min(3, len(inc.onset))] == [o.name for o in inc.onset[:3]]
    assert "global norm" in labels and any(label.startswith("trigger") for label in labels)
    with pytest.raises(KeyError, match="no parameter named"):
        gw.plot_incident(inc, names=["nope"])
    import matplotlib.pyplot as plt

    plt.close("all")


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"before": -1}, ValueError, "before"),
        ({"before": 1.5}, TypeError, "before"),
        ({"after": -2}, ValueError, "after"),
        ({"after": "3"}, TypeError, "after"),
        ({"before": True}, TypeError, "before"),
        ({"max_incidents": 0}, ValueError, "max_incidents"),
        ({"before": 2, "after": 1, "max_steps": 3}, ValueError, "max_steps"),
        ({"kinds": [1]}, TypeError, "kinds"),
        ({"onset_factor": 1.0}, ValueError, "onset_factor"),
    ],
)
def test_bad_recorder_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        gw.FlightRecorder(**kw)


def test_configurations_the_recorder_cannot_serve():
    model = mlp(depth=1)
    rec = gw.FlightRecorder()
    gw.GradWatch(model, recorder=rec)
    with pytest.raises(ValueError, match="recorder: this FlightRecorder already serves another GradWatch"):
        gw.GradWatch(model, recorder=rec)
    with pytest.raises(TypeError, match="recorder must be a gradwatch FlightRecorder"):
        gw.GradWatch(model, recorder=object())
    with pytest.raises(TypeError, match="update_ratio"):
        gw.GradWatch(model, update_ratio=1)
    watch = gw.GradWatch(model, update_ratio=True)
    model(torch.ones(1, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"update_ratio=True.*watch.attach\(optimizer\)"):
        watch.step()


def test_bad_marks():
    model = mlp(depth=1)
    with pytest.raises(RuntimeError, match="mark\\(\\) needs a flight recorder"):
        gw.GradWatch(model).mark("x")
    watch = gw.GradWatch(model, recorder=gw.FlightRecorder())
    with pytest.raises(ValueError, match="step"):
        watch.mark("x", step=1)  # no step has run: only step 0 (the coming one) may be marked
    with pytest.raises(TypeError, match="reason"):
        watch.mark(3)
    with pytest.raises(TypeError, match="value"):
        watch.mark("x", value="big")
    watch.close()
    with pytest.raises(RuntimeError, match=r"GradWatch.mark\(\) after close"):
        watch.mark("late")


# -- the example --------------------------------------------------------------------------------
def test_the_srn_example_captures_the_explosion_between_two_logged_steps(tmp_path, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "srn_digit_sum"
    sys.path.insert(0, str(example))
    try:
        import forensics as srn_forensics
    finally:
        sys.path.remove(str(example))
    assert srn_forensics.main(["--out", str(tmp_path), "--epochs", "3"]) == 0  # 15 steps
    out = capsys.readouterr().out
    h = gw.History.load(tmp_path / "run.npz")
    assert h.steps.tolist() == [0]  # the log of every 25th step holds step 0 only
    inc = h.incidents[0]
    W = h.names.index("rnn_model.W")
    assert inc.history.steps.tolist() == list(range(inc.start, inc.end + 1)) and inc.start == 0
    assert inc.kind == "threshold" and inc.name.startswith("rnn_model.")
    peak = np.nanmax(inc.history.norms[:, W])
    assert peak > srn_forensics.THRESHOLD > 10 * h.norms[0, W]  # orders of magnitude missed by the log
    assert inc.onset and inc.onset[0].step < inc.step  # the departure precedes the threshold crossing
    assert "started in:" in out and (tmp_path / "forensics.png").stat().st_size > 10_000


def test_a_resumed_file_sink_keeps_the_earlier_incidents(tmp_path):
    def part(steps, mode, state=None):
        torch.manual_seed(0)
        model = mlp(depth=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sink = gw.CSVSink(tmp_path / "run.csv", mode=mode)
        watch = gw.GradWatch(model, every=5, sinks=[sink], recorder=gw.FlightRecorder(before=2, after=1, kinds=[]))
        if state is not None:
            watch.load_state_dict(state)
        watch.attach(opt)
        for _ in steps:
            opt.zero_grad()
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            if watch.state_dict()["step"] - 1 in (3, 13):
                watch.mark("here")
        state = watch.state_dict()
        watch.close()
        return state

    state = part(range(10), "w")
    part(range(10), "a", state)
    companion = gw.History.load(tmp_path / "run.csv.incidents.npz")
    assert [(i.step, i.start, i.end) for i in companion.incidents] == [(3, 1, 4), (13, 11, 14)]
    assert gw.read_csv(tmp_path / "run.csv").steps.tolist() == [0, 5, 10, 15]


def test_take_selects_rows_and_their_events():
    h = gw.History(["w"])
    h.append([0, 1, 2], [[1.0], [2.0], [3.0]], events=[gw.Event(1, "spike", "w", 2.0, 1.0)])
    assert h.take([1]).events == h.events and h.take([0, 2]).events == []
    assert h.take(np.array([True, False, True])).norms.tolist() == [[1.0], [3.0]]
    with pytest.raises(IndexError, match="mask"):
        h.take(np.array([True, False]))
    with pytest.raises(IndexError):
        h.take([5])


def test_summary_shows_weights_and_update_ratios_per_group(tmp_path, capsys):
    from gradwatch.cli import main

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, update_ratio=True)
    watch.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    h = watch.history
    h.save(tmp_path / "run.npz")
    assert main(["summary", str(tmp_path / "run.npz")]) == 0
    out = capsys.readouterr().out
    assert "weights and updates per group" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("2 "))  # the group of "2.weight", "2.bias"
    w = np.sqrt(h.param_norms[:, 2] ** 2 + h.param_norms[:, 3] ** 2)
    d = np.sqrt(h.update_norms[:, 2] ** 2 + h.update_norms[:, 3] ** 2)
    assert f"{float(np.median(d / w)):.4g}" in line
