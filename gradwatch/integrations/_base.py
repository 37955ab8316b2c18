"""What the trainer callbacks share: arguments, building the watch, the logged row, the saved state.

:class:`WatchCallback` holds everything that does not depend on the trainer:
the constructor (``clipper, detectors, sinks, every, log`` and the keyword
options, checked at construction), building the :class:`~gradwatch.GradWatch`
on the trainer's model (state carried over from a checkpoint or an earlier
run), stepping it, the newest row for the trainer's loggers, the state that
goes into checkpoints and closing. Each trainer's ``GradWatchCallback`` is a
thin adapter: it decides *where* in the trainer's loop to call
:meth:`WatchCallback._step_watch`, hands the trainer's ``GradScaler`` to
:meth:`WatchCallback._build_watch`, and moves the state and the metrics through
the trainer's own mechanisms.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradwatch.clip import Clipper
from gradwatch.detect import Detector
from gradwatch.history import History
from gradwatch.integrations import LatestRow, check_callback_args
from gradwatch.watch import GradWatch

__all__ = ["WatchCallback"]


def to_device(state: Any, device: torch.device) -> Any:
    """``state`` with every tensor moved to ``device`` (checkpoints are often loaded onto the CPU).

    Example:
        >>> to_device({"a": [torch.zeros(1)], "n": 3}, torch.device("cpu"))
        {'a': [tensor([0.])], 'n': 3}
    """
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(v, device) for v in state)
    return state


class WatchCallback:
    """The trainer-independent part of a ``GradWatchCallback`` (a mixin: the trainer's ``Callback`` comes after it).

    Args:
        clipper: a :class:`~gradwatch.Clipper` applied at every optimizer step, or None.
        detectors: :class:`~gradwatch.Detector` objects.
        sinks: :class:`~gradwatch.Sink` objects.
        every: record every ``every``-th optimizer step (the clipper runs at all).
        log: log the newest row through the trainer's loggers.
        log_groups: per-group norms to log: a module depth, a function from
            parameter name to group name, ``"params"`` or None (global norms only).
        log_prefix: put in front of every logged name.
        measure: GradWatch's ``measure`` (None: ``"step"`` where the adapter
            says the gradients must be read in one fused pass, else ``"auto"``).
        flush_every: GradWatch's ``flush_every``.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or range (named in the message).

    Example:
        >>> cb = WatchCallback(every=0)
        Traceback (most recent call last):
        ...
        ValueError: every must be an integer in [1, inf], got 0
    """

    #: what the trainer runs, for messages ("no fit has run with this callback yet")
    _run_name = "run"

    def __init__(
        self,
        clipper: Clipper | None = None,
        detectors: Sequence[Detector] = (),
        sinks: Sequence[Any] = (),
        every: int = 1,
        log: bool = True,
        *,
        log_groups: int | str | Callable[[str], str] | None = 1,
        log_prefix: str = "grad_norm/",
        measure: str | None = None,
        flush_every: int = 100,
    ) -> None:
        super().__init__()
        self.detectors, self.sinks = check_callback_args(clipper, detectors, sinks, every, log, log_groups, log_prefix)
        self.clipper = clipper
        self.every = int(every)
        self._log = log  # not `self.log`: Lightning sets callback.log = pl_module.log
        self.log_groups = log_groups
        self.log_prefix = log_prefix
        self.measure = measure
        self.flush_every = flush_every
        self.watch: GradWatch | None = None
        self._latest: LatestRow | None = None
        self._pending_state: dict[str, Any] | None = None
        self._stepped = False  # the watch has stepped since the last optimizer step
        self._logged_step: int | None = None
        self._open = False
        self._device = torch.device("cpu")
        self._scaler: Any | None = None

    # -- building the watch -----------------------------------------------------------
    def _build_watch(self, model: torch.nn.Module, *, scaler: Any | None, fused: bool) -> GradWatch:
        """Build the watch on ``model`` (now on its device) and restore the state it continues from.

        The state is the one handed to :meth:`_restore_state` before the watch
        existed (a checkpoint), else the previous watch's (a second ``fit`` /
        ``train`` with the same callback continues counting).

        Args:
            model: the trainer's model.
            scaler: the trainer's ``GradScaler`` (used only if enabled), or None.
            fused: measure in one fused pass at the step (AMP, several processes)
                unless ``measure=`` says otherwise.
        """
        self._close()
        previous = self.watch
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._latest = LatestRow(self.log_groups, self.log_prefix, clipped=self.clipper is not None)
        self.watch = GradWatch(
            model,
            clipper=self.clipper,
            detectors=self.detectors,
            sinks=[*self.sinks, self._latest] if self._log else list(self.sinks),
            every=self.every,
            flush_every=self.flush_every,
            measure=self.measure or ("step" if fused else "auto"),
            scaler=self._scaler,
        )
        self._open = True
        self._stepped = False
        self._logged_step = None
        self._device = self.watch.device
        state, self._pending_state = self._pending_state, None
        if state is None and previous is not None:
            state = previous.state_dict()
        if state is not None:
            self.watch.load_state_dict(to_device(state, self._device))
        return self.watch

    def _warn_double_clip(self, setting: str, fix: str) -> None:
        """Warn that the trainer clips too (``setting``), and how to clip with gradwatch only (``fix``)."""
        warnings.warn(
            f"{type(self).__name__} has a clipper ({self.clipper!r}) and {setting} clips too: gradwatch clips "
            f"first, then the trainer. {fix}",
            UserWarning,
            stacklevel=3,
        )

    # -- every optimizer step ---------------------------------------------------------
    def _step_watch(self) -> None:
        """Measure, clip, detect and record the current gradients (one row per optimizer step)."""
        assert self.watch is not None
        self.watch.step()
        self._stepped = True

    def _new_metrics(self) -> dict[str, float]:
        """The newest row as ``{metric: value}`` if not logged yet, else ``{}`` (one device-to-host copy)."""
        if not self._log or self.watch is None or self._latest is None:
            return {}
        self.watch.flush()
        latest = self._latest
        if latest.step is None or latest.step == self._logged_step:
            return {}
        self._logged_step = latest.step
        return dict(latest.metrics)

    # -- state ------------------------------------------------------------------------
    def _saved_state(self) -> dict[str, Any] | None:
        """The watch's state (step counter, clipper, detectors) to checkpoint, or None before any run."""
        return self.watch.state_dict() if self.watch is not None else self._pending_state

    def _restore_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`_saved_state`: now into the open watch, else when the watch is built."""
        if self.watch is not None and self._open:
            self.watch.load_state_dict(to_device(state, self._device))
        else:
            self._pending_state = state

    def _warn_no_state(self, where: str) -> None:
        """Warn that a run resumes from ``where`` without this callback's state."""
        warnings.warn(
            f"resuming from {where} without {type(self).__name__}'s state: the step counter, the clipper and the "
            "detectors start afresh",
            UserWarning,
            stacklevel=3,
        )

    # -- the end ------------------------------------------------------------------------
    def _close(self) -> None:
        """Flush the last rows, remove the watch's hooks and close the sinks (once)."""
        if self.watch is not None and self._open:
            self._open = False
            self.watch.close()

    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` of the last run.

        Raises:
            RuntimeError: the callback has not run yet.
        """
        if self.watch is None:
            raise RuntimeError(f"{type(self).__name__}.history: no {self._run_name} has run with this callback yet")
        return self.watch.history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clipper={self.clipper!r}, every={self.every}, log={self._log})"
