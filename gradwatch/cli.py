"""The ``gradwatch`` command: summarise, plot and compare recorded runs.

RUN is a run file: a ``.npz`` written by :meth:`History.save
<gradwatch.History.save>`, a ``.csv`` written by :class:`~gradwatch.CSVSink`
or a ``.jsonl`` written by :class:`~gradwatch.JSONLSink`. A file with another
suffix is recognised from its first bytes (at most 4 KiB are read for that).
CSV and JSONL files are read in blocks into numpy arrays, so memory grows with
the numbers (8 bytes each), never with the text. Any problem with a file or an
option is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.history import History

__all__ = ["load_run", "main"]

FORMATS = ".npz (History.save), .csv (CSVSink) or .jsonl (JSONLSink)"
_SNIFF_BYTES = 4096
#: first bytes of common files that are not runs, for a helpful error
_NOT_RUNS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"<svg", "an SVG image"),
    (b"<?xml", "an XML document"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
)


class RunError(Exception):
    """A run file or an option that cannot be used; the message is shown as it is."""


def _sniff(p: Path) -> str:
    """The reader for ``p`` from at most its first 4 KiB: ``".npz"``, ``".csv"`` or ``".jsonl"``.

    Raises:
        RunError: the file is not a run file (the message says what it looks like).
    """
    with open(p, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    for magic, what in _NOT_RUNS:
        if head.startswith(magic):
            raise RunError(f"{p}: is {what}, not a gradwatch run file (expected {FORMATS})")
    if head.startswith(b"PK\x03\x04"):
        return ".npz"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"{"):
        return ".jsonl"
    if text.startswith(b"step,total,"):
        return ".csv"
    what = "binary data" if b"\x00" in head or _undecodable(head) else "text of another kind"
    raise RunError(f"{p}: is {what}, not a gradwatch run file (expected {FORMATS})")


def _undecodable(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 4  # a multi-byte character cut at the 4 KiB mark is fine
    return False


def load_run(path: str | os.PathLike) -> History:
    """Read a run from ``.npz``, ``.csv`` or ``.jsonl``, with one-line errors.

    A known suffix picks the reader; any other file is recognised from at most
    its first 4 KiB.

    Args:
        path: the run file.

    Returns:
        The :class:`~gradwatch.History`.

    Raises:
        RunError: a missing, empty, truncated or foreign file, or one without rows.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.log")
        >>> _ = open(path, "w").write("step,total,total_clipped,clip_coef,w\\n0,2.0,2.0,1.0,2.0\\n")
        >>> load_run(path)["w"].tolist()
        [2.0]
    """
    from gradwatch.sinks import read_csv, read_jsonl

    p = Path(path)
    if not p.exists():
        raise RunError(f"{p}: no such file")
    if p.is_dir():
        raise RunError(f"{p}: is a directory, expected a run file: {FORMATS}")
    if p.stat().st_size == 0:
        raise RunError(f"{p}: the file is empty")
    readers = {".npz": History.load, ".csv": read_csv, ".jsonl": read_jsonl, ".json": read_jsonl}
    suffix = p.suffix.lower()
    if suffix not in readers:
        suffix = _sniff(p)
    try:
        h = readers[suffix](p)
    except Exception as exc:  # any parse failure becomes one readable line
        if isinstance(exc, OSError):
            raise RunError(f"{p}: cannot read it ({exc.strerror or exc})") from exc
        _sniff(p)  # a PNG named run.csv: say what it is
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{p}: cannot read it as a gradwatch run ({detail})") from exc
    if len(h) == 0:
        raise RunError(f"{p}: holds no recorded step")
    return h


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _clipping_line(h: History) -> str:
    """What the run's clipping did, or why that is not known."""
    if "clipper" in h.meta and h.meta["clipper"] is None:
        return "clipping: off (the run had no clipper)"
    frac = h.clip_fraction
    if math.isnan(frac):
        return "clipping: unknown (this file does not hold the clip coefficient)"
    clipper = h.meta.get("clipper")
    if clipper is not None:
        return f"clipping bound on {frac:.1%} of steps ({clipper})"
    if frac > 0:
        return f"clipping bound on {frac:.1%} of steps"
    return "clipping never bound (this file does not record whether the run had a clipper)"


def cmd_summary(args: argparse.Namespace) -> int:
    h = load_run(args.run)
    rows = h.summary()
    no_events = h.meta.get("source_format") == "csv"  # CSV files hold no events
    width = max(len("parameter"), len("global norm"), *(len(r["name"]) for r in rows))
    steps = h.steps
    print(f"{args.run}: {len(h)} steps ({steps[0]}..{steps[-1]}), {len(h.names)} parameters")
    if len(steps) > 1 and np.any(np.diff(steps) <= 0):
        print("warning: the steps do not increase: this file may hold several runs")
    cols = ("max", "median", "last", "non-finite")
    header = f"{'parameter':<{width}}  " + "  ".join(f"{c:>10}" for c in cols) + f"  {'clipped':>8}  {'events':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        clipped = "?" if r["clipped"] is None else r["clipped"]
        events = "?" if no_events else r["events"]
        print(
            f"{r['name']:<{width}}  {_fmt(r['max']):>10}  {_fmt(r['median']):>10}  {_fmt(r['last']):>10}  "
            f"{r['nonfinite']:>10}  {clipped:>8}  {events:>6}"
        )
    total = h.total
    fin = total[np.isfinite(total)]
    peak, median = (float(fin.max()), float(np.median(fin))) if fin.size else (math.nan, math.nan)
    print("-" * len(header))
    nonfinite = int((~np.isfinite(total)).sum())
    print(
        f"{'global norm':<{width}}  {_fmt(peak):>10}  {_fmt(median):>10}  {_fmt(float(total[-1])):>10}  {nonfinite:>10}"
    )
    print(_clipping_line(h))
    if no_events:
        print("events: unknown (CSV files do not hold events; JSONLSink and History.save do)")
    else:
        kinds = Counter(e.kind for e in h.events)
        print("events: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) if kinds else "none"))
    if any(r["clipped"] is None for r in rows):
        print("clipped ?: unknown, this file does not hold post-clip norms per parameter (History.save does)")
    _print_weights(h)
    _print_stats(h)
    return 0


def _print_stats(h: History) -> None:
    """The statistics' columns (``History.stats``): last and median value, over finite values."""
    stats = h.stats
    if not stats:
        return
    width = max(len("statistic"), *(len(k) for k in stats))
    print(f"\n{'statistic':<{width}}  {'last':>10}  {'median':>10}  {'finite steps':>12}")
    for name, col in stats.items():
        col = np.asarray(col, dtype=np.float64)
        per_step = col if col.ndim == 1 else _per_step_max(col)
        fin = per_step[np.isfinite(per_step)]
        last = float(fin[-1]) if fin.size else math.nan
        label = name if col.ndim == 1 else f"{name} (max)"
        print(f"{label:<{width}}  {_fmt(last):>10}  {_fmt(_nanmedian(fin)):>10}  {fin.size:>12}")


def _per_step_max(col: np.ndarray) -> np.ndarray:
    """Each row's largest finite value (NaN for a row without one)."""
    masked = np.where(np.isfinite(col), col, -np.inf)
    best = masked.max(axis=1) if col.shape[1] else np.full(len(col), -np.inf)
    return np.where(np.isfinite(best), best, np.nan)


def _print_weights(h: History, depth: int = 1) -> None:
    """Per group: the weight norm and the update-to-weight ratio, when the run recorded them.

    ``GradWatch(param_norms=True)`` records ``‖W‖``, ``update_ratio=True`` also
    ``‖ΔW‖``; a group's norms are the L2 norms of its members'.
    """
    if not h.known("param_norms") or not np.isfinite(h.param_norms).any():
        return
    g = h.grouped(depth)
    weights, updates = g.param_norms, g.update_norms
    has_updates = h.known("update_norms") and np.isfinite(updates).any()
    width = max(len("group"), *(len(n) for n in g.names))
    head = f"{'group':<{width}}  {'|W| median':>10}  {'|W| last':>10}"
    if has_updates:
        head += f"  {'|dW|/|W| median':>15}  {'last':>10}"
    print(f"\nweights{' and updates' if has_updates else ''} per group (module depth {depth}):")
    print(head)
    print("-" * len(head))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = updates / weights
    for j, name in enumerate(g.names):
        w = weights[:, j]
        line = f"{name:<{width}}  {_fmt(_nanmedian(w)):>10}  {_fmt(float(w[-1])):>10}"
        if has_updates:
            r = ratio[:, j]
            line += f"  {_fmt(_nanmedian(r)):>15}  {_fmt(float(r[-1])):>10}"
        print(line)


def _nanmedian(x: np.ndarray) -> float:
    fin = x[np.isfinite(x)]
    return float(np.median(fin)) if fin.size else math.nan


def _output(fig: Any, out: Path) -> tuple[Path, str]:
    """The file matplotlib will write for ``-o out`` and its format.

    Raises:
        RunError: the suffix is not an image format matplotlib can write.
    """
    import matplotlib

    formats = fig.canvas.get_supported_filetypes()
    if not out.suffix:
        fmt = matplotlib.rcParams["savefig.format"]
        return out.with_name(out.name + "." + fmt), fmt
    fmt = out.suffix[1:].lower()
    if fmt not in formats:
        raise RunError(f"-o {out}: {fmt!r} is not an image format; use a suffix from {', '.join(sorted(formats))}")
    return out, fmt


def _savefig(fig: Any, out: Path) -> Path:
    path, fmt = _output(fig, out)
    try:
        fig.savefig(path, format=fmt, dpi=110)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot write the figure ({exc})") from exc
    return path


def _name_error(run: Path, h: History, name: str) -> RunError:
    close = difflib.get_close_matches(name, h.names + h.tap_names, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f" (it has {len(h.names)} parameters)"
    return RunError(f"{run}: no parameter named {name!r}{hint}")


def cmd_plot(args: argparse.Namespace) -> int:
    from gradwatch import plot

    if args.names is not None and args.kind == "clipping":
        raise RunError(
            "--names: the clipping plot draws the global norm only; --names applies to --kind norms, heatmap"
        )
    h = load_run(args.run)
    for name in args.names or ():
        if name not in h.names and name not in h.tap_names:
            raise _name_error(args.run, h, name)
    plt = plot.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        path, _ = _output(fig, args.output)  # a bad suffix fails before drawing
        log = {} if args.log is None else {"log": args.log}
        if args.kind == "norms":
            plot.plot_norms(h, names=args.names, ax=ax, **log)
        elif args.kind == "heatmap":
            plot.plot_heatmap(h, ax=ax, names=args.names, **log)
        else:
            plot.plot_clipping(h, ax=ax, **log)
        ax.set_title(Path(args.run).name)
        path = _savefig(fig, args.output)
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gradwatch import plot

    loaded = [(Path(r), load_run(r)) for r in args.runs]
    labels = [p.stem for p, _ in loaded]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p, _ in loaded]
    for p, h in loaded:
        if args.name is not None and args.name not in (h.names if args.clipped else h.names + h.tap_names):
            raise _name_error(p, h, args.name)
        column = "total_clipped" if args.name is None else "norms_clipped"
        if args.clipped and not h.known(column):
            what = "post-clip global norms" if args.name is None else "post-clip norms per parameter"
            raise RunError(f"{p}: --clipped: this file does not hold {what} (History.save keeps them)")
    plt = plot.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        _output(fig, args.output)
        log = {} if args.log is None else {"log": args.log}
        plot.plot_compare(dict(zip(labels, (h for _, h in loaded))), ax=ax, name=args.name, clipped=args.clipped, **log)
        path = _savefig(fig, args.output)
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return 0


def cmd_incidents(args: argparse.Namespace) -> int:
    from gradwatch.forensics import format_incidents

    if args.top < 1:
        raise RunError(f"--top must be >= 1, got {args.top}")
    run = Path(args.run)
    if run.suffix.lower() in (".csv", ".jsonl", ".json"):  # file sinks keep incidents in a companion file
        companion = Path(f"{run}.incidents.npz")
        if not companion.exists():
            print(f"{run}: no incidents ({companion.name} does not exist: no FlightRecorder incident was written)")
            return 0
        run = companion
    if not run.exists():
        raise RunError(f"{run}: no such file")
    try:
        h = History.load(run)
    except ValueError as exc:
        raise RunError(f"{run}: {exc}") from exc
    print(f"{args.run}: {format_incidents(h, top=args.top)}")
    return 0


def _version() -> str:
    from gradwatch import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradwatch`` command."""
    run_help = f"a run file: {FORMATS}; another suffix is recognised from the file's first bytes"
    out_help = "the image file to write; its suffix picks the format (png, pdf, svg, ...; none: .png is added)"
    log_help = "log or linear y axis (heatmap: colour scale); default: log for heatmap and clipping, linear for norms"
    p = argparse.ArgumentParser(
        prog="gradwatch",
        description=f"Summarise, plot and compare gradwatch runs. A RUN is {FORMATS}.",
        epilog="Errors are one line on stderr with exit status 2.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="summary, plot, compare or incidents (COMMAND --help for its options)",
    )
    s = sub.add_parser(
        "summary",
        help="a table per parameter: max, median, last, non-finite, clipped steps, events",
        description=f"Print a table per parameter and the global norm of one RUN ({FORMATS}).",
    )
    s.add_argument("run", type=Path, metavar="RUN", help=run_help)
    s.set_defaults(fn=cmd_summary)
    pl = sub.add_parser(
        "plot", help="draw one run to an image file", description=f"Draw one RUN ({FORMATS}) to an image file."
    )
    pl.add_argument("run", type=Path, metavar="RUN", help=run_help)
    pl.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help=out_help)
    pl.add_argument(
        "--kind",
        choices=("norms", "heatmap", "clipping"),
        default="norms",
        help="norms: chosen parameters over steps (default); heatmap: parameters x steps; "
        "clipping: global norm before/after clipping and the threshold",
    )
    pl.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="parameters to draw (norms: default the first 10; heatmap: default all); not for --kind clipping",
    )
    pl.add_argument("--log", action=argparse.BooleanOptionalAction, default=None, help=log_help)
    pl.set_defaults(fn=cmd_plot)
    c = sub.add_parser(
        "compare",
        help="several runs' global norms (or one parameter's) on one figure",
        description=f"Draw several RUNs ({FORMATS}) on one figure.",
    )
    c.add_argument("runs", nargs="+", type=Path, metavar="RUN", help=run_help)
    c.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help=out_help)
    c.add_argument(
        "--name", metavar="NAME", help="compare this parameter (present in every run) instead of the global norm"
    )
    c.add_argument(
        "--clipped",
        action="store_true",
        help="compare post-clip values (per-parameter post-clip norms are only in .npz runs)",
    )
    c.add_argument(
        "--log", action=argparse.BooleanOptionalAction, default=None, help="log or linear y axis (default: log)"
    )
    c.set_defaults(fn=cmd_compare)
    inc = sub.add_parser(
        "incidents",
        help="a flight recorder's incidents: trigger, window, where it started (onset ranking) and, with "
        "PerExampleNorms, the examples with the largest gradient contributions",
        description="Print the incidents of RUN: a .npz (History.save), or the <RUN>.incidents.npz file written "
        "beside a .csv/.jsonl sink's file.",
    )
    inc.add_argument("run", type=Path, metavar="RUN", help=run_help)
    inc.add_argument("--top", type=int, default=5, metavar="N", help="onsets and examples per incident (default 5)")
    inc.set_defaults(fn=cmd_incidents)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a bad file or option (one line on stderr).

    Example:
        >>> import tempfile, os
        >>> main(["summary", os.path.join(tempfile.mkdtemp(), "missing.npz")])  # the error goes to stderr
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RunError, ImportError) as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gradwatch summary run.npz | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
