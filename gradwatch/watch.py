"""GradWatch: measure -> clip -> detect -> record -> react, every optimizer step, without host syncs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._layout import Row, RowMeta
from gradwatch._params import ParamGuard, named_trainable
from gradwatch._parts import RowPlan, Taps, assemble
from gradwatch._store import OPEN_WATCHES, RowStore, collect
from gradwatch._validate import check_bool, check_choice, check_instance, check_int, check_list_of
from gradwatch.clip import Clipper
from gradwatch.contrib import Binding, Contributor, StepView
from gradwatch.detect import Detector, GradientAnomalyError
from gradwatch.distributed import check_process_group, get_rank, make_meter, measure_mode, needs_reduction, unwrap_ddp
from gradwatch.forensics import FlightRecorder
from gradwatch.gate import OptimizerGate
from gradwatch.history import History
from gradwatch.norms import MODES, stat_dtype
from gradwatch.sinks import SinkSet, check_sinks

__all__ = ["GradWatch"]

#: the largest ``flush_every``: rows are allocated as they fill, but a flush must stay addressable
MAX_FLUSH_EVERY = 2**31 - 1


class GradWatch:
    """Watch (and optionally clip) the gradients of a model at every optimizer step.

    Each step runs five phases, in this order: **measure** the L2 norm of
    every gradient and the global norm into a row of a device buffer;
    **clip** (the clipper scales the gradients in place, reusing those
    norms); **detect** (each detector, then each statistic, on the device);
    **record** their values into the row, each into the columns its
    :class:`~gradwatch.Contributor` declared when the watch was built; and
    **react** (``"raise"`` and ``"skip"``). Every ``flush_every`` recorded
    steps, and on :attr:`history` and :meth:`close`, the rows reach the host
    in one transfer, are stored in :attr:`history`, then handed to the sinks,
    warnings and callbacks; nothing else is read back to the host.

    ``measure="auto"`` measures gradients of at least 65,536 elements in
    post-accumulate-grad hooks (while in cache) and the rest in one fused pass
    at the step; ``"hook"`` and ``"step"`` force one way (``"step"``: exactly
    the kernels of ``clip_grad_norm_``; used with a ``scaler`` and under DDP).
    Under DDP, FSDP2, HSDP and tensor parallelism every rank records the
    norms of the full gradients (see the "Distributed training" guide).
    Half precision is accumulated in float32. A missing ``.grad`` is recorded
    as 0 and flagged in ``History.grad_missing``. A step that raises leaves
    the watch consistent: its row is in :attr:`history` and the next step is
    measured, clipped and numbered normally.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)`` pairs; parameters
            without ``requires_grad`` are ignored, tied ones watched once; names must be unique.
        clipper: a :class:`~gradwatch.Clipper` applied every step (even with ``every > 1``), or None.
        detectors: :class:`~gradwatch.Detector` objects run at recorded steps.
        sinks: :class:`~gradwatch.Sink` objects fed at every flush.
        every: record (measure, detect, record) every ``every``-th step.
        flush_every: recorded steps kept in the device buffer between flushes (it grows up to this).
        measure: ``"auto"``, ``"hook"`` or ``"step"`` (see above and the "Monitoring" guide).
        scaler: a ``torch.amp.GradScaler``: the gradients are unscaled once before measuring,
            non-finite steps are ``"amp_overflow"`` events, the scale is recorded. Call
            :meth:`step` before ``scaler.step(optimizer)``.
        recorder: a :class:`~gradwatch.FlightRecorder`: measure, clip and detect every step, keep
            rows every ``every`` steps and every row around each incident (``History.incidents``;
            ``flush_every`` then counts steps).
        param_norms: record ``‖W‖`` before the optimizer step in ``History.param_norms``.
        update_ratio: record the applied update ``‖W_{t+1} - W_t‖`` (``History.update_norms``,
            ``update_ratio``; implies ``param_norms``) in the attached optimizers' post-step hooks;
            costs one scratch copy of the parameters and needs :meth:`attach`.
        stats: statistics (:class:`~gradwatch.Contributor` objects) observed after the detectors;
            their columns are stored in ``History.stats`` as ``"<prefix>.<column>"``.
        process_group: for a model split across ranks in a way the device meshes do not describe
            (pipeline stages): a ``ProcessGroup`` or 1-D ``DeviceMesh`` over which the global norm
            is combined (one more all-reduce). See the "Distributed training" guide.
        sinks_rank: the rank whose sinks open, write and close (default 0); None: every rank's
            (give each its own file, e.g. with :func:`gradwatch.distributed.rank_path`).

    Raises:
        TypeError: ``model`` is neither a module nor named parameters, or a clipper, detector,
            statistic, sink, scaler or process_group of the wrong type.
        NotImplementedError: ``param_norms``/``update_ratio`` with DTensor parameters.
        ValueError: no trainable parameter, duplicate names, ``every``/``flush_every`` out of
            range, an unknown ``measure``, a recorder of another watch, or a prefix used twice.

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
        self.process_group = check_process_group(process_group)
        self.sinks_rank = None if sinks_rank is None else check_int(sinks_rank, "sinks_rank", min=0)
        sinks_here = SinkSet(self.sinks, sinks_rank is None or get_rank() == sinks_rank)
        distributed = needs_reduction(self.params, self.process_group)
        self.measure = measure_mode(model, measure, scaler, distributed)
        self.device, self.dtype = self.params[0].device, stat_dtype([p.dtype for p in self.params])
        self._guard = ParamGuard(module, self.params)
        binding = Binding(list(self.names), list(self.params), self.device, self.dtype, scaler is not None, scaler)
        self._plan = RowPlan(binding, assemble(self.param_norms, self.update_ratio, clipper, scaler, detectors, stats))
        if recorder is not None:
            recorder.bind(binding)
        self._meter = make_meter(self.names, self.params, self.measure, self.process_group, self._plan.uses_order)
        on_update = self._after_update if self._plan.late else None
        self._gate = OptimizerGate(self._gated_step, self._flush_if_full, self._guard.unknown, self.params, on_update)
        history = History(self.names, meta=self._meta())
        self._store = RowStore(self._plan, history, sinks_here, recorder, self.every, self.flush_every)
        self._store.after_flush = self._guard.check_unwatched
        self._step, self._closed = 0, False
        self._taps = Taps(self.device, self.dtype)
        self._live: tuple[int, int] | None = None  # (flush generation, step) of the last recorded row
        try:
            sinks_here.open(self.names, history.meta)
        except BaseException:
            self._release()
            raise
        OPEN_WATCHES.add(self)

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

    def _meta(self) -> dict[str, Any]:
        stats = self._plan.meta()
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

    @torch.compiler.disable  # host bookkeeping changes every step: traced, it would recompile every step
    @torch.no_grad()  # create_graph=True gradients: measure and clip outside the graph, as clip_grad_norm_ does
    def _run_step(self) -> Tensor | None:
        """The phases: measure -> contributors (clip, detect, statistics) -> record -> react; the skip flag."""
        step = self._step
        self._step += 1
        self._set_hot(self._step)
        observe = step % self.every == 0 or self._recorder is not None
        if not observe and not self._plan.every_step:
            return None
        if observe and self._store.rows.full:  # the flush after the last optimizer step did not run (it raised)
            self.flush()
        count, recorded = self._store.rows.count, False
        try:
            row = self._store.rows.next() if observe else self._store.rows.scratch
            view = self._measure(row, step)
            values = self._plan.observe(view, recorded=observe)
            if not observe:
                return None
            self._record(row, view, values)
            recorded = True
            return self._react(step)
        except BaseException:
            if not recorded:  # failed before its row was recorded: the step did not happen
                self._store.rows.count = count
                self._step = step
            raise
        finally:
            self._taps.clear()
            self._meter.reset()

    def _set_hot(self, step: int) -> None:
        """Whether the backward of step ``step`` is measured: hooks skip their work otherwise."""
        recorded = step % self.every == 0 or self._recorder is not None
        self._meter.hot = recorded or self._plan.every_step  # a clipper reads the norms at every step
        for c in self.stats:
            c.hot = recorded or c.every_step

    def _after_update(self, optimizer: torch.optim.Optimizer) -> None:
        """After an attached optimizer's step: the contributors that measure it, if their row is still buffered."""
        if self._live == (self._store.generation, self._step - 1):
            for c in self._plan.late:
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

    def _record(self, row: Row, view: StepView, values: dict[str, Tensor]) -> None:
        """Phase 4: every contributor's values into its declared columns (one op); the row's host-known meta."""
        self._plan.write(row.cols, values)
        self._live = (self._store.generation, view.step)
        self._store.rows.meta.append(RowMeta(view.step, view.missing, list(self._meter.order), self._taps.take()))

    def _react(self, step: int) -> Tensor | None:
        """Phase 5: raise now (one host sync), or return the skip flag for the optimizer gate."""
        raising = self._plan.flags("raise")
        if raising and bool(torch.stack(raising).any()):  # one host sync, by request
            self.flush()
            kinds = {d.kind for d in self.detectors if d.action == "raise"}
            hit = next(e for e in self._store.history.events if e.step == step and e.kind in kinds)
            raise GradientAnomalyError(hit)
        skipping = self._plan.flags("skip")
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
            self._taps.add(tensor, name)
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
        self._recorder.mark(max(self._step - 1, 0) if step is None else step, reason, value, latest=self._step)

    # -- flushing -----------------------------------------------------------------
    def _flush_if_full(self) -> None:
        if self._store.rows.full:
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
        self._store.flush()

    # -- reading and closing --------------------------------------------------------
    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` (flushes first, so it is complete)."""
        self._store.flush()
        return self._store.history

    def state_dict(self) -> dict[str, Any]:
        """Step counter and the clipper's, detectors' and statistics' state, for checkpoints."""
        return {"step": self._step, **self._plan.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the history itself is not part of it).

        Raises:
            ValueError: the state is not a GradWatch state, or has another
                number of detectors or statistics, a clipper state without a
                clipper here, or a clipper/detector state that does not fit.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("state must be a dict from GradWatch.state_dict() (keys 'step', 'clipper', 'detectors')")
        self._plan.load_state_dict(state)
        self._step = check_int(state["step"], "state['step']", min=0)
        self._set_hot(self._step)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"GradWatch.{what}() after close(): create a new GradWatch to watch again")

    def _release(self) -> None:
        """Remove the meter's and the contributors' hooks."""
        self._meter.remove()
        for c in self._plan.parts:
            c.close()

    def close(self) -> None:
        """Flush, remove every hook and close the sinks. Safe to call twice.

        The hooks are removed and the sinks closed even if the flush raises;
        the flush's error is raised after.
        """
        if self._closed:
            return
        self._closed = True
        OPEN_WATCHES.discard(self)
        errors = self._store.close()
        collect(errors, self._release)
        self._gate.detach_all()
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
