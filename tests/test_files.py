"""Files on disk and the command line: the existing-file policy of the file sinks, the readers, the CLI's
errors and options, argument validation, and bounded memory (measured, not timed)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gradwatch as gw
from gradwatch import cli

SINKS = [(gw.CSVSink, gw.read_csv, "csv"), (gw.JSONLSink, gw.read_jsonl, "jsonl")]
NAMES = ["enc.weight", "enc.bias", "head.weight"]


def chunk(steps, names=NAMES, clip=True, events=()):
    """A History of the given steps with float32 norms, as a watch hands it to its sinks."""
    steps = list(steps)
    rng = np.random.default_rng(steps[0] if steps else 0)
    norms = (rng.random((len(steps), len(names))) * 3 + 0.1).astype(np.float32)
    total = np.sqrt(np.square(norms.astype(np.float64)).sum(1)).astype(np.float32)
    coef = np.minimum(1.0, 1.0 / total).astype(np.float32) if clip else np.ones(len(steps), np.float32)
    h = gw.History(names, {"clipper": "ClipByGlobalNorm(max_norm=1.0)" if clip else None})
    h.append(
        steps,
        norms,
        norms_clipped=norms * coef[:, None],
        total=total,
        total_clipped=total * coef,
        clip_coef=coef,
        events=events,
    )
    return h


def write_run(sink, *chunks, names=NAMES, meta=None):
    sink.open(list(names), meta if meta is not None else {"clipper": "ClipByGlobalNorm(max_norm=1.0)"})
    try:
        for c in chunks:
            sink.write(c)
    finally:
        sink.close()


def assert_rows(back, *chunks):
    """``back`` holds exactly the rows of ``chunks``, in order (the file's numbers round-trip exactly)."""
    steps = np.concatenate([c.steps for c in chunks])
    np.testing.assert_array_equal(back.steps, steps)
    for key in ("norms", "total", "total_clipped", "clip_coef"):
        want = np.concatenate([getattr(c, key) for c in chunks]).astype(np.float64)
        np.testing.assert_array_equal(getattr(back, key), want, err_msg=key)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def train(sinks, steps=6, flush_every=4, clipper=None, state=None):
    """A tiny watched training run; returns the closed watch."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, clipper=clipper, sinks=list(sinks), flush_every=flush_every)
    if state is not None:
        watch.load_state_dict(state)
    watch.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    watch.close()
    return watch


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- the existing-file policy -------------------------------------------------------------------


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_rerunning_a_script_never_mixes_two_runs_in_one_file(tmp_path, Sink, read, ext, capsys):
    """Today a rerun doubles a CSV's rows ("400 steps (0..199)") and JSONL appends to any file."""
    path = tmp_path / f"run.{ext}"
    train([Sink(path)])
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"mode='w' to overwrite it, or mode='a' to append"):
        train([Sink(path)])
    assert path.read_bytes() == before
    other = tmp_path / f"other.{ext}"  # refused when built: no other sink of the watch has created its file
    with pytest.raises(FileExistsError):
        train([Sink(other), Sink(path)])
    assert not other.exists()
    code, out, _ = run_cli(capsys, "summary", path)
    assert code == 0 and out.startswith(f"{path}: 6 steps (0..5)")


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_w_overwrites_and_an_empty_file_counts_as_new(tmp_path, Sink, read, ext):
    path = tmp_path / f"run.{ext}"
    path.write_text("")
    write_run(Sink(path), chunk(range(5)))  # the default mode accepts an empty file
    write_run(Sink(path, mode="w"), chunk(range(3)))
    back = read(path)
    assert_rows(back, chunk(range(3)))
    assert path.read_text().count("enc.weight") == (1 if ext == "csv" else 4)  # one header (JSONL: + 3 rows)


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_a_resumes_the_same_run_after_its_last_step(tmp_path, Sink, read, ext):
    path = tmp_path / f"run.{ext}"
    ev = gw.Event(6, "spike", "enc.weight", 9.0, 3.0)
    write_run(Sink(path), chunk(range(4)), chunk(range(4, 8), events=[ev]))
    write_run(Sink(path, mode="a"), chunk(range(8, 11)))
    back = read(path)
    assert_rows(back, chunk(range(4)), chunk(range(4, 8)), chunk(range(8, 11)))
    if ext == "jsonl":
        assert back.events == [ev]
    # and end to end: a watch restored from its state continues the file
    path2 = tmp_path / f"train.{ext}"
    first = train([Sink(path2)], steps=5)
    train([Sink(path2, mode="a")], steps=3, state=first.state_dict())
    assert read(path2).steps.tolist() == list(range(8))


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_a_refuses_to_write_steps_that_do_not_follow_the_file(tmp_path, Sink, read, ext):
    """A rerun from step 0 with mode='a' (the watch not restored) must not duplicate the steps."""
    path = tmp_path / f"run.{ext}"
    write_run(Sink(path), chunk(range(6)))
    sink = Sink(path, mode="a")
    sink.open(NAMES, {})
    with pytest.raises(ValueError, match=r"holds steps up to 5 and this run writes step 0.*load_state_dict"):
        sink.write(chunk(range(3)))
    with pytest.raises(ValueError, match="holds steps up to 5"):  # and keeps refusing
        sink.write(chunk(range(3, 6)))
    sink.close()
    assert_rows(read(path), chunk(range(6)))
    # through a watch: the error reaches the user at the flush, and the watch's history keeps the rows
    path2 = tmp_path / f"train.{ext}"
    train([Sink(path2)], steps=5)
    model = make_model()
    watch = gw.GradWatch(model, sinks=[Sink(path2, mode="a")])
    model(torch.ones(1, 3)).sum().backward()
    watch.step()
    with pytest.raises(ValueError, match="holds steps up to 4 and this run writes step 0"):
        watch.flush()
    assert watch.history.steps.tolist() == [0]
    watch.close()
    assert read(path2).steps.tolist() == list(range(5))


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_a_refuses_another_runs_file_or_a_foreign_file(tmp_path, Sink, read, ext):
    path = tmp_path / f"run.{ext}"
    write_run(Sink(path), chunk(range(3)))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="mode='w'"):
        Sink(path, mode="a").open(["other.weight"], {})
    assert path.read_bytes() == before
    foreign = tmp_path / f"notes.{ext}"
    foreign.write_text('{"hello": 1}\n' if ext == "jsonl" else "a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"not a (JSONLSink file|CSV of this run)"):
        Sink(foreign, mode="a").open(NAMES, {})
    assert foreign.read_text().startswith(("a,b,c", '{"hello"'))


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_a_after_a_crash_removes_the_cut_line_and_loses_no_new_row(tmp_path, Sink, read, ext):
    """Appending after a line cut by a crash glued the first new row onto it, so it could not be read."""
    path = tmp_path / f"run.{ext}"
    write_run(Sink(path), chunk(range(5)))
    text = path.read_bytes()
    path.write_bytes(text[: text.rstrip(b"\r\n").rfind(b"\n") + 9])  # step 4's line cut after 8 bytes
    write_run(Sink(path, mode="a"), chunk(range(4, 7)))  # the run resumes from its last flushed step
    assert_rows(read(path), chunk(range(4)), chunk(range(4, 7)))


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_mode_a_on_a_missing_file_starts_it(tmp_path, Sink, read, ext):
    path = tmp_path / "sub" / f"run.{ext}"
    write_run(Sink(path, mode="a"), chunk(range(2)))
    assert_rows(read(path), chunk(range(2)))


# -- readers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_a_last_line_cut_inside_its_last_number_is_dropped(tmp_path, Sink, read, ext):
    """Today read_csv returns 6.96 for 6.962656 when a crash cuts the last field."""
    path = tmp_path / f"run.{ext}"
    write_run(Sink(path), chunk(range(4)))
    text = path.read_text()
    last = text.rstrip("\r\n")
    cut = last.rfind(",") + 5 if ext == "csv" else last.rfind(":") + 6  # inside the last number
    path.write_text(text[:cut], newline="")
    back = read(path)
    assert_rows(back, chunk(range(3)))


@pytest.mark.parametrize(("Sink", "read", "ext"), SINKS)
def test_columns_a_file_does_not_hold_are_unknown_not_zero(tmp_path, Sink, read, ext, capsys):
    """A run that clipped every step: today `summary run.csv` says 0 clipped steps per parameter."""
    path = tmp_path / f"run.{ext}"
    h = train([Sink(path)], steps=6, clipper=gw.ClipByGlobalNorm(1e-3)).history
    assert all(r["clipped"] == 6 for r in h.summary())  # the watch itself knows
    back = read(path)
    assert not back.known("norms_clipped") and back.known("norms") and back.known("total_clipped")
    assert np.isnan(back.norms_clipped).all()
    assert all(r["clipped"] is None for r in back.summary())
    np.testing.assert_array_equal(back.total_clipped, h.total_clipped.astype(np.float64))
    code, out, _ = run_cli(capsys, "summary", path)
    table = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in h.names]
    assert code == 0 and len(table) == len(h.names)
    assert all(row.split()[5] == "?" for row in table)
    assert "clipped ?: unknown" in out and "clipping bound on 100.0% of steps" in out


def test_readers_name_the_line_at_fault_and_never_show_codec_errors(tmp_path):
    path = tmp_path / "run.csv"
    write_run(gw.CSVSink(path), chunk(range(3)))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([*lines[:2], "1,2,oops\r\n", *lines[2:]]), newline="")
    with pytest.raises(ValueError, match="line 3"):
        gw.read_csv(path)
    jpath = tmp_path / "run.jsonl"
    write_run(gw.JSONLSink(jpath), chunk(range(3)))
    lines = jpath.read_text().splitlines(keepends=True)
    jpath.write_text("".join([*lines[:2], '{"type": "step", "step": 1}\n', *lines[2:]]))
    with pytest.raises(ValueError, match="line 3"):
        gw.read_jsonl(jpath)
    png = tmp_path / "fig.csv"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for read in (gw.read_csv, gw.read_jsonl):
        with pytest.raises(ValueError, match="not a gradwatch"):
            read(png)


def test_read_jsonl_keeps_the_runs_description(tmp_path):
    path = tmp_path / "run.jsonl"
    write_run(gw.JSONLSink(path), chunk(range(2), clip=False), meta={"clipper": None, "every": 1})
    back = gw.read_jsonl(path)
    assert back.meta["clipper"] is None and back.meta["every"] == 1


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: gw.CSVSink(None), TypeError, "path must be a str or os.PathLike"),
        (lambda: gw.CSVSink(b"run.csv"), TypeError, "path must be a str or os.PathLike"),
        (lambda: gw.JSONLSink(""), ValueError, "path must be a non-empty path"),
        (lambda: gw.CSVSink("r.csv", mode="r"), ValueError, "mode must be one of 'x', 'w', 'a'"),
        (lambda: gw.JSONLSink("r.jsonl", mode=None), TypeError, "mode must be one of 'x', 'w', 'a'"),
        (lambda: gw.CSVSink("r.csv", group_by=0), ValueError, "group_by must be an integer in"),
        (lambda: gw.CSVSink("r.csv", group_by="layers"), TypeError, "group_by must be None, a module depth"),
        (lambda: gw.JSONLSink("r.jsonl", group_by=True), TypeError, "group_by must be None, a module depth"),
        (lambda: gw.CallbackSink(None), TypeError, "fn must be callable"),
        (lambda: gw.CallbackSink(print, group_by=-1), ValueError, "group_by"),
        (lambda: gw.TensorBoardSink(5), TypeError, "log_dir must be a str or os.PathLike"),
        (lambda: gw.TensorBoardSink("tb", histogram="yes"), TypeError, "histogram must be True or False"),
        (lambda: gw.read_csv(None), TypeError, "path must be a str or os.PathLike"),
        (lambda: gw.read_jsonl(3), TypeError, "path must be a str or os.PathLike"),
    ],
)
def test_sink_and_reader_arguments_are_validated(tmp_path, monkeypatch, make, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        make()
    assert not any(tmp_path.iterdir())  # a rejected sink created nothing


def test_a_file_sink_cannot_be_opened_twice(tmp_path):
    sink = gw.CSVSink(tmp_path / "r.csv")
    sink.open(NAMES, {})
    with pytest.raises(RuntimeError, match="already open"):
        sink.open(NAMES, {})
    sink.close()


def test_tensorboard_sink_none_uses_tensorboards_default_run_directory(tmp_path, monkeypatch):
    """Today TensorBoardSink(None) writes to a folder named "None"."""
    monkeypatch.chdir(tmp_path)
    sink = gw.TensorBoardSink(None)
    write_run(sink, chunk(range(2)))
    assert not (tmp_path / "None").exists()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and any(f.name.startswith("events.out.tfevents") for f in runs[0].iterdir())


def test_install_hint_names_a_command_that_works_from_a_clone(monkeypatch):
    """gradwatch is installed from a clone: `pip install "gradwatch[tensorboard]"` cannot work."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError) as info:
        gw.TensorBoardSink("tb")
    msg = str(info.value)
    assert 'pip install -e ".[tensorboard]"' in msg and "pip install tensorboard" in msg
    assert "gradwatch[" not in msg


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path):
    """The same clipped run as .npz, .csv and .jsonl, and an unclipped one as .npz."""
    w = train([gw.CSVSink(tmp_path / "r.csv"), gw.JSONLSink(tmp_path / "r.jsonl")], clipper=gw.ClipByGlobalNorm(0.5))
    w.history.save(tmp_path / "r.npz")
    train([gw.JSONLSink(tmp_path / "plain.jsonl")]).history.save(tmp_path / "plain.npz")
    return tmp_path


def test_compare_with_a_name_missing_from_one_run_is_one_line_exit_2(runs, tmp_path, capsys):
    other = gw.History(["w"])
    other.append([0, 1], [[1.0], [2.0]])
    other.save(tmp_path / "other.npz")
    for extra in ([], ["--clipped"]):
        code, _, err = run_cli(
            capsys,
            "compare",
            runs / "r.npz",
            tmp_path / "other.npz",
            "--name",
            "0.weight",
            "-o",
            tmp_path / "c.png",
            *extra,
        )
        assert code == 2 and err.count("\n") == 1 and "other.npz: no parameter named '0.weight'" in err, err
    code, _, err = run_cli(
        capsys, "compare", runs / "r.npz", runs / "r.csv", "--name", "0.weigth", "-o", runs / "c.png"
    )
    assert code == 2 and "did you mean '0.weight'" in err
    code, out, err = run_cli(capsys, "compare", runs / "r.npz", runs / "r.csv", "--name", "0.weight", "-o", runs / "c")
    assert code == 0 and out == f"wrote {runs / 'c.png'}\n" and (runs / "c.png").stat().st_size > 1000, err


def test_compare_clipped_refuses_a_file_without_post_clip_norms(runs, capsys):
    code, _, err = run_cli(
        capsys, "compare", runs / "r.npz", runs / "r.csv", "--name", "0.weight", "--clipped", "-o", runs / "c.png"
    )
    assert code == 2 and "r.csv: --clipped: this file does not hold post-clip norms per parameter" in err
    code, _, err = run_cli(capsys, "compare", runs / "r.npz", runs / "r.csv", "--clipped", "-o", runs / "c.png")
    assert code == 0, err  # the post-clip global norm is in every file


def test_plot_reports_the_file_it_wrote_and_rejects_what_it_would_ignore(runs, capsys):
    code, out, _ = run_cli(capsys, "plot", runs / "r.npz", "-o", runs / "fig")
    assert code == 0 and out == f"wrote {runs / 'fig.png'}\n" and (runs / "fig.png").exists()
    assert not (runs / "fig").exists()
    code, _, err = run_cli(capsys, "plot", runs / "r.npz", "-o", runs / "fig.xyz")
    assert code == 2 and "'xyz' is not an image format" in err and not (runs / "fig.xyz").exists()
    code, _, err = run_cli(
        capsys, "plot", runs / "r.npz", "-o", runs / "c.png", "--kind", "clipping", "--names", "2.bias"
    )
    assert code == 2 and err.count("\n") == 1 and "--names" in err and not (runs / "c.png").exists()
    code, out, err = run_cli(
        capsys, "plot", runs / "r.jsonl", "-o", runs / "h.svg", "--kind", "heatmap", "--names", "2.bias"
    )
    assert code == 0 and (runs / "h.svg").read_text().startswith("<?xml"), err
    code, _, err = run_cli(capsys, "plot", runs / "r.npz", "-o", runs / "n.png", "--names", "2.bais")
    assert code == 2 and "no parameter named '2.bais'; did you mean '2.bias'" in err


@pytest.mark.parametrize("suffix", [".png", ".csv", ".dat"])
def test_an_image_given_as_a_run_says_it_is_not_a_run_file(runs, capsys, suffix):
    """Today a PNG fails with "'utf-8' codec can't decode byte 0x89"."""
    cli.main(["plot", str(runs / "r.npz"), "-o", str(runs / "fig.png")])
    capsys.readouterr()
    img = runs / f"image{suffix}"
    img.write_bytes((runs / "fig.png").read_bytes())
    code, _, err = run_cli(capsys, "summary", img)
    assert (
        code == 2
        and err == f"gradwatch: error: {img}: is a PNG image, not a gradwatch run file (expected {cli.FORMATS})\n"
    )


def test_unknown_suffixes_are_recognised_from_the_first_bytes(runs, capsys):
    for src in ("r.csv", "r.jsonl", "r.npz"):
        dst = runs / (src.replace(".", "_") + ".log")
        dst.write_bytes((runs / src).read_bytes())
        code, out, err = run_cli(capsys, "summary", dst)
        assert code == 0 and "6 steps (0..5)" in out, err
    (runs / "notes.txt").write_text("hello\n")
    code, _, err = run_cli(capsys, "summary", runs / "notes.txt")
    assert code == 2 and "is text of another kind, not a gradwatch run file" in err


def test_summary_of_a_run_without_a_clipper_says_so(runs, capsys):
    """Today: "clipping bound on 0.0% of steps"."""
    for name in ("plain.npz", "plain.jsonl"):
        code, out, _ = run_cli(capsys, "summary", runs / name)
        assert code == 0 and "clipping: off (the run had no clipper)" in out and "0.0%" not in out
    code, out, _ = run_cli(capsys, "summary", runs / "r.npz")
    h = gw.History.load(runs / "r.npz")
    assert f"clipping bound on {h.clip_fraction:.1%} of steps (ClipByGlobalNorm" in out
    assert "clipped ?" not in out and "events: none" in out


def test_summary_of_a_csv_says_what_the_file_cannot_tell(runs, capsys):
    write_run(gw.CSVSink(runs / "plain.csv"), chunk(range(3), clip=False))
    code, out, _ = run_cli(capsys, "summary", runs / "plain.csv")
    assert code == 0
    assert "clipping never bound (this file does not record whether the run had a clipper)" in out
    assert "events: unknown (CSV files do not hold events" in out


def test_summary_warns_about_a_file_holding_several_runs(tmp_path, capsys):
    path = tmp_path / "old.csv"  # as the old CSVSink wrote it when a script ran twice
    write_run(gw.CSVSink(path), chunk(range(4)))
    text = path.read_text()
    path.write_text(text + text.split("\n", 1)[1], newline="")
    code, out, _ = run_cli(capsys, "summary", path)
    assert code == 0 and "8 steps (0..3)" in out and "this file may hold several runs" in out


def test_version_and_help_for_every_argument(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"gradwatch {gw.__version__}\n"
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for p in [parser, *sub.choices.values()]:
        for action in p._actions:
            assert action.help, f"{p.prog}: {action.option_strings or action.dest} has no help"
    for command in sub.choices:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        for fmt in (".npz", ".csv", ".jsonl", "History.save", "CSVSink", "JSONLSink"):
            assert fmt in text, (command, fmt)


def test_bad_options_exit_2_without_a_traceback(runs, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plot", str(runs / "r.npz"), "-o", "x.png", "--kind", "pie"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_console_script_entry_point(runs):
    res = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "summary", str(runs / "r.jsonl")], capture_output=True, text=True
    )
    assert res.returncode == 0 and "6 steps (0..5)" in res.stdout, res.stderr


_MEASURE = textwrap.dedent(
    """
    import json, sys
    from gradwatch import cli

    def peak():  # the process's peak resident memory (VmHWM), in bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def reset():  # reset the peak to the current resident memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak()

    out = {}
    for key, argv in (("sniff", ["summary", sys.argv[1]]), ("summary", ["summary", sys.argv[2]])):
        base = reset()
        out[key] = {"code": cli.main(argv), "growth": peak() - base}
    print(json.dumps(out), file=sys.stderr)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to measure resident memory")
def test_cli_memory_is_bounded_by_the_numbers_not_the_file(tmp_path):
    """Today sniffing a 1 GiB file of unknown suffix peaks at 2.3 GB, `summary` of a 300 MB CSV at 2.5 GB.

    Measured, not timed: the growth of the peak resident memory (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs`` before each call) of a fresh process. Sniffing reads 4 KiB of a sparse
    1 GiB file; `summary` of a 24 MB CSV of float32 norms holds its numbers (4 bytes each, twice while
    the History is built), about half the file's size (12-14 MB measured; the old reader: 187 MB).
    """
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: no disk used, 1 GiB if read
    csv_path = tmp_path / "big.csv"
    names = [f"layers.{i}.weight" for i in range(60)]
    sink = gw.CSVSink(csv_path)
    sink.open(names, {})
    for start in range(0, 20_000, 5_000):
        sink.write(chunk(range(start, start + 5_000), names=names))
    sink.close()
    size = csv_path.stat().st_size
    assert size > 20e6
    res = subprocess.run([sys.executable, "-c", _MEASURE, str(big), str(csv_path)], capture_output=True, text=True)
    got = json.loads(res.stderr.strip().splitlines()[-1])
    assert got["sniff"]["code"] == 2 and got["summary"]["code"] == 0, res.stderr
    assert got["sniff"]["growth"] < 32e6, got
    print(f"CSV {size / 1e6:.1f} MB, peak growth {got}")
    assert got["summary"]["growth"] < 0.75 * size, (got, size)
    assert "20000 steps (0..19999)" in res.stdout and "layers.59.weight" in res.stdout
