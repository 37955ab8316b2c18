"""The optimizer gate: when a watch step runs, and how an optimizer step is skipped.

:class:`~gradwatch.GradWatch` knows how to measure, clip, detect and record;
this module knows optimizers: their step hooks, closures, several optimizers
stepping the same gradients, AMP unscaling, and making a step a no-op.

Rounds
    A *round* is one set of gradients (one backward, or one accumulation
    cycle). A watch step opens a round; each attached optimizer that steps
    joins it. An optimizer that steps again, while already in the round, means
    new gradients: a new watch step opens a new round. So one model with one
    optimizer per parameter group (or Muon + AdamW) gets one row and one clip
    per iteration, and ``watch.step()`` by hand followed by ``optimizer.step()``
    records once.

Closures
    ``optimizer.step(closure)`` (LBFGS, Lightning's automatic optimization)
    runs forward and backward inside the step, after the step pre-hook. The
    gate wraps the closure so that the watch step runs after the closure's
    first call -- on *this* step's gradients, once per step.

Skipping
    A skipped step leaves weights and optimizer state untouched. Fused
    optimizers whose state exists skip through ``optimizer.found_inf`` (as
    ``GradScaler`` does: no host sync); otherwise the gradients are hidden
    from the optimizer (``p.grad = None``) for that step and restored after
    it, and each param group's entries other than ``params`` are restored
    too (schedule-free optimizers advance ``k`` and ``weight_sum`` there even
    without gradients), at the cost of one host sync to read the flag. A
    wrapper with optimizer state of its own around the hooked optimizer
    (``torch_optimizer.Lookahead``: slow weights and a counter) has its
    ``step`` wrapped while attached, and a skipped step skips it whole.
    Not covered: state an optimizer keeps elsewhere (attributes of its own),
    or a step that changes parameters without a gradient.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from gradwatch._compat import found_inf_safe, has_step_hooks, set_found_inf, unscale_once, unscaled_this_step

__all__ = ["OptimizerGate", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind ``optimizer`` (accelerate's and Lightning's wrappers unwrapped).

    That is the optimizer that owns the step-hook dictionaries, so the hooks
    fire with it: ``LightningOptimizer`` passes ``isinstance`` checks and reads
    the wrapped optimizer's hooks through ``__getattr__``, so it is unwrapped too.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, or a wrapper whose
            optimizer gradwatch cannot reach (the message names the wrapper).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    seen = 0
    obj = optimizer
    while not (isinstance(obj, torch.optim.Optimizer) and has_step_hooks(obj)):
        inner = getattr(obj, "optimizer", None) or getattr(obj, "_optimizer", None)
        if inner is None or inner is obj or seen > 4:
            wrapper = type(optimizer).__name__
            if isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer is a {wrapper}, a wrapper without torch's step hooks; pass the wrapped "
                    f"optimizer (e.g. {wrapper}.optimizer) to attach(), or call watch.step() yourself"
                )
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {wrapper}")
        obj, seen = inner, seen + 1
    return obj


def _stateful_wrappers(optimizer: Any, inner: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """The wrappers between ``optimizer`` and ``inner`` that keep optimizer state of their own.

    Such a wrapper (``torch_optimizer.Lookahead``) steps ``inner`` and then
    changes its own state and the weights; skipping only ``inner``'s step is
    not enough. ``LightningOptimizer`` and ``AcceleratedOptimizer`` forward
    ``state`` to the wrapped optimizer, so they are not listed.
    """
    obj = optimizer
    while obj is not inner and obj is not None:
        own = getattr(obj, "__dict__", {})
        if isinstance(obj, torch.optim.Optimizer) and "state" in own and own["state"] is not inner.state:
            yield obj
        obj = getattr(obj, "optimizer", None) or getattr(obj, "_optimizer", None)


class _SkipWholeStep(Exception):
    """Raised from the hooked optimizer's step to skip a stateful wrapper's whole step."""

    def __init__(self, loss: Any) -> None:
        super().__init__("gradwatch: skipped step")
        self.loss = loss


class OptimizerGate:
    """Runs a watch step at the right moment of each attached optimizer's step.

    Args:
        on_grads: runs one watch step on the current gradients; returns a 0-d
            bool tensor (True: skip this step) or None.
        on_done: runs after each attached optimizer's step (the watch flushes there).
        on_unknown: called once with the parameters an attached optimizer
            updates but the watch does not know (e.g. added with
            ``add_param_group`` after the watch was built).
        on_update: called with each attached optimizer right after its step,
            before ``on_done`` (the watch measures the applied update there), or None.
    """

    def __init__(
        self,
        on_grads: Callable[[], Tensor | None],
        on_done: Callable[[], None],
        on_unknown: Callable[[list[Tensor]], None],
        watched: Sequence[Tensor],
        on_update: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> None:
        self._on_grads = on_grads
        self._on_update = on_update
        self._on_done = on_done
        self._on_unknown = on_unknown
        self._watched = {id(p) for p in watched}
        self._optimizers: dict[int, tuple[weakref.ref, list[Any], int]] = {}
        self._round: set[int] | None = None  # ids of the optimizers in the open round
        self._skip_flag: Tensor | None = None
        self._undo: list[Callable[[], None]] = []
        # id(wrapper) -> (wrapper, our step, the instance step it replaced or None, {"on": still wrapping})
        self._wrappers: dict[int, tuple[weakref.ref, Callable[..., Any], Any, dict[str, bool]]] = {}
        self._in_wrapper: list[torch.optim.Optimizer] = []  # inner optimizers whose wrapper is stepping
        self._skip_whole = False

    # -- attaching ---------------------------------------------------------------
    def attach(self, optimizer: Any) -> torch.optim.Optimizer:
        """Hook ``optimizer`` (unwrapped); attaching it again does nothing. Returns the optimizer."""
        opt = unwrap_optimizer(optimizer)
        for wrapper in _stateful_wrappers(optimizer, opt):
            self._wrap_step(wrapper, opt)
        entry = self._optimizers.get(id(opt))
        if entry is not None and entry[0]() is opt:
            return opt
        handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]
        self._optimizers[id(opt)] = (weakref.ref(opt), handles, -1)
        return opt

    def _wrap_step(self, wrapper: torch.optim.Optimizer, inner: torch.optim.Optimizer) -> None:
        """Wrap ``wrapper.step`` (an instance attribute) so that a skip skips all of it, not only ``inner``'s."""
        entry = self._wrappers.get(id(wrapper))
        if entry is not None and entry[0]() is wrapper:
            return
        original = wrapper.step
        active = {"on": True}

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            if not active["on"]:
                return original(*args, **kwargs)
            self._in_wrapper.append(inner)
            try:
                return original(*args, **kwargs)
            except _SkipWholeStep as skipped:
                self._post(inner, (), {})  # inner's post hook did not run
                return skipped.loss
            finally:
                self._in_wrapper.pop()

        previous = wrapper.__dict__.get("step")  # e.g. an LR scheduler's wrapper
        wrapper.step = step
        self._wrappers[id(wrapper)] = (weakref.ref(wrapper), step, previous, active)

    def _unwrap_steps(self) -> None:
        for ref, step, previous, active in self._wrappers.values():
            active["on"] = False  # wrapped again by someone else after us: our step only passes through
            wrapper = ref()
            if wrapper is not None and wrapper.__dict__.get("step") is step:
                if previous is None:
                    del wrapper.step
                else:
                    wrapper.step = previous
        self._wrappers.clear()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The attached optimizers that are still alive."""
        alive = (ref() for ref, _, _ in self._optimizers.values())  # no walrus: torch.compile traces this
        return [o for o in alive if o is not None]

    def detach_all(self) -> None:
        """Remove every hook (and wrapped ``step``) and undo a pending skip."""
        self._restore()
        self._unwrap_steps()
        for _, handles, _ in self._optimizers.values():
            for h in handles:
                h.remove()
        self._optimizers.clear()
        self._round = None

    # -- rounds ------------------------------------------------------------------
    def open_round(self, skip: Tensor | None) -> None:
        """A watch step ran by hand: attached optimizers stepping next join it (and its skip)."""
        self._round, self._skip_flag = set(), skip

    def close_round(self) -> None:
        """Forget the open round (after an exception): the next optimizer step opens a new one."""
        self._round, self._skip_flag = None, None

    def _arrive(self, opt: torch.optim.Optimizer) -> None:
        """``opt``'s gradients are ready: join the open round, or run a watch step for a new one."""
        if self._round is None or id(opt) in self._round:
            self.close_round()
            self.open_round(self._on_grads())
        assert self._round is not None
        self._round.add(id(opt))
        if self._skip_flag is not None:
            self.skip(opt, self._skip_flag)

    # -- hooks -------------------------------------------------------------------
    def _pre(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._restore()  # a previous step that raised left its skip in place
        self._check_params(opt)
        # args are step()'s positional arguments, self included: (optimizer, closure?)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            try:
                self._arrive(opt)
            except BaseException:
                self.close_round()
                raise
            self._raise_if_skipping_whole(None)
            return None
        wrapped = self._after_first_call(opt, closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _after_first_call(self, opt: torch.optim.Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        called = False

        def closure_then_watch() -> Any:
            nonlocal called
            loss = closure()
            if not called:
                called = True
                try:
                    self._arrive(opt)
                except BaseException:
                    self.close_round()
                    raise
                self._raise_if_skipping_whole(loss)
            return loss

        return closure_then_watch

    def _post(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._restore()
        if self._on_update is not None:
            self._on_update(opt)
        self._on_done()

    def _check_params(self, opt: torch.optim.Optimizer) -> None:
        """Warn once about parameters ``opt`` updates that the watch does not know."""
        ref, handles, groups = self._optimizers[id(opt)]
        if groups == len(opt.param_groups):
            return
        self._optimizers[id(opt)] = (ref, handles, len(opt.param_groups))
        unknown = [p for g in opt.param_groups for p in g["params"] if id(p) not in self._watched and p.requires_grad]
        if unknown:
            self._on_unknown(unknown)

    # -- skipping ----------------------------------------------------------------
    def skip(self, opt: torch.optim.Optimizer | None, flag: Tensor, params: Sequence[Tensor] = ()) -> None:
        """Make ``opt``'s coming step a no-op where ``flag`` is True.

        With ``opt=None`` (stepping by hand, nothing attached) the gradients
        of ``params`` are dropped (``p.grad = None``) when the flag is set.
        Inside the step of a wrapper with state of its own (see
        :func:`_stateful_wrappers`) the whole wrapper step is skipped instead.
        """
        if opt is not None and self._in_wrapper and self._in_wrapper[-1] is opt:
            self._skip_whole = bool(flag)  # one host sync: the wrapper cannot skip by itself
            return
        if opt is not None and found_inf_safe(opt):
            set_found_inf(opt, flag)
            self._undo.append(lambda: set_found_inf(opt, None))
            return
        if not bool(flag):  # one host sync: the optimizer cannot skip by itself
            return
        if opt is None:
            for p in params:
                p.grad = None
            return
        stash = [(p, p.grad) for g in opt.param_groups for p in g["params"]]
        for p, _ in stash:
            p.grad = None
        # step counters kept in the groups (schedule-free's k, weight_sum) move even without gradients
        groups = [(g, {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]

        def restore() -> None:
            for p, g in stash:
                p.grad = g
            for group, saved in groups:
                for key in [k for k in group if k != "params" and k not in saved]:
                    del group[key]
                group.update(saved)

        self._undo.append(restore)

    def _raise_if_skipping_whole(self, loss: Any) -> None:
        """End the hooked optimizer's step here when its stateful wrapper's whole step is skipped."""
        if self._skip_whole:
            self._skip_whole = False
            raise _SkipWholeStep(loss)

    def _restore(self) -> None:
        undo, self._undo = self._undo, []
        for fn in undo:
            fn()

    # -- AMP ---------------------------------------------------------------------
    def unscale(self, scaler: Any) -> None:
        """Unscale the gradients of every attached optimizer once this step.

        Raises:
            RuntimeError: nothing is attached and the gradients have not been
                unscaled this step (``scaler.unscale_(optimizer)``).
        """
        opts = self.optimizers()
        if not opts:
            if unscaled_this_step(scaler):
                return
            raise RuntimeError(
                "GradWatch(scaler=...) must unscale the gradients before measuring them: call "
                "watch.attach(optimizer), or scaler.unscale_(optimizer) before watch.step()"
            )
        for opt in opts:
            unscale_once(scaler, opt)
