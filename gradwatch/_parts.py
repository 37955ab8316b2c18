"""The watch's own contributors: the clipper's, the AMP scaler's and each detector's columns.

Each wraps a public object (a :class:`~gradwatch.Clipper`, a ``GradScaler``, a
:class:`~gradwatch.Detector`) in the :class:`~gradwatch.Contributor` protocol,
so :class:`~gradwatch.GradWatch` declares, observes, records and maps all of
them -- and every user statistic -- with the same loops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch._compat import scale_of
from gradwatch.clip import ClipContext, Clipper
from gradwatch.contrib import SCALAR, Binding, Contributor, StepView
from gradwatch.detect import Detector, Event, Observation, Record, ready_first

__all__ = ["ClipColumns", "DetectorColumns", "ScalerColumns"]


class ClipColumns(Contributor):
    """The clipper's step: it scales the gradients, then records the post-clip total, coefficient, bound and norms."""

    prefix = "clip"
    every_step = True  # a clipper clips every step, recorded or not

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper

    def bind(self, binding: Binding) -> None:
        super().bind(binding)
        self.clipper.bind(binding.names, binding.params)

    def columns(self) -> Mapping[str, int]:
        return {"total": SCALAR, "coef": SCALAR, "threshold": SCALAR, "norms": len(self.binding.params)}

    def observe(self, view: StepView) -> Mapping[str, Tensor]:
        ctx = ClipContext(view.params, self.binding.names, view.norms, view.total, view.step)
        r = self.clipper.clip_(ctx)
        return {"total": r.total, "coef": r.coef, "threshold": r.threshold, "norms": r.norms}

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "total_clipped": cols["total"],
            "clip_coef": cols["coef"],
            "clip_threshold": cols["threshold"],
            "norms_clipped": cols["norms"],
        }

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.clipper)


class ScalerColumns(Contributor):
    """The GradScaler's scale at each step, and an ``"amp_overflow"`` event for each non-finite gradient."""

    prefix = "amp"
    uses_order = True

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def columns(self) -> Mapping[str, int]:
        return {"scale": SCALAR}

    def observe(self, view: StepView) -> Mapping[str, Tensor]:
        scale = scale_of(self.scaler)
        if scale is None:  # a disabled scaler
            scale = torch.full((), float("nan"), device=self.binding.device)
        return {"scale": scale}

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"scale": cols["scale"]}

    def events(self, rec: Record) -> Sequence[Event]:
        bad = ~np.isfinite(rec.norms)
        if not bad.any():
            return ()
        names = self.binding.names
        return [Event(rec.step, "amp_overflow", names[i], float(rec.norms[i])) for i in ready_first(rec.order, bad)]

    def __repr__(self) -> str:
        return f"ScalerColumns({type(self.scaler).__name__})"


class DetectorColumns(Contributor):
    """A detector's declared values; :attr:`fired` holds its on-device flag after :meth:`observe`."""

    def __init__(self, detector: Detector, index: int) -> None:
        self.detector = detector
        self.prefix = f"detector{index}"
        self.fired: Tensor | None = None
        self.uses_order = type(detector).events is not Detector.events

    @property
    def action(self) -> Any:  # type: ignore[override]
        return self.detector.action

    def bind(self, binding: Binding) -> None:
        super().bind(binding)
        self.detector.bind(binding.names, amp=binding.amp)

    def columns(self) -> Mapping[str, int]:
        return self.detector.columns()

    def observe(self, view: StepView) -> Mapping[str, Tensor]:
        values, self.fired = self.detector.observe(Observation(view.step, view.norms, view.total, view.missing))
        return values

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}  # a detector's values serve its events; History keeps the events

    def events(self, rec: Record) -> Sequence[Event]:
        return self.detector.events(rec)

    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state)

    def __repr__(self) -> str:
        return repr(self.detector)
