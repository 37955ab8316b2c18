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

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradwatch._validate import check_choice, check_float, check_int, check_names
from gradwatch.detect import Event
from gradwatch.history import History
from gradwatch.norms import group_by_device_dtype, write_norms

__all__ = [
    "FlightRecorder",
    "Incident",
    "Onset",
    "WeightMeter",
    "find_onsets",
    "format_incidents",
    "plot_incident",
    "write_incident_file",
]

#: event kinds that do not open an incident by default: routine with a GradScaler
QUIET_KINDS = ("amp_overflow",)


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

    def bind(self) -> None:
        """Called by the watch that uses this recorder.

        Raises:
            ValueError: the recorder already serves another watch.
        """
        if self._bound:
            raise ValueError("recorder: this FlightRecorder already serves another GradWatch; create one per watch")
        self._bound = True

    def mark(self, step: int, reason: str | None, value: float) -> None:
        """Queue a trigger at ``step`` (host only); it is handled at the flush that holds the step's row.

        Use :meth:`GradWatch.mark`, which validates the arguments.

        Args:
            step: the marked step.
            reason: the label kept as ``Incident.reason``.
            value: the number kept as ``Incident.value``.
        """
        self._marks.append((step, reason, value))

    # -- the flush ------------------------------------------------------------------
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


# -- persistence (used by History.save/load) --------------------------------------------
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
    return "\n".join(lines)


def plot_incident(
    incident: Incident,
    names: Sequence[str] | None = None,
    ax: Any = None,
    *,
    top: int = 5,
    log: bool = True,
) -> Any:
    """An incident's window: gradient norms per step, the trigger and the onsets marked.

    Draws the pre-clip norm of the ``top`` earliest-onset parameters (or of
    ``names``) and the global norm (grey), a vertical line at the trigger step,
    and a dot at each drawn parameter's onset.

    Args:
        incident: the :class:`Incident`.
        names: parameters to draw (default: the first ``top`` onsets, or the
            first ``top`` parameters if none departed).
        ax: an Axes to draw on (default: a new figure).
        top: how many parameters by default, >= 1.
        log: log-scale y axis (exact zeros are left out).

    Returns:
        The matplotlib Axes.

    Raises:
        KeyError: an unknown name.
        ImportError: matplotlib is missing.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> w = History(["a", "b"]); w.append(range(4), [[1, 1], [1, 1], [1, 9], [20, 90]])
        >>> ax = plot_incident(Incident(3, "spike", None, 92.2, 10.0, w, find_onsets(w)))
        >>> [line.get_label() for line in ax.lines[:3]]
        ['b', 'a', 'global norm']
    """
    from gradwatch.plot import _axes, _pyplot

    top = check_int(top, "top", min=1)
    h = incident.history
    if names is None:
        names = [o.name for o in incident.onset[:top]] or h.names[:top]
    names = list(names)
    for n in names:
        h[n]  # KeyError with the closest names
    ax = _axes(ax)
    _pyplot()
    x = h.steps

    def shown(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.where(y > 0, y, np.nan) if log else y

    onset = {o.name: o for o in incident.onset}
    for n in names:
        (line,) = ax.plot(x, shown(h[n]), label=n, linewidth=1.4)
        o = onset.get(n)
        if o is not None and o.step in set(x.tolist()):
            y = shown(h[n])[int(np.searchsorted(x, o.step))]
            ax.scatter([o.step], [y], color=line.get_color(), s=40, zorder=4, edgecolor="black")
    ax.plot(x, shown(h.total), color="0.5", linewidth=1.0, linestyle=":", label="global norm")
    trig = incident.kind if incident.kind != "mark" else f"mark: {incident.reason or ''}".rstrip(": ")
    ax.axvline(incident.step, color="crimson", linewidth=1.0, linestyle="--", label=f"trigger ({trig})")
    ax.scatter([], [], color="white", edgecolor="black", s=40, label="onset")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(f"incident at step {incident.step}: steps {incident.start}..{incident.end}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ax


def write_incident_file(path: str | os.PathLike, history: History, mode: str = "w") -> None:
    """Write ``history``'s incidents to ``path`` (a :meth:`History.save` file without rows), atomically.

    This is the companion file ``<sink path>.incidents.npz`` that
    :class:`~gradwatch.GradWatch` writes beside every file sink when incidents
    complete; read it with ``History.load(path).incidents`` or ``gradwatch
    incidents``. With ``mode="a"`` (a resumed run) the incidents already in the
    file from before this run's first one are kept.
    """
    out = History(history.names, history.meta)
    mine = list(history.incidents)
    if mode == "a" and os.path.exists(path) and mine:
        try:
            old = History.load(path).incidents
        except ValueError:
            old = []
        out.incidents = [i for i in old if i.step < mine[0].start]
    out.incidents += mine
    out.save(path)


class WeightMeter:
    """Parameter norms ``‖W_t‖`` and applied updates ``‖W_{t+1} - W_t‖``, fused and sync-free.

    :meth:`norms` is one ``torch._foreach_norm`` per device and dtype.
    With ``update=True`` the meter keeps one scratch copy of the parameters
    (:attr:`nbytes`: their size, in their dtype): :meth:`snapshot` copies
    ``W_t`` into it before the optimizer step (one ``_foreach_copy_``), and
    :meth:`update` -- in the optimizer's post-step hook -- subtracts ``W_{t+1}``
    in place and takes the norms of the difference (``_foreach_sub_`` and
    ``_foreach_norm``). The subtraction is exact where ``W_t`` and ``W_{t+1}``
    are within a factor 2 of each other (Sterbenz), the usual case.

    Args:
        params: the parameters, in model order.
        update: keep the scratch copy for :meth:`update`.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> meter, out = WeightMeter([w], update=True), torch.zeros(1)
        >>> meter.norms(out)
        tensor([5.])
        >>> meter.snapshot(out); w.grad = torch.tensor([0.0, 10.0]); opt.step(); meter.update(opt, out)
        tensor([1.])
    """

    def __init__(self, params: Sequence[Tensor], update: bool = False) -> None:
        self.params = list(params)
        self._groups = group_by_device_dtype(self.params)
        self._index: dict[tuple[int, ...], Tensor] = {}
        self._views: list[Tensor] = []
        self._subsets: dict[int, tuple[int, dict]] = {}
        self.nbytes = 0
        if update:
            views: list[Tensor | None] = [None] * len(self.params)
            for (device, dtype), (tensors, positions) in self._groups.items():
                flat = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)
                self.nbytes += flat.numel() * flat.element_size()
                offset = 0
                for t, i in zip(tensors, positions):
                    views[i] = flat[offset : offset + t.numel()].view(t.shape)
                    offset += t.numel()
            self._views = [v for v in views if v is not None]

    def _index_of(self, positions: list[int]) -> Tensor:
        key = tuple(positions)
        if key not in self._index:
            self._index[key] = torch.tensor(positions, device=self.params[0].device)
        return self._index[key]

    @torch.no_grad()
    def norms(self, out: Tensor) -> Tensor:
        """Write ``‖W‖`` of every parameter into ``out`` (``[P]``); returns it."""
        return write_norms(out, self._groups, 2.0, self._index_of)

    @torch.no_grad()
    def snapshot(self, out: Tensor) -> None:
        """Copy the parameters into the scratch buffer and fill ``out`` (the update column) with NaN."""
        out.fill_(math.nan)
        for tensors, positions in self._groups.values():
            torch._foreach_copy_([self._views[i] for i in positions], tensors)

    def _subset(self, optimizer: torch.optim.Optimizer) -> dict:
        """``{(device, dtype): (scratch views, params, positions)}`` of the watched parameters ``optimizer`` steps."""
        cached = self._subsets.get(id(optimizer))
        if cached is not None and cached[0] == len(optimizer.param_groups):
            return cached[1]
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        groups: dict = {}
        for key, (tensors, positions) in self._groups.items():
            pick = [(t, i) for t, i in zip(tensors, positions) if id(t) in ids]
            if pick:
                groups[key] = ([self._views[i] for _, i in pick], [t for t, _ in pick], [i for _, i in pick])
        self._subsets[id(optimizer)] = (len(optimizer.param_groups), groups)
        return groups

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer, out: Tensor) -> Tensor:
        """After ``optimizer``'s step: ``‖W_{t+1} - W_t‖`` of its parameters into ``out``; returns it."""
        groups = self._subset(optimizer)
        for views, params, _ in groups.values():
            torch._foreach_sub_(views, params)
        return write_norms(out, {k: (v, pos) for k, (v, _, pos) in groups.items()}, 2.0, self._index_of)
