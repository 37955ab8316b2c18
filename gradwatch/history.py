"""History: the host-side record of every observed step, an append-only column store."""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from gradwatch.detect import Event
from gradwatch.incidents import Incident, incident_from_header, incident_header

__all__ = ["History"]

#: per-step 1-D float columns (besides the [S, P] matrices)
_SCALARS = ("total", "total_clipped", "clip_coef", "clip_threshold", "scale")
#: every column a History holds, in file order
COLUMNS = ("steps", "norms", "norms_clipped", "grad_missing", *_SCALARS, "taps", "param_norms", "update_norms")
#: columns a source may declare unknown (the rest are always known)
_OPTIONAL = ("norms_clipped", "grad_missing", *_SCALARS[1:], "taps", "param_norms", "update_norms")
#: the ``[S, P]`` columns
_MATRICES = ("norms", "norms_clipped", "grad_missing", "param_norms", "update_norms")
_FORMAT = 2
#: the store key of a statistic: ``History.stats["noise.b_simple"]`` is stored as ``"stats/noise.b_simple"``
_STAT = "stats/"
_GROWTH = 1.25  # capacity factor: amortised O(1) appends, at most 25 % slack


class _Columns:
    """Growable numpy columns sharing one row count; reads are views of the filled rows."""

    def __init__(self) -> None:
        self.n = 0
        self.cap = 0
        self.arrays: dict[str, np.ndarray] = {}

    def reserve(self, rows: int) -> None:
        need = self.n + rows
        if need <= self.cap:
            return
        self.cap = max(need, int(self.cap * _GROWTH) + 16)
        for key, a in self.arrays.items():
            grown = np.empty((self.cap, *a.shape[1:]), a.dtype)
            grown[: self.n] = a[: self.n]
            self.arrays[key] = grown

    def add(self, key: str, tail: tuple[int, ...], dtype: Any, fill: Any) -> None:
        """Start storing ``key``; the rows already stored get ``fill``."""
        a = np.empty((self.cap, *tail), dtype)
        a[: self.n] = fill
        self.arrays[key] = a

    def widen(self, key: str, width: int, fill: Any) -> None:
        """Grow the second dimension of ``key`` to ``width`` (new cells get ``fill``)."""
        a = self.arrays[key]
        if a.shape[1] < width:
            wide = np.full((self.cap, width), fill, a.dtype)
            wide[: self.n, : a.shape[1]] = a[: self.n]
            self.arrays[key] = wide

    def view(self, key: str) -> np.ndarray:
        v = self.arrays[key][: self.n]
        v.flags.writeable = False
        return v


class History:
    """Everything GradWatch recorded, one row per observed optimizer step.

    The per-step columns are numpy arrays (properties below), one row per
    observed step: ``steps``, ``norms`` and ``norms_clipped`` ``[S, P]``,
    ``grad_missing``, ``total``, ``total_clipped``, ``clip_coef``,
    ``clip_threshold``, ``scale`` and ``taps``; with ``GradWatch(param_norms=True)``
    or ``update_ratio=True`` also ``param_norms``, ``update_norms`` and
    ``update_ratio`` ``[S, P]`` (NaN where not recorded). A parameter whose
    ``.grad`` was None at a step is recorded with norm 0 and flagged in
    ``grad_missing``; NaN and Inf are kept as they were. With a
    :class:`~gradwatch.FlightRecorder`, :attr:`incidents` holds the full-resolution
    windows around anomalies. The columns of statistics (``GradWatch(stats=[...])``)
    are in :attr:`stats`, keyed ``"<prefix>.<column>"``.

    History is append-only: :meth:`append` and :meth:`extend` add rows (in
    amortised constant time per row), and reading a column returns a read-only
    view of the rows so far without copying, so reading ``watch.history`` at
    every step costs only the new rows.

    A column the source did not hold (``unknown``, e.g. post-clip norms in a
    CSV file) reads as NaN and :meth:`known` says so: unknown is not "nothing
    happened". A column that was simply not given to :meth:`append` takes its
    "nothing happened" value (not clipped, nothing missing, no scaler).

    Args:
        names: parameter names, in model order.
        meta: free-form description of the run (clipper, detectors, ...).
        unknown: columns the source did not hold, from ``norms_clipped``,
            ``grad_missing``, ``total_clipped``, ``clip_coef``,
            ``clip_threshold``, ``scale``, ``taps``, ``param_norms`` and ``update_norms``.

    Attributes:
        names: parameter names, in model order (``P`` of them).
        events: the :class:`~gradwatch.Event` list, in step order.
        incidents: the :class:`~gradwatch.Incident` list (a flight recorder's
            windows), in step order; kept by :meth:`save`/:meth:`load`.
        tap_names: names of tapped tensors (:meth:`GradWatch.tap`), the columns of ``taps``.
        meta: free-form description of the run.

    Raises:
        ValueError: duplicate names or an ``unknown`` entry that is not an optional column.

    Example:
        >>> h = History(["w", "b"])
        >>> h.append(steps=[0, 1], norms=[[3.0, 4.0], [1.0, 0.0]])
        >>> len(h), h["w"].tolist(), h.total.tolist()
        (2, [3.0, 1.0], [5.0, 1.0])
    """

    def __init__(
        self, names: Sequence[str], meta: dict[str, Any] | None = None, *, unknown: Iterable[str] = ()
    ) -> None:
        self.names = [str(n) for n in names]
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ValueError(f"names must be unique; repeated: {dup[:5]}")
        self.meta: dict[str, Any] = dict(meta or {})
        self.events: list[Event] = []
        self.incidents: list[Incident] = []
        self.tap_names: list[str] = []
        self._unknown = frozenset(unknown)
        bad = sorted(self._unknown - set(_OPTIONAL))
        if bad:
            raise ValueError(f"unknown must name columns from {_OPTIONAL}, got {bad}")
        self._cols = _Columns()
        self._dtype: np.dtype = np.dtype(np.float64)

    # -- building -----------------------------------------------------------------
    def append(
        self,
        steps: Sequence[int] | np.ndarray,
        norms: Sequence[Sequence[float]] | np.ndarray,
        *,
        norms_clipped: np.ndarray | None = None,
        grad_missing: np.ndarray | None = None,
        total: np.ndarray | None = None,
        total_clipped: np.ndarray | None = None,
        clip_coef: np.ndarray | None = None,
        clip_threshold: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        param_norms: np.ndarray | None = None,
        update_norms: np.ndarray | None = None,
        taps: dict[str, np.ndarray] | None = None,
        stats: dict[str, np.ndarray] | None = None,
        events: Sequence[Event] = (),
    ) -> None:
        """Add rows (copied); omitted columns take their "nothing happened" values.

        The keyword columns (``norms_clipped``, ``grad_missing``, ``total``,
        ``total_clipped``, ``clip_coef``, ``clip_threshold``, ``scale``,
        ``param_norms``, ``update_norms``) have the shapes of the properties of
        the same names; ``total`` defaults to the L2 norm of each row of ``norms``.

        Args:
            steps: ``[n]`` step indices.
            norms: ``[n, P]`` pre-clip norms.
            taps: ``{name: [n]}`` tapped-tensor gradient norms.
            stats: ``{"<prefix>.<column>": [n] or [n, w]}`` columns of statistics
                (rows without a statistic read NaN in it; a wider ``w`` than
                before widens the column, padding with NaN).
            events: events of these rows.

        Raises:
            ValueError: a column's shape does not match, or a statistic's name has no dot.
        """
        norms = np.asarray(norms)
        if norms.dtype.kind != "f":
            norms = norms.astype(np.float64)
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        n, P = len(steps), len(self.names)
        if norms.shape != (n, P):
            raise ValueError(f"norms must have shape {(n, P)}, got {norms.shape}")
        if total is None:
            total = np.sqrt(np.square(norms.astype(np.float64)).sum(axis=1))
        given = {
            "norms_clipped": norms_clipped,
            "grad_missing": grad_missing,
            "total_clipped": total_clipped,
            "clip_coef": clip_coef,
            "clip_threshold": clip_threshold,
            "scale": scale,
            "param_norms": param_norms,
            "update_norms": update_norms,
        }
        cols = {"steps": steps, "norms": norms, "total": np.asarray(total)}
        for key, value in given.items():
            if value is not None:
                cols[key] = np.asarray(value)
        for key, value in cols.items():
            want = (n, P) if key in _MATRICES else (n,)
            if value.shape != want:
                raise ValueError(f"{key} must have shape {want}, got {value.shape}")
        for name, value in (stats or {}).items():
            cols[_STAT + _stat_name(name)] = _stat_column(name, value, n)
        if not len(self._cols.arrays):
            self._dtype = norms.dtype
        self._write(cols, dict(taps or {}))
        self.events.extend(events)

    def extend(self, other: History) -> None:
        """Append all rows, events and incidents of ``other`` (same parameter names).

        Raises:
            ValueError: ``other`` has other parameter names.

        Example:
            >>> a, b = History(["w"]), History(["w"])
            >>> a.append([0], [[1.0]]); b.append([1], [[2.0]])
            >>> a.extend(b); a.steps.tolist()
            [0, 1]
        """
        if other.names != self.names:
            raise ValueError("extend needs a History with the same parameter names")
        if not len(other):
            self.events.extend(other.events)
            self.incidents.extend(other.incidents)
            return
        cols = {k: other._cols.view(k) for k in other._cols.arrays if k != "taps"}
        taps = {name: other.taps[:, j] for j, name in enumerate(other.tap_names)}
        if not self._cols.arrays:
            self._dtype = other._dtype
        self._write(cols, taps)
        self.events.extend(other.events)
        self.incidents.extend(other.incidents)

    def _write(self, cols: dict[str, np.ndarray], taps: dict[str, np.ndarray]) -> None:
        store = self._cols
        n = len(cols["steps"])
        store.reserve(n)
        P = len(self.names)
        for key in ("steps", "norms", "total"):
            if key not in store.arrays:
                store.add(key, (P,) if key == "norms" else (), np.int64 if key == "steps" else self._dtype, 0)
        for key, value in cols.items():
            if key.startswith(_STAT):
                if key not in store.arrays:
                    store.add(key, value.shape[1:], value.dtype, np.nan)
                elif value.ndim == 2:
                    store.widen(key, value.shape[1], np.nan)
            elif key not in store.arrays:  # first time given: earlier rows get their default
                tail = (P,) if key in _MATRICES else ()
                store.add(key, tail, bool if key == "grad_missing" else self._dtype, 0)
                self._fill_default(key, slice(0, store.n))
        for name in taps:
            if name not in self.tap_names:
                self.tap_names.append(name)
        if self.tap_names:
            if "taps" not in store.arrays:
                store.add("taps", (0,), self._dtype, np.nan)
            store.widen("taps", len(self.tap_names), np.nan)
        rows = slice(store.n, store.n + n)
        for key, a in store.arrays.items():
            if key == "taps":
                a[rows] = np.nan
                for name, col in taps.items():
                    a[rows, self.tap_names.index(name)] = col
            elif key in cols:
                if key.startswith(_STAT) and a.ndim == 2 and cols[key].shape[1] < a.shape[1]:
                    a[rows] = np.nan  # a narrower block of a widened statistic: NaN-padded
                    a[rows, : cols[key].shape[1]] = cols[key]
                else:
                    a[rows] = cols[key]
            else:
                self._fill_default(key, rows, cols)
        store.n += n

    def _fill_default(self, key: str, rows: slice, cols: dict[str, np.ndarray] | None = None) -> None:
        """Write ``key``'s "nothing happened" value into ``rows`` (from ``cols`` if they are the new rows)."""
        a = self._cols.arrays
        if key.startswith(_STAT):
            a[key][rows] = np.nan
        elif key in ("norms_clipped", "total_clipped"):
            src = key.removesuffix("_clipped")
            a[key][rows] = cols[src] if cols is not None else a[src][rows]
        else:
            a[key][rows] = {"grad_missing": False, "clip_coef": 1.0}.get(key, np.nan)

    # -- reading ------------------------------------------------------------------
    def known(self, column: str) -> bool:
        """Whether ``column`` was recorded (False for columns the source did not hold).

        Example:
            >>> History(["w"], unknown=["norms_clipped"]).known("norms_clipped")
            False
        """
        if column not in COLUMNS:
            raise ValueError(f"column must be one of {COLUMNS}, got {column!r}")
        return column not in self._unknown

    @property
    def unknown(self) -> frozenset[str]:
        """The columns the source did not hold (they read as NaN)."""
        return self._unknown

    def _col(self, key: str) -> np.ndarray:
        n, P = len(self), len(self.names)
        if key in self._unknown:
            shape = (n, len(self.tap_names)) if key == "taps" else (n, P) if key in _MATRICES else (n,)
            return np.full(shape, np.nan, self._dtype)
        store = self._cols
        if key in store.arrays:
            return store.view(key)
        if key == "norms_clipped" and "norms" in store.arrays:
            return store.view("norms")
        if key == "total_clipped" and "total" in store.arrays:
            return store.view("total")
        dtype = {"steps": np.int64, "grad_missing": bool}.get(key, self._dtype)
        shape = (n, P) if key in _MATRICES else (n, 0) if key == "taps" else (n,)
        out = np.full(
            shape, {"clip_coef": 1.0, "grad_missing": False, "steps": 0, "norms": 0.0}.get(key, np.nan), dtype
        )
        out.flags.writeable = False
        return out

    steps = property(lambda self: self._col("steps"), doc="``int64 [S]`` optimizer step of each row.")
    norms = property(
        lambda self: self._col("norms"), doc="``[S, P]`` pre-clip L2 norms (0 where ``.grad`` was None; NaN kept)."
    )
    norms_clipped = property(lambda self: self._col("norms_clipped"), doc="``[S, P]`` post-clip L2 norms.")
    grad_missing = property(lambda self: self._col("grad_missing"), doc="``bool [S, P]``: True where .grad was None.")
    total = property(lambda self: self._col("total"), doc="``[S]`` global norm before clipping.")
    total_clipped = property(lambda self: self._col("total_clipped"), doc="``[S]`` global norm after clipping.")
    clip_coef = property(
        lambda self: self._col("clip_coef"), doc="``[S]`` factor applied to the global norm (1.0 = not clipped)."
    )
    clip_threshold = property(
        lambda self: self._col("clip_threshold"), doc="``[S]`` bound the clipper enforced (NaN: no global bound)."
    )
    scale = property(lambda self: self._col("scale"), doc="``[S]`` GradScaler scale (NaN without one).")
    taps = property(lambda self: self._col("taps"), doc="``[S, K]`` gradient norms of tapped tensors.")
    param_norms = property(
        lambda self: self._col("param_norms"),
        doc="``[S, P]`` L2 norm of each parameter ``‖W_t‖`` before the step (NaN where not recorded).",
    )
    update_norms = property(
        lambda self: self._col("update_norms"),
        doc="``[S, P]`` ``‖W_{t+1} - W_t‖``: the update the optimizer applied (NaN where not recorded).",
    )

    @property
    def update_ratio(self) -> np.ndarray:
        """``[S, P]`` update-to-weight ratio ``‖W_{t+1} - W_t‖ / ‖W_t‖`` (NaN where not recorded).

        ``update_norms / param_norms``, IEEE division: ``inf`` where the weight
        was exactly zero and moved (a zero-initialised bias at its first step).

        Example:
            >>> h = History(["w"]); h.append([0], [[1.0]], param_norms=[[2.0]], update_norms=[[0.002]])
            >>> h.update_ratio.tolist()
            [[0.001]]
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.update_norms / self.param_norms
        out.flags.writeable = False
        return out

    @property
    def stats(self) -> dict[str, np.ndarray]:
        """The statistics' columns: ``{"<prefix>.<column>": [S] or [S, w]}`` (NaN where a row has no value).

        Filled by ``GradWatch(stats=[...])`` contributors (see
        :class:`~gradwatch.Contributor`), saved and loaded with the history,
        and written and read back by the CSV and JSONL sinks. The arrays are
        read-only views; the dict is new on each access.

        Example:
            >>> h = History(["w"]); h.append([0, 1], [[1.0], [2.0]], stats={"noise.b_simple": [np.nan, 12.5]})
            >>> h.stats["noise.b_simple"].tolist()
            [nan, 12.5]
        """
        store = self._cols
        return {k[len(_STAT) :]: store.view(k) for k in store.arrays if k.startswith(_STAT)}

    def __len__(self) -> int:
        return self._cols.n

    def __getitem__(self, name: str) -> np.ndarray:
        """The pre-clip norm column of parameter ``name`` (or of a tapped tensor, or a statistic's column).

        Raises:
            KeyError: unknown name; the message lists the closest names.
        """
        if name in self.names:
            return self.norms[:, self.names.index(name)]
        if name in self.tap_names:
            return self.taps[:, self.tap_names.index(name)]
        if _STAT + str(name) in self._cols.arrays:
            return self._cols.view(_STAT + name)
        close = difflib.get_close_matches(str(name), self.names + self.tap_names + list(self.stats), n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; names are {self.names[:10]}"
        raise KeyError(f"no parameter named {name!r} in this history{hint}")

    def __repr__(self) -> str:
        return f"History({len(self)} steps x {len(self.names)} parameters, {len(self.events)} events)"

    @property
    def clip_fraction(self) -> float:
        """Fraction of recorded steps where clipping bound (``clip_coef < 1``); NaN if empty or unknown."""
        coef = self.clip_coef
        if not len(coef) or not self.known("clip_coef"):
            return math.nan
        return float(np.mean(coef < 1.0))

    def events_of(self, kind: str | None = None, name: str | None = None) -> list[Event]:
        """The events of one ``kind`` and/or parameter ``name`` (None matches all)."""
        return [e for e in self.events if (kind is None or e.kind == kind) and (name is None or e.name == name)]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per parameter: max, median and last norm, steps clipped, events.

        NaN steps are left out of max/median (``nonfinite`` counts them);
        ``clipped`` is None when the post-clip norms are unknown.
        """
        rows = []
        norms = self.norms
        clipped = self.norms_clipped < norms if self.known("norms_clipped") else None
        for j, name in enumerate(self.names):
            col = norms[:, j]
            fin = col[np.isfinite(col)]
            rows.append(
                {
                    "name": name,
                    "max": float(fin.max()) if fin.size else math.nan,
                    "median": float(np.median(fin)) if fin.size else math.nan,
                    "last": float(col[-1]) if col.size else math.nan,
                    "nonfinite": int((~np.isfinite(col)).sum()),
                    "clipped": None if clipped is None else int(clipped[:, j].sum()),
                    "events": sum(1 for e in self.events if e.name == name),
                }
            )
        return rows

    def grouped(self, by: int | Callable[[str], str]) -> History:
        """A history whose columns are groups of parameters, for models with many tensors.

        A group's norm is the L2 norm of its members' norms (the norm of all
        their gradients together), before and after clipping; a group's
        gradient is missing only if all its members' are; ``param_norms`` and
        ``update_norms`` group the same way (so ``update_ratio`` is the group's
        ``‖ΔW‖/‖W‖``). Totals, steps and events carry over (events renamed to
        their group); incidents carry over unchanged, at parameter resolution.

        Args:
            by: a module depth (``1`` groups ``"layers.3.attn.weight"`` under
                ``"layers"``, ``2`` under ``"layers.3"``), or a function from
                parameter name to group name.

        Raises:
            ValueError: ``by`` is neither a depth >= 1 nor a callable.

        Example:
            >>> h = History(["enc.0.w", "enc.1.w", "head.w"]); h.append([0], [[3.0, 4.0, 1.0]])
            >>> g = h.grouped(1)
            >>> g.names, g.norms.tolist()
            (['enc', 'head'], [[5.0, 1.0]])
        """
        if callable(by):
            key = by
        elif isinstance(by, int) and not isinstance(by, bool) and by >= 1:

            def key(name: str) -> str:
                return ".".join(name.split(".")[:by])
        else:
            raise ValueError(f"by must be a module depth >= 1 or a callable name -> group, got {by!r}")
        groups: dict[str, list[int]] = {}
        for j, name in enumerate(self.names):
            groups.setdefault(str(key(name)), []).append(j)
        out = History(list(groups), {**self.meta, "grouped_by": repr(by)}, unknown=self._unknown)
        if len(self):

            def l2(mat: np.ndarray) -> np.ndarray:
                cols = [np.sqrt(np.square(mat[:, idx].astype(np.float64)).sum(axis=1)) for idx in groups.values()]
                return np.stack(cols, axis=1).astype(mat.dtype)

            missing = np.stack([self.grad_missing[:, idx].all(axis=1) for idx in groups.values()], 1)
            weights = {k: l2(self._col(k)) for k in ("param_norms", "update_norms") if k in self._cols.arrays}
            out.append(
                self.steps,
                l2(self.norms),
                norms_clipped=l2(self.norms_clipped),
                grad_missing=missing,
                taps={name: self.taps[:, j] for j, name in enumerate(self.tap_names)},
                stats=self.stats,
                **{k: self._col(k) for k in _SCALARS},
                **weights,
            )
        out.tap_names = list(self.tap_names)
        out.events = [e if e.name is None else replace(e, name=str(key(e.name))) for e in self.events]
        out.incidents = list(self.incidents)
        return out

    def take(self, rows: Sequence[int] | np.ndarray) -> History:
        """A new history holding only ``rows`` (indices or a boolean mask), with the events of their steps.

        Incidents are not carried (they are windows of their own).

        Args:
            rows: row indices (``int``) or a ``bool [S]`` mask.

        Raises:
            IndexError: an index out of range, or a mask of another length.

        Example:
            >>> h = History(["w"]); h.append([0, 1, 2], [[1.0], [2.0], [3.0]])
            >>> h.take(h.steps % 2 == 0).steps.tolist()
            [0, 2]
        """
        idx = np.asarray(rows)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"a row mask must have shape {(len(self),)}, got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        out = History(self.names, self.meta, unknown=self._unknown)
        out._dtype = self._dtype
        cols = {k: self._cols.view(k)[idx] for k in self._cols.arrays if k != "taps"}
        if "steps" not in cols:
            cols = {"steps": np.zeros(0, np.int64), "norms": np.zeros((0, len(self.names)), self._dtype)}
        taps = {name: self.taps[idx, j] for j, name in enumerate(self.tap_names)}
        out._write(cols, taps)
        out.tap_names = list(self.tap_names)
        kept = set(cols["steps"].tolist())
        out.events = [e for e in self.events if e.step in kept]
        return out

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the history to a ``.npz`` file (exact round trip with :meth:`load`).

        The file is written to a temporary name beside ``path`` and renamed
        over it, so a failed save never truncates an earlier good file.
        Incidents are stored in the same file: their fields in the JSON header
        (``"incidents"``), their windows' columns as arrays named
        ``incident.<i>.<column>`` (files without incidents load with ``[]``).

        ``meta`` is stored as JSON. Strings, numbers, booleans, None, lists
        and string-keyed dicts of them come back equal (tuples come back as
        lists, as JSON has no tuple). Numpy scalars and one-element tensors
        are stored as the Python number ``.item()`` gives, so they come back
        as a ``float`` (``int``, ``bool`` for integer and boolean dtypes), not
        as a tensor; numpy arrays come back as (nested) lists.

        Raises:
            TypeError: a ``meta`` value (or a value nested in it) that JSON
                cannot hold, e.g. an optimizer or a tensor of several
                elements; the message names the key. Nothing is written then.
        """
        for key, value in self.meta.items():
            _check_meta_value(key, value)
        header, arrays = self._payload()
        header["format"] = _FORMAT
        header["incidents"] = []
        for i, inc in enumerate(self.incidents):
            head, cols = inc.history._payload()
            header["incidents"].append({**incident_header(inc), "history": head})
            arrays.update({f"incident.{i}.{k}": v for k, v in cols.items()})
        text = json.dumps(header, default=_json_default)
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix=".gradwatch-", suffix=".npz.tmp", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, gradwatch=np.array(text), **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        """Read a history written by :meth:`save`.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a gradwatch history (empty, truncated,
                another ``.npz``, not a zip file).
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["gradwatch"]))
                arrays = {k: z[k] for k in z.files if k != "gradwatch"}
        except FileNotFoundError:
            raise
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise ValueError(f"{os.fspath(path)!r} is not a gradwatch history (.npz written by History.save)") from exc
        h = cls._from_payload(header, arrays)
        if header.get("incidents"):
            for i, d in enumerate(header["incidents"]):
                prefix = f"incident.{i}."
                cols = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                h.incidents.append(incident_from_header(d, cls._from_payload(d["history"], cols)))
        return h

    def _payload(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The JSON header fields and the column arrays that :meth:`save` writes for this history."""
        events = [
            [int(e.step), str(e.kind), None if e.name is None else str(e.name), float(e.value), _opt_float(e.threshold)]
            for e in self.events
        ]
        header = {
            "names": self.names,
            "tap_names": self.tap_names,
            "meta": self.meta,
            "events": events,
            "unknown": sorted(self._unknown),
        }
        return header, {key: self._cols.view(key) for key in self._cols.arrays}

    @classmethod
    def _from_payload(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> History:
        """The history of one :meth:`_payload` (the top-level run or an incident's window)."""
        h = cls(header["names"], header.get("meta"), unknown=header.get("unknown", ()))
        if len(arrays.get("steps", ())):
            tap_names = list(header.get("tap_names", []))
            taps = arrays.get("taps", np.zeros((len(arrays["steps"]), 0)))
            kw = {k: v for k, v in arrays.items() if k in COLUMNS and k not in ("steps", "norms", "taps")}
            stats = {k[len(_STAT) :]: v for k, v in arrays.items() if k.startswith(_STAT)}
            taps = {n: taps[:, j] for j, n in enumerate(tap_names)}
            h.append(arrays["steps"], arrays["norms"], taps=taps, stats=stats, **kw)
        h.tap_names = list(header.get("tap_names", []))
        h.events = [
            Event(int(s), k, n, float(v), None if t is None else float(t)) for s, k, n, v, t in header["events"]
        ]
        return h


def _stat_name(name: Any) -> str:
    """A statistic's key: ``"<prefix>.<column>"``."""
    if not isinstance(name, str) or "." not in name.strip("."):
        raise ValueError(f"stats keys must be '<prefix>.<column>' strings (e.g. 'noise.b_simple'), got {name!r}")
    return name


def _stat_column(name: str, value: Any, n: int) -> np.ndarray:
    """A statistic's ``[n]`` or ``[n, w]`` float column."""
    a = np.asarray(value)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    if a.ndim not in (1, 2) or a.shape[0] != n:
        raise ValueError(f"stats[{name!r}] must have shape ({n},) or ({n}, width), got {a.shape}")
    return a


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _json_default(obj: Any) -> Any:
    """numpy scalars, one-element tensors and numpy arrays in ``meta`` serialise as Python numbers and lists.

    Raises:
        TypeError: anything else JSON cannot hold (never a silent ``repr``).
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.partition(".")[0] == "torch" and hasattr(obj, "numel") and obj.numel() == 1:
        return obj.item()  # a tensor (torch is not imported here)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _check_meta_value(key: Any, value: Any) -> None:
    """Raise a ``TypeError`` naming ``key`` if ``meta[key]`` cannot be stored as JSON."""
    try:
        json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"History.save: meta[{key!r}] holds a {type(value).__name__} that JSON cannot store ({exc}); "
            "meta values must be str, int, float, bool, None, lists and str-keyed dicts of them, numpy "
            "scalars or arrays, or one-element tensors: convert it (e.g. str(value)) or remove it"
        ) from exc
