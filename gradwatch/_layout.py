"""The record layout: every contributor's named columns in one device row, and the buffer of rows.

The watch declares the meter's columns (``norms``, ``total``), then each
contributor's (:class:`~gradwatch.Contributor`: the clipper's, the scaler's,
the weight norms', each detector's, each statistic's) under its prefix, once,
when the watch is built -- as torchmetrics declares state with ``add_state``.
The step writes named views of one device buffer (:class:`Rows`); a flush
copies the filled rows to the host in one transfer and
:meth:`RecordLayout.split` hands each column back by name. Nothing else knows
where a column sits in the row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradwatch.contrib import Contributor
from gradwatch.detect import Event, Record
from gradwatch.history import History

#: the key of a row's views that holds the part :meth:`RecordLayout.write` fills
_VALUES = "*values"


class RecordLayout:
    """Named columns of a ``[rows, width]`` device buffer.

    Columns are declared with a width; width-1 columns declared ``scalar`` are
    0-d views on the device and 1-D ``[n]`` arrays on the host, the others
    ``[w]`` views and ``[n, w]`` arrays.

    Example:
        >>> layout = RecordLayout()
        >>> layout.declare("norms", 2); layout.declare("total", 1, scalar=True)
        >>> buf = torch.zeros(3, layout.width)
        >>> row = layout.views(buf[0]); row["norms"].fill_(3.0); row["total"].fill_(4.0)
        tensor([3., 3.])
        tensor(4.)
        >>> {k: v.tolist() for k, v in layout.split(buf[:1].numpy()).items()}
        {'norms': [[3.0, 3.0]], 'total': [4.0]}
    """

    def __init__(self) -> None:
        self._slices: dict[str, tuple[int, int, bool]] = {}
        self._plans: dict[str, list[str]] = {}  # columns written by write(), in row order
        self.width = 0
        #: the first column written by value (:meth:`write`); the columns before it are written in place
        self.values_from: str | None = None

    def declare(self, name: str, width: int, *, scalar: bool = False) -> None:
        """Reserve ``width`` slots for ``name`` at the end of the row.

        Raises:
            ValueError: ``name`` is declared already, or a scalar of width != 1.
        """
        if name in self._slices:
            raise ValueError(f"column {name!r} is declared twice")
        if scalar and width != 1:
            raise ValueError(f"scalar column {name!r} must have width 1, got {width}")
        self._slices[name] = (self.width, self.width + int(width), scalar)
        self._plans.clear()
        self.width += int(width)

    def __contains__(self, name: str) -> bool:
        return name in self._slices

    def names(self, prefix: str = "") -> list[str]:
        """The declared columns whose names start with ``prefix``, in row order."""
        return [k for k in self._slices if k.startswith(prefix)]

    def views(self, row: Tensor) -> dict[str, Tensor]:
        """Named views of one buffer row (writing them writes the row), and the part :meth:`write` fills."""
        views = {k: row[a] if scalar else row[a:b] for k, (a, b, scalar) in self._slices.items()}
        if self.values_from is not None:
            views[_VALUES] = row[self._slices[self.values_from][0] :]
        return views

    def write(self, views: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
        """Write ``values`` into a row in one op: the columns from :attr:`values_from` to the row's end.

        ``views`` are the row's :meth:`views` (they hold that part of the row,
        made once per row); ``values`` must hold every column declared from
        :attr:`values_from` on (the contributors that write by value are
        declared last, contiguously).
        """
        first = self.values_from
        if first is None:
            return
        names = self._plans.get(first)
        if names is None:
            start = self._slices[first][0]
            names = self._plans[first] = [k for k, (a, _, _) in self._slices.items() if a >= start]
        missing = [k for k in names if k not in values]
        if missing:
            raise KeyError(f"no value for declared columns {missing}")
        parts: list[Tensor] = []
        scalars: list[Tensor] = []  # consecutive 0-d values: one stack instead of a view each
        for k in names:
            v = values[k]
            if v.ndim == 0:
                scalars.append(v)
                continue
            if scalars:
                parts.append(torch.stack(scalars))
                scalars = []
            parts.append(v if v.ndim == 1 else v.reshape(-1))
        if scalars:
            parts.append(torch.stack(scalars))
        tail = views[_VALUES]
        if len(parts) == 1:
            tail.copy_(parts[0])
        else:
            torch.cat(parts, out=tail)

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Split host rows ``[n, width]`` into named columns (views, no copies)."""
        return {k: rows[:, a] if scalar else rows[:, a:b] for k, (a, b, scalar) in self._slices.items()}

    def declare_all(self, prefix: str, columns: Mapping[str, int]) -> None:
        """Declare ``"<prefix>.<column>"`` for each of a contributor's columns (width 0: a scalar)."""
        for key, width in columns.items():
            self.declare(f"{prefix}.{key}", max(int(width), 1), scalar=int(width) == 0)


def strip(cols: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The columns named ``"<prefix>.<column>"``, keyed by ``column``.

    Example:
        >>> strip({"clip.coef": 1, "scale": 2}, "clip")
        {'coef': 1}
    """
    head = prefix + "."
    return {k[len(head) :]: v for k, v in cols.items() if k.startswith(head)}


@dataclass
class RowMeta:
    """What a recorded row carries besides its device values (host-known at the step)."""

    step: int
    missing: list[int]
    order: list[int]
    taps: dict[str, Tensor] = field(default_factory=dict)


class Row(NamedTuple):
    """One buffer row and its named column views."""

    tensor: Tensor
    cols: dict[str, Tensor]


class Rows:
    """The device buffer of recorded rows: grows as it fills, up to ``capacity`` rows, and a scratch row.

    Args:
        layout: the declared columns.
        capacity: the most rows kept between flushes.
        device, dtype: where and how the rows are kept.
    """

    def __init__(self, layout: RecordLayout, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.layout, self.capacity = layout, capacity
        self.count = 0
        self._buf = torch.zeros(min(capacity, 64), layout.width, device=device, dtype=dtype)
        self._views = self._rows_of(self._buf)
        self.scratch = self._rows_of(torch.zeros(1, layout.width, device=device, dtype=dtype))[0]
        self.meta: list[RowMeta] = []

    def _rows_of(self, buf: Tensor) -> list[Row]:
        return [Row(r, self.layout.views(r)) for r in buf.unbind()]

    def next(self) -> Row:
        """The views of the next free row (grows the buffer geometrically, a device copy)."""
        if self.count == len(self._views):
            grown = self._buf.new_zeros(min(self.capacity, 2 * len(self._views)), self.layout.width)
            grown[: self.count].copy_(self._buf[: self.count])
            self._buf = grown
            self._views = self._rows_of(self._buf)
        row = self._views[self.count]
        self.count += 1
        return row

    def drain(self) -> tuple[Tensor, list[RowMeta]]:
        """The filled rows (``[count, width]`` on the device) and their metas; the buffer is empty after."""
        rows, metas = self._buf[: self.count], self.meta
        self.count, self.meta = 0, []
        return rows, metas

    @property
    def full(self) -> bool:
        return self.count >= self.capacity


def decode(
    names: list[str],
    meta: dict[str, Any],
    parts: Sequence[Contributor],
    cols: dict[str, np.ndarray],
    metas: list[RowMeta],
    taps: dict[str, np.ndarray],
) -> tuple[History, list[tuple[Any, Event]], list[Exception]]:
    """Flushed host rows as a History: each contributor maps its columns and makes its events.

    A contributor whose ``to_history`` or ``events`` raises (or maps columns of
    the wrong shape) loses only its own share: the norms and every other
    contributor's columns are kept, and its error is returned.

    Args:
        names: the parameter names.
        meta: the run's description (the watch history's ``meta``).
        parts: the contributors, in declaration order.
        cols: :meth:`RecordLayout.split` of the flushed rows.
        metas: the rows' host-known metas.
        taps: ``{name: [n]}`` tapped values (NaN where a row has none).

    Returns:
        The rows as a :class:`~gradwatch.History` (events in step order),
        ``(action, event)`` for each event whose contributor has an action, and
        the errors the contributors raised.
    """
    norms, total = cols["norms"], cols["total"]
    missing = np.zeros(norms.shape, bool)
    for r, m in enumerate(metas):
        missing[r, m.missing] = True
    steps = [m.step for m in metas]
    own = [(c, strip(cols, c.prefix)) for c in parts]
    mapped: dict[str, np.ndarray] = {}
    stats: dict[str, np.ndarray] = {}
    errors: list[Exception] = []
    for c, mine in own:
        try:
            part = dict(c.to_history(mine))
            part_stats = {k: part.pop(k) for k in [k for k in part if "." in k]}
            History(names).append(steps, norms, stats=part_stats, **part)  # shapes checked before they count
        except Exception as exc:
            errors.append(exc)
            continue
        mapped.update(part)
        stats.update(part_stats)
    chunk = History(names, meta)
    missing_or_none = missing if missing.any() else None
    chunk.append(steps, norms, total=total, grad_missing=missing_or_none, taps=taps, stats=stats, **mapped)
    reactions: list[tuple[Any, Event]] = []
    talking = [(c, mine) for c, mine in own if type(c).events is not Contributor.events]
    for r, m in enumerate(metas):
        for c, mine in talking:
            rec = Record(m.step, norms[r], float(total[r]), {k: v[r] for k, v in mine.items()}, missing[r], m.order)
            try:
                found = list(c.events(rec))
            except Exception as exc:
                errors.append(exc)
                continue
            chunk.events += found
            reactions += [(c.action, e) for e in found if c.action is not None]
    return chunk, reactions, errors
