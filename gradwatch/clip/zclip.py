"""ZClip: global-norm spikes clipped by their z-score against an EMA of past norms."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._validate import check_float, check_int, check_positive
from gradwatch.clip.base import _EPS_TORCH, GlobalClipper

__all__ = ["ZClip"]


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
    optional ``max_norm`` adds a hard cap, as the reference package's
    ``max_grad_norm`` does: during warm-up every step is
    ``clip_grad_norm_(max_norm)``; after it the norm is scaled by
    :math:`\min(n_c, m) / (n + 10^{-6})` only when it is above
    :math:`\min(n_c, m)` (a norm exactly at the cap is left as it is). It is
    off by default, unlike the reference package's 1.0.

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
        self.z_thresh = check_positive(z_thresh, "z_thresh")
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", min=1)
        self.max_norm = None if max_norm is None else check_positive(max_norm, "max_norm")
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
        # views, made once: no view op per step
        self._mean, self._var, self._seen = st[0], st[1], st[2:]
        self._row = st.view(1, 3)
        self._table = self._rows(st)
        self._powers = torch.tensor([1.0, 2.0, 0.0], dtype=dtype, device=like.device)
        return st, self._table

    def decide(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """z-score the norm, bound a spike, update the statistics (warm-up or EMA) with the clipped norm.

        One small program over the stacked statistics ``[mean, var, count]``:
        the count's table row gives the update factors and the z bound, one
        ``addcmul`` updates all three statistics and one ``where`` keeps them
        when the norm is not finite.
        """
        _, table = self._ready(norm)
        g = norm if norm.dtype == self._row.dtype else norm.to(self._row.dtype)
        mean, row = self._mean, self._row
        # the row of the count of finite norms seen: [1, 3] each; zmax = inf during warm-up (no spike)
        a, b, zmax = table.index_select(0, self._seen.long()).unbind(1)
        std = self._var.sqrt()
        z = (g - mean) / (std + self.eps)
        spike = z > zmax
        braw = torch.addcdiv(mean, std, z, value=self.z_thresh**2)  # below g wherever z > z_thresh
        bound = torch.where(spike, braw, self._constant(math.inf, g))  # [1, 3] copies of the bound
        d = torch.where(spike, braw, g) - mean  # the clipped norm minus the mean
        new = torch.addcmul(row * a, b, d.pow(self._powers))
        torch.where(g < math.inf, new, row, out=row)  # a non-finite norm leaves the statistics untouched
        thr = bound.amin()  # -> 0-d
        # fmin: a NaN ratio (a NaN norm, or an infinite one with no bound yet) leaves the gradients as they are
        coef = torch.fmin(thr / (g + _EPS_TORCH), self._constant(1.0, g))
        if self.max_norm is not None:
            thr = thr.clamp(max=self.max_norm)
            # warm-up (zmax = inf): clip_grad_norm_(max_norm), as the reference does at every warm-up step;
            # after it only a norm above the bound is scaled (a norm exactly at the cap is left as it is)
            cap = torch.fmin(thr / (g + _EPS_TORCH), self._constant(1.0, g))
            coef = torch.where((g > thr) | (zmax[0, 0] == math.inf), cap, coef)
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
