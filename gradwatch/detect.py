"""Detectors: on-device checks of every step's gradient norms, and what to do on a hit.

A detector looks at the norms GradWatch measured, updates its state on the
device and, at the next flush, turns what it saw into :class:`Event` objects.
Its ``action`` decides what happens then:

* ``"warn"`` -- a :class:`GradientWarning` per event (rate limited), at the flush;
* ``"ignore"`` -- the event is only recorded (history and sinks);
* a callable -- called with each :class:`Event`, at the flush;
* ``"raise"`` -- :class:`GradientAnomalyError` from the optimizer step, before
  the weights change (costs one host sync per step);
* ``"skip"`` -- the optimizer step becomes a no-op: weights and optimizer state
  (``optimizer.state``, ``param_groups``, a stateful wrapper's such as
  ``Lookahead``'s) stay bit-identical (sync-free on fused optimizers, else one
  host sync a step); state an optimizer keeps elsewhere is not covered (see
  :mod:`gradwatch.gate`).

Only ``"raise"`` and ``"skip"`` need the answer during the step; the others
cost no host sync, which is why their reactions wait for the flush
(``GradWatch(flush_every=1)`` reacts at once).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch._params import Binding
from gradwatch._validate import (
    check_bool,
    check_callable_or_choice,
    check_float,
    check_int,
    check_names,
    check_positive,
    match_names,
)

__all__ = [
    "Detector",
    "Event",
    "GradientAnomalyError",
    "GradientWarning",
    "NonFinite",
    "Spike",
    "Threshold",
    "Vanishing",
]

ACTIONS = ("warn", "raise", "skip", "ignore")
Action = str | Callable[["Event"], Any]


@dataclass(frozen=True)
class Event:
    """One anomaly at one optimizer step.

    Attributes:
        step: the optimizer step index (0-based).
        kind: ``"nonfinite"``, ``"amp_overflow"``, ``"threshold"``, ``"spike"``
            or ``"vanishing"`` (custom detectors may add kinds).
        name: the parameter, or None for the global norm.
        value: the norm that triggered the event (NaN and Inf kept as they are).
        threshold: the bound it crossed, or None where there is none.

    Example:
        >>> print(Event(12, "spike", "rnn.W", 4600.0, 120.0))
        step 12: spike in rnn.W: norm 4600 (threshold 120)
    """

    step: int
    kind: str
    name: str | None
    value: float
    threshold: float | None = None

    def __str__(self) -> str:
        where = "the global norm" if self.name is None else self.name
        thr = "" if self.threshold is None else f" (threshold {self.threshold:.4g})"
        return f"step {self.step}: {self.kind} in {where}: norm {self.value:.4g}{thr}"


class GradientAnomalyError(RuntimeError):
    """Raised by a detector with ``action="raise"``; ``.event`` is what it saw.

    Example:
        >>> err = GradientAnomalyError(Event(3, "nonfinite", "fc.weight", math.nan))
        >>> isinstance(err, RuntimeError), err.event.name
        (True, 'fc.weight')
    """

    def __init__(self, event: Event) -> None:
        super().__init__(str(event))
        self.event = event


class GradientWarning(UserWarning):
    """The warning category of ``action="warn"`` (filter it with :mod:`warnings`)."""


@dataclass
class Observation:
    """What detectors see on the device at one observed step.

    Attributes:
        step: optimizer step index.
        norms: ``[P]`` pre-clip L2 norms (0 where the gradient is missing).
        total: 0-d global L2 norm.
        missing: indices of parameters without a gradient this step.
    """

    step: int
    norms: Tensor
    total: Tensor
    missing: list[int]


@dataclass
class Record:
    """What detectors see on the host at a flush, for one recorded step.

    Attributes:
        step: optimizer step index.
        norms: ``[P]`` pre-clip norms (numpy).
        total: the global norm.
        values: this detector's declared columns (:meth:`Detector.columns`) for this row.
        missing: ``[P]`` bool, True where the gradient was None.
        order: parameter indices in the order their gradients became ready.
    """

    step: int
    norms: np.ndarray
    total: float
    values: dict[str, np.ndarray]
    missing: np.ndarray
    order: Sequence[int]


class Detector:
    """Base class of the detectors.

    A subclass sets :attr:`kind`, declares the per-step values it keeps
    (:meth:`columns`), and implements :meth:`observe` (device, every observed
    step) and :meth:`events` (host, at the flush). The watch reserves the
    declared columns in its device row once, writes what :meth:`observe`
    returns into them, and hands them back in :attr:`Record.values`.

    Args:
        action: ``"warn"``, ``"raise"``, ``"skip"``, ``"ignore"`` or a callable
            taking the :class:`Event`.

    Raises:
        ValueError: an unknown action.
    """

    kind = "anomaly"

    def __init__(self, action: Action = "warn") -> None:
        self.action = check_callable_or_choice(action, "action", ACTIONS)
        self.names: list[str] = []
        self.amp = False

    @property
    def needs_flag(self) -> bool:
        """Whether the step must know at once if this detector fired."""
        return self.action in ("raise", "skip")

    def bind(self, binding: Binding) -> None:
        """Called once by the watch: the watched parameters' names, and whether a GradScaler is used.

        Args:
            binding: the :class:`~gradwatch.Binding` every contributor gets.
        """
        self.names = list(binding.names)
        self.amp = binding.amp

    def columns(self) -> dict[str, int]:
        """The values kept per step for :meth:`events`: ``{column: width}`` (after :meth:`bind`)."""
        return {}

    def observe(self, obs: Observation) -> tuple[dict[str, Tensor], Tensor | None]:
        """Update state on the device.

        Returns:
            ``(values, fired)``: a tensor for each declared column (``width``
            elements), and a 0-d bool tensor, True when the detector fired
            (only needed when :attr:`needs_flag`; may be None otherwise).
        """
        return {}, None

    def events(self, rec: Record) -> list[Event]:
        """The events of one recorded step."""
        return []

    def _config(self) -> dict[str, Any]:
        """What a saved state must agree with to be loaded (class, sizes)."""
        return {"class": type(self).__name__}

    def state_dict(self) -> dict[str, Any]:
        """Device state to checkpoint, with the configuration it belongs to."""
        return {"config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state belongs to a differently configured detector.
        """
        theirs = state.get("config") if isinstance(state, dict) else None
        mine = self._config()
        if theirs is not None and theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state was saved by a detector configured "
                f"differently ({', '.join(f'{k}: saved {theirs.get(k)!r}, here {mine.get(k)!r}' for k in diff)})"
            )

    def reset(self) -> None:
        """Forget all state."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(action={self.action!r})"


class NonFinite(Detector):
    """Any NaN or Inf in any gradient.

    Emits one event per offending parameter, in the order their gradients
    became ready during backward, so the first event names the parameter where
    the non-finite value entered the backward pass. With a ``GradScaler``
    non-finite steps are overflows that the scaler skips: the watch labels them
    ``"amp_overflow"`` and this detector stays silent.

    Example:
        >>> NonFinite(action="skip")
        NonFinite(action='skip')
    """

    kind = "nonfinite"

    def observe(self, obs: Observation) -> tuple[dict[str, Tensor], Tensor | None]:
        if not self.needs_flag or self.amp:
            return {}, None
        return {}, ~torch.isfinite(obs.total)

    def events(self, rec: Record) -> list[Event]:
        if self.amp:
            return []
        bad = ~np.isfinite(rec.norms)
        if not bad.any():
            if math.isfinite(rec.total):
                return []
            return [Event(rec.step, self.kind, None, rec.total, None)]
        return [
            Event(rec.step, self.kind, self.names[i], float(rec.norms[i]), None) for i in ready_first(rec.order, bad)
        ]


class Threshold(Detector):
    """A norm above a fixed bound.

    Args:
        max_norm: the bound, > 0.
        names: parameter names or glob patterns to check one by one; None checks
            the global norm.
        action: see :class:`Detector`.

    Raises:
        TypeError: ``names`` is not a string or a list of strings.
        ValueError: ``max_norm`` not positive, or a name matching no parameter.

    Example:
        >>> Threshold(100.0, names=["rnn.*"])
        Threshold(max_norm=100.0, names=['rnn.*'], action='warn')
    """

    kind = "threshold"

    def __init__(self, max_norm: float, names: Sequence[str] | None = None, action: Action = "warn") -> None:
        super().__init__(action)
        self.max_norm = check_positive(max_norm, "max_norm")
        patterns = check_names(names, "names", allow_none=True)
        self.patterns = None if patterns is None else list(patterns)
        self._idx: list[int] = []
        self._idx_t: Tensor | None = None

    def __repr__(self) -> str:
        return f"Threshold(max_norm={self.max_norm!r}, names={self.patterns!r}, action={self.action!r})"

    def bind(self, binding: Binding) -> None:
        super().bind(binding)
        self._idx = [] if self.patterns is None else match_names(self.patterns, binding.names, "names")
        self._idx_t = None

    def observe(self, obs: Observation) -> tuple[dict[str, Tensor], Tensor | None]:
        if not self.needs_flag:
            return {}, None
        if self.patterns is None:
            return {}, obs.total > self.max_norm
        if self._idx_t is None or self._idx_t.device != obs.norms.device:
            self._idx_t = torch.tensor(self._idx, device=obs.norms.device)
        return {}, (obs.norms.index_select(0, self._idx_t) > self.max_norm).any()

    def events(self, rec: Record) -> list[Event]:
        if self.patterns is None:
            if rec.total > self.max_norm:
                return [Event(rec.step, self.kind, None, rec.total, self.max_norm)]
            return []
        return [
            Event(rec.step, self.kind, self.names[i], float(rec.norms[i]), self.max_norm)
            for i in self._idx
            if rec.norms[i] > self.max_norm
        ]


class Spike(Detector):
    r"""A norm far above its running mean (EMA z-score).

    Each watched value (the global norm, and with ``per_param`` each
    parameter's norm) first collects ``warmup_steps`` *finite* observations,
    which estimate its mean and variance; after that each step fires when

    .. math:: x > \mu + z_t(\sigma + \epsilon)

    and updates the EMA (factor ``alpha``) with the value capped at that
    threshold, so one spike does not inflate the statistics that judge the
    next steps. Non-finite values are left out entirely (that is
    :class:`NonFinite`'s job): a warm-up that saw only NaN is still warming
    up, and never fires. A missing gradient (recorded as 0) is no observation.

    Args:
        alpha: EMA factor in (0, 1).
        z_thresh: z-score that counts as a spike, > 0.
        warmup_steps: finite observations before a value may fire, >= 1.
        per_param: also watch each parameter's norm, not only the global one.
        action: see :class:`Detector`.
        eps: added to :math:`\sigma`, >= 0.

    Raises:
        TypeError: ``warmup_steps`` not an integer, ``per_param`` not a bool.
        ValueError: an argument outside its range.

    Example:
        >>> Spike(z_thresh=6.0)
        Spike(alpha=0.97, z_thresh=6.0, warmup_steps=25, per_param=False, action='warn')
    """

    kind = "spike"

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 6.0,
        warmup_steps: int = 25,
        per_param: bool = False,
        action: Action = "warn",
        eps: float = 1e-12,
    ) -> None:
        super().__init__(action)
        self.alpha = check_float(alpha, "alpha", min=0, max=1, min_open=True, max_open=True)
        self.z_thresh = check_positive(z_thresh, "z_thresh")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", min=1)
        self.per_param = check_bool(per_param, "per_param")
        self.eps = check_float(eps, "eps", min=0)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"Spike(alpha={self.alpha!r}, z_thresh={self.z_thresh!r}, warmup_steps={self.warmup_steps!r}, "
            f"per_param={self.per_param!r}, action={self.action!r})"
        )

    def _width(self) -> int:
        return 1 + (len(self.names) if self.per_param else 0)

    def columns(self) -> dict[str, int]:
        return {"threshold": self._width()}

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "values": self._width()}

    def reset(self) -> None:
        self._stats: Tensor | None = None  # [3, values]: rows mean, var, finite observations (saturating at W)
        self._missing_idx: dict[tuple[int, ...], Tensor] = {}
        self._tables: tuple[Tensor, Tensor, Tensor] | None = None

    def _weights(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-count constants ``(A [3, W + 1], B [3, W + 1], offset [W + 1])`` of the one-step update.

        With k finite observations seen (k saturates at W), an observation x,
        capped at the threshold, moves the statistics ``s = [mean, var, k]`` by
        ``delta = x - mean``::

            s <- s * A[:, k] + B[:, k] * [delta, delta**2, 1]

        i.e. ``mean += w * delta``, ``var = (1 - w) * var + c * delta**2``,
        ``k += 1`` until W. While warming up (k < W) ``w = 1 / (k + 1)`` and
        ``c = w (1 - w)``: Welford's recursion for the population mean and
        variance. After it ``w = 1 - alpha`` and ``c = (1 - alpha) alpha**2``:
        the EMA ``mean = a mean + (1 - a) x``, ``var = a var + (1 - a)(x - mean_new)**2``.
        The threshold is ``mean + offset[k] + z_thresh * sqrt(var)`` with
        ``offset = z_thresh * eps`` (inf while warming up).
        """
        if self._tables is None or self._tables[0].device != device:
            W, a = self.warmup_steps, self.alpha
            k = torch.arange(W + 1, dtype=torch.float64)
            warm = k < W
            w = torch.where(warm, 1.0 / (k + 1), 1.0 - a)
            c = torch.where(warm, w * (1 - w), (1 - a) * a * a)
            one = torch.ones_like(k)
            A = torch.stack([one, 1 - w, one])
            B = torch.stack([w, c, warm.double()])
            off = torch.where(warm, math.inf, self.z_thresh * self.eps)
            self._tables = (A.to(device), B.to(device), off.to(device))
        return self._tables

    def _ready(self, like: Tensor) -> Tensor:
        """The statistics tensor on ``like``'s device (zeros on first use)."""
        if self._stats is None:
            self._place(torch.zeros(3, self._width(), dtype=torch.float64, device=like.device))
        elif self._stats.device != like.device:
            self._place(self._stats.to(like.device))
        assert self._stats is not None
        return self._stats

    def _place(self, st: Tensor) -> None:
        """Keep ``st`` as the statistics, with its row views made once (no view op per step)."""
        self._stats = st
        self._mean, self._var, self._seen = st.unbind()
        self._powers = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64, device=st.device)

    def observe(self, obs: Observation) -> tuple[dict[str, Tensor], Tensor | None]:
        """One small tensor program over the stacked statistics: no host sync, the same ops for any width."""
        x = obs.total
        if self.per_param:
            x = torch.cat([x.reshape(1), obs.norms])
            if obs.missing:  # a missing gradient is no observation
                key = tuple(obs.missing)
                if key not in self._missing_idx:
                    self._missing_idx[key] = torch.tensor([1 + i for i in key], device=x.device)
                x = x.index_fill(0, self._missing_idx[key], math.nan)
        st = self._ready(x)
        A, B, off = self._weights(x.device)
        k = self._seen.long()
        thr = torch.add(self._mean + off.index_select(0, k), self._var.sqrt(), alpha=self.z_thresh)
        delta = torch.minimum(x, thr) - self._mean  # float64 (x is promoted)
        new = torch.addcmul(st * A.index_select(1, k), B.index_select(1, k), delta.pow(self._powers))
        torch.where(x < math.inf, new, st, out=st)  # NaN and inf are no observation
        fired = (x > thr).any() if self.needs_flag else None
        return {"threshold": thr}, fired

    def events(self, rec: Record) -> list[Event]:
        values = [rec.total] + (list(rec.norms) if self.per_param else [])
        out = []
        for k, (v, thr) in enumerate(zip(values, rec.values["threshold"])):
            if v > thr and not (k and rec.missing[k - 1]):
                out.append(Event(rec.step, self.kind, None if k == 0 else self.names[k - 1], float(v), float(thr)))
        return out

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        if self._stats is not None:
            st.update(n=self._seen.long(), mean=self._mean.clone(), var=self._var.clone())
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reset()
        if "mean" in state:
            if state["mean"].numel() != self._width():
                raise ValueError(
                    f"Spike.load_state_dict: the state watches {state['mean'].numel()} values, this detector "
                    f"{self._width()} (per_param={self.per_param}, {len(self.names)} parameters)"
                )
            mean = state["mean"].to(torch.float64).reshape(-1)
            seen = state["n"].to(mean.device).clamp(max=self.warmup_steps).to(torch.float64).reshape(-1)
            var = state["var"].to(device=mean.device, dtype=torch.float64).reshape(-1)
            self._place(torch.stack([mean, var, seen]))


class Vanishing(Detector):
    """A parameter whose gradient norm stays below ``min_norm`` for ``patience`` steps.

    Fires once per run of small norms, at the step the run reaches ``patience``
    consecutive observed steps. Only *live* parameters count: a parameter
    whose gradient has been exactly zero at every step so far -- unused in the
    forward pass (its gradient stays all zeros with
    ``zero_grad(set_to_none=False)``), or with zero elements -- is not
    reported until it first receives a nonzero gradient; after that an exact
    zero counts as small. Missing gradients (None) neither count nor fire.

    Args:
        min_norm: the bound, > 0.
        patience: consecutive steps below it, >= 1.
        action: see :class:`Detector`.

    Raises:
        TypeError: ``patience`` not an integer.
        ValueError: ``min_norm`` not positive or ``patience`` < 1.

    Example:
        >>> Vanishing(min_norm=1e-2, patience=10)
        Vanishing(min_norm=0.01, patience=10, action='warn')
    """

    kind = "vanishing"

    def __init__(self, min_norm: float = 1e-6, patience: int = 10, action: Action = "warn") -> None:
        super().__init__(action)
        self.min_norm = check_positive(min_norm, "min_norm")
        self.patience = check_int(patience, "patience", min=1)
        self.reset()

    def __repr__(self) -> str:
        return f"Vanishing(min_norm={self.min_norm!r}, patience={self.patience!r}, action={self.action!r})"

    def columns(self) -> dict[str, int]:
        return {"run": len(self.names)}

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "parameters": len(self.names)}

    def reset(self) -> None:
        self._run: Tensor | None = None
        self._live: Tensor | None = None

    def observe(self, obs: Observation) -> tuple[dict[str, Tensor], Tensor | None]:
        if self._run is None or self._live is None:
            self._run = torch.zeros(obs.norms.shape, device=obs.norms.device, dtype=obs.norms.dtype)
            self._live = torch.zeros(obs.norms.shape, device=obs.norms.device, dtype=torch.bool)
        self._live = self._live | (obs.norms > 0)
        small = (obs.norms < self.min_norm) & self._live
        if obs.missing:
            small[obs.missing] = False
        self._run = torch.where(small, self._run + 1, 0.0)
        fired = (self._run == self.patience).any() if self.needs_flag else None
        return {"run": self._run}, fired

    def events(self, rec: Record) -> list[Event]:
        hits = np.flatnonzero(rec.values["run"] == self.patience)
        return [Event(rec.step, self.kind, self.names[i], float(rec.norms[i]), self.min_norm) for i in hits]

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        if self._run is not None:
            st.update(run=self._run.clone(), live=self._live.clone())
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reset()
        if "run" in state:
            if state["run"].numel() != len(self.names):
                raise ValueError(
                    f"Vanishing.load_state_dict: the state has {state['run'].numel()} parameters, "
                    f"this detector {len(self.names)}"
                )
            self._run = state["run"].clone()
            self._live = state["live"].clone() if "live" in state else self._run > 0


def ready_first(order: Sequence[int], bad: np.ndarray) -> list[int]:
    """Indices where ``bad`` is True: in gradient-ready ``order`` first, then model order."""
    out, seen = [], set()
    for i in [*order, *range(len(bad))]:
        if bad[i] and i not in seen:
            seen.add(i)
            out.append(i)
    return out


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside gradwatch and torch.

    Warnings fire at a flush, which may run inside ``optimizer.step()``; the
    user wants to see their own line, not the hook machinery.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("gradwatch", "torch"):
        frame, level = frame.f_back, level + 1
    return level


class Warner:
    """Rate-limited warnings: the first ``limit`` events of a (kind, name), then a summary."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, str | None], int] = {}
        self.last: dict[tuple[str, str | None], int] = {}

    def __call__(self, event: Event, prefix: str = "") -> None:
        key = (event.kind, event.name)
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        self.last[key] = event.step
        if n <= self.limit:
            warnings.warn(f"gradwatch: {prefix}{event}", GradientWarning, stacklevel=user_stacklevel())
        if n == self.limit:
            warnings.warn(
                f"gradwatch: {event.kind} events for {event.name or 'the global norm'} reached {n}; "
                "further ones are counted and summarised at close()",
                GradientWarning,
                stacklevel=user_stacklevel(),
            )

    def summary(self) -> None:
        """Warn once for every (kind, name) whose events were suppressed."""
        for key, n in self.counts.items():
            if n > self.limit:
                kind, name = key
                warnings.warn(
                    f"gradwatch: {n - self.limit} more {kind} events for {name or 'the global norm'} "
                    f"were not shown (last at step {self.last[key]}); see History.events",
                    GradientWarning,
                    stacklevel=user_stacklevel(),
                )
        self.counts.clear()
