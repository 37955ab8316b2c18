"""GradWatch: measure -> detect -> clip -> record, every optimizer step, without host syncs."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._measure import MODES, NormMeter
from gradwatch._params import named_trainable
from gradwatch.clip import ClipContext, Clipper
from gradwatch.detect import (
    Detector,
    Event,
    GradientAnomalyError,
    NonFinite,
    Observation,
    Record,
    Warner,
    ready_first,
)
from gradwatch.history import History
from gradwatch.norms import stat_dtype

__all__ = ["GradWatch"]


def _int_at_least_1(value: Any, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argname} must be an integer >= 1, got {value!r}")
    return int(value)


class GradWatch:
    """Watch (and optionally clip) the gradients of a model at every optimizer step.

    Each step, GradWatch measures the L2 norm of every parameter's gradient and
    the global norm, runs the detectors, applies the clipper and writes one row
    to a device buffer; every ``flush_every`` observed steps the buffer is copied
    to the host in one transfer and becomes rows of :attr:`history`, events,
    warnings and sink output. Between flushes nothing is read back to the host.

    Gradient norms are measured where the gradients are cheapest to read:

    * ``measure="hook"`` (default): in ``register_post_accumulate_grad_hook``
      hooks, while each gradient is still hot in cache. The hooks also record
      the order in which gradients became ready (for :class:`NonFinite`). With
      gradient accumulation each micro-batch's hook measures the accumulated
      gradient, so the last one -- the norm at the optimizer step -- is recorded.
      If you change ``.grad`` between ``backward()`` and the step yourself (your
      own clipping, DDP's all-reduce), use ``measure="step"``.
    * ``measure="step"``: one fused pass (``torch._foreach_norm`` per device and
      dtype) when the step runs. Used automatically with a ``scaler``.

    Half-precision norms are accumulated and recorded in float32; float64
    models are recorded in float64. A parameter whose ``.grad`` is None at a step
    is recorded with norm 0 and flagged in ``History.grad_missing`` (never NaN,
    so it cannot be mistaken for a non-finite gradient).

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)`` pairs.
            Parameters without ``requires_grad`` are ignored; shared (tied)
            parameters are watched once.
        clipper: a :class:`~gradwatch.Clipper` applied every step (even with
            ``every > 1``), or None.
        detectors: :class:`~gradwatch.Detector` objects run at observed steps.
        sinks: :class:`~gradwatch.Sink` objects fed at every flush.
        every: observe (measure, detect, record) every ``every``-th step.
        flush_every: observed steps kept in the device buffer between flushes.
        measure: ``"hook"`` or ``"step"`` (see above).
        scaler: a ``torch.amp.GradScaler``; the gradients are unscaled once
            (``scaler.unscale_``) before measuring, non-finite steps are labelled
            ``"amp_overflow"`` and the scale is recorded. Call :meth:`step`
            before ``scaler.step(optimizer)``.

    Raises:
        TypeError: ``model`` is neither a module nor named parameters, or a
            clipper/detector/sink of the wrong type.
        ValueError: no trainable parameter, ``every``/``flush_every`` < 1, or an
            unknown ``measure``.

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
    ) -> None:
        self.names, self.params = named_trainable(model, "model")
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True: nothing to watch")
        self.every = _int_at_least_1(every, "every")
        self.flush_every = _int_at_least_1(flush_every, "flush_every")
        if measure not in MODES:
            raise ValueError(f"measure must be one of {MODES}, got {measure!r}")
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(f"clipper must be a gradwatch Clipper or None, got {type(clipper).__name__}")
        for d in detectors:
            if not isinstance(d, Detector):
                raise TypeError(f"detectors must be gradwatch Detector objects, got {type(d).__name__}")
        for s in sinks:
            if not all(callable(getattr(s, m, None)) for m in ("open", "write", "close")):
                raise TypeError(f"sinks must have open/write/close methods (gradwatch.Sink), got {type(s).__name__}")
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.clipper = clipper
        self.detectors = list(detectors)
        self.sinks = list(sinks)
        self.scaler = scaler
        self.measure = "step" if scaler is not None else measure

        P = len(self.params)
        self.device = self.params[0].device
        self.dtype = stat_dtype([p.dtype for p in self.params])
        if clipper is not None:
            clipper.bind(self.names, self.params)
        for d in self.detectors:
            d.bind(self.names)
        self._history = History(self.names, meta=self._meta())
        for s in self.sinks:
            s.open(self.names, self._history.meta)

        # Device buffer: rows of [norms (P) | total], written in place by the meter
        # (no copy per step), plus a scratch row for steps that clip but are not
        # observed. What the clipper and detectors add goes to `_extra` (lazily sized).
        self._base = torch.zeros(self.flush_every + 1, P + 1, device=self.device, dtype=self.dtype)
        self._row_views = [(r[:P], r[P]) for r in self._base.unbind()]
        self._extra: Tensor | None = None
        self._extra_rows: list[Tensor] = []
        self._widths: list[int] | None = None  # slots each detector writes per row
        self._pos = 0
        track_order = any(isinstance(d, NonFinite) for d in self.detectors) or scaler is not None
        self._meter = NormMeter(self.params, self.measure, self.device, self.dtype, track_order)
        self._row_meta: list[tuple[int, list[int], list[int], dict[str, Tensor]]] = []
        self._step = 0
        self._taps: dict[str, Tensor | None] = {}
        self._stepped = False
        self._pending_skip: Tensor | None = None
        self._stash: list[tuple[Tensor, Tensor | None]] = []
        self._set_found_inf: list[Any] = []
        self._optimizers: dict[int, tuple[weakref.ref, list[Any]]] = {}
        self._warner = Warner()
        self._closed = False
        self._needs_every_step = clipper is not None

    # -- set-up -------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "clipper": repr(self.clipper) if self.clipper is not None else None,
            "detectors": [repr(d) for d in self.detectors],
            "every": self.every,
            "measure": self.measure,
        }

    def attach(self, optimizer: torch.optim.Optimizer) -> GradWatch:
        """Run :meth:`step` automatically at every ``optimizer.step()``.

        Uses ``optimizer.register_step_pre_hook`` (and a post hook that undoes
        a skipped step's bookkeeping). Attaching the same optimizer twice does
        nothing the second time. Returns ``self`` for chaining.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            RuntimeError: the watch is closed.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._check_open("attach")
        if id(optimizer) in self._optimizers and self._optimizers[id(optimizer)][0]() is optimizer:
            return self
        handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self._optimizers[id(optimizer)] = (weakref.ref(optimizer), handles)
        return self

    # -- the step -----------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not (self._stepped and not self._meter.touched):  # not already stepped by hand since backward
            self.step(_optimizer=optimizer)
        self._stepped = False
        if self._pending_skip is not None:
            flag, self._pending_skip = self._pending_skip, None
            self._skip(optimizer, flag)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for opt in self._set_found_inf:
            del opt.found_inf
        self._set_found_inf.clear()
        for p, g in self._stash:
            p.grad = g
        self._stash.clear()

    def _skip(self, optimizer: torch.optim.Optimizer | None, flag: Tensor) -> None:
        """Make the coming optimizer step a no-op where ``flag`` is True."""
        fused = optimizer is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        fused = fused and all(g.get("fused") for g in optimizer.param_groups)
        if fused and self.scaler is None and getattr(optimizer, "found_inf", None) is None:
            optimizer.found_inf = flag.to(torch.float32)  # the fused kernels skip the update
            self._set_found_inf.append(optimizer)
            return
        if not bool(flag):  # one host sync: the optimizer cannot skip by itself
            return
        params = self.params if optimizer is None else [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            if optimizer is not None:
                self._stash.append((p, p.grad))
            p.grad = None

    def step(self, _optimizer: torch.optim.Optimizer | None = None) -> None:
        """Measure, detect, clip and record the current gradients.

        Called automatically when attached; call it yourself after
        ``backward()`` and before ``optimizer.step()`` otherwise (with a
        ``scaler``, before ``scaler.step(optimizer)``). Calling it once per
        optimizer step is what gives one record per step under gradient
        accumulation.

        Raises:
            RuntimeError: the watch is closed, or a ``scaler`` is set but no
                optimizer is attached.
            GradientAnomalyError: a detector with ``action="raise"`` fired.
        """
        self._check_open("step")
        step = self._step
        observe = step % self.every == 0
        self._step += 1
        self._meter.hot = self._step % self.every == 0 or self._needs_every_step
        self._stepped = True
        grads = [p.grad for p in self.params]
        missing = [i for i, g in enumerate(grads) if g is None]
        norms, total = self._row_views[self._pos if observe else self.flush_every]
        if observe or self.clipper is not None:
            self._measure(grads, missing, norms, total)
        res = None
        if self.clipper is not None:
            res = self.clipper.clip_(ClipContext(self.params, self.names, norms, total, step))
        flags: list[tuple[Detector, Tensor]] = []
        if observe:
            parts: list[Tensor] = []
            if res is not None:
                parts += [torch.stack([res.total, res.coef, res.threshold]).to(self.dtype), res.norms]
            if self.scaler is not None:
                parts.append(
                    self.scaler._scale.reshape(1).to(self.dtype)
                    if self.scaler._scale is not None
                    else torch.full((1,), math.nan, device=self.device, dtype=self.dtype)
                )
            obs = Observation(step, norms, total, missing)
            widths = []
            for d in self.detectors:
                slots, fired = d.observe(obs)
                widths.append(0 if slots is None else slots.numel())
                if slots is not None:
                    parts.append(slots.to(self.dtype).reshape(-1))
                if fired is not None and d.needs_flag and not (self.scaler is not None and isinstance(d, NonFinite)):
                    flags.append((d, fired))
            if self._widths is None:
                self._widths = widths
            if parts:
                self._write_extra(parts)
            self._pos += 1
            taps = {k: v for k, v in self._taps.items() if v is not None}
            self._row_meta.append((step, missing, list(self._meter.order), taps))
        self._taps.clear()
        self._meter.reset()
        raising = [f for d, f in flags if d.action == "raise"]
        if raising and bool(torch.stack(raising).any()):  # one host sync, by request
            self.flush()
            hit = next(e for e in self._history.events if e.step == step and self._raises(e))
            raise GradientAnomalyError(hit)
        skipping = [f for d, f in flags if d.action == "skip"]
        if skipping:
            flag = skipping[0] if len(skipping) == 1 else torch.stack(skipping).any()
            if _optimizer is None and not self._optimizers:
                self._skip(None, flag)
            else:
                self._pending_skip = flag
        if observe and self._pos == self.flush_every:
            self.flush()

    def _raises(self, event: Event) -> bool:
        return any(d.action == "raise" and d.kind == event.kind for d in self.detectors)

    def _measure(self, grads: list[Tensor | None], missing: list[int], norms: Tensor, total: Tensor) -> None:
        """Write this step's norms and their total into a buffer row."""
        unscaled = self.scaler is not None and self.scaler.is_enabled()
        if unscaled:
            self._unscale()
            grads = [p.grad for p in self.params]
        self._meter.measure(grads, missing, norms, hooks_valid=not unscaled)
        torch.linalg.vector_norm(norms, out=total)

    def _unscale(self) -> None:
        opts = [ref() for ref, _ in self._optimizers.values() if ref() is not None]
        if not opts:
            raise RuntimeError("GradWatch(scaler=...) needs the optimizer: call watch.attach(optimizer) first")
        for opt in opts:
            try:
                self.scaler.unscale_(opt)
            except RuntimeError as exc:  # already unscaled by the user this step: fine
                if "already been called" not in str(exc):
                    raise

    def _write_extra(self, parts: list[Tensor]) -> None:
        """Write the clipper's, scaler's and detectors' values of this row (one call)."""
        if self._extra is None:
            width = sum(t.numel() for t in parts)
            self._extra = torch.zeros(self.flush_every, width, device=self.device, dtype=self.dtype)
            self._extra_rows = list(self._extra.unbind())
        row = self._extra_rows[self._pos]
        if len(parts) == 1:
            row.copy_(parts[0])
        else:
            torch.cat(parts, out=row)

    # -- taps ---------------------------------------------------------------------
    def tap(self, tensor: Tensor, name: str) -> Tensor:
        """Record the gradient L2 norm of an intermediate tensor at this step.

        Registers a backward hook on ``tensor`` (an activation, e.g. the hidden
        state ``h_t`` of an RNN) that stores ``‖∂L/∂tensor‖``; the values land in
        ``History.taps`` / ``history[name]`` at the next observed step. A no-op
        on steps that are not observed or for tensors without ``requires_grad``.

        Args:
            tensor: the intermediate tensor.
            name: the column name (must not collide with a parameter name).

        Returns:
            ``tensor`` itself, so it can wrap an expression.

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
                self._taps[name] = torch.linalg.vector_norm(g, dtype=acc).to(device=self.device, dtype=self.dtype)

            self._taps.setdefault(name, None)  # columns in the order of tap() calls
            tensor.register_hook(hook)
        return tensor

    # -- flushing -----------------------------------------------------------------
    def flush(self) -> None:
        """Copy the buffered rows to the host (one transfer) and hand them out.

        Builds the :attr:`history` rows and events, fires warnings and
        callbacks, and writes to every sink.
        """
        if self._pos == 0:
            return
        n, self._pos = self._pos, 0
        metas, self._row_meta = self._row_meta, []
        tap_names: list[str] = []
        tap_vals: list[Tensor] = []
        for _, _, _, taps in metas:
            for k, v in taps.items():
                tap_names.append(k)
                tap_vals.append(v.reshape(1))
        pieces = [self._base[:n].reshape(-1)]
        if self._extra is not None:
            pieces.append(self._extra[:n].reshape(-1))
        dev = torch.cat(pieces + tap_vals) if len(pieces) + len(tap_vals) > 1 else pieces[0]
        host = dev.to("cpu", copy=True).numpy()  # the one device-to-host copy
        base_w = self._base.shape[1]
        extra_w = 0 if self._extra is None else self._extra.shape[1]
        rows = host[: n * base_w].reshape(n, base_w)
        if extra_w:
            rows = np.concatenate([rows, host[n * base_w : n * (base_w + extra_w)].reshape(n, extra_w)], axis=1)
        self._ingest(rows, metas, host[n * (base_w + extra_w) :])

    def _ingest(self, rows: np.ndarray, metas: list, tap_flat: np.ndarray) -> None:
        P = len(self.names)
        n = len(rows)
        norms = rows[:, :P]
        total = rows[:, P]
        c = P + 1
        kw: dict[str, Any] = {}
        if self.clipper is not None:
            kw.update(total_clipped=rows[:, c], clip_coef=rows[:, c + 1], clip_threshold=rows[:, c + 2])
            kw["norms_clipped"] = rows[:, c + 3 : c + 3 + P]
            c += 3 + P
        if self.scaler is not None:
            kw["scale"] = rows[:, c]
            c += 1
        missing = np.zeros((n, P), bool)
        for r, (_, miss, _, _) in enumerate(metas):
            missing[r, miss] = True
        taps: dict[str, np.ndarray] = {}
        k = 0
        for r, (_, _, _, tap) in enumerate(metas):
            for name in tap:
                taps.setdefault(name, np.full(n, np.nan))[r] = tap_flat[k]
                k += 1
        events: list[Event] = []
        slot_start = c
        for r, (step, _, order, _) in enumerate(metas):
            if self.scaler is not None and not np.isfinite(norms[r]).all():
                events.extend(
                    Event(step, "amp_overflow", self.names[i], float(norms[r, i]), None)
                    for i in ready_first(order, ~np.isfinite(norms[r]))
                )
            c = slot_start
            for d, width in zip(self.detectors, self._widths or [0] * len(self.detectors)):
                slots = rows[r, c : c + width]
                c += width
                if self.scaler is not None and isinstance(d, NonFinite):
                    continue
                rec = Record(step, norms[r], float(total[r]), slots, missing[r], order)
                for e in d.events(rec):
                    events.append(e)
                    self._act(d, e)
        steps = [m[0] for m in metas]
        chunk = History(self.names, self._history.meta)
        chunk.append(
            steps,
            norms.copy(),
            grad_missing=missing,
            total=total.copy(),
            taps=taps,
            events=events,
            **{k: v.copy() for k, v in kw.items()},
        )
        self._history._chunks.extend(chunk._chunks)
        for name in chunk.tap_names:
            if name not in self._history.tap_names:
                self._history.tap_names.append(name)
        self._history.events.extend(events)
        self._history._cache = None
        for s in self.sinks:
            s.write(chunk)

    def _act(self, d: Detector, e: Event) -> None:
        if d.action == "warn":
            self._warner(e)
        elif d.action == "skip":
            self._warner(e, prefix="optimizer step skipped: ")
        elif callable(d.action):
            d.action(e)

    # -- reading and closing --------------------------------------------------------
    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` (flushes first, so it is complete)."""
        self.flush()
        return self._history

    def state_dict(self) -> dict[str, Any]:
        """Step counters and the clipper's and detectors' state, for checkpoints."""
        return {
            "step": self._step,
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "detectors": [d.state_dict() for d in self.detectors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the history itself is not part of it).

        Raises:
            ValueError: the state has a different number of detectors.
        """
        if len(state["detectors"]) != len(self.detectors):
            raise ValueError(f"state has {len(state['detectors'])} detectors, this watch {len(self.detectors)}")
        self._step = int(state["step"])
        self._meter.hot = self._step % self.every == 0 or self._needs_every_step
        if self.clipper is not None and state["clipper"] is not None:
            self.clipper.load_state_dict(state["clipper"])
        for d, st in zip(self.detectors, state["detectors"]):
            d.load_state_dict(st)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"GradWatch.{what}() after close(): create a new GradWatch to watch again")

    def close(self) -> None:
        """Flush, remove every hook and close the sinks. Safe to call twice."""
        if self._closed:
            return
        self.flush()
        self._meter.remove()
        for _, handles in self._optimizers.values():
            for h in handles:
                h.remove()
        self._optimizers.clear()
        self._warner.summary()
        for s in self.sinks:
            s.close()
        self._closed = True

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradWatch({len(self.params)} parameters, clipper={self.clipper!r}, "
            f"detectors={self.detectors!r}, every={self.every}, measure={self.measure!r})"
        )
