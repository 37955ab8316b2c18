"""The stateless clippers: by value, by per-tensor norm, by global norm."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._compat import foreach_clamp_, foreach_mul_
from gradwatch._validate import check_float, check_positive
from gradwatch.clip.base import (
    _EPS_TORCH,
    ClipContext,
    Clipper,
    ClipResult,
    GlobalClipper,
    _measure_after,
    _reject,
)
from gradwatch.norms import check_norm_type

__all__ = ["ClipByGlobalNorm", "ClipByNorm", "ClipByValue"]


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
        self.clip_value = check_positive(clip_value, "clip_value")

    def _repr_args(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clamp every element; the post-clip norms are measured again."""
        _reject(ctx, self, complex_ok=False)
        total = ctx.total  # before the gradients change
        for _, (grads, _) in ctx.groups.items():
            foreach_clamp_(grads, -self.clip_value, self.clip_value)
        return ctx.result(total, self._constant(math.nan, total), lambda: _measure_after(ctx))


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
        self.clip_norm = check_positive(clip_norm, "clip_norm")
        self._index: dict[tuple, Tensor] = {}

    def _repr_args(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Scale each gradient by its own factor ``c / max(norm, c)``."""
        norms = ctx.norms
        total = ctx.total  # before the gradients change
        c = self._constant(self.clip_norm, norms)
        factors = c / torch.maximum(norms, c)  # a true division: exactly 1 below the bound
        groups = ctx.groups
        if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(ctx.grads):
            ((device, _), (grads, _)) = next(iter(groups.items()))  # one group, no missing grads
            foreach_mul_(grads, factors.to(device).unbind())
        else:
            for (device, _), (grads, positions) in groups.items():
                key = (factors.device, tuple(positions))
                if key not in self._index:
                    self._index[key] = torch.tensor(positions, device=factors.device)
                foreach_mul_(grads, factors.index_select(0, self._index[key]).to(device).unbind())
        return ctx.result(total, self._constant(self.clip_norm, total), lambda: norms * factors)


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
        self.max_norm = check_positive(max_norm, "max_norm")
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
        return coef, self._constant(self.max_norm, coef)
