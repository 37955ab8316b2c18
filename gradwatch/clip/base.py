"""The clipper base: :class:`ClipContext`, :class:`ClipResult`, :class:`Clipper`, :class:`GlobalClipper`.

Also the helpers the clippers share (norm measurement, validation, rejection of
gradients a clipper cannot clip). See :mod:`gradwatch.clip` for the overview.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch._compat import foreach_mul, foreach_mul_, foreach_norm
from gradwatch._params import Binding, named_trainable
from gradwatch.distributed import full_norms, is_dtensor, local_tensor
from gradwatch.norms import accumulation_dtype, grad_norms, group_by_device_dtype, stat_dtype, total_norm

__all__ = ["ClipContext", "ClipResult", "Clipper", "GlobalClipper"]

_EPS_TORCH = 1e-6  # the epsilon in torch.nn.utils.clip_grad_norm_'s coefficient


def _norm_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The real dtype in which the norms of tensors of ``dtypes`` are kept."""
    if torch.complex128 in dtypes:
        return torch.float64
    return stat_dtype(dtypes)


def _norms(
    grads: Sequence[Tensor | None],
    norm_type: float = 2.0,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """:func:`gradwatch.norms.grad_norms`, also for sparse gradients (norm of the coalesced values).

    DTensor gradients (FSDP2, HSDP, tensor parallel): the norms of the full gradients, the same on every
    rank (:func:`gradwatch.distributed.full_norms`: one all-reduce per device mesh).
    """
    present = [g for g in grads if g is not None]
    if any(is_dtensor(g) for g in present):
        norms = full_norms(grads, norm_type)
        return norms.to(device=device or norms.device, dtype=dtype or _norm_dtype([g.dtype for g in present]))
    if device is None:
        device = present[0].device if present else torch.device("cpu")
    if dtype is None:
        dtype = _norm_dtype([g.dtype for g in present])
    if all(g.layout == torch.strided for g in present):
        return grad_norms(grads, norm_type, device=device, dtype=dtype)
    dense = [g if g is not None and g.layout == torch.strided else None for g in grads]
    out = grad_norms(dense, norm_type, device=device, dtype=dtype)
    for i, g in enumerate(grads):
        if g is not None and g.layout != torch.strided:
            values = g.coalesce().values()
            out[i] = torch.linalg.vector_norm(values, norm_type).to(device=device, dtype=dtype)
    return out


class ClipContext:
    """What a clipper sees at one step: the parameters, their gradients, their norms.

    Args:
        params: the parameters, in model order.
        names: their names.
        norms: the L2 norm of each gradient (0 where ``grad`` is None), or None to
            compute them on first use.
        total: the global L2 norm, or None to compute it on first use.
        step: the optimizer step index (0-based).
        measured: whether the caller wants the post-clip norms (default: True
            when ``norms`` are given, i.e. inside GradWatch).
        groups: the gradients already grouped by device and dtype (as
            :attr:`groups` returns them), or None to group them on first use.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> ctx = ClipContext([p], ["p"])
        >>> ctx.norms, ctx.total, ctx.measured
        (tensor([5.]), tensor(5.), False)
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str],
        norms: Tensor | None = None,
        total: Tensor | None = None,
        step: int = 0,
        *,
        measured: bool | None = None,
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] | None = None,
    ) -> None:
        self.params = list(params)
        self.names = list(names)
        self.grads: list[Tensor | None] = [p.grad for p in self.params]
        self.step = step
        self._norms = norms
        self._total = total
        self._groups = groups
        #: True inside GradWatch, which wants the post-clip norms; a clipper
        #: called alone skips computing them.
        self.measured = norms is not None if measured is None else measured

    @property
    def norms(self) -> Tensor:
        """``[P]`` L2 norm of each gradient, 0 for a missing gradient."""
        if self._norms is None:
            self._norms = _norms(self.grads)
        return self._norms

    @property
    def total(self) -> Tensor:
        """0-d global L2 norm.

        From :attr:`norms` if they are known, else computed exactly as
        ``torch.nn.utils.get_total_norm`` (one fused pass, same bits).
        """
        if self._total is None:
            if self._norms is not None:
                self._total = torch.linalg.vector_norm(self._norms)
            else:
                self._total = self.total_norm(2.0)
        return self._total

    def total_norm(self, norm_type: float) -> Tensor:
        """The ``norm_type``-norm of all gradients together (bit-identical to torch for dense ones)."""
        if all(g is None or (g.layout == torch.strided and not is_dtensor(g)) for g in self.grads):
            return total_norm(self.grads, norm_type)
        return torch.linalg.vector_norm(_norms(self.grads, norm_type), norm_type)

    @property
    def groups(self) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
        """The present gradients grouped by device and dtype (for ``torch._foreach_*``)."""
        if self._groups is None:
            # DTensor gradients by their local shards: in-place ops on them need no redistribution
            self._groups = group_by_device_dtype([None if g is None else local_tensor(g) for g in self.grads])
        return self._groups

    def with_norms(self, norms: Tensor | None, total: Tensor | None) -> ClipContext:
        """A context over the same (already clipped) gradients with updated norms.

        None norms (a clipper called alone) are measured again on first use.
        """
        return ClipContext(
            self.params, self.names, norms, total, self.step, measured=self.measured, groups=self._groups
        )

    def scaled_result(self, coef: Tensor, threshold: Tensor, norm: Tensor) -> ClipResult:
        """The :class:`ClipResult` of a step that multiplied every gradient by the 0-d ``coef``.

        Args:
            coef: the factor applied to every gradient.
            threshold: the bound enforced.
            norm: the pre-clip norm returned by a standalone call.

        Returns:
            The result, with the post-clip norms ``norms * coef`` inside GradWatch.
        """
        if not self.measured:
            return ClipResult(None, None, coef, threshold, norm)
        c = coef.to(self.norms)
        norms, total = foreach_mul([self.norms, self.total.to(c)], c)  # one fused multiply
        return ClipResult(norms, total, c, threshold.to(c), norm)

    def result(self, norm: Tensor, threshold: Tensor, norms_after: Callable[[], Tensor]) -> ClipResult:
        """The :class:`ClipResult` of a step that changed the gradients in any other way.

        Args:
            norm: the pre-clip norm returned by a standalone call.
            threshold: the bound enforced (NaN where no single global bound applies).
            norms_after: computes the ``[P]`` post-clip norms; called only inside
                GradWatch (:attr:`measured`), so a standalone call skips the work.

        Returns:
            The result; its coefficient is ``total_after / total`` (1 where the
            pre-clip total is 0 or NaN).
        """
        if not self.measured:
            return ClipResult(None, None, None, None, norm)
        after = norms_after().to(self.norms)
        total_after = torch.linalg.vector_norm(after)
        coef = torch.nan_to_num(total_after / self.total.to(total_after), nan=1.0, posinf=math.inf)
        return ClipResult(after, total_after, coef, threshold.to(total_after), norm)


@dataclass
class ClipResult:
    """What one clipping step did; every field is a device tensor.

    Attributes:
        norms: ``[P]`` L2 norm of each gradient after clipping.
        total: 0-d global L2 norm after clipping.
        coef: 0-d factor by which the global norm shrank (1 = untouched).
        threshold: 0-d bound the clipper enforced this step (``inf`` if none,
            NaN where no single global bound applies).

        ``norms`` and ``total`` are None when the clipper is called alone
        (``ClipContext.measured`` is False), and so are ``coef`` and
        ``threshold`` for clippers other than :class:`GlobalClipper` ones: only
        ``norm`` is needed then.
        norm: 0-d pre-clip norm the clipper returns when called alone (the
            ``norm_type`` norm for :class:`ClipByGlobalNorm`, else the L2 norm).
    """

    norms: Tensor | None
    total: Tensor | None
    coef: Tensor | None
    threshold: Tensor | None
    norm: Tensor


def _measure_after(ctx: ClipContext) -> Tensor:
    """The L2 norms of the (clipped) gradients, in one fused pass when possible."""
    like = ctx.norms
    if any(g is not None and is_dtensor(g) for g in ctx.grads):  # the full norms of sharded gradients
        return _norms(ctx.grads, device=like.device, dtype=like.dtype)
    groups = ctx.groups
    if len(groups) == 1:
        (_, dtype), (grads, _) = next(iter(groups.items()))
        if len(grads) == len(ctx.grads):  # no missing gradient: no scatter needed
            return torch.stack(foreach_norm(grads, 2, dtype=accumulation_dtype(dtype)))
    return _norms(ctx.grads, device=like.device, dtype=like.dtype)


def _reject(ctx: ClipContext, clipper: Clipper, *, complex_ok: bool = True) -> None:
    """Raise NotImplementedError naming the first parameter whose gradient ``clipper`` cannot clip."""
    for name, g in zip(ctx.names, ctx.grads):
        if g is None:
            continue
        if g.layout != torch.strided:
            raise NotImplementedError(
                f"{type(clipper).__name__} does not support sparse gradients; parameter {name!r} has a "
                f"{g.layout} gradient (use ClipByGlobalNorm, ClipByNorm, AutoClip or ZClip for it)"
            )
        if not complex_ok and g.is_complex():
            raise NotImplementedError(
                f"{type(clipper).__name__} does not support complex gradients (torch.clamp does not); "
                f"parameter {name!r} is {g.dtype}"
            )


class Clipper(ABC):
    """Base class of the clippers.

    A subclass implements :meth:`clip_`; stateful ones also
    :meth:`state_dict`, :meth:`load_state_dict` and :meth:`reset`, and clippers
    that need parameter names override :meth:`bind`. Clippers that scale all
    gradients by one coefficient subclass :class:`GlobalClipper` instead and
    implement only :meth:`GlobalClipper.decide`.
    """

    def bind(self, binding: Binding) -> None:  # noqa: B027 - optional hook
        """Called once with the parameters the clipper will see (names validated here).

        Args:
            binding: the :class:`~gradwatch.Binding` every contributor of a watch gets
                (the clipper alone binds to what it is called with).
        """

    @abstractmethod
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clip ``ctx``'s gradients in place; returns what was done."""

    def __call__(self, parameters: Tensor | Iterable) -> Tensor:
        """Clip the ``.grad`` of ``parameters`` in place and return the pre-clip norm.

        Args:
            parameters: a tensor, an iterable of tensors, an ``nn.Module`` or
                ``(name, tensor)`` pairs (names are needed by ``AGC(exclude=...)``).

        Returns:
            The pre-clip global norm as a 0-d tensor, like ``clip_grad_norm_``.
        """
        names, params = named_trainable(parameters, "parameters")
        if not params and isinstance(parameters, Tensor):
            names, params = ["0"], [parameters]
        self.bind(Binding.of(names, params))
        ctx = ClipContext(params, names)
        if all(g is None for g in ctx.grads):
            return torch.tensor(0.0)
        return self.clip_(ctx).norm

    def state_dict(self) -> dict[str, Any]:
        """The clipper's state (tensors and Python numbers), tagged with the class name."""
        return {"type": type(self).__name__}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the state comes from another class or has unknown keys.
        """
        self._check_state(state, ())

    def _check_state(self, state: Any, keys: Iterable[str], **config: Any) -> None:
        """Check that ``state`` was saved by a clipper of this class and configuration.

        Args:
            state: the dict to check.
            keys: the keys a state of this class may hold (besides ``type`` and ``config``'s).
            **config: settings that must match, e.g. ``window=self.window``.

        Raises:
            TypeError: ``state`` is not a dict.
            ValueError: another class, an unknown key, or a setting that differs.
        """
        cls = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{cls}.load_state_dict expects a dict from state_dict(), got {type(state).__name__}")
        kind = state.get("type", cls)
        if kind != cls:
            raise ValueError(f"state was saved by a {kind} clipper and cannot be loaded into a {cls}")
        allowed = {"type", *keys, *config}
        unknown = sorted(set(state) - allowed)
        if unknown:
            raise ValueError(f"{cls} state has unknown keys {unknown}; expected keys among {sorted(allowed)}")
        for name, value in config.items():
            if name in state and state[name] != value:
                raise ValueError(
                    f"state was saved by a {cls} with {name}={state[name]!r}, but this {cls} has "
                    f"{name}={value!r}; build it with the same {name} to resume"
                )

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget all observed history (no-op for stateless clippers)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict[str, Any]:
        return {}

    def _constant(self, value: float, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """A tensor of ``value`` on ``like``'s device and dtype (shaped like it, or ``shape``), cached on this clipper.

        No operation per step after the first call. The cache is this clipper's
        own field: nothing else writes it.
        """
        cache: dict[tuple, Tensor] | None = getattr(self, "_constants", None)
        if cache is None:
            cache = self._constants = {}
        size = tuple(like.shape) if shape is None else shape
        key = (value, like.device, like.dtype, size)
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.full(size, value, dtype=like.dtype, device=like.device)
        return t


class GlobalClipper(Clipper):
    r"""A clipper that scales every gradient by one coefficient: measure, decide, act.

    :meth:`clip_` runs the three steps and builds the :class:`ClipResult`; a
    subclass implements :meth:`decide` and may override :meth:`measure`
    (default: the global L2 norm) -- the split of torch's own
    ``get_total_norm`` / ``clip_grads_with_norm_``.

    Example:
        >>> class HalveAll(GlobalClipper):
        ...     def decide(self, norm):
        ...         return torch.full_like(norm, 0.5), torch.full_like(norm, math.nan)
        >>> p = torch.nn.Parameter(torch.zeros(1)); p.grad = torch.tensor([4.0])
        >>> HalveAll()([p]), p.grad
        (tensor(4.), tensor([2.]))
    """

    def measure(self, ctx: ClipContext) -> Tensor:
        """The 0-d norm the decision is based on (also what a standalone call returns)."""
        return ctx.total

    @abstractmethod
    def decide(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """From the measured norm (and the clipper's state): the 0-d coefficient and bound.

        Updates the state of adaptive clippers. No host sync: use ``torch.where``
        and ``torch.clamp``, never a Python ``if`` on a tensor.

        Returns:
            ``(coef, threshold)``: every gradient is multiplied by ``coef``;
            ``threshold`` is the bound the clipper enforced (``inf`` if none).
        """

    def act(self, ctx: ClipContext, coef: Tensor) -> None:
        """Multiply every gradient by ``coef`` (one fused call per device and dtype, as torch does)."""
        for (device, _), (grads, _) in ctx.groups.items():
            foreach_mul_(grads, coef.to(device))

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Measure, decide and act; returns what was done."""
        norm = self.measure(ctx)
        coef, threshold = self.decide(norm)
        self.act(ctx, coef)
        return ctx.scaled_result(coef, threshold, norm)
