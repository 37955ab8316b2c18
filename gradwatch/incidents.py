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

import numpy as np

from gradwatch._validate import check_int
from gradwatch.detect import Event

if TYPE_CHECKING:
    from gradwatch.history import History

__all__ = ["ExampleNorm", "Incident", "Onset", "incident_from_header", "incident_header", "top_examples"]


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


class ExampleNorm(NamedTuple):
    """One example's gradient-contribution norm in an incident's window (see :func:`top_examples`).

    A named tuple ``(step, index, norm, micro)``: the optimizer step, the
    example's index within that step (micro-batches concatenated in order),
    the norm of its contribution to the step's gradient, and the micro-batch
    (``0, 1, ...`` within the step) it came from.

    Example:
        >>> print(ExampleNorm(12, 5, 3.2e3, 1))
        step 12 #5 (micro-batch 1): 3.2e+03
    """

    step: int
    index: int
    norm: float
    micro: int

    def __str__(self) -> str:
        return f"step {self.step} #{self.index} (micro-batch {self.micro}): {self.norm:.3g}"


def top_examples(history: History, k: int = 5) -> list[ExampleNorm]:
    """The ``k`` examples of ``history``'s rows whose contributions had the largest norms, largest first.

    Reads ``History.stats["example.norm"]`` and ``["example.micro"]``, the
    columns of :class:`~gradwatch.PerExampleNorms`; NaN entries (padding) are
    skipped, an infinite norm ranks first.

    Args:
        history: an incident's window (or any history with those columns).
        k: how many, >= 1.

    Returns:
        The :class:`ExampleNorm` list (empty without ``PerExampleNorms``).

    Raises:
        TypeError: ``k`` is not an integer.
        ValueError: ``k`` < 1.

    Example:
        >>> import numpy as np
        >>> from gradwatch import History
        >>> h = History(["w"])
        >>> norms, micro = [[1.0, 2.0, np.nan], [1.5, 900.0, 2.5]], [[0, 0, np.nan], [0, 1, 1]]
        >>> h.append([7, 8], [[1.0], [9.0]], stats={"example.norm": norms, "example.micro": micro})
        >>> [str(e) for e in top_examples(h, 2)]
        ['step 8 #1 (micro-batch 1): 900', 'step 8 #2 (micro-batch 1): 2.5']
    """
    k = check_int(k, "k", min=1)
    norms = history.stats.get("example.norm")
    if norms is None or norms.ndim != 2 or not len(norms):
        return []
    micro = history.stats.get("example.micro", np.full(norms.shape, np.nan))
    flat = np.where(np.isnan(norms), -np.inf, norms).reshape(-1)
    order = [i for i in np.argsort(-flat, kind="stable") if not np.isnan(norms.reshape(-1)[i])][:k]
    w = norms.shape[1]
    steps = history.steps
    out = []
    for i in order:
        r, c = divmod(int(i), w)
        m = micro[r, c]
        out.append(ExampleNorm(int(steps[r]), c, float(norms[r, c]), -1 if np.isnan(m) else int(m)))
    return out


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

    With :class:`~gradwatch.PerExampleNorms` among the watch's statistics, the
    window holds every step's per-example norms and :meth:`top_examples` names
    the examples of the batch whose contributions were largest.

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

    def top_examples(self, k: int = 5) -> list[ExampleNorm]:
        """The ``k`` largest per-example norms of the window, largest first (:func:`top_examples`)."""
        return top_examples(self.history, k)

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
