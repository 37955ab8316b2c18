"""Sinks: where the rows and events go at every flush (files, TensorBoard, your logger).

A sink has three methods, called by :class:`~gradwatch.GradWatch`:
``open(names, meta)`` once, ``write(chunk)`` at every flush with a
:class:`~gradwatch.History` holding just the new rows and events, and
``close()`` from ``GradWatch.close()`` (or at interpreter exit).

The file sinks (:class:`CSVSink`, :class:`JSONLSink`) share one policy for a
file that already exists, chosen with ``mode``:

* ``"x"`` (the default): a new run. An existing non-empty file is refused
  (``FileExistsError`` naming the modes below, raised when the sink is built
  and again when the watch opens it), so rerunning a script never mixes two
  runs in one file; an existing empty file is used.
* ``"w"``: overwrite whatever is there.
* ``"a"``: append, to resume the same run. The file must be a file of the same
  sink with the same columns (else ``ValueError``), a line cut short by a crash
  is removed first, and the first step written must come after the last step
  already in the file (else ``ValueError`` at that flush): restore the watch
  with :meth:`GradWatch.load_state_dict <gradwatch.GradWatch.load_state_dict>`
  when resuming.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import math
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gradwatch._validate import check_bool, check_choice, check_int
from gradwatch.detect import Event
from gradwatch.distributed import get_rank
from gradwatch.history import History

__all__ = ["CSVSink", "CallbackSink", "JSONLSink", "Sink", "TensorBoardSink", "read_csv", "read_jsonl"]

FileMode = Literal["x", "w", "a"]
_MODES = ("x", "w", "a")
_CSV_FIXED = ["step", "total", "total_clipped", "clip_coef"]
#: History columns that the CSV and JSONL files do not hold: unknown when read back, not "nothing happened".
_NOT_IN_FILES = ("norms_clipped", "grad_missing", "clip_threshold", "scale", "taps", "param_norms", "update_norms")
#: the header prefix of a statistic's CSV column: ``stats:noise.b_simple``, ``stats:example.norm[3]``
_STAT_COL = "stats:"
_BLOCK = 1 << 20  # bytes read at a time by the readers

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
    """A number written by :func:`_num` (a JSON number or "nan"/"inf"/"-inf"); rejects anything else."""
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ValueError(f"expected a number, got {x!r}")
    return float(x)


def _check_path(path: Any, name: str = "path") -> Path:
    """A file path given as ``str`` or ``os.PathLike`` (not empty, not bytes)."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike file path, got {path!r} ({type(path).__name__})")
    if os.fspath(path) == "":
        raise ValueError(f"{name} must be a non-empty path, got an empty string")
    return Path(path)


def _check_group_by(group_by: Any) -> Any:
    """None, a module depth >= 1, or a callable name -> group."""
    if group_by is None or callable(group_by):
        return group_by
    try:
        return check_int(group_by, "group_by", min=1)
    except TypeError:
        raise TypeError(
            f"group_by must be None, a module depth (int >= 1) or a callable name -> group, got {group_by!r}"
        ) from None


class Sink(ABC):
    """Base class: subclasses implement ``_write(chunk)`` and usually :meth:`open`/:meth:`close`.

    Args:
        group_by: aggregate parameters before writing (see :meth:`History.grouped`):
            None, a module depth >= 1, or a callable from parameter name to group name.

    Raises:
        TypeError: ``group_by`` is of another kind.
        ValueError: ``group_by`` is a depth < 1.
    """

    def __init__(self, group_by: Any = None) -> None:
        self.group_by = _check_group_by(group_by)
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


def _last_newline(f: io.BufferedRandom | io.BufferedReader, size: int) -> int:
    """Offset just past the last ``\\n`` of the file (0 if it has none), reading backwards block by block."""
    end = size
    while end > 0:
        start = max(0, end - _BLOCK)
        f.seek(start)
        i = f.read(end - start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def _lines_backwards(f: io.BufferedRandom | io.BufferedReader, end: int) -> Iterator[bytes]:
    """The complete lines before offset ``end`` (which follows a ``\\n``), last first, without their ends."""
    pos, buf = end, b""
    first = True
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        buf = f.read(pos - start) + buf
        pos = start
        parts = buf.split(b"\n")
        if first:
            parts.pop()  # the empty piece after the final newline
            first = False
        buf = parts[0]
        for line in reversed(parts[1:]):
            yield line.rstrip(b"\r")
    if buf or not first:
        yield buf.rstrip(b"\r")


class _FileSink(Sink):
    """A sink writing to one text file, kept open across flushes and flushed after each.

    Subclasses give ``_header_line()`` (the first line, newline included) and
    ``_resume_point(f, end)`` (check the existing file's first line; return the
    last step in it, or None without rows).
    """

    def __init__(self, path: str | os.PathLike, mode: FileMode = "x", group_by: Any = None) -> None:
        super().__init__(group_by)
        self.path = _check_path(path)
        if not isinstance(mode, str):
            raise TypeError(f"mode must be one of 'x', 'w', 'a', got {mode!r} ({type(mode).__name__})")
        self.mode: FileMode = check_choice(mode, "mode", _MODES)
        self._file: io.TextIOWrapper | None = None
        self._meta: dict[str, Any] = {}
        self._stats: dict[str, int] = {}  # the statistics' columns and widths (0: one number a step)
        self._incidents: list[Any] = []  # every incident of this run, for the companion file
        self._resume_after: int | None = None  # mode "a": the last step already in the file
        if get_rank() == 0:  # now, before the watch opens any sink's file, and again at open(); other ranks
            self._check_new()  # do not open file sinks by default, and rank 0 may have created the file already

    def _check_new(self) -> bool:
        """Whether the file holds something; with ``mode="x"`` that is an error."""
        p = self.path
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory; {type(self).__name__} needs a file path")
        nonempty = p.exists() and p.stat().st_size > 0
        if nonempty and self.mode == "x":
            raise FileExistsError(
                f"{p} already exists and is not empty; pass mode='w' to overwrite it, or mode='a' to append "
                f"to it when resuming the same run (or choose another path)"
            )
        return nonempty

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        if self._file is not None:
            raise RuntimeError(f"{type(self).__name__}({str(self.path)!r}) is already open: use one sink per watch")
        super().open(names, meta)
        self._meta = dict(meta)
        self._stats = stat_widths(meta)
        p = self.path
        nonempty = self._check_new()
        p.parent.mkdir(parents=True, exist_ok=True)
        if nonempty and self.mode == "a":
            with open(p, "r+b") as f:
                end = _last_newline(f, p.stat().st_size)
                self._resume_after = self._resume_point(f, end)
                f.truncate(end)  # drop a line cut short by a crash
            self._file = open(p, "a", newline="", encoding="utf-8")
        else:
            self._file = open(p, "w", newline="", encoding="utf-8")
            self._file.write(self._header_line())
            self._file.flush()

    def write(self, chunk: History) -> None:
        if self._file is None or self._file.closed:
            raise RuntimeError(f"{type(self).__name__}({str(self.path)!r}) is not open")
        if self._resume_after is not None and len(chunk):
            first = int(chunk.steps[0])
            if first <= self._resume_after:
                raise ValueError(
                    f"{self.path} already holds steps up to {self._resume_after} and this run writes step {first}: "
                    f"mode='a' continues the same run, so restore the watch's step with "
                    f"GradWatch.load_state_dict() when resuming, or pass mode='w' to start the file over"
                )
            self._resume_after = None
        super().write(chunk)
        if chunk.incidents:
            self._incidents += chunk.incidents
            _write_incident_file(Path(f"{self.path}.incidents.npz"), chunk, self._incidents, self.mode)

    @abstractmethod
    def _header_line(self) -> str: ...

    @abstractmethod
    def _resume_point(self, f: io.BufferedRandom, end: int) -> int | None: ...

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        super().close()


class CSVSink(_FileSink):
    """One CSV row per recorded step: ``step, total, total_clipped, clip_coef``, then each parameter.

    The header is the first line. Rows reach the disk at every flush, so a
    crash loses at most the unflushed steps. Values are written with Python's
    shortest exact ``repr``, NaN and Inf as ``nan`` / ``inf``. The file does
    not hold events, post-clip per-parameter norms or the run's description:
    use :class:`JSONLSink` or :meth:`History.save` for those.

    An existing file is handled by ``mode`` as described in :mod:`gradwatch.sinks`:
    ``"x"`` (default) refuses a non-empty one, ``"w"`` overwrites it, ``"a"``
    appends to a CSV with the same header, after its last step.

    Args:
        path: the file (``str`` or ``os.PathLike``); missing folders are created.
        mode: ``"x"``, ``"w"`` or ``"a"``.
        group_by: aggregate parameters into groups first (None, a module depth >= 1, or a callable).

    Raises:
        TypeError: ``path``, ``mode`` or ``group_by`` of the wrong kind.
        ValueError: ``mode`` or ``group_by`` out of range. When the watch opens
            the sink: ``mode="a"`` and the file has another header; at a flush:
            ``mode="a"`` and the run writes a step not after the file's last.
        FileExistsError: ``mode="x"`` and the file is not empty (checked when the sink is
            built, so before the watch creates any sink's file, and again when it opens it).
        IsADirectoryError: ``path`` is a folder.

    Example:
        >>> import tempfile, os, torch, gradwatch as gw
        >>> path = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> lin = torch.nn.Linear(2, 1)
        >>> with gw.GradWatch(lin, sinks=[CSVSink(path)]) as w:
        ...     lin(torch.ones(1, 2)).sum().backward(); w.step()
        >>> open(path).readline().strip()
        'step,total,total_clipped,clip_coef,weight,bias'
        >>> CSVSink(path)  # the same path again  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileExistsError: ... already exists and is not empty; pass mode='w' to overwrite it, ...
    """

    def _header(self) -> list[str]:
        stats = [
            _STAT_COL + name if w == 0 else f"{_STAT_COL}{name}[{i}]"
            for name, w in self._stats.items()
            for i in range(max(w, 1))
        ]
        return [*_CSV_FIXED, *self.names, *stats]

    def _header_line(self) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow(self._header())
        return buf.getvalue()

    def _resume_point(self, f: io.BufferedRandom, end: int) -> int | None:
        f.seek(0)
        first = f.readline()
        try:
            existing = next(csv.reader([first.decode("utf-8")]), [])
        except UnicodeDecodeError:
            existing = []
        header = self._header()
        if existing != header or not first.endswith(b"\n"):
            extra = [c for c in existing if c not in header][:3]
            lacking = [c for c in header if c not in existing][:3]
            detail = f"columns only in the file: {extra}; only in this run: {lacking}" if existing else "no header"
            raise ValueError(
                f"{self.path} is not a CSV of this run ({detail}); mode='a' appends only to a file with the "
                f"same columns: pass mode='w' to overwrite it or choose another path"
            )
        for line in _lines_backwards(f, end):
            if line.strip():
                head = line.split(b",", 1)[0]
                if head == b"step":
                    return None
                try:
                    return int(float(head))
                except ValueError:
                    raise ValueError(
                        f"{self.path}: its last line is not a row of this run ({line[:40]!r}); "
                        f"pass mode='w' to overwrite the file or choose another path"
                    ) from None
        return None

    def _write(self, chunk: History) -> None:
        stats = _stat_block(chunk, self._stats)
        cols = np.column_stack([chunk.total, chunk.total_clipped, chunk.clip_coef, chunk.norms, *stats])
        out = [f"{step}," + ",".join(map(repr, row)) + "\r\n" for step, row in zip(chunk.steps.tolist(), cols.tolist())]
        self._file.write("".join(out))
        self._file.flush()


class JSONLSink(_FileSink):
    """One JSON object per recorded step and one per event, one per line.

    The first line (``"type": "header"``) holds the names and the run's
    description (``meta``). Step lines: ``{"type": "step", "step", "total",
    "total_clipped", "clip_coef", "norms": {name: value}}``; event lines:
    ``{"type": "event", "step", "kind", "name", "value", "threshold"}``.
    NaN/Inf are the strings "nan"/"inf"/"-inf" (strict JSON). The file does not
    hold post-clip per-parameter norms: use :meth:`History.save` for those.

    An existing file is handled by ``mode`` as described in :mod:`gradwatch.sinks`:
    ``"x"`` (default) refuses a non-empty one, ``"w"`` overwrites it, ``"a"``
    appends to a JSONLSink file with the same parameter names, after its last step.

    Args:
        path: the file (``str`` or ``os.PathLike``); missing folders are created.
        mode: ``"x"``, ``"w"`` or ``"a"``.
        group_by: aggregate parameters into groups first (None, a module depth >= 1, or a callable).

    Raises:
        TypeError: ``path``, ``mode`` or ``group_by`` of the wrong kind.
        ValueError: ``mode`` or ``group_by`` out of range. When the watch opens
            the sink: ``mode="a"`` and the file is not a JSONLSink file with the
            same names; at a flush: ``mode="a"`` and the run writes a step not
            after the file's last.
        FileExistsError: ``mode="x"`` and the file is not empty (checked when the sink is
            built, so before the watch creates any sink's file, and again when it opens it).
        IsADirectoryError: ``path`` is a folder.

    Example:
        >>> import tempfile, os, torch, gradwatch as gw
        >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
        >>> lin = torch.nn.Linear(2, 1)
        >>> with gw.GradWatch(lin, sinks=[JSONLSink(path)]) as w:
        ...     lin(torch.ones(1, 2)).sum().backward(); w.step()
        >>> with gw.GradWatch(lin, sinks=[JSONLSink(path, mode="a")]) as w:  # resume: the step continues
        ...     w.load_state_dict({**w.state_dict(), "step": 1})
        ...     lin(torch.ones(1, 2)).sum().backward(); w.step()
        >>> gw.read_jsonl(path).steps.tolist()
        [0, 1]
    """

    def _header_line(self) -> str:
        header = {"type": "header", "format": 1, "names": self.names, "meta": self._meta}
        return json.dumps(header, default=str) + "\n"

    def _resume_point(self, f: io.BufferedRandom, end: int) -> int | None:
        f.seek(0)
        first = f.readline()
        try:
            obj = json.loads(first) if first.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict) or obj.get("type") != "header":
            raise ValueError(
                f"{self.path} is not a JSONLSink file (its first line is not a gradwatch header); mode='a' "
                f"appends only to a file of the same run: pass mode='w' to overwrite it or choose another path"
            )
        if obj.get("names") != self.names:
            theirs = obj.get("names")
            raise ValueError(
                f"{self.path} holds another run (parameters {_short(theirs)}, this run has {_short(self.names)}); "
                f"mode='a' appends only to a file with the same parameters: pass mode='w' or choose another path"
            )
        last: int | None = None
        for line in _lines_backwards(f, end):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            kind = rec.get("type") if isinstance(rec, dict) else None
            if kind == "event" and isinstance(rec.get("step"), int):
                last = max(last if last is not None else rec["step"], rec["step"])
            elif kind == "step" and isinstance(rec.get("step"), int):
                return max(rec["step"], last if last is not None else rec["step"])
            elif kind == "header":
                break
        return last

    def _write(self, chunk: History) -> None:
        lines = []
        names = chunk.names
        for step, tot, totc, coef, norms in zip(
            chunk.steps.tolist(),
            chunk.total.tolist(),
            chunk.total_clipped.tolist(),
            chunk.clip_coef.tolist(),
            chunk.norms.tolist(),
        ):
            rec = {"type": "step", "step": step, "total": _num(tot), "total_clipped": _num(totc)}
            rec["clip_coef"] = _num(coef)
            rec["norms"] = {n: _num(v) for n, v in zip(names, norms)}
            lines.append(rec)
        if self._stats:
            stats = chunk.stats
            for r, rec in enumerate(lines):
                rec["stats"] = {k: _num_or_list(stats[k][r]) for k in self._stats if k in stats}
        for e in chunk.events:
            lines.append(
                {
                    "type": "event",
                    "step": int(e.step),
                    "kind": e.kind,
                    "name": e.name,
                    "value": _num(e.value),
                    "threshold": None if e.threshold is None else _num(e.threshold),
                }
            )
        self._file.write("".join(json.dumps(x) + "\n" for x in lines))
        self._file.flush()


def _short(names: Any) -> str:
    if not isinstance(names, list):
        return repr(names)
    return repr(names[:4])[:-1] + (f", ... {len(names)} in all]" if len(names) > 4 else "]")


_TB_INSTALL = (
    "TensorBoardSink needs the tensorboard package: pip install tensorboard "
    '(or, in your gradwatch clone, pip install -e ".[tensorboard]")'
)


class TensorBoardSink(Sink):
    """Scalars for TensorBoard, through the ``tensorboard`` package.

    Writes ``grad_norm/<param>``, ``grad_norm/total``, ``grad_norm/total_clipped``
    and ``clip/coef`` per step, each event as text under ``events``, and, with
    ``histogram=True``, a histogram of the per-parameter norms. Non-finite
    values are written as they are for scalars and left out of histograms
    (TensorBoard cannot bin them). Install tensorboard with ``pip install
    tensorboard`` (or ``pip install -e ".[tensorboard]"`` in a gradwatch clone).

    Args:
        log_dir: a directory (``str`` / ``os.PathLike``), None for TensorBoard's
            default ``runs/<date>_<host>``, or an existing
            ``torch.utils.tensorboard.SummaryWriter`` (left open at close).
        histogram: also write ``grad_norm/histogram``.
        group_by: aggregate parameters into groups first (None, a module depth >= 1, or a callable).

    Raises:
        ImportError: tensorboard is not installed.
        TypeError: an argument of the wrong kind.
        ValueError: ``group_by`` is a depth < 1.
    """

    def __init__(self, log_dir: Any = None, histogram: bool = False, group_by: Any = None) -> None:
        super().__init__(group_by)
        self.histogram = check_bool(histogram, "histogram")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(_TB_INSTALL) from exc
        if log_dir is not None and not isinstance(log_dir, SummaryWriter):
            _check_path(log_dir, "log_dir")
        self._own = not isinstance(log_dir, SummaryWriter)
        if self._own:
            self.writer = SummaryWriter() if log_dir is None else SummaryWriter(log_dir=os.fspath(log_dir))
        else:
            self.writer = log_dir

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
        group_by: aggregate parameters into groups first (None, a module depth >= 1, or a callable).

    Raises:
        TypeError: ``fn`` is not callable, or ``group_by`` of the wrong kind.

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
        if not callable(fn):
            raise TypeError(f"fn must be callable (a function of the new rows' History), got {type(fn).__name__}")
        super().__init__(group_by)
        self.fn = fn

    def _write(self, chunk: History) -> None:
        self.fn(chunk)


# -- readers -----------------------------------------------------------------------------------


def _count_lines(f: io.BufferedReader) -> int:
    n = 0
    while block := f.read(_BLOCK):
        n += block.count(b"\n")
    return n


def _complete_lines(f: io.BufferedReader) -> Iterator[tuple[int, list[bytes]]]:
    """Blocks of complete lines (ending in ``\\n``) with the line number of each block's first line.

    A last line without ``\\n`` was cut short by a crash and is not yielded.
    """
    rest, lineno = b"", 2
    while block := f.read(_BLOCK):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        rest = block[cut:]
        lines = block[:cut].split(b"\n")[:-1]
        yield lineno, lines
        lineno += len(lines)


def read_csv(path: str | os.PathLike) -> History:
    """Read a :class:`CSVSink` file back.

    The file is parsed in blocks straight into numpy columns: float32 when
    every number in the file is exactly a float32 (a run recorded in float32
    reads back as it was recorded), else float64. Memory is about 4 (or 8)
    bytes per number, twice that while the History is built, never the text.
    A last line without its line end was cut by a crash and is dropped; any
    other line that is not a row of numbers is an error. Columns the file does
    not hold (post-clip per-parameter norms, missing-gradient flags, clip
    thresholds, scaler scales, taps) are *unknown* in the result
    (``h.known("norms_clipped")`` is False), and it has no events.

    Args:
        path: the file.

    Returns:
        The :class:`~gradwatch.History`, with ``meta={"source": path, "source_format": "csv"}``.

    Raises:
        TypeError: ``path`` is not a ``str`` / ``os.PathLike``.
        FileNotFoundError: there is no such file.
        ValueError: the file is not a gradwatch CSV (with the line at fault).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> _ = open(path, "w").write("step,total,total_clipped,clip_coef,w\\n0,3.0,1.0,0.3333,3.0\\n1,2.0,1.0,0.5,2.0")
        >>> h = read_csv(path)  # the last line has no line end: a crash cut it
        >>> h.steps.tolist(), h["w"].tolist(), h.known("norms_clipped")
        ([0], [3.0], False)
    """
    p = _check_path(path)
    src = os.fspath(path)
    with open(p, "rb") as f:
        first = f.readline()
        try:
            header = next(csv.reader([first.decode("utf-8")]), [])
        except UnicodeDecodeError:
            header = []
        if header[:4] != _CSV_FIXED:
            raise ValueError(f"{src!r} is not a gradwatch CSV (expected a header line step,total,total_clipped,...)")
        if not first.endswith(b"\n"):
            raise ValueError(f"{src!r} is cut short inside its header line: it holds no complete row")
        width = len(header)
        start = f.tell()
        cap = _count_lines(f)
        f.seek(start)
        steps = np.empty(cap, np.int64)
        values = np.empty((cap, width - 1), np.float32)  # float32 while every number is exactly a float32
        n = 0
        for lineno, lines in _complete_lines(f):
            block = _parse_csv_block(lines, width, lineno, src)
            k = len(block)
            if not k:
                continue
            if not np.array_equal(block[:, 0], np.round(block[:, 0])):
                raise ValueError(f"{src!r} lines {lineno}-{lineno + k - 1}: a step that is not an integer")
            steps[n : n + k] = block[:, 0]
            v = block[:, 1:]
            if values.dtype == np.float32 and not _exact_float32(v):
                values = values.astype(np.float64)
            values[n : n + k] = v
            n += k
    names = [c for c in header[4:] if not c.startswith(_STAT_COL)]
    h = History(names, {"source": src, "source_format": "csv"}, unknown=_NOT_IN_FILES)
    if n:
        v = values[:n]
        P = len(names)
        stats = _stats_of_columns(header[4 + P :], v[:, 3 + P :])
        h.append(steps[:n], v[:, 3 : 3 + P], total=v[:, 0], total_clipped=v[:, 1], clip_coef=v[:, 2], stats=stats)
    return h


def _stats_of_columns(header: list[str], values: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of a CSV's ``stats:`` columns: ``name`` -> ``[n]``, ``name[i]`` -> column i of ``[n, w]``."""
    out: dict[str, list[np.ndarray]] = {}
    scalar: set[str] = set()
    for j, col in enumerate(header):
        name = col[len(_STAT_COL) :]
        if name.endswith("]") and "[" in name:
            out.setdefault(name[: name.rindex("[")], []).append(values[:, j])
        else:
            out[name] = [values[:, j]]
            scalar.add(name)
    return {k: cols[0] if k in scalar else np.stack(cols, axis=1) for k, cols in out.items()}


def _parse_csv_block(lines: list[bytes], width: int, lineno: int, src: str) -> np.ndarray:
    """Parse complete CSV lines (the first is line ``lineno`` of the file) into ``[k, width]`` float64."""
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return np.empty((0, width))
    try:
        block = np.loadtxt([ln.decode("ascii") for ln in lines], delimiter=",", dtype=np.float64, ndmin=2)
        if block.shape[1] == width:
            return block
    except (ValueError, UnicodeDecodeError):
        pass
    for k, ln in enumerate(lines):  # find the line at fault
        fields = ln.split(b",")
        try:
            ok = len([float(v) for v in fields]) == width
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{src!r} line {lineno + k}: not a row of {width} numbers (a gradwatch CSV holds only those "
                f"after its header)"
            )
    raise ValueError(f"{src!r} lines {lineno}-{lineno + len(lines) - 1}: not rows of {width} numbers")


def read_jsonl(path: str | os.PathLike) -> History:
    """Read a :class:`JSONLSink` file back, with its events and description.

    A last line cut short by a crash is dropped; any other line that is not a
    gradwatch record is an error. Columns the file does not hold (post-clip
    per-parameter norms) are *unknown* in the result (``h.known("norms_clipped")``
    is False).

    Args:
        path: the file.

    Returns:
        The :class:`~gradwatch.History` (float32 columns when every number is
        exactly a float32, else float64); ``meta`` is the run's description
        from the header.

    Raises:
        TypeError: ``path`` is not a ``str`` / ``os.PathLike``.
        FileNotFoundError: there is no such file.
        ValueError: the file is not a gradwatch JSONL file (with the line at fault).

    Example:
        >>> import tempfile, os, json
        >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
        >>> recs = [{"type": "header", "names": ["w"], "meta": {"clipper": None}},
        ...         {"type": "step", "step": 0, "total": 2.0, "total_clipped": 2.0, "clip_coef": 1.0,
        ...          "norms": {"w": 2.0}}]
        >>> _ = open(path, "w").write("".join(json.dumps(r) + "\\n" for r in recs))
        >>> h = read_jsonl(path)
        >>> h.steps.tolist(), h["w"].tolist(), h.meta["clipper"]
        ([0], [2.0], None)
    """
    p = _check_path(path)
    src = os.fspath(path)
    with open(p, "rb") as f:
        first = f.readline()
        try:
            header = json.loads(first)
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("type") != "header" or not isinstance(header.get("names"), list):
            raise ValueError(f"{src!r} is not a gradwatch JSONL file (its first line is not a JSONLSink header)")
        names = [str(n) for n in header["names"]]
        meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
        start = f.tell()
        rows = _JSONLRows(names, _count_lines(f))
        f.seek(start)
        for lineno, lines in _complete_lines(f):
            for k, line in enumerate(lines):
                try:
                    rows.add(line)
                except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise ValueError(f"{src!r} line {lineno + k}: not a gradwatch record ({detail})") from None
    h = History(names, {**meta, "source": src, "source_format": "jsonl"}, unknown=_NOT_IN_FILES)
    rows.into(h)
    return h


class _JSONLRows:
    """The records of a JSONL file as columns, filled line by line (capacity: the file's line count)."""

    def __init__(self, names: list[str], cap: int) -> None:
        self.names, self.n = names, 0
        self.steps = np.empty(cap, np.int64)
        self.scal = np.empty((cap, 3), np.float64)
        self.norms = np.empty((cap, len(names)), np.float64)
        self.events: list[Event] = []
        self.stats: dict[str, list[Any]] = {}

    def add(self, line: bytes) -> None:
        """Parse one line (a step or an event record; blank lines are skipped)."""
        if not line.strip():
            return
        rec = json.loads(line)
        kind = rec["type"]
        if kind == "event":
            thr = rec["threshold"]
            value = _unnum(rec["value"])
            self.events.append(
                Event(int(rec["step"]), str(rec["kind"]), rec["name"], value, None if thr is None else _unnum(thr))
            )
            return
        if kind != "step":
            raise ValueError(f"unknown record type {kind!r}")
        step, n = rec["step"], self.n
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError("step is not an integer")
        self.norms[n] = [_unnum(rec["norms"][name]) for name in self.names]
        self.scal[n] = (_unnum(rec["total"]), _unnum(rec["total_clipped"]), _unnum(rec["clip_coef"]))
        self.steps[n] = step
        for key, value in rec.get("stats", {}).items():
            self.stats.setdefault(key, [math.nan] * n).append(_unnum_or_list(value))
        self.n = n + 1
        for column in self.stats.values():  # a statistic this row did not hold
            column.extend([math.nan] * (self.n - len(column)))

    def into(self, h: History) -> None:
        """Append the rows and events to ``h`` (float32 when every number is exactly a float32, as read_csv)."""
        norms, scal = self.norms[: self.n], self.scal[: self.n]
        if _exact_float32(norms) and _exact_float32(scal):
            norms, scal = norms.astype(np.float32), scal.astype(np.float32)
        stats = {k: _stat_array(v) for k, v in self.stats.items()}
        total, clipped, coef = scal.T
        h.append(self.steps[: self.n], norms, total=total, total_clipped=clipped, clip_coef=coef, stats=stats)
        h.events = self.events


class SinkSet:
    """The sinks one watch feeds on this rank: opened all or none; a failing write or close stops no other.

    Args:
        sinks: the sinks (see :func:`check_sinks`).
        here: whether this rank runs them (``GradWatch(sinks_rank=...)``).
    """

    def __init__(self, sinks: list[Any], here: bool) -> None:
        self.sinks = list(sinks) if here else []

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        """Open every sink; if one refuses (e.g. an existing file), close those already open and re-raise."""
        opened = []
        try:
            for s in self.sinks:
                s.open(names, meta)
                opened.append(s)
        except BaseException:
            _each(opened, "close")
            raise

    def write(self, chunk: History) -> list[Exception]:
        """Hand ``chunk`` to every sink; returns the errors they raised."""
        return _each(self.sinks, "write", chunk)

    def close(self) -> list[Exception]:
        """Close every sink; returns the errors they raised."""
        return _each(self.sinks, "close")


def _each(sinks: list[Any], method: str, *args: Any) -> list[Exception]:
    errors: list[Exception] = []
    for s in sinks:
        try:
            getattr(s, method)(*args)
        except Exception as exc:
            errors.append(exc)
    return errors


def check_sinks(value: Any, name: str = "sinks") -> list[Any]:
    """A list of sinks (objects with ``open``, ``write`` and ``close``), else ``TypeError`` naming ``name``."""
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of sink objects (use () for none), got {value!r}")
    sinks = list(value)
    for s in sinks:
        if not all(callable(getattr(s, m, None)) for m in ("open", "write", "close")):
            raise TypeError(f"{name} must have open/write/close methods (gradwatch.Sink), got {type(s).__name__}")
    return sinks


def stat_widths(meta: dict[str, Any]) -> dict[str, int]:
    """The statistics a run declares (``meta["stats"]``: ``{"<prefix>.<column>": width}``, 0 for one number)."""
    declared = meta.get("stats") or {}
    return {str(k): int(w) for k, w in declared.items()} if isinstance(declared, dict) else {}


def _stat_block(chunk: History, widths: dict[str, int]) -> list[np.ndarray]:
    """The declared statistics of ``chunk`` as ``[n]`` / ``[n, w]`` columns (NaN where a row has none)."""
    stats, n, out = chunk.stats, len(chunk), []
    for name, w in widths.items():
        col = np.full((n, w) if w else n, np.nan)
        got = stats.get(name)
        if got is not None:
            if w:
                col[:, : min(w, got.shape[1] if got.ndim == 2 else 1)] = got.reshape(n, -1)[:, :w]
            else:
                col[:] = got.reshape(n)
        out.append(col)
    return out


def _num_or_list(x: Any) -> Any:
    return [_num(v) for v in x.tolist()] if isinstance(x, np.ndarray) and x.ndim else _num(float(x))


def _unnum_or_list(x: Any) -> Any:
    return [_unnum(v) for v in x] if isinstance(x, list) else _unnum(x)


def _stat_array(rows: list[Any]) -> np.ndarray:
    """One statistic's JSONL values as ``[n]``, or ``[n, w]`` (NaN-padded) when they are lists."""
    if not any(isinstance(v, list) for v in rows):
        return np.asarray(rows, dtype=np.float64)
    w = max(len(v) if isinstance(v, list) else 0 for v in rows)
    out = np.full((len(rows), w), np.nan)
    for r, v in enumerate(rows):
        if isinstance(v, list):
            out[r, : len(v)] = v
    return out


def _exact_float32(a: np.ndarray) -> bool:
    """Whether every number of ``a`` is exactly a float32 (NaN and Inf included)."""
    return all(
        np.array_equal(a[i : i + 65536].astype(np.float32), a[i : i + 65536], equal_nan=True)
        for i in range(0, len(a), 65536)
    )


def _write_incident_file(path: Path, chunk: History, incidents: list[Any], mode: str) -> None:
    """Write ``incidents`` to ``path`` (a :meth:`History.save` file without rows), atomically.

    This is the companion file ``<sink path>.incidents.npz`` that every file
    sink rewrites beside its file when incidents complete (every incident of
    the run so far); read it with ``History.load(path).incidents`` or
    ``gradwatch incidents``. With ``mode="a"`` (a resumed run) the incidents
    already in the file from before this run's first one are kept.
    """
    out = History(chunk.names, chunk.meta)
    mine = list(incidents)
    if mode == "a" and os.path.exists(path) and mine:
        try:
            old = History.load(path).incidents
        except ValueError:
            old = []
        out.incidents = [i for i in old if i.step < mine[0].start]
    out.incidents += mine
    out.save(path)
