"""The ``gradwatch`` command: summarise, plot and compare recorded runs.

RUN is a history written by ``History.save`` (``.npz``) or a file of
:class:`~gradwatch.CSVSink` (``.csv``) or :class:`~gradwatch.JSONLSink`
(``.jsonl``). Any problem with a file is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gradwatch.history import History

__all__ = ["load_run", "main"]


class RunError(Exception):
    """A run file that cannot be read; the message is shown as it is."""


def load_run(path: str | Path) -> History:
    """Read a run from ``.npz``, ``.csv`` or ``.jsonl``, with one-line errors.

    Raises:
        RunError: missing, empty, truncated or foreign file.
    """
    from gradwatch.sinks import read_csv, read_jsonl

    p = Path(path)
    if not p.exists():
        raise RunError(f"{p}: no such file")
    if p.is_dir():
        raise RunError(f"{p}: is a directory, expected a .npz, .csv or .jsonl run file")
    if p.stat().st_size == 0:
        raise RunError(f"{p}: the file is empty")
    suffix = p.suffix.lower()
    readers = {".npz": History.load, ".csv": read_csv, ".jsonl": read_jsonl, ".json": read_jsonl}
    if suffix not in readers:
        head = p.read_bytes()[:4]
        suffix = ".npz" if head.startswith(b"PK") else ".jsonl" if head.startswith(b"{") else ".csv"
    try:
        h = readers[suffix](p)
    except RunError:
        raise
    except Exception as exc:  # any parse failure becomes one readable line
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{p}: cannot read it as a gradwatch run ({detail})") from exc
    if len(h) == 0:
        raise RunError(f"{p}: holds no recorded step")
    return h


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def cmd_summary(args: argparse.Namespace) -> int:
    h = load_run(args.run)
    rows = h.summary()
    width = max(len("parameter"), *(len(r["name"]) for r in rows))
    print(f"{args.run}: {len(h)} steps ({h.steps[0]}..{h.steps[-1]}), {len(h.names)} parameters")
    cols = ("max", "median", "last", "non-finite")
    header = f"{'parameter':<{width}}  " + "  ".join(f"{c:>10}" for c in cols) + f"  {'clipped':>8}  {'events':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<{width}}  {_fmt(r['max']):>10}  {_fmt(r['median']):>10}  {_fmt(r['last']):>10}  "
            f"{r['nonfinite']:>10}  {r['clipped']:>8}  {r['events']:>6}"
        )
    fin = h.total[np.isfinite(h.total)]
    peak, median = (float(fin.max()), float(np.median(fin))) if fin.size else (math.nan, math.nan)
    print("-" * len(header))
    print(f"{'global norm':<{width}}  {_fmt(peak):>10}  {_fmt(median):>10}  {_fmt(float(h.total[-1])):>10}")
    print(f"clipping bound on {h.clip_fraction:.1%} of steps")
    kinds = Counter(e.kind for e in h.events)
    print("events: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) if kinds else "none"))
    return 0


def _savefig(fig, out: Path) -> None:
    try:
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as exc:
        raise RunError(f"{out}: cannot write the figure ({exc})") from exc


def cmd_plot(args: argparse.Namespace) -> int:
    from gradwatch import plot

    h = load_run(args.run)
    plt = plot._pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        if args.kind == "norms":
            plot.plot_norms(h, names=args.names, ax=ax, log=args.log)
        elif args.kind == "heatmap":
            plot.plot_heatmap(h, ax=ax, names=args.names, log=True)
        else:
            plot.plot_clipping(h, ax=ax, log=args.log)
    except KeyError as exc:
        raise RunError(f"{args.run}: {exc.args[0]}") from exc
    ax.set_title(Path(args.run).name)
    _savefig(fig, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gradwatch import plot

    runs = {Path(r).stem: load_run(r) for r in args.runs}
    if len(runs) < len(args.runs):
        runs = {str(r): load_run(r) for r in args.runs}
    plt = plot._pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        plot.plot_compare(runs, ax=ax, name=args.name, clipped=args.clipped, log=args.log)
    except ValueError as exc:
        raise RunError(f"--name {args.name!r} is not a parameter of every run") from exc
    _savefig(fig, args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradwatch", description="Summarise, plot and compare gradwatch runs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="a table per parameter: max, median, last, clipped steps, events")
    s.add_argument("run", type=Path)
    s.set_defaults(fn=cmd_summary)
    pl = sub.add_parser("plot", help="draw one run")
    pl.add_argument("run", type=Path)
    pl.add_argument("-o", "--output", type=Path, required=True, help="image file (png, pdf, svg)")
    pl.add_argument("--kind", choices=("norms", "heatmap", "clipping"), default="norms")
    pl.add_argument("--names", nargs="+", help="parameters to draw (default: the first 10)")
    pl.add_argument("--log", action="store_true", help="log-scale y axis")
    pl.set_defaults(fn=cmd_plot)
    c = sub.add_parser("compare", help="several runs' global norms on one figure")
    c.add_argument("runs", nargs="+", type=Path)
    c.add_argument("-o", "--output", type=Path, required=True)
    c.add_argument("--name", help="compare this parameter instead of the global norm")
    c.add_argument("--clipped", action="store_true", help="compare post-clip values")
    c.add_argument("--log", action="store_true", help="log-scale y axis")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RunError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gradwatch summary run.npz | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
