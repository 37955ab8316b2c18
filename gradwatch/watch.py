"""GradWatch: measure -> clip -> detect -> record -> react, every optimizer step, without host syncs."""

from __future__ import annotations

import atexit
import math
import numbers
import sys
import traceback
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._layout import RecordLayout, Row, RowMeta, Rows, strip
from gradwatch._params import ParamGuard, named_trainable
from gradwatch._parts import ClipColumns, DetectorColumns, ScalerColumns
from gradwatch._validate import check_bool, check_choice, check_instance, check_int, check_list_of
from gradwatch.clip import Clipper
from gradwatch.contrib import Binding, Contributor, StepView
from gradwatch.detect import Detector, Event, GradientAnomalyError, Record, Warner
from gradwatch.distributed import (
    DistributedMeter,
    check_process_group,
    get_rank,
    is_dtensor,
    needs_reduction,
    unwrap_ddp,
)
from gradwatch.forensics import FlightRecorder
from gradwatch.gate import OptimizerGate
from gradwatch.history import History
from gradwatch.norms import MODES, NormMeter, WeightNorms, accumulation_dtype, stat_dtype
from gradwatch.sinks import check_sinks

__all__ = ["GradWatch"]

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


class GradWatch:
    """Watch (and optionally clip) the gradients of a model at every optimizer step.

    Each step runs five phases, in this order:

    1. **measure** -- the L2 norm of every parameter's gradient and the global
       norm, into a row of a device buffer;
    2. **clip** -- the clipper (if any) scales the gradients in place, reusing
       those norms;
    3. **detect** -- each detector, then each statistic (``stats``), computes
       its values on the device;
    4. **record** -- those values go into the same row (one op), each into the
       columns its contributor declared when the watch was built (see
       :class:`~gradwatch.Contributor`);
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
        stats: :class:`~gradwatch.Contributor` objects (statistics) whose
            columns are stored in ``History.stats`` as ``"<prefix>.<column>"``
            (e.g. :class:`~gradwatch.NoiseScale`); they observe after the detectors.
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
            clipper/detector/statistic/sink/scaler/process_group of the wrong type.
        NotImplementedError: ``param_norms``/``update_ratio`` with DTensor parameters.
        ValueError: no trainable parameter, duplicate names,
            ``every``/``flush_every`` out of range, an unknown ``measure``, a
            recorder that already serves another watch, or two statistics with
            one prefix.

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
        stats: Sequence[Contributor] = (),
    ) -> None:
        module = unwrap_ddp(model) if isinstance(model, nn.Module) else model
        self.names, self.params = named_trainable(module, "model")
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True: nothing to watch")
        self._check_args(clipper, detectors, sinks, every, flush_every, measure, scaler, recorder, stats)
        self.update_ratio = check_bool(update_ratio, "update_ratio")
        self.param_norms = check_bool(param_norms, "param_norms") or self.update_ratio
        if self.param_norms and any(is_dtensor(p) for p in self.params):
            raise NotImplementedError(
                "param_norms and update_ratio are not supported for DTensor parameters (FSDP2, HSDP, tensor "
                "parallel) yet: their weight norms would be the local shards'"
            )
        self.process_group = check_process_group(process_group)
        self.sinks_rank = None if sinks_rank is None else check_int(sinks_rank, "sinks_rank", min=0)
        self._sinks_here = self.sinks if sinks_rank is None or get_rank() == sinks_rank else []
        distributed = needs_reduction(self.params, self.process_group)
        self.measure = _effective_mode(model, measure, scaler, distributed)
        self.device, self.dtype = self.params[0].device, stat_dtype([p.dtype for p in self.params])
        self._guard = ParamGuard(module, self.params)
        self._bind_parts()
        self._rows = Rows(self._layout, self.flush_every, self.device, self.dtype)
        self._meter = self._make_meter(distributed)
        on_update = self._after_update if self._late_parts else None
        self._gate = OptimizerGate(self._gated_step, self._flush_if_full, self._guard.unknown, self.params, on_update)
        self._history = History(self.names, meta=self._meta())
        self._warner = Warner()
        self._step, self._flushes, self._closed = 0, 0, False
        self._taps: dict[str, Tensor | None] = {}
        self._live: tuple[int, int] | None = None  # (flush generation, step) of the last recorded row
        self._open_sinks()
        _OPEN.add(self)

    # -- set-up -------------------------------------------------------------------
    def _check_args(self, clipper, detectors, sinks, every, flush_every, measure, scaler, recorder, stats) -> None:
        """Validate the constructor's arguments; keep them."""
        self.every = check_int(every, "every", min=1)
        self.flush_every = check_int(flush_every, "flush_every", min=1, max=MAX_FLUSH_EVERY)
        check_choice(measure, "measure", MODES)
        if clipper is not None:
            check_instance(clipper, "clipper", Clipper, "a gradwatch Clipper or None")
        if recorder is not None:
            check_instance(recorder, "recorder", FlightRecorder, "a gradwatch FlightRecorder or None")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.clipper, self.scaler, self._recorder = clipper, scaler, recorder
        self.detectors = check_list_of(detectors, "detectors", Detector, "gradwatch Detector objects")
        self.stats = check_list_of(stats, "stats", Contributor, "gradwatch Contributor objects")
        self.sinks = check_sinks(sinks)

    def _bind_parts(self) -> None:
        """Every contributor to the row, in the order they observe: bound once, their columns declared once."""
        parts: list[Contributor] = []
        if self.param_norms:
            parts.append(WeightNorms(update=self.update_ratio))
        if self.clipper is not None:
            parts.append(ClipColumns(self.clipper))
        if self.scaler is not None:
            parts.append(ScalerColumns(self.scaler))
        self._detectors = [DetectorColumns(d, i) for i, d in enumerate(self.detectors)]
        parts += [*self._detectors, *self.stats]
        binding = Binding(list(self.names), list(self.params), self.device, self.dtype, amp=self.scaler is not None)
        self._layout = RecordLayout()
        self._layout.declare("norms", len(self.params))  # the meter writes these two in place
        self._layout.declare("total", 1, scalar=True)
        taken = {"norms", "total"}
        for c in parts:
            if not isinstance(c.prefix, str) or not c.prefix.isidentifier() or c.prefix in taken:
                raise ValueError(f"stats: {c!r} has prefix {c.prefix!r}; a prefix must be a new identifier")
            taken.add(c.prefix)
            c.bind(binding)
            self._layout.declare_all(c.prefix, c.columns())
        if self._recorder is not None:
            self._recorder.bind(binding)
        self._parts = parts
        self._plan = [(c, {k: f"{c.prefix}.{k}" for k in c.columns()}) for c in parts]
        self._always = [(c, keys) for c, keys in self._plan if c.every_step]  # observed at unrecorded steps too
        self._late_parts = [c for c in parts if type(c).after_optimizer_step is not Contributor.after_optimizer_step]
        self._first_value = next((k for k in self._layout.names() if k not in ("norms", "total")), "")

    def _make_meter(self, distributed: bool) -> NormMeter | DistributedMeter:
        """The norm meter: fused and hooked passes on one process, full norms from shards when distributed."""
        track_order = any(c.uses_order for c in self._parts)
        if distributed:  # full norms from local shards, one all-reduce per mesh; no parameter hooks
            return DistributedMeter(self.params, self.names, process_group=self.process_group, track_order=track_order)
        return NormMeter(self.params, self.measure, self.device, self.dtype, track_order)

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
            self._release()
            raise

    def _meta(self) -> dict[str, Any]:
        stats = {f"{c.prefix}.{k}": int(w) for c in self.stats for k, w in c.columns().items()}
        return {
            "clipper": repr(self.clipper) if self.clipper is not None else None,
            "detectors": [repr(d) for d in self.detectors],
            "every": self.every,
            "measure": self.measure,
            **({"recorder": repr(self._recorder)} if self._recorder is not None else {}),
            **({"stats": stats} if stats else {}),
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
        """The phases: measure -> contributors (clip, detect, statistics) -> record -> react; the skip flag."""
        step = self._step
        self._step += 1
        self._set_hot(self._step)
        observe = step % self.every == 0 or self._recorder is not None
        if not observe and not self._always:
            return None
        if observe and self._rows.full:  # the flush after the last optimizer step did not run (it raised)
            self.flush()
        count, recorded = self._rows.count, False
        try:
            row = self._rows.next() if observe else self._rows.scratch
            view = self._measure(row, step)
            values = self._observe(view, self._plan if observe else self._always)
            if not observe:
                return None
            self._record(row, view, values)
            recorded = True
            return self._react(step)
        except BaseException:
            if not recorded:  # failed before its row was recorded: the step did not happen
                self._rows.count = count
                self._step = step
            raise
        finally:
            self._taps.clear()
            self._meter.reset()

    def _set_hot(self, step: int) -> None:
        """Whether the backward of step ``step`` is measured: hooks skip their work otherwise."""
        hot = step % self.every == 0 or bool(self._always) or self._recorder is not None
        self._meter.hot = hot
        for c in self.stats:
            c.hot = hot

    def _after_update(self, optimizer: torch.optim.Optimizer) -> None:
        """After an attached optimizer's step: the contributors that measure it, if their row is still buffered."""
        if self._live == (self._flushes, self._step - 1):
            for c in self._late_parts:
                c.after_optimizer_step(optimizer)

    def _measure(self, row: Row, step: int) -> StepView:
        """Phase 1: this step's norms and their total, into the row."""
        self._guard.check_same()
        unscaled = self.scaler is not None and self.scaler.is_enabled()
        if unscaled:
            self._gate.unscale(self.scaler)
        grads = [p.grad for p in self.params]
        missing = [i for i, g in enumerate(grads) if g is None]
        norms, total = row.cols["norms"], row.cols["total"]
        self._meter.measure(grads, missing, norms, hooks_valid=not unscaled)
        self._meter.total(norms, out=total)
        return StepView(step, norms, total, missing, grads, self.params, row.cols)

    def _observe(self, view: StepView, plan: list[tuple[Contributor, dict[str, str]]]) -> dict[str, Tensor]:
        """Phases 2-3: each contributor in order (the clipper first: it scales the gradients), on the device."""
        values: dict[str, Tensor] = {}
        for c, keys in plan:
            for k, v in c.observe(view).items():
                key = keys.get(k)
                if key is None:
                    raise ValueError(f"{c!r}.observe() returned {k!r}, a column its columns() does not declare")
                values[key] = v
        return values

    def _record(self, row: Row, view: StepView, values: dict[str, Tensor]) -> None:
        """Phase 4: every contributor's values into its declared columns (one op); the row's host-known meta."""
        if self._first_value:
            self._layout.write(row.tensor, values, first=self._first_value)
        self._live = (self._flushes, view.step)
        taps = {k: v for k, v in self._taps.items() if v is not None}
        self._rows.meta.append(RowMeta(view.step, view.missing, list(self._meter.order), taps))

    def _react(self, step: int) -> Tensor | None:
        """Phase 5: raise now (one host sync), or return the skip flag for the optimizer gate."""
        raising = [c.fired for c in self._detectors if c.fired is not None and c.action == "raise"]
        if raising and bool(torch.stack(raising).any()):  # one host sync, by request
            self.flush()
            kinds = {c.detector.kind for c in self._detectors if c.action == "raise"}
            hit = next(e for e in self._history.events if e.step == step and e.kind in kinds)
            raise GradientAnomalyError(hit)
        skipping = [c.fired for c in self._detectors if c.fired is not None and c.action == "skip"]
        if not skipping:
            return None
        return skipping[0] if len(skipping) == 1 else torch.stack(skipping).any()

    # -- taps and marks -------------------------------------------------------------
    def tap(self, tensor: Tensor, name: str) -> Tensor:
        """Record the gradient L2 norm of an intermediate tensor at this step.

        Registers a backward hook on ``tensor`` (an activation, e.g. the hidden
        state ``h_t`` of an RNN) that stores ``‖∂L/∂tensor‖``; the values land in
        ``History.taps`` / ``history[name]`` at the next recorded step. A no-op
        on steps that are not recorded or for tensors without ``requires_grad``.
        Taps are the one part of a row without a declared column: their names
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

            def hook(g: Tensor) -> None:
                norm = torch.linalg.vector_norm(g.detach(), dtype=accumulation_dtype(g.dtype))
                self._taps[name] = norm.to(device=self.device, dtype=self.dtype)

            self._taps.setdefault(name, None)  # columns in the order of tap() calls
            tensor.register_hook(hook)
        return tensor

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
            chunk, reactions = self._chunk(*self._to_host())
            self._flushes += 1
        elif final and self._recorder is not None:
            chunk, reactions = History(self.names, self._history.meta), []
        else:
            return
        if self._recorder is not None:
            chunk = self._recorded(chunk, final)
        self._history.extend(chunk)
        errors: list[BaseException] = []
        for sink in self._sinks_here:
            _collect(errors, sink.write, chunk)
        for action, event in reactions:
            _collect(errors, self._act, action, event)
        _collect(errors, self._guard.check_unwatched)
        if errors:
            raise errors[0]

    def _to_host(self) -> tuple[dict[str, np.ndarray], list[RowMeta], dict[str, np.ndarray]]:
        """The one device-to-host copy: the filled rows split by column, their metas, the tapped values."""
        rows, metas = self._rows.drain()
        n, width = rows.shape
        tapped = [(r, k, v.reshape(1)) for r, m in enumerate(metas) for k, v in m.taps.items()]
        dev = torch.cat([rows.reshape(-1), *(v for _, _, v in tapped)]) if tapped else rows.reshape(-1)
        host = dev.to("cpu", copy=True).numpy()
        taps: dict[str, np.ndarray] = {}
        for (r, k, _), x in zip(tapped, host[n * width :]):
            taps.setdefault(k, np.full(n, np.nan))[r] = x
        return self._layout.split(host[: n * width].reshape(n, width)), metas, taps

    def _chunk(
        self, cols: dict[str, np.ndarray], metas: list[RowMeta], taps: dict[str, np.ndarray]
    ) -> tuple[History, list[tuple[Any, Event]]]:
        """The flushed rows as a History: each contributor maps its columns and makes its events."""
        norms, total = cols["norms"], cols["total"]
        missing = np.zeros(norms.shape, bool)
        for r, m in enumerate(metas):
            missing[r, m.missing] = True
        own = [(c, strip(cols, c.prefix)) for c in self._parts]
        mapped: dict[str, np.ndarray] = {}
        for c, mine in own:
            mapped.update(c.to_history(mine))
        stats = {k: mapped.pop(k) for k in [k for k in mapped if "." in k]}
        events, reactions = self._events(own, metas, norms, total, missing)
        chunk = History(self.names, self._history.meta)
        missing_or_none = missing if missing.any() else None
        steps = [m.step for m in metas]
        chunk.append(steps, norms, total=total, grad_missing=missing_or_none, taps=taps, stats=stats, **mapped)
        chunk.events = events
        return chunk, reactions

    def _events(self, own: list, metas: list[RowMeta], norms: np.ndarray, total: np.ndarray, missing: np.ndarray):
        """Every contributor's events of the flushed rows, in step order, and the reactions they ask for."""
        talking = [(c, mine) for c, mine in own if type(c).events is not Contributor.events]
        events: list[Event] = []
        reactions: list[tuple[Any, Event]] = []
        for r, m in enumerate(metas):
            for c, mine in talking:
                rec = Record(m.step, norms[r], float(total[r]), {k: v[r] for k, v in mine.items()}, missing[r], m.order)
                for e in c.events(rec):
                    events.append(e)
                    if c.action is not None:
                        reactions.append((c.action, e))
        return events, reactions

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

    def _act(self, action: Any, e: Event) -> None:
        if action == "warn":
            self._warner(e)
        elif action == "skip":
            self._warner(e, prefix="optimizer step skipped: ")
        elif callable(action):
            action(e)

    # -- reading and closing --------------------------------------------------------
    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` (flushes first, so it is complete)."""
        self.flush()
        return self._history

    def state_dict(self) -> dict[str, Any]:
        """Step counter and the clipper's, detectors' and statistics' state, for checkpoints."""
        return {
            "step": self._step,
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
            "stats": [c.state_dict() for c in self.stats],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the history itself is not part of it).

        Raises:
            ValueError: the state is not a GradWatch state, or has another
                number of detectors or statistics, a clipper state without a
                clipper here, or a clipper/detector state that does not fit.
        """
        if not isinstance(state, dict) or not {"step", "clipper", "detectors"} <= set(state):
            raise ValueError("state must be a dict from GradWatch.state_dict() (keys 'step', 'clipper', 'detectors')")
        stats = state.get("stats", [{} for _ in self.stats])  # states saved before statistics existed
        for key, mine in (("detectors", self.detectors), ("stats", self.stats)):
            theirs = state["detectors"] if key == "detectors" else stats
            if len(theirs) != len(mine):
                raise ValueError(f"state has {len(theirs)} {key}, this watch {len(mine)}")
        if (state["clipper"] is None) != (self.clipper is None):
            raise ValueError("state and watch disagree on having a clipper")
        if self.clipper is not None:
            self.clipper.load_state_dict(state["clipper"])
        for part, st in zip([*self.detectors, *self.stats], [*state["detectors"], *stats]):
            part.load_state_dict(st)
        self._step = check_int(state["step"], "state['step']", min=0)
        self._set_hot(self._step)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"GradWatch.{what}() after close(): create a new GradWatch to watch again")

    def _release(self) -> None:
        """Remove the meter's and the contributors' hooks."""
        self._meter.remove()
        for c in self._parts:
            c.close()

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
        _collect(errors, self._release)
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


def _effective_mode(model: Any, measure: str, scaler: Any, distributed: bool = False) -> str:
    """The measurement mode actually used: ``"step"`` with AMP, with DTensors and under DDP (``"hook"`` warns)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if scaler is not None or distributed:  # sharded gradients: no parameter hooks (they would gather)
        return "step"
    if measure == "hook" and ddp:  # a clipper or a skip would decide from each rank's own gradients
        import warnings

        warnings.warn(
            "GradWatch(measure='hook') on a DistributedDataParallel model: hooks see each rank's local "
            "gradients before DDP's all-reduce, so the synchronized gradients are measured at the step "
            "instead; pass measure='step' (the default 'auto' does the same) to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    return "step" if ddp else measure
