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
from gradwatch._layout import RecordLayout
from gradwatch.clip import ClipContext, Clipper
from gradwatch.contrib import SCALAR, Binding, Contributor, StepView
from gradwatch.detect import Detector, Event, Observation, Record, ready_first
from gradwatch.norms import WeightNorms, accumulation_dtype

__all__ = ["ClipColumns", "DetectorColumns", "RowPlan", "ScalerColumns", "Taps", "assemble"]


class ClipColumns(Contributor):
    """The clipper's step: it scales the gradients, then records the post-clip total, coefficient, bound and norms."""

    prefix = "clip"
    every_step = True  # a clipper clips every step, recorded or not

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper

    def bind(self, binding: Binding) -> None:
        super().bind(binding)
        self.clipper.bind(binding)

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
        self.detector.bind(binding)

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


class Taps:
    """The gradient norms of tapped intermediate tensors (:meth:`GradWatch.tap <gradwatch.GradWatch.tap>`).

    The one part of a row without declared columns: the names are known only
    when ``tap()`` is called, so the values travel beside the row (in the same
    device-to-host copy). Names keep the order of their first ``add``.

    Args:
        device, dtype: where and how the values are kept (the row's).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._values: dict[str, Tensor | None] = {}

    def add(self, tensor: Tensor, name: str) -> None:
        """Store ``‖∂L/∂tensor‖`` under ``name`` when backward reaches ``tensor`` (a tensor hook)."""

        def hook(g: Tensor) -> None:
            norm = torch.linalg.vector_norm(g.detach(), dtype=accumulation_dtype(g.dtype))
            self._values[name] = norm.to(device=self.device, dtype=self.dtype)

        self._values.setdefault(name, None)
        tensor.register_hook(hook)

    def take(self) -> dict[str, Tensor]:
        """The values stored since the last :meth:`clear` (taps backward did not reach are left out)."""
        return {k: v for k, v in self._values.items() if v is not None}

    def clear(self) -> None:
        self._values.clear()


def assemble(
    weights: bool,
    update: bool,
    clipper: Clipper | None,
    scaler: Any,
    detectors: Sequence[Detector],
    stats: Sequence[Contributor],
) -> list[Contributor]:
    """A watch's contributors in the order they observe.

    Weight norms (``weights``; with the applied update if ``update``), the
    clipper (it acts on the gradients, so it comes first of those that read
    them), the scaler's columns, each detector, each statistic.
    """
    parts: list[Contributor] = [WeightNorms(update=update)] if weights else []
    parts += [ClipColumns(clipper)] if clipper is not None else []
    parts += [ScalerColumns(scaler)] if scaler is not None else []
    return [*parts, *(DetectorColumns(d, i) for i, d in enumerate(detectors)), *stats]


class RowPlan:
    """The contributors of one watch, bound once, and the row layout they declared -- what each step runs.

    The meter's ``norms`` and ``total`` come first in the row (written in
    place), then each contributor's columns under its prefix, in the order
    they observe: one op writes all of them (:meth:`write`).

    Args:
        binding: the watched parameters and the row's device and dtype.
        parts: from :func:`assemble`.

    Raises:
        ValueError: a prefix that is not an identifier, or taken by an earlier contributor.
    """

    def __init__(self, binding: Binding, parts: list[Contributor]) -> None:
        self.binding, self.parts = binding, parts
        self.layout = RecordLayout()
        self.layout.declare("norms", len(binding.params))
        self.layout.declare("total", 1, scalar=True)
        taken = {"norms", "total"}
        for c in parts:
            if not isinstance(c.prefix, str) or not c.prefix.isidentifier() or c.prefix in taken:
                raise ValueError(f"stats: {c!r} has prefix {c.prefix!r}; a prefix must be a new identifier")
            taken.add(c.prefix)
            c.bind(binding)
            self.layout.declare_all(c.prefix, c.columns())
        self._keys = [(c, {k: f"{c.prefix}.{k}" for k in c.columns()}) for c in parts]
        self._always = [(c, keys) for c, keys in self._keys if c.every_step]  # observed at unrecorded steps too
        self.late = [c for c in parts if type(c).after_optimizer_step is not Contributor.after_optimizer_step]
        self.detectors = [c for c in parts if isinstance(c, DetectorColumns)]
        self.clip = next((c for c in parts if isinstance(c, ClipColumns)), None)
        self.stats = [c for c in parts if not isinstance(c, _BUILTIN)]
        self.every_step = bool(self._always)
        self.uses_order = any(c.uses_order for c in parts)
        self.layout.values_from = next((k for k in self.layout.names() if k not in ("norms", "total")), None)

    def observe(self, view: StepView, *, recorded: bool) -> dict[str, Tensor]:
        """Each contributor's device values for the step (only the every-step ones when not ``recorded``)."""
        values: dict[str, Tensor] = {}
        for c, keys in self._keys if recorded else self._always:
            for k, v in c.observe(view).items():
                key = keys.get(k)
                if key is None:
                    raise ValueError(f"{c!r}.observe() returned {k!r}, a column its columns() does not declare")
                values[key] = v
        return values

    def write(self, views: dict[str, Tensor], values: dict[str, Tensor]) -> None:
        """Every contributor's values into its declared columns of a row (its views), in one op."""
        self.layout.write(views, values)

    def flags(self, action: str) -> list[Tensor]:
        """The on-device "fired" flags of this step's detectors whose action is ``action``."""
        return [c.fired for c in self.detectors if c.fired is not None and c.action == action]

    def meta(self) -> dict[str, int]:
        """The statistics' columns and widths, as sinks and files record them (``History.meta["stats"]``)."""
        return {k: int(w) for c in self.stats for k, w in c.history_columns().items()}

    def state_dict(self) -> dict[str, Any]:
        """The clipper's, detectors' and statistics' state (what :meth:`GradWatch.state_dict` adds to the step)."""
        return {
            "clipper": None if self.clip is None else self.clip.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
            "stats": [c.state_dict() for c in self.stats],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state without ``"stats"`` predates statistics: they keep theirs).

        Raises:
            ValueError: not such a state, another number of detectors or
                statistics, a clipper state without a clipper here (or the
                reverse), or a part's state that does not fit.
        """
        if not isinstance(state, dict) or not {"clipper", "detectors"} <= set(state):
            raise ValueError("state must be a dict from GradWatch.state_dict() (keys 'step', 'clipper', 'detectors')")
        stats = state.get("stats")  # None: saved before statistics existed
        counts = [("detectors", state["detectors"], self.detectors)]
        if stats is not None:
            counts.append(("stats", stats, self.stats))
        for key, theirs, mine in counts:
            if len(theirs) != len(mine):
                raise ValueError(f"state has {len(theirs)} {key}, this watch {len(mine)}")
        if (state["clipper"] is None) != (self.clip is None):
            raise ValueError("state and watch disagree on having a clipper")
        clip = [(self.clip, state["clipper"])] if self.clip is not None else []
        for part, st in [*clip, *zip(self.detectors, state["detectors"]), *zip(self.stats, stats or [])]:
            part.load_state_dict(st)


#: the watch's own contributors (every other one is a statistic)
_BUILTIN = (WeightNorms, ClipColumns, ScalerColumns, DetectorColumns)
