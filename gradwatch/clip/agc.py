"""AGC: adaptive gradient clipping, unit-wise, batched over parameters."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradwatch._compat import flatten_cat, foreach_mul_, foreach_norm
from gradwatch._params import Binding
from gradwatch._validate import check_names, check_positive, match_names
from gradwatch.clip.base import (
    _EPS_TORCH,
    ClipContext,
    Clipper,
    ClipResult,
    _measure_after,
    _reject,
)
from gradwatch.distributed import is_dtensor, local_tensor, row_norms
from gradwatch.norms import accumulation_dtype

__all__ = ["AGC"]

#: devices with the one-buffer path's kernels (``_chunk_cat``, ``segment_reduce``); others use the per-shape path
_FLAT = ("cpu", "cuda")


@dataclass
class _Piece:
    """Parameters whose unit norms come from one reduction: ``kind`` is flat, vec, cat or big.

    ``flat``: every small real-floating parameter of one device and dtype, its
    weights and gradients copied into one buffer (one op) and reduced per unit
    with one ``segment_reduce``, whatever their shapes; ``layout`` then holds,
    per ndim in order, ``(ndim, units per parameter)``, ``lengths`` the
    elements per unit (weights, then gradients) and ``floor`` the squared
    floors ``[eps**2] * units + [1e-12] * units``.
    """

    kind: str
    indices: list[int]
    rows: list[int]  # units per parameter
    ndim: int
    device: torch.device
    acc: torch.dtype | None
    layout: list[tuple[int, list[int]]] = field(default_factory=list)
    lengths: Tensor | None = None
    floor: Tensor | None = None


class AGC(Clipper):
    r"""Adaptive gradient clipping, unit-wise (Brock et al., 2021).

    For each unit i (a row, i.e. an output unit, of a weight of ndim >= 2; the
    whole tensor for biases and scalars):

    .. math::
        \text{if } \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda:\quad
        G_i \leftarrow \lambda \frac{\max(\lVert W_i \rVert, \epsilon)}{\max(\lVert G_i \rVert, 10^{-6})} G_i

    The same as timm's ``adaptive_clip_grad``. The unit norms of all
    parameters are computed in a few batched operations: the weights and
    gradients of every real floating-point parameter of one device and dtype
    are copied into one buffer (one op, whatever their shapes) and summed per
    unit by one ``torch.segment_reduce``; all gradients are then scaled by one
    ``torch._foreach_mul_``. So the operations per step do not grow with the
    number of parameters nor with the number of distinct shapes (only with the
    number of distinct ``ndim``, for the views that broadcast each factor).
    Tensors of :attr:`batch_numel` elements or more are reduced in place
    instead of being copied (one reduction each), and parameters whose
    gradient has another dtype, complex ones and scalars go through the
    per-shape path (``torch._foreach_norm`` for vectors, one concatenation per
    trailing shape). The squared unit norms of the one-buffer path are
    accumulated in float32 (float64 for float64 parameters). The paper does not clip the final classifier: name it in
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
        self.clipping = check_positive(clipping, "clipping")
        self.eps = check_positive(eps, "eps")
        self.exclude = check_names(exclude, "exclude")
        self._mask: list[bool] | None = None
        self._plans: dict[tuple, list[_Piece]] = {}

    def _repr_args(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def bind(self, binding: Binding) -> None:
        """Resolve ``exclude`` against the parameter names."""
        hint = " (pass an nn.Module or (name, parameter) pairs so AGC can see the names)"
        hits = set(match_names(self.exclude, binding.names, "exclude", hint))
        self._mask = [i in hits for i in range(len(binding.names))]
        self._plans = {}

    def _plan(self, ctx: ClipContext) -> list[_Piece]:
        """The batched reductions for this pattern of present gradients (cached)."""
        key = tuple(None if g is None else (g.dtype, g.device, g.layout) for g in ctx.grads)
        plan = self._plans.get(key)
        if plan is None:
            assert self._mask is not None
            _reject(ctx, self)
            plan = self._plans[key] = self._make_plan(ctx, self._mask)
        return plan

    def _make_plan(self, ctx: ClipContext, mask: list[bool]) -> list[_Piece]:
        flat: dict[tuple, list[int]] = {}
        vec: dict[tuple, list[int]] = {}
        cat: dict[tuple, list[int]] = {}
        big: list[int] = []
        for i, (p, g) in enumerate(zip(ctx.params, ctx.grads)):
            if g is None or mask[i] or g.numel() == 0:
                continue
            if g.shape != p.shape:
                raise ValueError(f"AGC: gradient of {ctx.names[i]!r} has shape {tuple(g.shape)}, not {tuple(p.shape)}")
            if g.numel() >= self.batch_numel and g.ndim > 1:
                big.append(i)
            elif g.ndim >= 1 and g.dtype == p.dtype and g.dtype.is_floating_point and g.device.type in _FLAT:
                flat.setdefault((g.device, g.dtype), []).append(i)
            elif g.ndim <= 1:
                vec.setdefault((g.device, g.dtype, p.dtype), []).append(i)
            else:
                cat.setdefault((g.device, g.dtype, p.dtype, g.ndim, tuple(g.shape[1:])), []).append(i)
        plan = [self._flat_piece(ctx, idx, device, dt) for (device, dt), idx in flat.items()]
        acc = accumulation_dtype
        for (device, gdt, pdt), idx in vec.items():
            plan.append(_Piece("vec", idx, [1] * len(idx), 1, device, acc(gdt) or acc(pdt)))
        for (device, gdt, pdt, ndim, _), idx in cat.items():
            rows = [ctx.grads[i].shape[0] for i in idx]  # type: ignore[union-attr]
            plan.append(_Piece("cat", idx, rows, ndim, device, acc(gdt) or acc(pdt)))
        for i in big:
            g = ctx.grads[i]
            assert g is not None
            plan.append(_Piece("big", [i], [g.shape[0]], g.ndim, g.device, accumulation_dtype(g.dtype)))
        return plan

    def _flat_piece(self, ctx: ClipContext, idx: list[int], device: torch.device, dtype: torch.dtype) -> _Piece:
        """One buffer for all of ``idx`` (ordered by ndim); units: rows, or the whole tensor for ndim 1."""
        idx = sorted(idx, key=lambda i: ctx.params[i].ndim)
        layout: list[tuple[int, list[int]]] = []
        for i in idx:
            p = ctx.params[i]
            if not layout or layout[-1][0] != p.ndim:
                layout.append((p.ndim, []))
            layout[-1][1].append(1 if p.ndim == 1 else p.shape[0])
        rows = [r for _, rs in layout for r in rs]
        per_unit = [ctx.params[i].numel() // r for i, r in zip(idx, rows) for _ in range(r)]
        units = len(per_unit)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        lengths = torch.tensor([per_unit * 2], dtype=torch.int64, device=device)
        floor = torch.tensor([[self.eps**2] * units + [1e-12] * units], dtype=acc, device=device)
        return _Piece("flat", idx, rows, 0, device, None if acc == dtype else acc, layout, lengths, floor)

    @staticmethod
    def _squares(ctx: ClipContext, pc: _Piece) -> Tensor:
        """``[1, 2 * units]``: the squared unit norms of the weights, then of the gradients, of a flat piece."""
        flat = flatten_cat([ctx.params[i] for i in pc.indices] + [ctx.grads[i] for i in pc.indices])  # type: ignore[misc]
        if pc.acc is not None:
            flat = flat.to(pc.acc)
        return torch.segment_reduce(flat * flat, "sum", lengths=pc.lengths, axis=1)

    def _norms(self, ctx: ClipContext, pc: _Piece) -> Tensor:
        """``[2, units]``: the weight and gradient norms of the units of one piece."""
        ps = [ctx.params[i] for i in pc.indices]
        gs: list[Tensor] = [ctx.grads[i] for i in pc.indices]  # type: ignore[misc]
        if pc.kind == "flat":
            return self._squares(ctx, pc).sqrt()
        if pc.kind == "vec":
            return torch.stack(foreach_norm(ps + gs, 2, dtype=pc.acc))
        dims = tuple(range(1, pc.ndim))
        if pc.kind == "cat":
            return torch.linalg.vector_norm(torch.cat(ps + gs), dim=dims, dtype=pc.acc)
        return torch.cat([torch.linalg.vector_norm(t, dim=dims, dtype=pc.acc) for t in (ps[0], gs[0])])

    def _factor(self, ctx: ClipContext, plan: list[_Piece], home: torch.device) -> Tensor:
        """The factor of every unit, in plan order."""
        if len(plan) == 1 and plan[0].kind == "flat" and self.eps * self.clipping >= _EPS_TORCH:
            # min(lambda max(|W|, eps) / max(|G|, 1e-6), 1) from the squared norms: no sqrt before the ratio
            sw, sg = self._squares(ctx, plan[0]).clamp(min=plan[0].floor).split(sum(plan[0].rows), dim=1)
            ratio = torch.addcdiv(self._constant(0.0, sw, ()), sw, sg, value=self.clipping**2)
            return ratio.clamp_(max=1.0).sqrt_()
        pieces = [u if u.device == home else u.to(home) for u in (self._norms(ctx, pc) for pc in plan)]
        w_norm, g_norm = (
            torch.cat([u.view(2, -1) for u in pieces], dim=1).unbind()
            if len(pieces) > 1
            else (pieces[0].view(2, -1).unbind())
        )
        floor = torch.clamp(w_norm, min=self.eps)
        if self.eps * self.clipping >= _EPS_TORCH:  # then the ratio is >= 1 whenever the unit is within bounds
            ratio = torch.addcdiv(self._constant(0.0, g_norm, ()), floor, g_norm.clamp(min=1e-6), value=self.clipping)
            return torch.clamp(ratio, max=1.0)
        limit = floor * self.clipping
        return torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), 1.0)

    @staticmethod
    def _views(pc: _Piece, f: Tensor) -> list[Tensor]:
        """One factor view per gradient of ``pc``, shaped to broadcast over its units."""
        if pc.kind == "vec":
            return list(f.unbind(-1))
        if pc.kind != "flat":
            shaped = f.view((-1,) + (1,) * (pc.ndim - 1))
            return list(shaped.split(pc.rows) if pc.kind == "cat" else (shaped,))
        out: list[Tensor] = []
        chunks = f.split([sum(rs) for _, rs in pc.layout], dim=-1) if len(pc.layout) > 1 else (f,)
        for (ndim, rs), chunk in zip(pc.layout, chunks):
            if ndim == 1:
                out.extend(chunk.unbind(-1))
            else:
                shaped = chunk.view((-1,) + (1,) * (ndim - 1))
                out.extend(shaped.split(rs) if len(rs) > 1 else (shaped,))
        return out

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Clip every unit; batched over parameters."""
        if self._mask is None or len(self._mask) != len(ctx.params):
            self.bind(Binding.of(ctx.names, ctx.params))
        total = ctx.total  # before the gradients change
        if any(g is not None and is_dtensor(g) for g in ctx.grads):
            return self._clip_sharded(ctx, total)
        plan = self._plan(ctx)
        nan = self._constant(math.nan, total)
        if not plan:
            return ctx.result(total, nan, lambda: ctx.norms)
        factor = self._factor(ctx, plan, total.device)
        chunks = factor.split([sum(pc.rows) for pc in plan], dim=-1) if len(plan) > 1 else (factor,)
        grads: list[Tensor] = []
        views: list[Tensor] = []
        for pc, f in zip(plan, chunks):
            grads.extend(ctx.grads[i] for i in pc.indices)  # type: ignore[misc]
            views.extend(self._views(pc, f if f.device == pc.device else f.to(pc.device)))
        foreach_mul_(grads, views)  # one fused multiply
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
