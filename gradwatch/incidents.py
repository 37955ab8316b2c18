"""Incidents: the windows a flight recorder keeps around anomalies, and how files store them.

:class:`Incident` and :class:`Onset` are plain records: :class:`~gradwatch.History`
holds a list of them (``History.incidents``) and saves them with its rows, the
:class:`~gradwatch.FlightRecorder` (:mod:`gradwatch.forensics`) cuts them.
This module sits below both, so neither needs the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from gradwatch.detect import Event

if TYPE_CHECKING:
    from gradwatch.history import History

__all__ = ["Incident", "Onset", "incident_from_header", "incident_header"]


class Onset(NamedTuple):
    """When one parameter's gradient norm left its recent level.

    A named tuple ``(name, step, ratio)``: the parameter, the optimizer step of
    the departure, and the norm at that step divided by its EMA over the rows
    before (``> factor`` up, ``< 1/factor`` down; NaN or Inf for a non-finite norm).

    Example:
        >>> print(Onset("rnn.W", 3, 12.5))
        rnn.W@3 (x12.5)
    """

    name: str
    step: int
    ratio: float

    def __str__(self) -> str:
        return f"{self.name}@{self.step} (x{self.ratio:.3g})"


@dataclass
class Incident:
    """A full-resolution window of steps around an anomaly.

    Attributes:
        step: the step of the trigger (the event or mark that opened it).
        kind: the trigger's kind (``"spike"``, ``"nonfinite"``, ... or ``"mark"``).
        name: the parameter of the trigger (None for the global norm or a mark).
        value: the trigger's value (a mark's ``value``, NaN if none was given).
        threshold: the bound it crossed, or None.
        history: a :class:`~gradwatch.History` of every step of the window
            (``every=1`` resolution), with the window's events.
        onset: :class:`Onset` per parameter that departed from its recent
            level in the window, earliest first: ``incident.onset[:5]``.
        reason: the reason given to :meth:`GradWatch.mark` (None for events).
        merged: how many later triggers fell into this window and joined it.

    Example:
        >>> from gradwatch import History, find_onsets
        >>> h = History(["w"]); h.append([4, 5, 6], [[1.0], [1.0], [9.0]])
        >>> inc = Incident(6, "mark", None, math.nan, None, h, find_onsets(h), reason="loss spike")
        >>> print(inc)
        step 6: mark (loss spike); steps 4..6 (3 rows); onset: w@6 (x9)
    """

    step: int
    kind: str
    name: str | None
    value: float
    threshold: float | None
    history: History
    onset: list[Onset] = field(default_factory=list)
    reason: str | None = None
    merged: int = 0

    @property
    def start(self) -> int:
        """The first step of the window (the trigger's step if the window is empty)."""
        return int(self.history.steps[0]) if len(self.history) else self.step

    @property
    def end(self) -> int:
        """The last step of the window (the trigger's step if the window is empty)."""
        return int(self.history.steps[-1]) if len(self.history) else self.step

    def __str__(self) -> str:
        if self.kind == "mark":
            what = f"mark ({self.reason})" if self.reason else "mark"
            if not math.isnan(self.value):
                what += f": value {self.value:.4g}"
        else:
            what = str(Event(self.step, self.kind, self.name, self.value, self.threshold)).split(": ", 1)[1]
        more = f", {self.merged} more trigger(s) merged" if self.merged else ""
        onset = ", ".join(map(str, self.onset[:5])) if self.onset else "none"
        return (
            f"step {self.step}: {what}; steps {self.start}..{self.end} ({len(self.history)} rows{more}); onset: {onset}"
        )


def incident_header(inc: Incident) -> dict[str, Any]:
    """The JSON fields of an incident (its window is stored beside them as arrays)."""
    return {
        "step": int(inc.step),
        "kind": str(inc.kind),
        "name": None if inc.name is None else str(inc.name),
        "value": float(inc.value),
        "threshold": None if inc.threshold is None else float(inc.threshold),
        "reason": inc.reason,
        "merged": int(inc.merged),
        "onset": [[o.name, int(o.step), float(o.ratio)] for o in inc.onset],
    }


def incident_from_header(d: dict[str, Any], history: History) -> Incident:
    """The :class:`Incident` of :func:`incident_header`'s fields and its window."""
    thr = d.get("threshold")
    return Incident(
        int(d["step"]),
        str(d["kind"]),
        d.get("name"),
        float(d["value"]),
        None if thr is None else float(thr),
        history,
        [Onset(str(n), int(s), float(r)) for n, s, r in d.get("onset", [])],
        d.get("reason"),
        int(d.get("merged", 0)),
    )
