"""AGC: adaptive gradient clipping, unit-wise, batched over parameters."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch._compat import foreach_norm
from gradwatch._validate import check_names
from gradwatch.clip.base import (
    _EPS_TORCH,
    ClipContext,
    Clipper,
    ClipResult,
    _accumulate,
    _measure_after,
    _positive,
    _reject,
)
from gradwatch.distributed import is_dtensor, local_tensor, row_norms

__all__ = ["AGC"]


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
        nan = self._constant(math.nan, total)
        if not plan:
            return ctx.result(total, nan, lambda: ctx.norms)
        home = total.device
        pieces = []  # [2, units]: weight norms, gradient norms
        for pc in plan:
            ps = [ctx.params[i] for i in pc.indices]
            gs: list[Tensor] = [ctx.grads[i] for i in pc.indices]  # type: ignore[misc]
            if pc.kind == "vec":
                u = torch.stack(foreach_norm(ps + gs, 2, dtype=pc.acc))
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
                torch.addcdiv(self._constant(0.0, g_norm, ()), floor, g_norm.clamp(min=1e-6), value=self.clipping),
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
        nan = self._constant(math.nan, total)
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
