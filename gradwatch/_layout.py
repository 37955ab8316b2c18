"""The record layout: every contributor's named columns in one device row.

Every part of a watch that records something per step (the norm meter, the
clipper, the AMP scaler, each detector) declares its columns once, when the
watch is built -- as torchmetrics declares state with ``add_state``. The step
writes named views of one device buffer; a flush copies the filled rows to the
host in one transfer and :meth:`RecordLayout.split` hands each column back by
name. Nothing else knows where a column sits in the row.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


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
        self._plans: dict[str, list[str]] = {}  # columns written by write(first=...), in row order
        self.width = 0

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
        """Named views of one buffer row (writing them writes the row)."""
        return {k: row[a] if scalar else row[a:b] for k, (a, b, scalar) in self._slices.items()}

    def write(self, row: Tensor, values: Mapping[str, Tensor], first: str) -> None:
        """Write ``values`` into ``row`` in one op: the columns from ``first`` to the row's end.

        ``values`` must hold every column declared from ``first`` on (the
        contributors that write by value are declared last, contiguously).
        """
        start = self._slices[first][0]
        names = self._plans.get(first)
        if names is None:
            names = self._plans[first] = [k for k, (a, _, _) in self._slices.items() if a >= start]
        if not names:
            return
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
        if len(parts) == 1:
            row[start:].copy_(parts[0])
        else:
            torch.cat(parts, out=row[start:])

    def split(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Split host rows ``[n, width]`` into named columns (views, no copies)."""
        return {k: rows[:, a] if scalar else rows[:, a:b] for k, (a, b, scalar) in self._slices.items()}
