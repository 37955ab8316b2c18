"""Forensics: a flight recorder that keeps every step around an incident, and which layer moved first.

People log gradient norms every N steps to keep logs small -- and then the
loss spikes between two logged steps and the record that would explain it is
gone. With a :class:`FlightRecorder`, :class:`~gradwatch.GradWatch` measures,
clips and runs its detectors at *every* step on the device (no host sync, as
always), keeps a history row only every ``every`` steps, and saves the full
per-parameter rows of the ``before`` steps before and the ``after`` steps after
every detector event and every :meth:`GradWatch.mark` as an :class:`Incident`.

For each incident an onset ranking answers "where did it start?": per
parameter, the first step of the window at which its gradient norm left its
own recent level (:func:`find_onsets`: upwards, or downwards for a
``"vanishing"`` trigger), earliest first.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch._validate import check_choice, check_float, check_int, check_names
from gradwatch.contrib import Binding
from gradwatch.history import History
from gradwatch.incidents import Incident, Onset
from gradwatch.plot import plot_incident

__all__ = [
    "FlightRecorder",
    "Incident",
    "Onset",
    "find_onsets",
    "format_incidents",
    "plot_incident",
]

#: event kinds that do not open an incident by default: routine with a GradScaler
QUIET_KINDS = ("amp_overflow",)


def find_onsets(history: History, factor: float = 3.0, alpha: float = 0.9, direction: str = "up") -> list[Onset]:
    r"""Per parameter, the first step at which its gradient norm left its own recent level.

    Each parameter's pre-clip norm :math:`x_t` is compared with the EMA of its
    earlier rows, :math:`m_{t-1}` (:math:`m` starts at the first positive
    finite norm; :math:`m_t = \alpha m_{t-1} + (1-\alpha) x_t`). Its onset is the
    first row where :math:`x_t > k\,m_{t-1}` (``direction="up"``, explosions),
    :math:`x_t < m_{t-1}/k` (``"down"``, vanishing) or either (``"both"``), or
    :math:`x_t` is NaN/Inf. Rows whose gradient was missing neither count nor
    update the EMA. Onsets are sorted by step, ties by how far the norm moved
    (``|log ratio|``, largest first).

    Args:
        history: the rows to scan (an incident's window).
        factor: the departure factor :math:`k` > 1.
        alpha: the EMA factor in [0, 1).
        direction: ``"up"``, ``"down"`` or ``"both"``.

    Returns:
        The :class:`Onset` list, earliest first; parameters that never left
        their level are not in it.

    Raises:
        ValueError: ``factor`` <= 1, ``alpha`` outside [0, 1) or an unknown ``direction``.

    Example:
        >>> h = History(["a", "b"])
        >>> h.append(range(5), [[1, 1], [1, 1], [1, 5], [8, 40], [60, 300]])
        >>> [str(o) for o in find_onsets(h)]
        ['b@2 (x5)', 'a@3 (x8)']
    """
    factor = check_float(factor, "factor", min=1, min_open=True)
    alpha = check_float(alpha, "alpha", min=0, max=1, max_open=True)
    check_choice(direction, "direction", ("up", "down", "both"))
    hi = factor if direction != "down" else np.inf
    lo = 1.0 / factor if direction != "up" else -np.inf
    x = np.asarray(history.norms, dtype=np.float64)
    valid = ~np.asarray(history.grad_missing)
    steps = history.steps
    P = x.shape[1]
    m = np.full(P, np.nan)
    at = np.full(P, -1, np.int64)
    ratio = np.full(P, np.nan)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for t in range(x.shape[0]):
            xt, v = x[t], valid[t]
            r = xt / m
            finite = np.isfinite(xt)
            dep = v & (at < 0) & ((~finite) | (~np.isnan(m) & ((r > hi) | (r < lo))))
            at[dep] = t
            ratio[dep] = np.where(finite[dep], r[dep], xt[dep])
            learn = v & finite
            start = learn & np.isnan(m) & (xt > 0)
            m = np.where(start, xt, np.where(learn & ~np.isnan(m), alpha * m + (1 - alpha) * xt, m))
        hit = np.flatnonzero(at >= 0)
        size = np.abs(np.log(np.abs(ratio[hit])))
    size = np.where(np.isnan(size), np.inf, size)
    order = sorted(range(len(hit)), key=lambda k: (at[hit[k]], -size[k], hit[k]))
    return [Onset(history.names[hit[k]], int(steps[at[hit[k]]]), float(ratio[hit[k]])) for k in order]


@dataclass
class _Open:
    """An incident still collecting its rows."""

    start: int
    end: int
    step: int
    kind: str
    name: str | None
    value: float
    threshold: float | None
    reason: str | None = None
    merged: int = 0


class FlightRecorder:
    """Keeps every step around each incident while the history is kept sparsely.

    Pass it as ``GradWatch(model, every=100, recorder=gw.FlightRecorder())``.
    With a recorder the watch measures, clips and runs its detectors at every
    step into its device buffer (no host sync per step); at a flush every
    buffered row reaches the host in the one copy, the rows of steps
    ``step % every == 0`` go to :attr:`GradWatch.history` and the sinks, and
    every row passes through the recorder. ``flush_every`` then counts steps,
    not recorded rows.

    A trigger -- a detector's event (any kind except ``"amp_overflow"``,
    unless ``kinds`` says otherwise) or :meth:`GradWatch.mark` -- at step ``s``
    opens an incident over steps ``s - before .. s + after``. It is complete,
    and appears in ``History.incidents`` and the sinks, once the step
    ``s + after`` has been flushed (or at ``close()``, with the steps it has).

    Bounds (memory stays bounded under an event storm):

    * a trigger whose window overlaps the open incident's window joins it
      (``merged`` counts them) and extends it to its own ``s + after``, but an
      incident never spans more than ``max_steps`` steps; windows never share
      rows (a later incident starts after the previous one's end);
    * at most ``max_incidents`` incidents are kept; later ones are counted in
      :attr:`dropped` (and ``History.meta["incidents_dropped"]``), not stored;
    * the host keeps at most ``max(before, max_steps) + flush_every`` rows
      between flushes; the device buffer holds ``flush_every`` rows.

    Args:
        before: steps kept before the trigger, >= 0.
        after: steps kept after the trigger, >= 0.
        max_incidents: incidents kept, >= 1.
        max_steps: the longest (merged) incident in steps, >= ``before + 1 + after``
            (default: 4 times that).
        kinds: event kinds that open an incident (None: every kind except
            ``"amp_overflow"``); marks always do.
        onset_factor: the departure factor of :func:`find_onsets`, > 1 (the
            direction is ``"down"`` for ``"vanishing"`` triggers, else ``"up"``).
        onset_alpha: the EMA factor of :func:`find_onsets`, in [0, 1).

    Raises:
        TypeError: an argument of the wrong type (``before=1.5``, ``kinds=[1]``).
        ValueError: an argument out of range.

    Example:
        >>> import torch, gradwatch as gw
        >>> model = torch.nn.Linear(2, 1)
        >>> watch = gw.GradWatch(model, every=10, recorder=gw.FlightRecorder(before=3, after=1))
        >>> for step in range(20):
        ...     model(torch.ones(1, 2) * (100.0 if step == 12 else 1.0)).sum().backward()
        ...     watch.step(); model.zero_grad()
        ...     if step == 12:
        ...         watch.mark("loss spike")
        >>> watch.close()
        >>> h = watch.history
        >>> h.steps.tolist(), h.incidents[0].history.steps.tolist()
        ([0, 10], [9, 10, 11, 12, 13])
        >>> [str(o) for o in h.incidents[0].onset]
        ['weight@12 (x100)']
    """

    def __init__(
        self,
        before: int = 64,
        after: int = 16,
        *,
        max_incidents: int = 100,
        max_steps: int | None = None,
        kinds: Sequence[str] | None = None,
        onset_factor: float = 3.0,
        onset_alpha: float = 0.9,
    ) -> None:
        self.before = check_int(before, "before", min=0)
        self.after = check_int(after, "after", min=0)
        self.max_incidents = check_int(max_incidents, "max_incidents", min=1)
        window = self.before + 1 + self.after
        self.max_steps = 4 * window if max_steps is None else check_int(max_steps, "max_steps", min=window)
        chosen = check_names(kinds, "kinds", allow_none=True)
        self.kinds: list[str] | None = None if chosen is None else list(chosen)
        self.onset_factor = check_float(onset_factor, "onset_factor", min=1, min_open=True)
        self.onset_alpha = check_float(onset_alpha, "onset_alpha", min=0, max=1, max_open=True)
        self.dropped = 0
        self.kept = 0
        self._bound = False
        self._buf: History | None = None
        self._open: _Open | None = None
        self._last_end = -1
        self._marks: list[tuple[int, str | None, float]] = []

    def __repr__(self) -> str:
        return (
            f"FlightRecorder(before={self.before}, after={self.after}, max_incidents={self.max_incidents}, "
            f"max_steps={self.max_steps}, kinds={self.kinds!r})"
        )

    @property
    def held(self) -> int:
        """Rows the recorder holds on the host now (the ring of recent steps and the open incident's rows)."""
        return 0 if self._buf is None else len(self._buf)

    def bind(self, binding: Binding) -> None:
        """Called by the watch that uses this recorder (the one ``bind`` of every contributor).

        Args:
            binding: the watched parameters; the recorder keeps their names.

        Raises:
            ValueError: the recorder already serves another watch.
        """
        if self._bound:
            raise ValueError("recorder: this FlightRecorder already serves another GradWatch; create one per watch")
        self._bound = True

    def mark(self, step: int, reason: str | None, value: float, *, latest: int) -> None:
        """Queue a trigger at ``step`` (host only); it is handled at the flush that holds the step's row.

        Called by :meth:`GradWatch.mark <gradwatch.GradWatch.mark>`.

        Args:
            step: the marked step, in ``[0, latest]``.
            reason: the label kept as ``Incident.reason``, or None.
            value: the number kept as ``Incident.value``.
            latest: the coming step of the watch (the largest step that may be marked).

        Raises:
            TypeError: ``reason`` not a string, ``step`` not an integer or ``value`` not a number.
            ValueError: ``step`` out of range.
        """
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None, got {type(reason).__name__}")
        step = check_int(step, "step", min=0, max=latest)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"value must be a number, got {value!r} ({type(value).__name__})")
        self._marks.append((step, reason, float(value)))

    # -- the flush ------------------------------------------------------------------
    def keep(self, every_step: History, every: int, *, final: bool = False) -> History:
        """A flush of every step: cut incidents (:meth:`process`), then keep the rows of ``step % every == 0``.

        Args:
            every_step: the flushed rows of every step, with their events.
            every: the watch's ``every``.
            final: the watch is closing (see :meth:`process`).

        Returns:
            The kept rows, with every event of the flush and the incidents completed.
        """
        incidents = self.process(every_step, final=final)
        kept = every_step if every == 1 else every_step.take(every_step.steps % every == 0)
        kept.events = list(every_step.events)
        kept.incidents = incidents
        return kept

    def process(self, rows: History, *, final: bool = False) -> list[Incident]:
        """Take one flush's rows (every step, with their events); return the incidents completed.

        Args:
            rows: the flushed rows, in step order, with all their events.
            final: the watch is closing: complete the open incident with the rows it has.

        Returns:
            The incidents completed by these rows, in step order (none beyond ``max_incidents``).
        """
        if self._buf is None:
            self._buf = History(rows.names, rows.meta)
        self._buf.extend(rows)
        buf = self._buf
        newest = int(buf.steps[-1]) if len(buf) else -1
        triggers: list[tuple[int, int, _Open]] = []
        for k, e in enumerate(rows.events):
            if (e.kind not in QUIET_KINDS) if self.kinds is None else (e.kind in self.kinds):
                triggers.append((e.step, k, _Open(0, 0, e.step, e.kind, e.name, e.value, e.threshold)))
        waiting = []
        for step, reason, value in self._marks:
            if step <= newest or final:
                triggers.append((step, len(triggers), _Open(0, 0, step, "mark", None, value, None, reason)))
            else:
                waiting.append((step, reason, value))
        self._marks = waiting
        done: list[Incident] = []
        for s, _, trig in sorted(triggers, key=lambda t: (t[0], t[1])):
            inc = self._open
            if inc is not None and s - self.before <= inc.end:  # overlapping windows merge, up to max_steps
                inc.end = min(max(inc.end, s + self.after), inc.start + self.max_steps - 1)
                if s <= inc.end:
                    inc.merged += 1
                    continue
            if inc is not None:
                self._complete(inc, done)
            trig.start = max(s - self.before, self._last_end + 1)
            trig.end = s + self.after
            self._open = trig
        if self._open is not None and (newest >= self._open.end or final):
            self._complete(self._open, done)
        keep_from = newest - self.before + 1 if self._open is None else min(self._open.start, newest - self.before + 1)
        if len(buf) and buf.steps[0] < keep_from:
            self._buf = buf.take(buf.steps >= keep_from)
        return done

    def _complete(self, inc: _Open, done: list[Incident]) -> None:
        self._open = None
        self._last_end = inc.end
        if self.kept >= self.max_incidents:
            self.dropped += 1
            return
        buf = self._buf
        assert buf is not None
        window = buf.take((buf.steps >= inc.start) & (buf.steps <= inc.end))
        window.meta = {**window.meta, "every": 1, "incident_step": inc.step}
        direction = "down" if inc.kind == "vanishing" else "up"
        onset = find_onsets(window, self.onset_factor, self.onset_alpha, direction)
        done.append(
            Incident(inc.step, inc.kind, inc.name, inc.value, inc.threshold, window, onset, inc.reason, inc.merged)
        )
        self.kept += 1


def format_incidents(h: History, top: int = 5) -> str:
    """The incidents of ``h`` as text, one paragraph each (what ``gradwatch incidents`` prints).

    Args:
        h: a history (``History.load`` of a run or of a ``*.incidents.npz`` companion file).
        top: onsets listed per incident.

    Example:
        >>> h = History(["w"]); w = History(["w"]); w.append([3, 4], [[1.0], [5.0]])
        >>> h.incidents.append(Incident(4, "spike", None, 5.0, 2.0, w, find_onsets(w)))
        >>> print(format_incidents(h))
        1 incident
        step 4: spike in the global norm: norm 5 (threshold 2); steps 3..4 (2 rows)
          started in: w@4 (x5)
    """
    top = check_int(top, "top", min=1)
    n = len(h.incidents)
    dropped = h.meta.get("incidents_dropped")
    lines = [f"{n} incident{'s' if n != 1 else ''}" + (f" ({dropped} more dropped)" if dropped else "")]
    for inc in h.incidents:
        head = str(inc).rsplit("; onset: ", 1)[0]
        lines.append(head)
        shown = ", ".join(map(str, inc.onset[:top])) if inc.onset else "no parameter left its recent level"
        more = f" (+{len(inc.onset) - top} more)" if len(inc.onset) > top else ""
        lines.append(f"  started in: {shown}{more}")
        examples = inc.top_examples(top)  # with PerExampleNorms: the examples with the largest contributions
        if examples:
            lines.append(f"  top examples: {', '.join(map(str, examples))}")
    return "\n".join(lines)
