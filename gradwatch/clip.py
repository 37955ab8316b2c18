"""Gradient clippers: by value, per-tensor norm, global norm, AutoClip, AGC, ZClip, Chain.

Every clipper works two ways:

* alone, as ``clipper(parameters) -> Tensor``: it reads ``p.grad``, clips in
  place and returns the pre-clip global norm, like
  :func:`torch.nn.utils.clip_grad_norm_`;
* inside :class:`gradwatch.GradWatch`, which has already measured every
  gradient's L2 norm: :meth:`Clipper.clip_` reuses those norms, so no clipper
  but :class:`ClipByValue` and :class:`AGC` (and :class:`ClipByGlobalNorm` for
  ``norm_type != 2``) reads the gradients a second time to measure them.

Like torch's own clipping, the clippers that scale every gradient by one
coefficient are split into **measure** (the norm the decision uses), **decide**
(the coefficient and the bound, from the norm and the clipper's state) and
**act** (scale the gradients): :class:`GlobalClipper` runs the three and builds
the :class:`ClipResult`; :class:`ClipByGlobalNorm`, :class:`AutoClip` and
:class:`ZClip` only implement :meth:`GlobalClipper.decide`.

Everything runs on the gradients' device: thresholds, histories and moving
averages are tensors, and no clipper reads a value back to the host, so a
clipped step costs no host synchronisation. The number of tensor operations a
clipper dispatches per step does not grow with the number of parameter tensors
(AGC: with the number of distinct trailing shapes), which is what a step costs
on a GPU, where every operation is a kernel launch; see ``benchmarks/ops.py``.

Non-finite gradients follow torch: a NaN anywhere makes the global norm NaN and,
through the coefficient, every clipped gradient NaN; an Inf makes the
coefficient 0. Clipping is not the tool that protects weights from NaN --
:class:`gradwatch.NonFinite` with ``action="skip"`` is. The adaptive clippers
(:class:`AutoClip`, :class:`ZClip`) leave non-finite norms out of their
statistics, so one bad step cannot poison the thresholds of the next ones.

Sparse gradients (``nn.Embedding(sparse=True)``) are scaled by the clippers that
scale whole tensors (:class:`ClipByGlobalNorm`, :class:`ClipByNorm`,
:class:`AutoClip`, :class:`ZClip`); :class:`ClipByValue` and :class:`AGC` raise
``NotImplementedError`` naming the parameter. Complex gradients are measured as
torch measures them (the L2 norm of the moduli); :class:`ClipByValue` rejects
them, as ``torch.clamp`` does.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch._params import named_trainable
from gradwatch._validate import check_float, check_int, check_names
from gradwatch.distributed import full_norms, is_dtensor, local_tensor, row_norms
from gradwatch.norms import check_norm_type, grad_norms, group_by_device_dtype, stat_dtype, total_norm

__all__ = [
    "AGC",
    "AutoClip",
    "Chain",
    "ClipByGlobalNorm",
    "ClipByNorm",
    "ClipByValue",
    "ClipContext",
    "ClipResult",
    "Clipper",
    "GlobalClipper",
    "ZClip",
]

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


def _accumulate(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for half-precision tensors (their norms are accumulated in float32), else None."""
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else None


def _constant(owner: object, value: float, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """A cached tensor of ``value`` on ``like``'s device and dtype (shaped like it, or ``shape``).

    No operation per step after the first call.
    """
    cache: dict = owner.__dict__.setdefault("_constants", {})
    size = tuple(like.shape) if shape is None else shape
    key = (value, like.device, like.dtype, size)
    t = cache.get(key)
    if t is None:
        t = cache[key] = torch.full(size, value, dtype=like.dtype, device=like.device)
    return t


class ClipContext:
    """What a clipper sees at one step: the parameters, their gradients, their norms.

    Args:
        params: the parameters, in model order.
        names: their names.
        norms: the L2 norm of each gradient (0 where ``grad`` is None), or None to
            compute them on first use.
        total: the global L2 norm, or None to compute it on first use.
        step: the optimizer step index (0-based).

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
    ) -> None:
        self.params = list(params)
        self.names = list(names)
        self.grads: list[Tensor | None] = [p.grad for p in self.params]
        self.step = step
        self._norms = norms
        self._total = total
        self._groups: dict | None = None
        #: True inside GradWatch, which wants the post-clip norms; a clipper
        #: called alone skips computing them.
        self.measured = norms is not None

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
        ctx = ClipContext(self.params, self.names, norms, total, self.step)
        ctx._groups = self._groups
        ctx.measured = self.measured
        return ctx

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
        return ClipResult(self.norms * c, self.total.to(c) * c, c, threshold.to(c), norm)

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


def _positive(value: Any, argname: str) -> float:
    return check_float(value, argname, min=0, min_open=True)


def _measure_after(ctx: ClipContext) -> Tensor:
    """The L2 norms of the (clipped) gradients, in one fused pass when possible."""
    like = ctx.norms
    if any(g is not None and is_dtensor(g) for g in ctx.grads):  # the full norms of sharded gradients
        return _norms(ctx.grads, device=like.device, dtype=like.dtype)
    groups = ctx.groups
    if len(groups) == 1:
        (_, dtype), (grads, _) = next(iter(groups.items()))
        if len(grads) == len(ctx.grads):  # no missing gradient: no scatter needed
            return torch.stack(torch._foreach_norm(grads, 2, dtype=_accumulate(dtype)))
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

    def bind(self, names: Sequence[str], params: Sequence[Tensor]) -> None:  # noqa: B027 - optional hook
        """Called once with the parameters the clipper will see (names validated here)."""

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
        self.bind(names, params)
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
            torch._foreach_mul_(grads, coef.to(device))

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Measure, decide and act; returns what was done."""
        norm = self.measure(ctx)
        coef, threshold = self.decide(norm)
        self.act(ctx, coef)
        return ctx.scaled_result(coef, threshold, norm)


class ClipByValue(Clipper):
    r"""Clamp every gradient element to ``[-clip_value, clip_value]``.

    Exactly :func:`torch.nn.utils.clip_grad_value_`. Clamping changes the
    gradient's direction, so the post-clip norms are measured again (one more
    read of the gradients). Sparse and complex gradients raise
    ``NotImplementedError``, as in torch.

    Args:
        clip_value: the bound, > 0.

    Raises:
        TypeError: ``clip_value`` is not a number.
        ValueError: ``clip_value`` is not a finite positive number.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([-2.0, 0.5, 3.0])
        >>> ClipByValue(1.0)([p])
        tensor(3.6401)
        >>> p.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _positive(clip_value, "clip_value")

    def _repr_args(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clamp every element; the post-clip norms are measured again."""
        _reject(ctx, self, complex_ok=False)
        total = ctx.total  # before the gradients change
        for _, (grads, _) in ctx.groups.items():
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        return ctx.result(total, _constant(self, math.nan, total), lambda: _measure_after(ctx))


class ClipByNorm(Clipper):
    r"""Clip each gradient tensor to L2 norm ``clip_norm``, independently.

    .. math:: g_i \leftarrow g_i \cdot \frac{c}{\max(\lVert g_i \rVert_2,\ c)}

    This is PaddlePaddle's ``paddle.nn.ClipGradByNorm``, the clipper of the
    NNDL textbook's gradient-explosion experiment (practice 6.2). Unlike global
    clipping it changes the relative sizes of the gradients.

    Args:
        clip_norm: the per-tensor bound ``c``, > 0.

    Raises:
        TypeError: ``clip_norm`` is not a number.
        ValueError: ``clip_norm`` is not a finite positive number.

    Example:
        >>> a = torch.nn.Parameter(torch.zeros(2)); a.grad = torch.tensor([30.0, 40.0])
        >>> b = torch.nn.Parameter(torch.zeros(1)); b.grad = torch.tensor([1.0])
        >>> ClipByNorm(5.0)([a, b])
        tensor(50.0100)
        >>> a.grad, b.grad
        (tensor([3., 4.]), tensor([1.]))

    References:
        PaddlePaddle, ``paddle.nn.ClipGradByNorm``; Qiu Xipeng, *Neural Networks
        and Deep Learning*, practice 6.2.
    """

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = _positive(clip_norm, "clip_norm")
        self._index: dict[tuple, Tensor] = {}

    def _repr_args(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Scale each gradient by its own factor ``c / max(norm, c)``."""
        norms = ctx.norms
        total = ctx.total  # before the gradients change
        c = _constant(self, self.clip_norm, norms)
        factors = c / torch.maximum(norms, c)  # a true division: exactly 1 below the bound
        groups = ctx.groups
        if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(ctx.grads):
            ((device, _), (grads, _)) = next(iter(groups.items()))  # one group, no missing grads
            torch._foreach_mul_(grads, factors.to(device).unbind())
        else:
            for (device, _), (grads, positions) in groups.items():
                key = (factors.device, tuple(positions))
                if key not in self._index:
                    self._index[key] = torch.tensor(positions, device=factors.device)
                torch._foreach_mul_(grads, factors.index_select(0, self._index[key]).to(device).unbind())
        return ctx.result(total, _constant(self, self.clip_norm, total), lambda: norms * factors)


class ClipByGlobalNorm(GlobalClipper):
    r"""Scale all gradients together so their global norm is at most ``max_norm``.

    .. math::
        n = \bigl\lVert (\lVert g_i \rVert_p)_i \bigr\rVert_p,\qquad
        g_i \leftarrow g_i \cdot \min\Bigl(\frac{m}{n + 10^{-6}},\ 1\Bigr)

    Bit-identical to :func:`torch.nn.utils.clip_grad_norm_` when called alone
    (same grouping, same kernels, same clamped coefficient, no host sync).

    Args:
        max_norm: the bound ``m``, > 0.
        norm_type: the ``p`` of the p-norm, any p > 0 or ``math.inf``.

    Raises:
        TypeError: ``max_norm`` or ``norm_type`` is not a number (e.g. ``"fro"``).
        ValueError: ``max_norm`` or ``norm_type`` is not positive, or NaN.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> ClipByGlobalNorm(1.0)([p])
        tensor(5.)
        >>> p.grad
        tensor([0.6000, 0.8000])

    References:
        Pascanu, Mikolov and Bengio, *On the difficulty of training recurrent
        neural networks*, ICML 2013.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = _positive(max_norm, "max_norm")
        check_float(norm_type, "norm_type", min=0, min_open=True, allow_inf=True)
        self.norm_type = check_norm_type(norm_type)

    def _repr_args(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def measure(self, ctx: ClipContext) -> Tensor:
        """The ``norm_type``-norm of all gradients (the watch's L2 total for p = 2)."""
        return ctx.total if self.norm_type == 2.0 else ctx.total_norm(self.norm_type)

    def decide(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """torch's coefficient ``clamp(max_norm / (norm + 1e-6), max=1)``."""
        coef = torch.clamp(self.max_norm / (norm + _EPS_TORCH), max=1.0)
        return coef, _constant(self, self.max_norm, coef)


# AutoClip's histogram after the exact phase: log-spaced buckets [lo * g^j, lo * g^(j+1)) over
# [1e-20, 1e20); a bucket's representative 2 g / (1 + g) * lower is within (g - 1) / (g + 1) < 1e-3
# relative of every value in it.
_SKETCH_LO, _SKETCH_HI, _SKETCH_GAMMA = 1e-20, 1e20, 1.002
#: the relative error bound of AutoClip's percentile after the exact phase
SKETCH_RELATIVE_ERROR = (_SKETCH_GAMMA - 1) / (_SKETCH_GAMMA + 1)
_INT32_MAX = 2**31 - 1


class _Sketch:
    """Cumulative counts over fixed log-spaced buckets, in two levels: O(sqrt(buckets)) work per step.

    The ~46,000 buckets (one for [0, lo), the log buckets, one for [hi, inf))
    are cut into ``C`` blocks of ``F``. ``blocks[1 + j]`` counts the finite values
    in blocks 0..j (``blocks[0]`` = 0, the last entry a sentinel); row j of
    ``fine`` counts, cumulatively, the values of block j in its buckets 0..i
    (column 0 is a dummy 0, row ``C`` a sentinel). Inserting a value updates the
    ``C`` block counts and one row of ``F``; a rank is found with one binary
    search in the blocks and one in a row. NaN and inf are below no upper bound,
    so they are never counted.
    """

    F = 256

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        m = math.ceil(math.log(_SKETCH_HI / _SKETCH_LO) / math.log(_SKETCH_GAMMA))
        F = self.F
        C = -(-(m + 2) // F)
        f64 = {"dtype": torch.float64, "device": device}
        lowers = _SKETCH_LO * _SKETCH_GAMMA ** torch.arange(m, **f64)
        uppers = torch.full((C * F,), math.inf, **f64)
        uppers[0] = _SKETCH_LO
        uppers[1 : m + 1] = lowers * _SKETCH_GAMMA
        reps = torch.full((C * F,), float(lowers[-1]) * _SKETCH_GAMMA, **f64)  # [hi, inf) counts as hi
        reps[0] = 0.0  # [0, lo) counts as 0
        reps[1 : m + 1] = lowers * (2 * _SKETCH_GAMMA / (1 + _SKETCH_GAMMA))
        self.C = C
        self.uppers = uppers  # flat, for fill()
        self.block_uppers = uppers.view(C, F)[:, -1].contiguous()
        # one more row of -inf: a NaN or inf norm lands there and adds nothing
        self.fine_uppers = torch.cat([uppers.view(C, F), torch.full((1, F), -math.inf, **f64)])
        table = torch.zeros(C + 1, F + 1, **f64)
        table[:, 0] = math.inf  # the dummy column: an empty sketch's percentile is inf
        table[:C, 1:] = reps.view(C, F)
        self.table = table.reshape(-1).to(dtype)
        i32 = {"dtype": torch.int32, "device": device}
        self.blocks = torch.zeros(C + 2, **i32)
        self.blocks[-1] = _INT32_MAX
        self.fine = torch.zeros(C + 1, F + 1, **i32)
        self.fine[C, 1:] = _INT32_MAX
        self._mask = torch.zeros(1, F + 1, **i32)  # column 0 stays 0
        # views, made once
        self.inclusive = self.blocks[1:]
        self._block_counts = self.blocks[1:-1]
        self._mask_cols = self._mask[:, 1:]
        self.finite = self.blocks[C]  # the number of finite values recorded

    def counts(self) -> Tensor:
        """The flat cumulative counts per bucket (int64): the canonical, device-independent form."""
        C = self.C
        return (self.fine[:C, 1:] + self.blocks[:C].unsqueeze(1)).reshape(-1).to(torch.int64)

    def load(self, counts: Tensor) -> None:
        """Restore :meth:`counts`.

        Raises:
            ValueError: ``counts`` has another number of buckets.
        """
        C, F = self.C, self.F
        if counts.shape != (C * F,):
            raise ValueError(f"AutoClip state holds {counts.numel()} histogram buckets; this version uses {C * F}")
        flat = counts.to(device=self.blocks.device, dtype=torch.int64).view(C, F)
        ends = flat[:, -1]
        self.blocks[1 : C + 1] = ends.to(torch.int32)
        self.fine[:C, 1:] = (flat - self.blocks[:C].unsqueeze(1)).to(torch.int32)

    def fill(self, values: Tensor) -> None:
        """Count the finite ``values`` (a 1-D tensor; non-finite entries are ignored)."""
        v = torch.sort(torch.where(torch.isfinite(values), values, math.inf).to(torch.float64)).values
        finite = torch.searchsorted(v, math.inf)
        self.load(torch.minimum(torch.searchsorted(v, self.uppers), finite))

    def add(self, norm: Tensor) -> None:
        """Count ``norm``: the block counts above it, and its block's row."""
        self._block_counts.add_(self.block_uppers > norm)
        j = torch.searchsorted(self.block_uppers, norm, right=True)  # its block (C if NaN or inf)
        torch.gt(self.fine_uppers.index_select(0, j), norm, out=self._mask_cols)
        self.fine.index_add_(0, j, self._mask)

    def ranks(self, v: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """The representatives of the values of 0-based ranks ``floor(v)`` and ``floor(v) + 1``."""
        r = v + offsets
        j = torch.searchsorted(self.inclusive, r, right=True)  # the blocks holding the ranks
        within = r - torch.take(self.blocks, j)  # rank inside the block
        i = torch.searchsorted(self.fine.index_select(0, j), within.unsqueeze(1), right=True)
        return torch.take(self.table, torch.add(i.view(-1), j, alpha=self.F + 1)).unbind()


class AutoClip(GlobalClipper):
    r"""Clip the global norm to a percentile of all global norms seen so far.

    At step t, with :math:`n_t` the global L2 norm and :math:`H_t` the history
    including :math:`n_t`:

    .. math:: g \leftarrow g \cdot \min\Bigl(\frac{\operatorname{pct}_p(H_t)}{n_t + 10^{-6}},\ 1\Bigr)

    Non-finite norms are not added to the history (with ``window`` they still
    use up their slot). The cost of a step does not grow with the length of the
    run:

    * while fewer than :attr:`exact_limit` norms are recorded, and always with
      ``window``, the history is kept whole and the percentile is exactly
      ``numpy.percentile`` (linear interpolation) -- one sort of at most
      ``max(exact_limit, window)`` values per step;
    * after that (``window=None``), the norms are counted in a fixed histogram of
      log-spaced buckets, and the percentile is within a relative error of
      :data:`SKETCH_RELATIVE_ERROR` (< 1e-3) of numpy's for norms in
      [1e-20, 1e20) (smaller norms count as 0, larger ones as 1e20): one
      comparison over the ~23,000 buckets and a binary search per step, however
      long the run.

    Args:
        percentile: p in (0, 100]; 10 is the paper's set-and-forget default.
        window: keep only the last ``window`` norms (a ring buffer); None keeps all.

    Raises:
        TypeError: ``percentile`` is not a number or ``window`` not an integer (``3.0`` is rejected).
        ValueError: ``percentile`` outside (0, 100] or ``window`` < 1.

    Example:
        >>> clip = AutoClip(percentile=50.0)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for g in [1.0, 3.0, 100.0]:
        ...     p.grad = torch.tensor([g])
        ...     _ = clip([p])
        >>> p.grad  # 100 clipped to the median of [1, 3, 100]
        tensor([3.])

    References:
        Seetharaman, Wichern, Pardo and Le Roux, *AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks*, MLSP 2020, arXiv:2007.14469.
    """

    #: norms recorded exactly (sorted every step) before switching to the histogram (``window=None``)
    exact_limit: int = 1024

    def __init__(self, percentile: float = 10.0, window: int | None = None) -> None:
        self.percentile = check_float(percentile, "percentile", min=0, max=100, min_open=True)
        self.window = None if window is None else check_int(window, "window", min=1)
        self.reset()

    def _repr_args(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window}

    def reset(self) -> None:
        self._count = 0  # norms observed (host-known, so slot indexing needs no sync)
        self._key: tuple | None = None  # (device, dtype) of the device structures
        self._buf: Tensor | None = None  # exact phase: the history, non-finite as `_sentinel`
        self._slots: tuple[Tensor, ...] = ()
        self._sketch: _Sketch | None = None
        self._pending: dict[str, Any] | None = None  # a loaded state, placed on the first step

    # -- device structures ------------------------------------------------------------
    def _exact(self) -> bool:
        return self.window is not None or self._count < self.exact_limit

    def _ready(self, like: Tensor) -> None:
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        key = (like.device, dtype)
        if self._key == key:
            return
        state = self._pending if self._pending is not None else (self._export() if self._key else None)
        self._pending = None
        self._key = key
        f64 = {"dtype": torch.float64, "device": like.device}
        q = self.percentile / 100.0
        self._negq = torch.tensor(-q, **f64)
        self._offs = torch.tensor([0.0, 1.0], **f64)
        self._sentinel = torch.finfo(dtype).max
        self._buf, self._slots, self._sketch = None, (), None
        if state is not None and "counts" in state:
            self._sketch = _Sketch(like.device, dtype)
            self._sketch.load(state["counts"])
            return
        hist = None if state is None else state["history"].to(**f64)
        cap = self.window + 1 if self.window is not None else 256
        while self.window is None and hist is not None and cap <= hist.numel():
            cap *= 2
        self._alloc(min(cap, self.exact_limit + 1) if self.window is None else cap, hist)

    def _alloc(self, cap: int, hist: Tensor | None) -> None:
        assert self._key is not None
        device, dtype = self._key
        buf = torch.full((cap,), self._sentinel, dtype=dtype, device=device)
        if hist is not None and hist.numel():
            h = hist.to(device=device, dtype=torch.float64)
            buf[: h.numel()] = torch.where(torch.isfinite(h), h, self._sentinel).to(dtype)
        self._buf, self._slots = buf, buf.unbind()  # one view per slot, made once

    def _export(self) -> dict[str, Any]:
        """The history in device-independent form (non-finite entries as inf)."""
        if self._sketch is not None:
            return {"counts": self._sketch.counts()}
        if self._buf is None:
            return {"history": torch.empty(0, dtype=torch.float64)}
        used = min(self._count, self._buf.numel() - 1)
        h = self._buf[:used].to(torch.float64)
        return {"history": torch.where(h >= self._sentinel, math.inf, h)}

    # -- measure / decide -------------------------------------------------------------
    def _record(self, norm: Tensor) -> None:
        if not self._exact():
            assert self._sketch is not None
            self._sketch.add(norm)
            self._count += 1
            return
        assert self._buf is not None
        cap = self._buf.numel()
        if self.window is not None:
            slot = self._count % self.window
        else:
            slot = self._count
            if slot + 1 >= cap:  # keep one spare slot (the sentinel) past the last value
                size = (min(2 * cap, self.exact_limit + 1),)
                grown = torch.full(size, self._sentinel, dtype=self._buf.dtype, device=self._buf.device)
                grown[:cap] = self._buf
                self._buf, self._slots = grown, grown.unbind()
        torch.nan_to_num(norm.to(self._buf.dtype), nan=self._sentinel, posinf=self._sentinel, out=self._slots[slot])
        self._count += 1
        if self.window is None and self._count == self.exact_limit:  # switch to the histogram, once
            self._sketch = _Sketch(self._buf.device, self._buf.dtype)
            self._sketch.fill(torch.where(self._buf >= self._sentinel, math.inf, self._buf))
            self._buf, self._slots = None, ()

    def _percentile(self) -> Tensor:
        """numpy's linear percentile over the history (or the histogram): no host sync."""
        if self._sketch is not None:
            v = torch.add(self._negq, self._sketch.finite, alpha=self.percentile / 100.0)  # (n - 1) q, float64
            a, b = self._sketch.ranks(v, self._offs)  # ranks floor(v) and floor(v) + 1
        else:
            assert self._buf is not None
            srt = torch.sort(self._buf).values  # non-finite (the sentinel) and unused slots sort last
            n = torch.searchsorted(srt, self._sentinel)  # finite values
            v = torch.add(self._negq, n, alpha=self.percentile / 100.0)
            # ranks floor(v) and floor(v) + 1; the latter may be the sentinel, weighted by 0 then
            a, b = torch.take(srt, (v + self._offs).long()).unbind()
        gamma = torch.frac(v)
        return torch.lerp(a, b, gamma if gamma.dtype == a.dtype else gamma.to(a.dtype))

    def threshold(self) -> Tensor:
        """The current percentile of the history (``inf`` before any finite norm).

        Example:
            >>> clip = AutoClip(50.0)
            >>> for g in (1.0, 2.0, 4.0):
            ...     p = torch.nn.Parameter(torch.zeros(1)); p.grad = torch.tensor([g]); _ = clip([p])
            >>> clip.threshold()
            tensor(2.)
        """
        if self._key is None:
            if self._pending is None:
                return torch.tensor(math.inf)
            self._ready(torch.zeros((), dtype=torch.float32))
        thr = self._percentile()
        return torch.where(thr >= self._sentinel, math.inf, thr)

    def decide(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """Record ``norm``; the bound is the percentile of the history including it."""
        self._ready(norm)
        self._record(norm)
        thr = self._percentile()
        if thr.dtype != norm.dtype:
            thr = thr.to(norm.dtype)
        coef = torch.clamp(thr / (norm + _EPS_TORCH), max=1.0)
        return coef, thr

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``count``, the ``window`` and the ``history`` (exact phase) or the histogram ``counts``."""
        if self._pending is not None:
            body = dict(self._pending)
        elif self._key is None:
            body = {"history": torch.empty(0, dtype=torch.float64)}
        else:
            body = self._export()
        return {"type": "AutoClip", "window": self.window, "count": self._count, **body}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly.

        Raises:
            ValueError: the state comes from another clipper class, another
                ``window``, or is malformed.
        """
        self._check_state(state, ("count", "history", "counts"), window=self.window)
        count = state.get("count", 0)
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"AutoClip state 'count' must be an integer >= 0, got {count!r}")
        body: dict[str, Any]
        if "counts" in state:
            if self.window is not None or count < self.exact_limit:
                raise ValueError("AutoClip state holds a histogram, but this AutoClip keeps its history exactly")
            body = {"counts": torch.as_tensor(state["counts"]).to(torch.int64)}
        else:
            hist = torch.as_tensor(state.get("history", torch.empty(0)), dtype=torch.float64).reshape(-1)
            expected = min(count, self.window) if self.window is not None else count
            if hist.numel() != expected:
                raise ValueError(f"AutoClip state has {hist.numel()} history entries for count={count}")
            if self.window is None and count >= self.exact_limit:
                sk = _Sketch(hist.device, torch.float64)
                sk.fill(hist)
                body = {"counts": sk.counts()}
            else:
                body = {"history": hist.clone()}
        self.reset()
        self._count = count
        self._pending = body


class ZClip(GlobalClipper):
    r"""Clip global-norm spikes by their z-score against an EMA of past norms.

    After ``warmup_steps`` finite norms initialise the mean :math:`\mu` and
    variance :math:`\sigma^2` (population statistics), each step computes
    :math:`z = (n - \mu) / (\sigma + \epsilon)`; when :math:`z > z_t` the norm is
    clipped to

    .. math:: n_c = \mu + \frac{z_t^2\,\sigma}{z}

    (the farther the outlier, the harder the clip), and the EMA is updated with
    the clipped norm: :math:`\mu \leftarrow \alpha\mu + (1-\alpha) n_c`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(n_c - \mu)^2` (with the
    updated :math:`\mu`). Non-finite norms leave the statistics untouched. The
    optional ``max_norm`` adds a hard cap (also during warm-up); it is off by
    default, unlike the reference package's 1.0.

    The warm-up statistics are accumulated with Welford's update (equal to the
    population mean and variance of the first ``warmup_steps`` finite norms), so
    one table row indexed by the count of finite norms turns the same few
    operations into either the warm-up or the EMA update: no host sync and no
    buffer of warm-up norms. The statistics are kept in the dtype of the norms.

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is clipped, > 0.
        warmup_steps: number of finite norms that initialise the statistics, >= 1.
        max_norm: optional hard cap on the global norm.
        eps: added to :math:`\sigma` in the z-score, >= 0.

    Raises:
        TypeError: an argument of the wrong type (``warmup_steps=3.0`` included).
        ValueError: an argument is outside its range, infinite or NaN.

    Example:
        >>> clip = ZClip(warmup_steps=5)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:
        ...     p.grad = torch.tensor([g])
        ...     _ = clip([p])
        >>> bool(p.grad < 2.0)  # the spike of 50 was clipped
        True

    References:
        Kumar, Owen, Chowdhury and Güra, *ZClip: Adaptive Spike Mitigation for
        LLM Pre-Training*, 2025, arXiv:2504.02507 (reference package ``zclip``).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        self.alpha = check_float(alpha, "alpha", min=0, max=1, min_open=True, max_open=True)
        self.z_thresh = _positive(z_thresh, "z_thresh")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", min=1)
        self.max_norm = None if max_norm is None else _positive(max_norm, "max_norm")
        self.eps = check_float(eps, "eps", min=0)
        self.reset()

    def _repr_args(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }

    def reset(self) -> None:
        self._stats: Tensor | None = None  # [mean, var, finite norms seen (saturating at warmup_steps)]
        self._table: Tensor | None = None  # rebuilt (with the views below) whenever _stats is replaced

    def _rows(self, like: Tensor) -> Tensor:
        """``[W + 1, 3, 3]``: per count k of finite norms, the factors a, b and the z bound.

        new stats = stats * a + b * (d, d^2, 1), with d the (clipped) norm minus the
        mean: Welford for k < W (w = 1 / (k + 1)), the EMA for k = W.
        """
        W, al = self.warmup_steps, self.alpha
        rows = []
        for k in range(W):
            w = 1.0 / (k + 1)
            rows.append([[1.0, 1.0 - w, 1.0], [w, w * (1.0 - w), 1.0], [math.inf] * 3])
        rows.append([[1.0, al, 1.0], [1.0 - al, (1.0 - al) * al * al, 0.0], [self.z_thresh] * 3])
        return torch.tensor(rows, dtype=like.dtype, device=like.device)

    def _ready(self, like: Tensor) -> tuple[Tensor, Tensor]:
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        st = self._stats
        if st is not None and st.dtype == dtype and st.device == like.device and self._table is not None:
            return st, self._table
        if st is None:
            st = torch.zeros(3, dtype=dtype, device=like.device)
        self._stats = st = st.to(dtype=dtype, device=like.device)
        self._seen, self._row = st[2:], st.view(1, 3)  # views, made once
        self._table = self._rows(st)
        self._powers = torch.tensor([1.0, 2.0, 0.0], dtype=dtype, device=like.device)
        return st, self._table

    def decide(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """z-score the norm, bound a spike, update the statistics (warm-up or EMA) with the clipped norm."""
        st, table = self._ready(norm)
        g = norm if norm.dtype == st.dtype else norm.to(st.dtype)
        mean, var, _ = st.unbind()
        # the row of the count of finite norms seen: [1, 3] each; zmax = inf during warm-up (no spike)
        a, b, zmax = table.index_select(0, self._seen.long()).unbind(1)
        std = var.sqrt()
        z = (g - mean) / (std + self.eps)
        bound = torch.where(z > zmax, torch.addcdiv(mean, std, z, value=self.z_thresh**2), _constant(self, math.inf, g))
        d = torch.minimum(g, bound) - mean  # the clipped norm minus the mean
        row = self._row  # the statistics as [1, 3], the shape of the table's rows
        new = torch.addcmul(row * a, b, d.pow(self._powers))
        torch.where(g < math.inf, new, row, out=row)  # a non-finite norm leaves the statistics untouched
        thr = bound.amin()  # [1, 3] copies of the bound -> 0-d
        if self.max_norm is not None:
            thr = thr.clamp(max=self.max_norm)
        # fmin: a NaN ratio (a NaN norm, or an infinite one with no bound yet) leaves the gradients as they are
        coef = torch.fmin(thr / (g + _EPS_TORCH), _constant(self, 1.0, g))
        if coef.dtype != norm.dtype:
            coef, thr = coef.to(norm.dtype), thr.to(norm.dtype)
        return coef, thr

    def state_dict(self) -> dict[str, Any]:
        """``warmup_steps`` and ``stats`` = [mean, var, finite norms seen] (absent before the first step)."""
        out: dict[str, Any] = {"type": "ZClip", "warmup_steps": self.warmup_steps}
        if self._stats is not None:
            out["stats"] = self._stats.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly.

        Raises:
            ValueError: the state comes from another clipper class or another
                ``warmup_steps``, or is malformed.
        """
        self._check_state(state, ("stats",), warmup_steps=self.warmup_steps)
        stats = state.get("stats")
        if stats is not None:
            stats = torch.as_tensor(stats)
            if stats.shape != (3,) or not stats.is_floating_point():
                raise ValueError(f"ZClip state 'stats' must be a float tensor of shape [3], got {tuple(stats.shape)}")
        self.reset()
        self._stats = None if stats is None else stats.clone()

    @property
    def mean(self) -> Tensor | None:
        """The EMA mean of the global norm (None before the first step)."""
        return None if self._stats is None else self._stats[0]

    @property
    def var(self) -> Tensor | None:
        """The EMA variance of the global norm (None before the first step)."""
        return None if self._stats is None else self._stats[1]


@dataclass
class _Piece:
    """Parameters whose unit norms come from one reduction: ``kind`` is vec, cat or big."""

    kind: str
    indices: list[int]
    rows: list[int]  # units per parameter
    ndim: int
    device: torch.device
    acc: torch.dtype | None


class AGC(Clipper):
    r"""Adaptive gradient clipping, unit-wise (Brock et al., 2021).

    For each unit i (a row, i.e. an output unit, of a weight of ndim >= 2; the
    whole tensor for biases and scalars):

    .. math::
        \text{if } \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda:\quad
        G_i \leftarrow \lambda \frac{\max(\lVert W_i \rVert, \epsilon)}{\max(\lVert G_i \rVert, 10^{-6})} G_i

    The same as timm's ``adaptive_clip_grad``. The unit norms of all
    parameters are computed in a few batched operations -- weights of the same
    trailing shape are concatenated, biases and scalars go through one
    ``torch._foreach_norm`` -- and all gradients are scaled by one
    ``torch._foreach_mul_``, so the operations per step grow with the number of
    distinct trailing shapes, not with the number of parameters. Tensors of
    :attr:`batch_numel` elements or more are reduced in place instead of being
    copied. The paper does not clip the final classifier: name it in
    ``exclude``. Zero-element parameters are left alone; sparse gradients raise
    ``NotImplementedError`` naming the parameter.

    Args:
        clipping: the ratio bound :math:`\lambda` (0.01 suits large batches), > 0.
        eps: the floor :math:`\epsilon` of the weight norm, > 0.
        exclude: parameter names or glob patterns (``"fc.*"``) left unclipped;
            each must match a parameter.

    Raises:
        TypeError: ``exclude`` is not a string or a list of strings (None included).
        ValueError: non-positive ``clipping``/``eps``, or an ``exclude`` entry
            matching no parameter (or given without parameter names).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> lin.weight.grad = torch.ones(2, 2); lin.bias.grad = torch.ones(2)
        >>> _ = AGC(clipping=0.01, exclude=["bias"])(lin)
        >>> bool(lin.weight.grad.abs().max() < 0.1), lin.bias.grad
        (True, tensor([1., 1.]))

    References:
        Brock, De, Smith and Simonyan, *High-Performance Large-Scale Image
        Recognition Without Normalization*, ICML 2021, arXiv:2102.06171.
    """

    #: tensors with at least this many elements are reduced in place (one operation each)
    #: instead of being concatenated with the others of their trailing shape
    batch_numel: int = 1 << 16

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Iterable[str] | str = ()) -> None:
        self.clipping = _positive(clipping, "clipping")
        self.eps = _positive(eps, "eps")
        self.exclude = check_names(exclude, "exclude")
        self._mask: list[bool] | None = None
        self._plans: dict[tuple, list[_Piece]] = {}

    def _repr_args(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def bind(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """Resolve ``exclude`` against the parameter names."""
        excluded = [False] * len(names)
        for pattern in self.exclude:
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"exclude entry {pattern!r} matches no parameter name; names are "
                    f"{list(names)[:8]}{' ...' if len(names) > 8 else ''} (pass an nn.Module "
                    "or (name, parameter) pairs so AGC can see the names)"
                )
            for i in hits:
                excluded[i] = True
        self._mask = excluded
        self._plans = {}

    def _plan(self, ctx: ClipContext) -> list[_Piece]:
        """The batched reductions for this pattern of present gradients (cached)."""
        key = tuple(None if g is None else (g.dtype, g.device, g.layout) for g in ctx.grads)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        assert self._mask is not None
        _reject(ctx, self)
        vec: dict[tuple, list[int]] = {}
        cat: dict[tuple, list[int]] = {}
        big: list[int] = []
        for i, (p, g) in enumerate(zip(ctx.params, ctx.grads)):
            if g is None or self._mask[i] or g.numel() == 0:
                continue
            if g.shape != p.shape:
                raise ValueError(f"AGC: gradient of {ctx.names[i]!r} has shape {tuple(g.shape)}, not {tuple(p.shape)}")
            if g.ndim <= 1:
                vec.setdefault((g.device, g.dtype, p.dtype), []).append(i)
            elif g.numel() >= self.batch_numel:
                big.append(i)
            else:
                cat.setdefault((g.device, g.dtype, p.dtype, g.ndim, tuple(g.shape[1:])), []).append(i)
        plan = []
        for (device, gdt, pdt), idx in vec.items():
            plan.append(_Piece("vec", idx, [1] * len(idx), 1, device, _accumulate(gdt) or _accumulate(pdt)))
        for (device, gdt, pdt, ndim, _), idx in cat.items():
            rows = [ctx.grads[i].shape[0] for i in idx]  # type: ignore[union-attr]
            plan.append(_Piece("cat", idx, rows, ndim, device, _accumulate(gdt) or _accumulate(pdt)))
        for i in big:
            g = ctx.grads[i]
            assert g is not None
            plan.append(_Piece("big", [i], [g.shape[0]], g.ndim, g.device, _accumulate(g.dtype)))
        self._plans[key] = plan
        return plan

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clip every unit; batched over parameters."""
        if self._mask is None or len(self._mask) != len(ctx.params):
            self.bind(ctx.names, ctx.params)
        total = ctx.total  # before the gradients change
        if any(g is not None and is_dtensor(g) for g in ctx.grads):
            return self._clip_sharded(ctx, total)
        plan = self._plan(ctx)
        nan = _constant(self, math.nan, total)
        if not plan:
            return ctx.result(total, nan, lambda: ctx.norms)
        home = total.device
        pieces = []  # [2, units]: weight norms, gradient norms
        for pc in plan:
            ps = [ctx.params[i] for i in pc.indices]
            gs: list[Tensor] = [ctx.grads[i] for i in pc.indices]  # type: ignore[misc]
            if pc.kind == "vec":
                u = torch.stack(torch._foreach_norm(ps + gs, 2, dtype=pc.acc))
            elif pc.kind == "cat":
                u = torch.linalg.vector_norm(torch.cat(ps + gs), dim=tuple(range(1, pc.ndim)), dtype=pc.acc)
            else:
                dims = tuple(range(1, pc.ndim))
                u = torch.cat(
                    [
                        torch.linalg.vector_norm(ps[0], dim=dims, dtype=pc.acc),
                        torch.linalg.vector_norm(gs[0], dim=dims, dtype=pc.acc),
                    ]
                )
            pieces.append((u if u.device == home else u.to(home)).view(2, -1))
        w_norm, g_norm = (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]).unbind()
        floor = torch.clamp(w_norm, min=self.eps)
        if self.eps * self.clipping >= _EPS_TORCH:  # then the ratio is >= 1 whenever the unit is within bounds
            factor = torch.clamp(
                torch.addcdiv(_constant(self, 0.0, g_norm, ()), floor, g_norm.clamp(min=1e-6), value=self.clipping),
                max=1.0,
            )
        else:
            limit = floor * self.clipping
            factor = torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), 1.0)
        # one factor view per gradient, shaped to broadcast over its units; one fused multiply
        chunks = factor.split([sum(pc.rows) for pc in plan]) if len(plan) > 1 else (factor,)
        grads: list[Tensor] = []
        views: list[Tensor] = []
        for pc, f in zip(plan, chunks):
            f = f if f.device == pc.device else f.to(pc.device)
            grads.extend(ctx.grads[i] for i in pc.indices)  # type: ignore[misc]
            if pc.kind == "vec":
                views.extend(f.unbind())
            else:
                shaped = f.view((-1,) + (1,) * (pc.ndim - 1))
                views.extend(shaped.split(pc.rows) if pc.kind == "cat" else (shaped,))
        torch._foreach_mul_(grads, views)
        return ctx.result(total, nan, lambda: _measure_after(ctx))

    def _clip_sharded(self, ctx: ClipContext, total: Tensor) -> ClipResult:
        """DTensor gradients: each unit's full norm from the local rows (:func:`gradwatch.distributed.row_norms`:
        local for ``Shard(0)``, reduced across the mesh for ``Shard(1)``), the local rows scaled in place."""
        assert self._mask is not None
        idx = [i for i, g in enumerate(ctx.grads) if g is not None and not self._mask[i] and g.numel() > 0]
        nan = _constant(self, math.nan, total)
        if not idx:
            return ctx.result(total, nan, lambda: ctx.norms)
        units = row_norms([ctx.params[i].detach() for i in idx] + [ctx.grads[i] for i in idx])  # type: ignore[misc]
        for k, i in enumerate(idx):
            w_norm, g_norm = units[k], units[len(idx) + k]
            limit = w_norm.clamp(min=self.eps) * self.clipping
            factor = torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), 1.0)
            g = local_tensor(ctx.grads[i])  # type: ignore[arg-type]
            g.mul_(factor.reshape(factor.shape + (1,) * (g.ndim - factor.ndim)).to(g.dtype))
        return ctx.result(total, nan, lambda: _measure_after(ctx))


class Chain(Clipper):
    """Apply several clippers in order, each seeing the previous one's output.

    A hard cap before an adaptive clipper protects the first steps, before the
    adaptive clipper's statistics exist: ``Chain(ClipByGlobalNorm(10.0), AutoClip())``.
    The recorded threshold is the smallest of the clippers' thresholds (NaN if
    none has a global bound).

    Args:
        *clippers: the clippers, applied left to right.

    Raises:
        TypeError: an argument is not a :class:`Clipper`.
        ValueError: no clipper given.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1)); p.grad = torch.tensor([8.0])
        >>> Chain(ClipByValue(4.0), ClipByGlobalNorm(2.0))([p])
        tensor(8.)
        >>> p.grad
        tensor([2.0000])
    """

    def __init__(self, *clippers: Clipper) -> None:
        if not clippers:
            raise ValueError("Chain needs at least one clipper")
        for i, c in enumerate(clippers):
            if not isinstance(c, Clipper):
                raise TypeError(f"Chain argument {i} must be a gradwatch Clipper, got {type(c).__name__}")
        self.clippers = tuple(clippers)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.clippers))})"

    def bind(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """Bind every clipper of the chain."""
        for c in self.clippers:
            c.bind(names, params)

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Run the clippers in order."""
        first: ClipResult | None = None
        res: ClipResult | None = None
        thr: Tensor | None = None
        for c in self.clippers:
            res = c.clip_(ctx if res is None else ctx.with_norms(res.norms, res.total))
            first = first or res
            if ctx.measured:
                assert res.threshold is not None
                thr = res.threshold if thr is None else torch.fmin(thr, res.threshold)  # NaN = no bound
        assert res is not None and first is not None
        if not ctx.measured:
            return ClipResult(None, None, None, None, first.norm)
        assert res.total is not None and thr is not None
        coef = torch.nan_to_num(res.total / ctx.total.to(res.total), nan=1.0, posinf=math.inf)
        return ClipResult(res.norms, res.total, coef, thr, first.norm)

    def state_dict(self) -> dict[str, Any]:
        """The state of each clipper, keyed by position."""
        return {"type": "Chain", **{str(i): c.state_dict() for i, c in enumerate(self.clippers)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state holds another number of clippers, or one of
                them does not match.
        """
        saved = [k for k in state if k != "type"] if isinstance(state, dict) else []
        if saved and sorted(saved) != sorted(str(i) for i in range(len(self.clippers))):
            raise ValueError(
                f"state was saved by a Chain of {len(saved)} clippers; this Chain has {len(self.clippers)}"
            )
        self._check_state(state, [str(i) for i in range(len(self.clippers))])
        for i, c in enumerate(self.clippers):
            c.load_state_dict(state.get(str(i), {}))

    def reset(self) -> None:
        """Reset every clipper of the chain."""
        for c in self.clippers:
            c.reset()
