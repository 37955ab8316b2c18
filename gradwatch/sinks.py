"""Sinks: where the rows and events go at every flush (files, TensorBoard, your logger).

A sink has three methods, called by :class:`~gradwatch.GradWatch`:
``open(names, meta)`` once, ``write(chunk)`` at every flush with a
:class:`~gradwatch.History` holding just the new rows and events, and
``close()`` from ``GradWatch.close()`` (or at interpreter exit).
"""

from __future__ import annotations

import atexit
import csv
import json
import math
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.detect import Event
from gradwatch.history import History

__all__ = ["CSVSink", "CallbackSink", "JSONLSink", "Sink", "TensorBoardSink", "read_csv", "read_jsonl"]

_OPEN_SINKS: weakref.WeakSet[Sink] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - runs at interpreter exit
    for sink in list(_OPEN_SINKS):
        sink.close()


def _num(x: float) -> float | str:
    """JSON has no NaN/Inf: write them as the strings "nan", "inf", "-inf"."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _unnum(x: Any) -> float:
    return float(x)


class Sink(ABC):
    """Base class: subclasses implement ``_write(chunk)`` and usually :meth:`open`/:meth:`close`.

    Args:
        group_by: aggregate parameters before writing (see :meth:`History.grouped`).
    """

    def __init__(self, group_by: Any = None) -> None:
        self.group_by = group_by
        self.names: list[str] = []
        self.closed = False

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        """Called once with the parameter names and the run's description."""
        if self.group_by is not None:
            names = History(names).grouped(self.group_by).names
        self.names = list(names)
        _OPEN_SINKS.add(self)

    def write(self, chunk: History) -> None:
        """Called at every flush with the new rows and events."""
        self._write(chunk.grouped(self.group_by) if self.group_by is not None else chunk)

    @abstractmethod
    def _write(self, chunk: History) -> None:
        """Write one flush's rows and events (already grouped when ``group_by`` is set)."""

    def close(self) -> None:
        """Flush and release resources; safe to call twice."""
        self.closed = True
        _OPEN_SINKS.discard(self)


class _FileSink(Sink):
    """A sink writing to one text file, kept open across flushes and flushed after each."""

    def __init__(self, path: str | os.PathLike, group_by: Any = None) -> None:
        super().__init__(group_by)
        self.path = Path(path)
        self._file = None

    def _open_file(self, mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, mode, newline="")

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        super().close()


class CSVSink(_FileSink):
    """One CSV row per recorded step: ``step, total, total_clipped, clip_coef``, then each parameter.

    The header is written once; an existing file with the same header is
    appended to (a resumed run continues it), a different header is an error.
    Rows reach the disk at every flush, so a crash loses at most the unflushed
    steps. NaN and Inf are written as ``nan`` / ``inf``.

    Args:
        path: the file.
        group_by: aggregate parameters into groups first.

    Raises:
        ValueError: the file exists with a different header.

    Example:
        >>> import tempfile, os, torch, gradwatch as gw
        >>> path = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> lin = torch.nn.Linear(2, 1)
        >>> with gw.GradWatch(lin, sinks=[CSVSink(path)]) as w:
        ...     lin(torch.ones(1, 2)).sum().backward(); w.step()
        >>> open(path).readline().strip()
        'step,total,total_clipped,clip_coef,weight,bias'
    """

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        super().open(names, meta)
        header = ["step", "total", "total_clipped", "clip_coef", *self.names]
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                existing = next(csv.reader(f), [])
            if existing != header:
                raise ValueError(f"{self.path} exists with another header ({existing[:6]}...); choose a new path")
            self._open_file("a")
        else:
            self._open_file("w")
            csv.writer(self._file).writerow(header)
            self._file.flush()

    def _write(self, chunk: History) -> None:
        writer = csv.writer(self._file)
        cols = np.column_stack([chunk.total, chunk.total_clipped, chunk.clip_coef, chunk.norms])
        for step, row in zip(chunk.steps, cols):
            writer.writerow([int(step), *(repr(float(v)) for v in row)])
        self._file.flush()


class JSONLSink(_FileSink):
    """One JSON object per recorded step and one per event, one per line.

    Step lines: ``{"type": "step", "step", "total", "total_clipped", "clip_coef",
    "norms": {name: value}}``; event lines: ``{"type": "event", "step", "kind",
    "name", "value", "threshold"}``. The first line (``"type": "header"``) holds
    the names and the run's description. NaN/Inf are the strings "nan"/"inf".

    Args:
        path: the file (appended to if it exists).
        group_by: aggregate parameters into groups first.
    """

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        super().open(names, meta)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._open_file("a")
        if fresh:
            self._file.write(json.dumps({"type": "header", "names": self.names, "meta": meta}) + "\n")
            self._file.flush()

    def _write(self, chunk: History) -> None:
        lines = []
        for r, step in enumerate(chunk.steps):
            lines.append(
                {
                    "type": "step",
                    "step": int(step),
                    "total": _num(chunk.total[r]),
                    "total_clipped": _num(chunk.total_clipped[r]),
                    "clip_coef": _num(chunk.clip_coef[r]),
                    "norms": {n: _num(v) for n, v in zip(chunk.names, chunk.norms[r])},
                }
            )
        for e in chunk.events:
            lines.append(
                {
                    "type": "event",
                    "step": e.step,
                    "kind": e.kind,
                    "name": e.name,
                    "value": _num(e.value),
                    "threshold": None if e.threshold is None else _num(e.threshold),
                }
            )
        self._file.write("".join(json.dumps(x) + "\n" for x in lines))
        self._file.flush()


class TensorBoardSink(Sink):
    """Scalars for TensorBoard, through the ``tensorboard`` package (``pip install "gradwatch[tensorboard]"``).

    Writes ``grad_norm/<param>``, ``grad_norm/total``, ``grad_norm/total_clipped``
    and ``clip/coef`` per step, each event as text under ``events``, and, with
    ``histogram=True``, a histogram of the per-parameter norms. Non-finite
    values are written as they are for scalars and left out of histograms
    (TensorBoard cannot bin them).

    Args:
        log_dir: a directory, or an existing ``torch.utils.tensorboard.SummaryWriter``.
        histogram: also write ``grad_norm/histogram``.
        group_by: aggregate parameters into groups first.

    Raises:
        ImportError: tensorboard is not installed.
    """

    def __init__(self, log_dir: Any, histogram: bool = False, group_by: Any = None) -> None:
        super().__init__(group_by)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError('TensorBoardSink needs tensorboard: pip install "gradwatch[tensorboard]"') from exc
        self._own = not isinstance(log_dir, SummaryWriter)
        self.writer = SummaryWriter(log_dir=str(log_dir)) if self._own else log_dir
        self.histogram = histogram

    def _write(self, chunk: History) -> None:
        w = self.writer
        for r, step in enumerate(chunk.steps.tolist()):
            for name, v in zip(chunk.names, chunk.norms[r]):
                w.add_scalar(f"grad_norm/{name}", float(v), step)
            w.add_scalar("grad_norm/total", float(chunk.total[r]), step)
            w.add_scalar("grad_norm/total_clipped", float(chunk.total_clipped[r]), step)
            w.add_scalar("clip/coef", float(chunk.clip_coef[r]), step)
            if self.histogram:
                finite = chunk.norms[r][np.isfinite(chunk.norms[r])]
                if finite.size:
                    w.add_histogram("grad_norm/histogram", finite, step)
        for e in chunk.events:
            w.add_text("events", str(e), e.step)
        w.flush()

    def close(self) -> None:
        if not self.closed:
            self.writer.flush()
            if self._own:
                self.writer.close()
        super().close()


class CallbackSink(Sink):
    """Call ``fn(chunk)`` at every flush: the adapter for any logger (W&B, MLflow, ...).

    ``chunk`` is a :class:`~gradwatch.History` of the new rows and events.

    Args:
        fn: the function.
        group_by: aggregate parameters into groups first.

    Example:
        >>> import torch, gradwatch as gw
        >>> seen = []
        >>> lin = torch.nn.Linear(2, 1)
        >>> with gw.GradWatch(lin, sinks=[CallbackSink(lambda c: seen.append(len(c)))]) as w:
        ...     lin(torch.ones(1, 2)).sum().backward(); w.step()
        >>> seen
        [1]
    """

    def __init__(self, fn: Callable[[History], Any], group_by: Any = None) -> None:
        super().__init__(group_by)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def _write(self, chunk: History) -> None:
        self.fn(chunk)


def read_csv(path: str | os.PathLike) -> History:
    """Read a :class:`CSVSink` file back; a truncated last line is dropped.

    Raises:
        ValueError: the file is empty or not a gradwatch CSV.
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:4] != ["step", "total", "total_clipped", "clip_coef"]:
        raise ValueError(f"{os.fspath(path)!r} is not a gradwatch CSV (expected header step,total,...)")
    header, body = rows[0], rows[1:]
    width = len(header)
    good = []
    for row in body:
        try:
            good.append([float(v) for v in row]) if len(row) == width else None
        except ValueError:
            continue
    h = History(header[4:], {"source": os.fspath(path)})
    if good:
        a = np.array(good, dtype=np.float64)
        h.append(a[:, 0].astype(np.int64), a[:, 4:], total=a[:, 1], total_clipped=a[:, 2], clip_coef=a[:, 3])
    return h


def read_jsonl(path: str | os.PathLike) -> History:
    """Read a :class:`JSONLSink` file back; a truncated last line is dropped.

    Raises:
        ValueError: the file is empty or not a gradwatch JSONL file.
    """
    header, steps, events = None, [], []
    with open(path) as f:
        for line in f:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "header" and header is None:
                header = obj
            elif kind == "step":
                steps.append(obj)
            elif kind == "event":
                thr = obj.get("threshold")
                events.append(
                    Event(
                        obj["step"], obj["kind"], obj["name"], _unnum(obj["value"]), None if thr is None else float(thr)
                    )
                )
    if header is None:
        raise ValueError(f"{os.fspath(path)!r} is not a gradwatch JSONL file (no header line)")
    names = header["names"]
    h = History(names, header.get("meta"))
    if steps:
        h.append(
            [s["step"] for s in steps],
            np.array([[_unnum(s["norms"][n]) for n in names] for s in steps], dtype=np.float64),
            total=np.array([_unnum(s["total"]) for s in steps]),
            total_clipped=np.array([_unnum(s["total_clipped"]) for s in steps]),
            clip_coef=np.array([_unnum(s["clip_coef"]) for s in steps]),
        )
    h.events = events
    return h
