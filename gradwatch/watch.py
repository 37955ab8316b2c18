"""GradWatch: measure -> clip -> detect -> record -> react, every optimizer step, without host syncs."""

from __future__ import annotations

import atexit
import math
import numbers
import os
import sys
import traceback
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._compat import scale_of
from gradwatch._layout import RecordLayout
from gradwatch._params import clean_name, named_trainable
from gradwatch._validate import check_bool, check_choice, check_instance, check_int
from gradwatch.clip import ClipContext, Clipper, ClipResult
from gradwatch.detect import Detector, Event, GradientAnomalyError, Observation, Record, Warner, ready_first
from gradwatch.distributed import (
    DistributedMeter,
    check_process_group,
    get_rank,
    is_dtensor,
    needs_reduction,
    unwrap_ddp,
)
from gradwatch.forensics import FlightRecorder, WeightMeter, write_incident_file
from gradwatch.gate import OptimizerGate, warn_unwatched
from gradwatch.history import History
from gradwatch.norms import MODES, NormMeter, stat_dtype

__all__ = ["GradWatch"]

#: columns written in place during the step (the rest are written by value, in one op, in the record phase)
_IN_PLACE = ("norms", "total", "param_norms", "update_norms")

#: the largest ``flush_every``: rows are allocated as they fill, but a flush must stay addressable
MAX_FLUSH_EVERY = 2**31 - 1

_OPEN: weakref.WeakSet[GradWatch] = weakref.WeakSet()


@atexit.register
def _close_open_watches() -> None:  # pragma: no cover - runs at interpreter exit
    """Interpreter exit (also after an uncaught exception): pending rows reach history and sinks."""
    for watch in list(_OPEN):
        try:
            watch.close()
        except Exception:
            traceback.print_exc(file=sys.stderr)


@dataclass
class _RowMeta:
    """What a recorded row carries besides its device values (host-known at the step)."""

    step: int
    missing: list[int]
    order: list[int]
    taps: dict[str, Tensor] = field(default_factory=dict)


class _Row(NamedTuple):
    """One buffer row and its named column views."""

    tensor: Tensor
    cols: dict[str, Tensor]


class _Rows:
    """The device buffer of recorded rows: grows as it fills, up to ``capacity`` rows, and a scratch row."""

    def __init__(self, layout: RecordLayout, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.layout, self.capacity = layout, capacity
        self.count = 0
        self._buf = torch.zeros(min(capacity, 64), layout.width, device=device, dtype=dtype)
        self._views = self._rows_of(self._buf)
        self.scratch = self._rows_of(torch.zeros(1, layout.width, device=device, dtype=dtype))[0]

    def _rows_of(self, buf: Tensor) -> list[_Row]:
        return [_Row(r, self.layout.views(r)) for r in buf.unbind()]

    def next(self) -> _Row:
        """The views of the next free row (grows the buffer geometrically, a device copy)."""
        if self.count == len(self._views):
            grown = self._buf.new_zeros(min(self.capacity, 2 * len(self._views)), self.layout.width)
            grown[: self.count].copy_(self._buf[: self.count])
            self._buf = grown
            self._views = self._rows_of(self._buf)
        row = self._views[self.count]
        self.count += 1
        return row

    def filled(self) -> Tensor:
        """The filled rows, ``[count, width]`` on the device."""
        return self._buf[: self.count]

    @property
    def full(self) -> bool:
        return self.count >= self.capacity


class GradWatch:
    """Watch (and optionally clip) the gradients of a model at every optimizer step.

    Each step runs five phases, in this order:

    1. **measure** -- the L2 norm of every parameter's gradient and the global
       norm, into a row of a device buffer;
    2. **clip** -- the clipper (if any) scales the gradients in place, reusing
       those norms;
    3. **detect** -- each detector updates its state on the device;
    4. **record** -- the clipper's, scaler's and detectors' values go into the
       same row, each into the columns it declared when the watch was built;
    5. **react** -- ``"raise"`` and ``"skip"`` actions (the only ones that need
       an answer during the step).

    Every ``flush_every`` recorded steps (and on :attr:`history` and
    :meth:`close`) the rows are copied to the host in one transfer, stored in
    :attr:`history`, and then handed to the sinks, warnings and callbacks.
    Between flushes nothing is read back to the host.

    Gradient norms are measured where the gradients are cheapest to read
    (``measure=``):

    * ``"auto"`` (default): gradients of at least 65,536 elements in
      ``register_post_accumulate_grad_hook`` hooks (``torch.dot`` while the
      gradient is in cache), the rest in one fused ``torch._foreach_norm`` per
      device and dtype at the step. Under ``DistributedDataParallel``, whose
      all-reduce changes the gradients after the hooks, ``"auto"`` means ``"step"``.
    * ``"hook"``: every gradient in a hook. With gradient accumulation each
      micro-batch's hook measures the accumulated gradient, so the last one --
      the norm at the optimizer step -- is recorded. If you change ``.grad``
      between ``backward()`` and the step yourself, use ``"step"``.
    * ``"step"``: every gradient in the fused pass when the step runs: exactly
      the kernels of ``clip_grad_norm_``. Used automatically with a ``scaler``.

    Distributed training: under DDP the synchronized gradients are measured at
    the step (names without DDP's ``module.``); with DTensor parameters (FSDP2,
    HSDP, tensor parallel) every rank records the norms of the *full*
    gradients, computed from its shards with one all-reduce per device mesh
    (:mod:`gradwatch.distributed`), so rows, clip coefficients and detector
    decisions are the same on every rank. Build the watch on every rank.

    Half-precision norms are accumulated and recorded in float32; float64
    models are recorded in float64. A parameter whose ``.grad`` is None at a step
    is recorded with norm 0 and flagged in ``History.grad_missing`` (never NaN,
    so it cannot be mistaken for a non-finite gradient).

    A step that raises (``action="raise"``, a failing sink) leaves the watch
    consistent: the row is in :attr:`history`, and the next step is measured,
    clipped and numbered normally.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)`` pairs.
            Parameters without ``requires_grad`` are ignored; shared (tied)
            parameters are watched once; names must be unique.
        clipper: a :class:`~gradwatch.Clipper` applied every step (even with
            ``every > 1``), or None.
        detectors: :class:`~gradwatch.Detector` objects run at recorded steps.
        sinks: :class:`~gradwatch.Sink` objects fed at every flush.
        every: record (measure, detect, record) every ``every``-th step.
        flush_every: recorded steps kept in the device buffer between flushes
            (the buffer grows as it fills, up to this many rows).
        measure: ``"auto"``, ``"hook"`` or ``"step"`` (see above).
        scaler: a ``torch.amp.GradScaler``; the gradients are unscaled once
            (``scaler.unscale_``, unless already done this step) before
            measuring, non-finite steps are labelled ``"amp_overflow"`` and the
            scale is recorded. Call :meth:`step` before ``scaler.step(optimizer)``.
        recorder: a :class:`~gradwatch.FlightRecorder`: measure, clip and
            detect at every step, keep history rows every ``every`` steps, and
            the full rows around each incident in ``History.incidents``
            (``flush_every`` then counts steps). See :mod:`gradwatch.forensics`.
        param_norms: record ``‖W‖`` of every parameter before the optimizer
            step in ``History.param_norms`` (one fused norm pass, no sync).
        update_ratio: record ``‖W_{t+1} - W_t‖`` in ``History.update_norms`` and
            so ``History.update_ratio`` (implies ``param_norms``), measured in
            the attached optimizers' post-step hooks: the update they actually
            applied. Costs one scratch copy of the watched parameters (their
            size in their dtype) and needs :meth:`attach`.
        process_group: for a model split across ranks in a way the device
            meshes do not describe (pipeline stages): the global norm, and so
            every global clip coefficient, is combined over this
            ``ProcessGroup`` or 1-D ``DeviceMesh`` (one more all-reduce of one
            number). See the "Distributed training" guide.
        sinks_rank: the rank whose sinks open, write and close (default 0);
            None: every rank's (give each rank its own file, e.g. with
            :func:`gradwatch.distributed.rank_path`).

    Raises:
        TypeError: ``model`` is neither a module nor named parameters, or a
            clipper/detector/sink/scaler/process_group of the wrong type.
        NotImplementedError: ``param_norms``/``update_ratio`` with DTensor parameters.
        ValueError: no trainable parameter, duplicate names,
            ``every``/``flush_every`` out of range, an unknown ``measure``, or a
            recorder that already serves another watch.

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(1.0)) as watch:
        ...     _ = watch.attach(opt)
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         model(torch.ones(2, 3)).sum().backward()
        ...         opt.step()
        >>> h = watch.history
        >>> h.names, h.norms.shape, bool(h.total_clipped.max() <= 1.0 + 1e-6)
        (['weight', 'bias'], (3, 2), True)
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, Tensor]],
        *,
        clipper: Clipper | None = None,
        detectors: Sequence[Detector] = (),
        sinks: Sequence[Any] = (),
        every: int = 1,
        flush_every: int = 100,
        measure: str = "auto",
        scaler: Any | None = None,
        process_group: Any = None,
        sinks_rank: int | None = 0,
        recorder: FlightRecorder | None = None,
        param_norms: bool = False,
        update_ratio: bool = False,
    ) -> None:
        self.names, self.params = named_trainable(unwrap_ddp(model) if isinstance(model, nn.Module) else model, "model")
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True: nothing to watch")
        self.every = check_int(every, "every", min=1)
        self.flush_every = check_int(flush_every, "flush_every", min=1, max=MAX_FLUSH_EVERY)
        check_choice(measure, "measure", MODES)
        if clipper is not None:
            check_instance(clipper, "clipper", Clipper, "a gradwatch Clipper or None")
        self.detectors = _list_of(detectors, "detectors", Detector, "gradwatch Detector objects")
        self.sinks = _list_of(sinks, "sinks", object, "sink objects")
        for s in self.sinks:
            if not all(callable(getattr(s, m, None)) for m in ("open", "write", "close")):
                raise TypeError(f"sinks must have open/write/close methods (gradwatch.Sink), got {type(s).__name__}")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if recorder is not None:
            check_instance(recorder, "recorder", FlightRecorder, "a gradwatch FlightRecorder or None")
        self._recorder = recorder
        self.update_ratio = check_bool(update_ratio, "update_ratio")
        self.param_norms = check_bool(param_norms, "param_norms") or self.update_ratio
        if self.param_norms and any(is_dtensor(p) for p in self.params):
            raise NotImplementedError(
                "param_norms and update_ratio are not supported for DTensor parameters (FSDP2, HSDP, tensor "
                "parallel) yet: their weight norms would be the local shards'"
            )
        self.clipper = clipper
        self.scaler = scaler
        self.process_group = check_process_group(process_group)
        if sinks_rank is not None:
            check_int(sinks_rank, "sinks_rank", min=0)
        self.sinks_rank = sinks_rank
        self._sinks_here = self.sinks if sinks_rank is None or get_rank() == sinks_rank else []
        self._distributed = needs_reduction(self.params, self.process_group)
        self.measure = _effective_mode(model, measure, scaler, self._distributed)
        self._unwatched = _frozen_params(unwrap_ddp(model) if isinstance(model, nn.Module) else model)
        self._owner, self._first_key = _owner_of(model, self.params[0])

        self.device = self.params[0].device
        self.dtype = stat_dtype([p.dtype for p in self.params])
        self._layout = self._declare_layout()
        self._rows = _Rows(self._layout, self.flush_every, self.device, self.dtype)
        self._first_value_column = next((k for k in self._layout.names() if k not in _IN_PLACE), "")
        self._pending: list[_RowMeta] = []
        track_order = any(type(d).events is not Detector.events for d in self.detectors) or scaler is not None
        if self._distributed:  # full norms from local shards, one all-reduce per mesh; no parameter hooks
            self._meter = DistributedMeter(
                self.params, self.names, process_group=self.process_group, track_order=track_order
            )
        else:
            self._meter = NormMeter(self.params, self.measure, self.device, self.dtype, track_order)
        self._gate = OptimizerGate(
            self._gated_step,
            self._flush_if_full,
            self._warn_unknown,
            self.params,
            on_update=self._after_update if update_ratio else None,
        )
        self._history = History(self.names, meta=self._meta())
        self._warner = Warner()
        self._step = 0
        self._taps: dict[str, Tensor | None] = {}
        self._closed = False
        self._warned_unwatched = False
        self._weights = WeightMeter(self.params, update=self.update_ratio) if self.param_norms else None
        self._flushes = 0  # flush generation: a post-step hook writes its row only if it was not flushed yet
        self._update_row: tuple[Tensor, int, int] | None = None  # (column, flush generation, step)
        if recorder is not None:
            recorder.bind()
        self._open_sinks()
        _OPEN.add(self)

    # -- set-up -------------------------------------------------------------------
    def _open_sinks(self) -> None:
        """Open every sink; if one refuses (e.g. an existing file), close those already open and re-raise."""
        opened = []
        try:
            for s in self._sinks_here:
                s.open(self.names, self._history.meta)
                opened.append(s)
        except BaseException:
            for s in opened:
                _collect([], s.close)
            self._meter.remove()
            raise

    def _declare_layout(self) -> RecordLayout:
        """Every contributor's columns, declared once: meter, clipper, scaler, detectors."""
        P = len(self.params)
        layout = RecordLayout()
        layout.declare("norms", P)  # the meter writes these two in place
        layout.declare("total", 1, scalar=True)
        if self.param_norms:  # in place too: at the step, and in the optimizer's post-step hook
            layout.declare("param_norms", P)
        if self.update_ratio:
            layout.declare("update_norms", P)
        if self.clipper is not None:
            self.clipper.bind(self.names, self.params)
            for key in ("clip.total", "clip.coef", "clip.threshold"):
                layout.declare(key, 1, scalar=True)
            layout.declare("clip.norms", P)
        if self.scaler is not None:
            layout.declare("scale", 1, scalar=True)
        for i, d in enumerate(self.detectors):
            d.bind(self.names, amp=self.scaler is not None)
            for key, width in d.columns().items():
                layout.declare(f"detector{i}.{key}", width)
        return layout

    def _meta(self) -> dict[str, Any]:
        return {
            "clipper": repr(self.clipper) if self.clipper is not None else None,
            "detectors": [repr(d) for d in self.detectors],
            "every": self.every,
            "measure": self.measure,
            **({"recorder": repr(self._recorder)} if self._recorder is not None else {}),
        }

    def attach(self, optimizer: torch.optim.Optimizer) -> GradWatch:
        """Run :meth:`step` automatically at every ``optimizer.step()``.

        Uses the optimizer's step hooks (see :mod:`gradwatch.gate`): with a
        closure (``optimizer.step(closure)``, LBFGS, Lightning) the step runs
        after the closure's backward; with several attached optimizers on the
        same gradients the step runs once per iteration. Attaching the same
        optimizer twice does nothing the second time. Wrappers with an
        ``.optimizer`` (accelerate's ``AcceleratedOptimizer``,
        ``LightningOptimizer``) are unwrapped. Returns ``self`` for chaining.

        Raises:
            TypeError: ``optimizer`` is not (and does not wrap) a ``torch.optim.Optimizer``.
            RuntimeError: the watch is closed.
        """
        self._check_open("attach")
        self._gate.attach(optimizer)
        return self

    # -- the step -----------------------------------------------------------------
    def step(self) -> None:
        """Measure, clip, detect and record the current gradients.

        Called automatically when attached; call it yourself after
        ``backward()`` and before ``optimizer.step()`` otherwise (with a
        ``scaler``, before ``scaler.step(optimizer)``). Calling it once per
        optimizer step is what gives one record per step under gradient
        accumulation; an attached optimizer stepping right after it does not
        record the step again.

        Raises:
            RuntimeError: the watch is closed, or a ``scaler`` is set but the
                gradients cannot be unscaled (nothing attached, not unscaled).
            GradientAnomalyError: a detector with ``action="raise"`` fired.
        """
        self._check_open("step")
        if self.update_ratio and not self._gate.optimizers():
            raise RuntimeError(
                "GradWatch(update_ratio=True) measures the update in the optimizer's post-step hook: "
                "call watch.attach(optimizer) before stepping"
            )
        try:
            skip = self._run_step()
        except BaseException:
            self._gate.close_round()
            raise
        self._gate.open_round(skip)
        if not self._gate.optimizers():
            if skip is not None:
                self._gate.skip(None, skip, self.params)
            self._flush_if_full()

    def _gated_step(self) -> Tensor | None:
        """The step as the optimizer gate runs it (it flushes after the optimizer's step)."""
        self._check_open("step")
        return self._run_step()

    @torch.no_grad()  # create_graph=True gradients: measure and clip outside the graph, as clip_grad_norm_ does
    def _run_step(self) -> Tensor | None:
        """The five phases; returns the skip flag (or None)."""
        step = self._step
        self._step += 1
        self._meter.hot = self._hot(self._step)
        observe = step % self.every == 0 or self._recorder is not None
        count, recorded = self._rows.count, False
        try:
            if not observe and self.clipper is None:
                return None
            grads, missing = self._grads()
            if observe and self._rows.full:  # the flush after the last optimizer step did not run (it raised)
                self.flush()
            row = self._rows.next() if observe else self._rows.scratch
            self._measure(row, grads, missing)
            clipped = self._clip(row, step)
            if not observe:
                return None
            found = self._detect(row, step, missing)
            self._record(row, step, missing, clipped, found)
            recorded = True
            return self._react(step, found)
        except BaseException:
            if not recorded:  # failed before its row was recorded: the step did not happen
                self._rows.count = count
                self._step = step
            raise
        finally:
            self._taps.clear()
            self._meter.reset()

    def _grads(self) -> tuple[list[Tensor | None], list[int]]:
        grads = [p.grad for p in self.params]
        return grads, [i for i, g in enumerate(grads) if g is None]

    def _hot(self, step: int) -> bool:
        """Whether the step numbered ``step`` measures (records, clips, or feeds the flight recorder)."""
        return step % self.every == 0 or self.clipper is not None or self._recorder is not None

    def _after_update(self, optimizer: torch.optim.Optimizer) -> None:
        """After an attached optimizer's step: ``‖W_{t+1} - W_t‖`` of its parameters into the step's row."""
        pending = self._update_row  # the row of this round's step, unless flushed since or the step was not recorded
        if pending is not None and pending[1:] == (self._flushes, self._step - 1) and self._weights is not None:
            self._weights.update(optimizer, pending[0])

    def _measure(self, row: _Row, grads: list[Tensor | None], missing: list[int]) -> None:
        """Phase 1: this step's norms and their total, into the row."""
        self._check_same_parameters()
        unscaled = self.scaler is not None and self.scaler.is_enabled()
        if unscaled:
            self._gate.unscale(self.scaler)
            grads, missing = self._grads()
        self._meter.measure(grads, missing, row.cols["norms"], hooks_valid=not unscaled)
        if self._distributed:  # the meter knows the override group (pipeline stages)
            self._meter.total(row.cols["norms"], out=row.cols["total"])
        else:
            torch.linalg.vector_norm(row.cols["norms"], out=row.cols["total"])
        if self._weights is not None:
            self._weights.norms(row.cols["param_norms"])

    def _check_same_parameters(self) -> None:
        """A model moved after the watch was built has other (or relocated) parameters: say so, at the step."""
        first = self.params[0]
        owner = self._owner() if self._owner is not None else None
        current = owner._parameters.get(self._first_key, first) if owner is not None else first
        if current is not first or first.device != self.device:
            raise RuntimeError(
                f"the model's parameters changed after the GradWatch was built (now on {current.device}, "
                f"watched on {self.device}): build the GradWatch after moving or converting the model"
            )

    def _clip(self, row: _Row, step: int) -> ClipResult | None:
        """Phase 2: the clipper, reusing the measured norms."""
        if self.clipper is None:
            return None
        return self.clipper.clip_(ClipContext(self.params, self.names, row.cols["norms"], row.cols["total"], step))

    def _detect(self, row: _Row, step: int, missing: list[int]) -> list[tuple[Detector, dict, Tensor]]:
        """Phase 3: each detector's values and its "fired" flag (on the device)."""
        obs = Observation(step, row.cols["norms"], row.cols["total"], missing)
        return [(d, *d.observe(obs)) for d in self.detectors]

    def _record(self, row: _Row, step: int, missing: list[int], clipped: ClipResult | None, found: list) -> None:
        """Phase 4: the clipper's, scaler's and detectors' values into their declared columns (one op)."""
        values: dict[str, Tensor] = {}
        if clipped is not None:
            values.update(
                {
                    "clip.total": clipped.total,
                    "clip.coef": clipped.coef,
                    "clip.threshold": clipped.threshold,
                    "clip.norms": clipped.norms,
                }
            )
        if self.scaler is not None:
            scale = scale_of(self.scaler)
            values["scale"] = scale if scale is not None else torch.full((), float("nan"), device=self.device)
        for i, (_, vals, _) in enumerate(found):
            values.update({f"detector{i}.{k}": v for k, v in vals.items()})
        if values:
            self._layout.write(row.tensor, values, first=self._first_value_column)
        if self._weights is not None and self.update_ratio:  # W_t, for the optimizer's post-step hook
            self._weights.snapshot(row.cols["update_norms"])
            self._update_row = (row.cols["update_norms"], self._flushes, step)
        taps = {k: v for k, v in self._taps.items() if v is not None}
        self._pending.append(_RowMeta(step, missing, list(self._meter.order), taps))

    def _react(self, step: int, found: list[tuple[Detector, dict, Tensor | None]]) -> Tensor | None:
        """Phase 5: raise now (one host sync), or return the skip flag for the optimizer gate."""
        raising = [f for d, _, f in found if f is not None and d.action == "raise"]
        if raising and bool(torch.stack(raising).any()):  # one host sync, by request
            self.flush()
            kinds = {d.kind for d, _, _ in found if d.action == "raise"}
            hit = next(e for e in self._history.events if e.step == step and e.kind in kinds)
            raise GradientAnomalyError(hit)
        skipping = [f for d, _, f in found if f is not None and d.action == "skip"]
        if not skipping:
            return None
        return skipping[0] if len(skipping) == 1 else torch.stack(skipping).any()

    # -- taps ---------------------------------------------------------------------
    def tap(self, tensor: Tensor, name: str) -> Tensor:
        """Record the gradient L2 norm of an intermediate tensor at this step.

        Registers a backward hook on ``tensor`` (an activation, e.g. the hidden
        state ``h_t`` of an RNN) that stores ``‖∂L/∂tensor‖``; the values land in
        ``History.taps`` / ``history[name]`` at the next recorded step. A no-op
        on steps that are not recorded or for tensors without ``requires_grad``.
        Taps are the one contributor without a declared column: their names
        are known only when ``tap()`` is called, so their values travel beside
        the row (in the same device-to-host copy).

        Args:
            tensor: the intermediate tensor.
            name: the column name (must not collide with a parameter name).

        Returns:
            ``tensor`` itself, so it can wrap an expression.

        Raises:
            ValueError: ``name`` is a parameter name.

        Example:
            >>> lin = torch.nn.Linear(2, 2); watch = GradWatch(lin)
            >>> h = watch.tap(lin(torch.ones(1, 2)), "h")
            >>> h.sum().backward(); watch.step()
            >>> watch.history["h"]
            array([1.4142135], dtype=float32)
        """
        if name in self.names:
            raise ValueError(f"tap name {name!r} is a parameter name; choose another")
        if self._meter.hot and tensor.requires_grad:
            acc = torch.float32 if tensor.dtype.itemsize < 4 else None

            def hook(g: Tensor) -> None:
                norm = torch.linalg.vector_norm(g.detach(), dtype=acc)
                self._taps[name] = norm.to(device=self.device, dtype=self.dtype)

            self._taps.setdefault(name, None)  # columns in the order of tap() calls
            tensor.register_hook(hook)
        return tensor

    # -- forensics ----------------------------------------------------------------
    def mark(self, reason: str | None = None, *, step: int | None = None, value: float = math.nan) -> None:
        """Save the steps around ``step`` as an incident, as if a detector had fired there.

        For what the watch cannot see: a loss spike, a divergence of your own
        metric. Host only (no sync); the incident is cut when the step's row is
        flushed and appears in ``History.incidents`` once ``after`` more steps
        have been flushed (or at :meth:`close`).

        Args:
            reason: a label kept as ``Incident.reason`` (the incident's kind is ``"mark"``).
            step: the step to mark, >= 0 and at most the coming step (default:
                the last step the watch ran, or step 0 before any).
            value: a number kept as ``Incident.value`` (e.g. the loss); NaN by default.

        Raises:
            RuntimeError: the watch is closed, or has no ``recorder``.
            TypeError: ``reason`` not a string, ``step`` not an integer or ``value`` not a number.
            ValueError: ``step`` out of range.

        Example:
            >>> lin = torch.nn.Linear(2, 1)
            >>> watch = GradWatch(lin, recorder=FlightRecorder(before=1, after=0))
            >>> for _ in range(3):
            ...     lin(torch.ones(1, 2)).sum().backward(); watch.step()
            >>> watch.mark("loss spike", value=7.5)
            >>> print(watch.history.incidents[0])
            step 2: mark (loss spike): value 7.5; steps 1..2 (2 rows); onset: none
        """
        self._check_open("mark")
        if self._recorder is None:
            raise RuntimeError(
                "GradWatch.mark() needs a flight recorder: GradWatch(..., recorder=gradwatch.FlightRecorder())"
            )
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a string or None, got {type(reason).__name__}")
        step = max(self._step - 1, 0) if step is None else check_int(step, "step", min=0, max=self._step)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"value must be a number, got {value!r} ({type(value).__name__})")
        self._recorder.mark(step, reason, float(value))

    # -- flushing -----------------------------------------------------------------
    def _flush_if_full(self) -> None:
        if self._rows.full:
            self.flush()

    def flush(self) -> None:
        """Copy the buffered rows to the host (one transfer) and hand them out.

        The rows and their events are stored in :attr:`history` first; then
        every sink gets them, and warnings and callbacks fire. If any of those
        raises, the others still run and the first error is raised at the end:
        nothing recorded is lost. With a ``recorder`` every buffered step is
        copied, the rows of ``step % every == 0`` are kept, and every row passes
        through the recorder (incidents completed here are stored and handed
        out with the rows).
        """
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """:meth:`flush`; ``final`` (at close) completes the flight recorder's open incident."""
        if self._rows.count:
            metas, self._pending = self._pending, []
            cols, taps = self._to_host(metas)
            self._flushes += 1
            chunk, reactions = self._chunk(cols, metas, taps)
        elif final and self._recorder is not None:
            chunk, reactions = History(self.names, self._history.meta), []
        else:
            return
        if self._recorder is not None:
            chunk = self._recorded(chunk, final)
        self._history.extend(chunk)
        errors: list[BaseException] = []
        if chunk.incidents:
            _collect(errors, self._write_incident_files)
        for sink in self._sinks_here:
            _collect(errors, sink.write, chunk)
        for detector, event in reactions:
            _collect(errors, self._act, detector, event)
        self._check_unwatched(errors)
        if errors:
            raise errors[0]

    def _to_host(self, metas: list[_RowMeta]) -> tuple[dict[str, np.ndarray], list[tuple[str, int, float]]]:
        """The one device-to-host copy: the filled rows and the tapped values, split by column."""
        n = self._rows.count
        dev = self._rows.filled().reshape(-1)
        tapped = [(r, k, v.reshape(1)) for r, m in enumerate(metas) for k, v in m.taps.items()]
        if tapped:
            dev = torch.cat([dev, *(v for _, _, v in tapped)])
        host = dev.to("cpu", copy=True).numpy()
        self._rows.count = 0
        width = self._layout.width
        cols = self._layout.split(host[: n * width].reshape(n, width))
        return cols, [(k, r, float(x)) for (r, k, _), x in zip(tapped, host[n * width :])]

    def _chunk(
        self, cols: dict[str, np.ndarray], metas: list[_RowMeta], tapped: list[tuple[str, int, float]]
    ) -> tuple[History, list[tuple[Detector, Event]]]:
        """The flushed rows as a History, with their events (and who reacts to each)."""
        n, P = len(metas), len(self.names)
        norms, total = cols["norms"], cols["total"]
        missing = np.zeros((n, P), bool)
        for r, m in enumerate(metas):
            missing[r, m.missing] = True
        taps: dict[str, np.ndarray] = {}
        for name, r, value in tapped:
            taps.setdefault(name, np.full(n, np.nan))[r] = value
        events: list[Event] = []
        reactions: list[tuple[Detector, Event]] = []
        for r, m in enumerate(metas):
            if self.scaler is not None and not np.isfinite(norms[r]).all():
                bad = ~np.isfinite(norms[r])
                events += [
                    Event(m.step, "amp_overflow", self.names[i], float(norms[r, i])) for i in ready_first(m.order, bad)
                ]
            for i, d in enumerate(self.detectors):
                values = {k.split(".", 1)[1]: cols[k][r] for k in self._layout.names(f"detector{i}.")}
                for e in d.events(Record(m.step, norms[r], float(total[r]), values, missing[r], m.order)):
                    events.append(e)
                    reactions.append((d, e))
        clip = {}
        if self.clipper is not None:
            clip = {
                "total_clipped": cols["clip.total"],
                "clip_coef": cols["clip.coef"],
                "clip_threshold": cols["clip.threshold"],
                "norms_clipped": cols["clip.norms"],
            }
        chunk = History(self.names, self._history.meta)
        chunk.append(
            [m.step for m in metas],
            norms,
            total=total,
            grad_missing=missing if missing.any() else None,
            scale=cols.get("scale"),
            param_norms=cols.get("param_norms"),
            update_norms=cols.get("update_norms"),
            taps=taps,
            events=events,
            **clip,
        )
        return chunk, reactions

    def _recorded(self, every_step: History, final: bool) -> History:
        """The flight recorder's share of a flush: cut incidents, then keep the rows of ``step % every == 0``."""
        assert self._recorder is not None
        incidents = self._recorder.process(every_step, final=final)
        kept = every_step if self.every == 1 else every_step.take(every_step.steps % self.every == 0)
        kept.events = list(every_step.events)
        kept.incidents = incidents
        if self._recorder.dropped:
            self._history.meta["incidents_dropped"] = self._recorder.dropped
        return kept

    def _write_incident_files(self) -> None:
        """Beside each file sink's ``path``: ``<path>.incidents.npz``, every incident so far (rewritten atomically)."""
        for sink in self._sinks_here:
            path = getattr(sink, "path", None)
            if isinstance(path, (str, os.PathLike)):
                write_incident_file(f"{os.fspath(path)}.incidents.npz", self._history, getattr(sink, "mode", "w"))

    def _act(self, d: Detector, e: Event) -> None:
        if d.action == "warn":
            self._warner(e)
        elif d.action == "skip":
            self._warner(e, prefix="optimizer step skipped: ")
        elif callable(d.action):
            d.action(e)

    def _check_unwatched(self, errors: list[BaseException]) -> None:
        """Warn once about frozen-at-build parameters that now receive gradients."""
        if self._warned_unwatched:
            return
        late = [name for name, p in self._unwatched if p.grad is not None]
        if late:
            self._warned_unwatched = True
            _collect(errors, warn_unwatched, late)

    def _warn_unknown(self, params: list[Tensor]) -> None:
        if not self._warned_unwatched:
            self._warned_unwatched = True
            names = {id(p): n for n, p in self._unwatched}
            warn_unwatched([names.get(id(p), f"<{tuple(p.shape)} tensor>") for p in params])

    # -- reading and closing --------------------------------------------------------
    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` (flushes first, so it is complete)."""
        self.flush()
        return self._history

    def state_dict(self) -> dict[str, Any]:
        """Step counter and the clipper's and detectors' state, for checkpoints."""
        return {
            "step": self._step,
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the history itself is not part of it).

        Raises:
            ValueError: the state is not a GradWatch state, or has another
                number of detectors, a clipper state without a clipper here,
                or a clipper/detector state that does not fit.
        """
        if not isinstance(state, dict) or not {"step", "clipper", "detectors"} <= set(state):
            raise ValueError("state must be a dict from GradWatch.state_dict() (keys 'step', 'clipper', 'detectors')")
        if len(state["detectors"]) != len(self.detectors):
            raise ValueError(f"state has {len(state['detectors'])} detectors, this watch {len(self.detectors)}")
        if (state["clipper"] is None) != (self.clipper is None):
            raise ValueError("state and watch disagree on having a clipper")
        if self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])
        for d, st in zip(self.detectors, state["detectors"]):
            d.load_state_dict(st)
        self._step = check_int(state["step"], "state['step']", min=0)
        self._meter.hot = self._hot(self._step)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"GradWatch.{what}() after close(): create a new GradWatch to watch again")

    def close(self) -> None:
        """Flush, remove every hook and close the sinks. Safe to call twice.

        The hooks are removed and the sinks closed even if the flush raises;
        the flush's error is raised after.
        """
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        errors: list[BaseException] = []
        _collect(errors, self._flush, True)
        self._meter.remove()
        self._gate.detach_all()
        _collect(errors, self._warner.summary)
        for s in self._sinks_here:
            _collect(errors, s.close)
        if errors:
            raise errors[0]

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradWatch({len(self.params)} parameters, clipper={self.clipper!r}, "
            f"detectors={self.detectors!r}, every={self.every}, measure={self.measure!r})"
        )


def _collect(errors: list[BaseException], fn: Any, *args: Any) -> None:
    """Run ``fn``; keep its exception for later instead of letting it stop the others."""
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)


def _list_of(items: Any, argname: str, cls: type, what: str) -> list:
    if items is None or isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{argname} must be a list of {what} (use () for none), got {items!r}")
    items = list(items)
    for x in items:
        if not isinstance(x, cls):
            raise TypeError(f"{argname} must be {what}, got {type(x).__name__}")
    return items


def _effective_mode(model: Any, measure: str, scaler: Any, distributed: bool = False) -> str:
    """The measurement mode actually used: ``"step"`` with AMP, and for ``"auto"`` under DDP."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if scaler is not None or distributed:  # sharded gradients: no parameter hooks (they would gather)
        return "step"
    if measure == "auto" and ddp:
        return "step"
    if measure == "hook" and ddp:
        import warnings

        warnings.warn(
            "GradWatch(measure='hook') on a DistributedDataParallel model: hooks see each rank's local "
            "gradients before DDP's all-reduce; use measure='step' (the default 'auto' does) for the "
            "synchronized gradients",
            UserWarning,
            stacklevel=3,
        )
    return measure


def _owner_of(model: Any, param: Tensor) -> tuple[weakref.ref | None, str]:
    """The submodule holding ``param`` (a weak reference) and its key there, to see it replaced later."""
    if not isinstance(model, nn.Module):
        return None, ""
    for name, p in model.named_parameters():
        if p is param:
            prefix, _, key = name.rpartition(".")
            return weakref.ref(model.get_submodule(prefix)), key
    return None, ""


def _frozen_params(model: Any) -> list[tuple[str, Tensor]]:
    """The module's parameters that do not require a gradient now (watched for a late unfreeze)."""
    if not isinstance(model, nn.Module):
        return []
    return [(clean_name(n), p) for n, p in model.named_parameters() if not p.requires_grad]
