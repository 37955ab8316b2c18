"""The host side of a watch: the device buffer of rows, and what a flush does with them.

:class:`RowStore` owns the rows between flushes, the :class:`~gradwatch.History`
they become, the sinks, the warnings and the reactions. A flush reads one way:
one device-to-host copy -> decode by the declared columns (each contributor
maps its own) -> the flight recorder keeps what history keeps -> history ->
sinks -> warnings and callbacks. Rows are stored before anything else can
raise, and a raising sink, warning or callback stops none of the others: the
first error is raised at the end.
"""

from __future__ import annotations

import atexit
import sys
import traceback
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradwatch._layout import RowMeta, Rows, decode
from gradwatch._parts import RowPlan
from gradwatch.detect import Event, Warner
from gradwatch.forensics import FlightRecorder
from gradwatch.history import History
from gradwatch.sinks import SinkSet

__all__ = ["OPEN_WATCHES", "RowStore", "collect"]

#: watches not closed yet: closed at interpreter exit (also after an uncaught exception), so pending rows reach
#: history and sinks
OPEN_WATCHES: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_open_watches() -> None:  # pragma: no cover - runs at interpreter exit
    for watch in list(OPEN_WATCHES):
        try:
            watch.close()
        except Exception:
            traceback.print_exc(file=sys.stderr)


def collect(errors: list[BaseException], fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn``; keep its exception for later instead of letting it stop the others."""
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)


class RowStore:
    """Recorded rows on the device until a flush; then history, sinks and reactions on the host.

    Args:
        plan: the contributors and the row layout they declared (they decode their own columns).
        history: the run's history (its ``names`` and ``meta`` label every chunk).
        sinks: the sinks this rank feeds.
        recorder: the flight recorder, or None.
        every: the watch's ``every`` (with a recorder, the rows kept in history).
        capacity: the watch's ``flush_every`` (rows kept between flushes).

    Attributes:
        after_flush: called at the end of every flush (the watch's late-parameter warning).
    """

    def __init__(
        self,
        plan: RowPlan,
        history: History,
        sinks: SinkSet,
        recorder: FlightRecorder | None,
        every: int,
        capacity: int,
    ) -> None:
        self.layout = plan.layout
        self.rows = Rows(plan.layout, capacity, plan.binding.device, plan.binding.dtype)
        self.history = history
        self.parts, self.sinks, self.recorder, self.every = plan.parts, sinks, recorder, every
        self.after_flush: Callable[[], None] = lambda: None
        self.warner = Warner()
        self.generation = 0  # flushes so far: a row is still buffered while the generation it was written in lasts

    def flush(self, final: bool = False) -> None:
        """Copy the buffered rows to the host and hand them out; ``final`` (at close) completes an open incident."""
        if self.rows.count:
            chunk, reactions, failed = decode(self.history.names, self.history.meta, self.parts, *self._to_host())
            self.generation += 1
        elif final and self.recorder is not None:
            chunk, reactions, failed = History(self.history.names, self.history.meta), [], []
        else:
            return
        if self.recorder is not None:  # every step was copied: the recorder keeps what history keeps
            chunk = self.recorder.keep(chunk, self.every, final=final)
            if self.recorder.dropped:
                self.history.meta["incidents_dropped"] = self.recorder.dropped
        self.history.extend(chunk)
        errors: list[BaseException] = [*failed, *self.sinks.write(chunk)]
        for action, event in reactions:
            collect(errors, self._act, action, event)
        collect(errors, self.after_flush)
        if errors:
            raise errors[0]

    def _to_host(self) -> tuple[dict[str, np.ndarray], list[RowMeta], dict[str, np.ndarray]]:
        """The one device-to-host copy: the filled rows split by column, their metas, the tapped values."""
        rows, metas = self.rows.drain()
        n, width = rows.shape
        tapped = [(r, k, v.reshape(1)) for r, m in enumerate(metas) for k, v in m.taps.items()]
        dev = torch.cat([rows.reshape(-1), *(v for _, _, v in tapped)]) if tapped else rows.reshape(-1)
        host = dev.to("cpu", copy=True).numpy()
        taps: dict[str, np.ndarray] = {}
        for (r, k, _), x in zip(tapped, host[n * width :]):
            taps.setdefault(k, np.full(n, np.nan))[r] = x
        return self.layout.split(host[: n * width].reshape(n, width)), metas, taps

    def _act(self, action: Any, e: Event) -> None:
        if action == "warn":
            self.warner(e)
        elif action == "skip":
            self.warner(e, prefix="optimizer step skipped: ")
        elif callable(action):
            action(e)

    def close(self) -> list[BaseException]:
        """The last flush, the warnings' summary and the sinks' close; returns the errors (none stops another)."""
        errors: list[BaseException] = []
        collect(errors, self.flush, True)
        collect(errors, self.warner.summary)
        errors += self.sinks.close()
        return errors
