"""Gradient clippers: by value, per-tensor norm, global norm, AutoClip, AGC, ZClip, Chain.

Every clipper works two ways:

* alone, as ``clipper(parameters) -> Tensor``: it reads ``p.grad``, clips in
  place and returns the pre-clip global norm, like
  :func:`torch.nn.utils.clip_grad_norm_`;
* inside :class:`gradwatch.GradWatch`, which has already measured every
  gradient's L2 norm: :meth:`Clipper.clip_` reuses those norms, so no clipper
  but :class:`ClipByValue` (and :class:`ClipByGlobalNorm` for ``norm_type != 2``)
  reads the gradients a second time to measure them.

Everything runs on the gradients' device: thresholds, histories and moving
averages are tensors, and no clipper reads a value back to the host, so a
clipped step costs no host synchronisation.

Non-finite gradients follow torch: a NaN anywhere makes the global norm NaN and,
through the coefficient, every clipped gradient NaN; an Inf makes the
coefficient 0. Clipping is not the tool that protects weights from NaN --
:class:`gradwatch.NonFinite` with ``action="skip"`` is. The adaptive clippers
(:class:`AutoClip`, :class:`ZClip`) leave non-finite norms out of their
statistics, so one bad step cannot poison the thresholds of the next ones.
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch._params import named_trainable
from gradwatch.norms import check_norm_type, grad_norms, group_by_device_dtype, total_norm

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
    "ZClip",
]

_EPS_TORCH = 1e-6  # the epsilon in torch.nn.utils.clip_grad_norm_'s coefficient


class ClipContext:
    """What a clipper sees at one step: the parameters, their gradients, their norms.

    Args:
        params: the parameters, in model order.
        names: their names.
        norms: the L2 norm of each gradient (0 where ``grad`` is None), or None to
            compute them on first use.
        total: the global L2 norm, or None to compute it on first use.
        step: the optimizer step index (0-based).
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
            self._norms = grad_norms(self.grads)
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
                self._total = total_norm(self.grads)
        return self._total

    @property
    def groups(self) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
        """The present gradients grouped by device and dtype (for ``torch._foreach_*``)."""
        if self._groups is None:
            self._groups = group_by_device_dtype(self.grads)
        return self._groups

    def with_norms(self, norms: Tensor | None, total: Tensor | None) -> ClipContext:
        """A context over the same (already clipped) gradients with updated norms.

        None norms (a clipper called alone) are measured again on first use.
        """
        ctx = ClipContext(self.params, self.names, norms, total, self.step)
        ctx._groups = self._groups
        ctx.measured = self.measured
        return ctx


@dataclass
class ClipResult:
    """What one clipping step did; every field is a device tensor.

    Attributes:
        norms: ``[P]`` L2 norm of each gradient after clipping.
        total: 0-d global L2 norm after clipping.
        coef: 0-d factor by which the global norm shrank (1 = untouched).
        threshold: 0-d bound the clipper enforced this step (``inf`` if none,
            NaN where no single global bound applies).

        The four are None when the clipper is called alone
        (``ClipContext.measured`` is False): only ``norm`` is needed then.
        norm: 0-d pre-clip norm the clipper returns when called alone (the
            ``norm_type`` norm for :class:`ClipByGlobalNorm`, else the L2 norm).
    """

    norms: Tensor | None
    total: Tensor | None
    coef: Tensor | None
    threshold: Tensor | None
    norm: Tensor


def _positive(value: float, argname: str) -> float:
    v = float(value)
    if not v > 0 or math.isinf(v):
        raise ValueError(f"{argname} must be a finite number > 0, got {value!r}")
    return v


def _scale_(ctx: ClipContext, coef: Tensor) -> None:
    """Multiply every present gradient by the 0-d ``coef`` (as torch does, per group)."""
    for (device, _), (grads, _) in ctx.groups.items():
        torch._foreach_mul_(grads, coef.to(device))


def _ratio(after: Tensor, before: Tensor) -> Tensor:
    """``after / before``, and 1 where ``before`` is 0."""
    return torch.where(before > 0, after / before, torch.ones_like(before))


class Clipper(ABC):
    """Base class of the clippers.

    A subclass implements :meth:`clip_`; stateful ones also
    :meth:`state_dict`, :meth:`load_state_dict` and :meth:`reset`, and clippers
    that need parameter names override :meth:`bind`.
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
        """The clipper's state (tensors and Python numbers); empty for stateless ones."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} is stateless; got state keys {sorted(state)}")

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget all observed history (no-op for stateless clippers)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict[str, Any]:
        return {}


class ClipByValue(Clipper):
    r"""Clamp every gradient element to ``[-clip_value, clip_value]``.

    Exactly :func:`torch.nn.utils.clip_grad_value_`. Clamping changes the
    gradient's direction, so the post-clip norms are measured again (the one
    clipper that reads the gradients twice).

    Args:
        clip_value: the bound, > 0.

    Raises:
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

    def clip_(self, ctx: ClipContext) -> ClipResult:
        total = ctx.total
        for _, (grads, _) in ctx.groups.items():
            torch._foreach_clamp_min_(grads, -self.clip_value)
            torch._foreach_clamp_max_(grads, self.clip_value)
        if not ctx.measured:
            return ClipResult(None, None, None, None, total)
        norms = grad_norms(ctx.grads, device=ctx.norms.device, dtype=ctx.norms.dtype)
        after = torch.linalg.vector_norm(norms)
        thr = torch.full_like(after, math.nan)
        return ClipResult(norms, after, _ratio(after, total.to(after)), thr, total)


class ClipByNorm(Clipper):
    r"""Clip each gradient tensor to L2 norm ``clip_norm``, independently.

    .. math:: g_i \leftarrow g_i \cdot \frac{c}{\max(\lVert g_i \rVert_2,\ c)}

    This is PaddlePaddle's ``paddle.nn.ClipGradByNorm``, the clipper of the
    NNDL textbook's gradient-explosion experiment (practice 6.2). Unlike global
    clipping it changes the relative sizes of the gradients.

    Args:
        clip_norm: the per-tensor bound ``c``, > 0.

    Raises:
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

    def _repr_args(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    def clip_(self, ctx: ClipContext) -> ClipResult:
        norms = ctx.norms
        total = ctx.total  # before the gradients change
        c = torch.full_like(norms, self.clip_norm)
        factors = c / torch.maximum(norms, c)  # a true division: exactly 1 below the bound
        groups = ctx.groups
        if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(ctx.grads):
            ((device, _), (grads, _)) = next(iter(groups.items()))  # one group, no missing grads
            torch._foreach_mul_(grads, factors.to(device).unbind())
        else:
            for (device, _), (grads, positions) in groups.items():
                idx = torch.tensor(positions, device=factors.device)
                torch._foreach_mul_(grads, factors.index_select(0, idx).to(device).unbind())
        if not ctx.measured:
            return ClipResult(None, None, None, None, total)
        after = norms * factors
        total_after = torch.linalg.vector_norm(after)
        total = total.to(total_after)
        thr = torch.full_like(total_after, self.clip_norm)
        return ClipResult(after, total_after, _ratio(total_after, total), thr, total)


class ClipByGlobalNorm(Clipper):
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
        ValueError: ``max_norm`` or ``norm_type`` is not positive.

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
        self.norm_type = check_norm_type(norm_type)

    def _repr_args(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if self.norm_type == 2.0:
            norm = ctx.total
        else:
            norm = total_norm(ctx.grads, self.norm_type)
        coef = torch.clamp(self.max_norm / (norm + _EPS_TORCH), max=1.0)
        _scale_(ctx, coef)
        if not ctx.measured:
            return ClipResult(None, None, coef, None, norm)
        c = coef.to(ctx.norms)
        thr = torch.full_like(c, self.max_norm)
        return ClipResult(ctx.norms * c, ctx.total.to(c) * c, c, thr, norm)


class AutoClip(Clipper):
    r"""Clip the global norm to a percentile of all global norms seen so far.

    At step t, with :math:`n_t` the global L2 norm and :math:`H_t` the history
    including :math:`n_t`:

    .. math:: g \leftarrow g \cdot \min\Bigl(\frac{\operatorname{pct}_p(H_t)}{n_t + 10^{-6}},\ 1\Bigr)

    The percentile interpolates linearly, as ``numpy.percentile``. The history
    lives on the device; sorting it costs O(n log n) per step for n recorded
    norms, so set ``window`` for runs of hundreds of thousands of steps. Non-finite norms are
    not added to the history (with ``window`` they still use up their slot).

    Args:
        percentile: p in (0, 100]; 10 is the paper's set-and-forget default.
        window: keep only the last ``window`` norms (a ring buffer); None keeps all.

    Raises:
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

    def __init__(self, percentile: float = 10.0, window: int | None = None) -> None:
        p = float(percentile)
        if not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
        if window is not None and (int(window) != window or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        self.percentile = p
        self.window = None if window is None else int(window)
        self.reset()

    def _repr_args(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window}

    def reset(self) -> None:
        self._history: Tensor | None = None
        self._count = 0  # steps observed (host-known, so indexing needs no sync)

    def _slot(self, like: Tensor) -> int:
        """Index of this step's slot, growing or wrapping the history as needed."""
        if self._history is None or self._history.device != like.device:
            cap = self.window or 256
            old, self._history = self._history, torch.full((cap,), math.inf, dtype=torch.float64, device=like.device)
            if old is not None:
                self._history[: old.numel()] = old.to(like.device)
        cap = self._history.numel()
        if self.window is not None:
            return self._count % self.window
        if self._count >= cap:
            grown = torch.full((2 * cap,), math.inf, dtype=torch.float64, device=like.device)
            grown[:cap] = self._history
            self._history = grown
        return self._count

    def threshold(self) -> Tensor:
        """The percentile of the history (``inf`` while it holds no finite norm)."""
        assert self._history is not None
        used = min(self._count, self._history.numel())
        h = torch.sort(self._history[:used]).values  # non-finite (inf) sort last
        n = torch.isfinite(h).sum().to(torch.float64)
        # numpy's "linear" method: virtual index q * (n - 1), then lerp.
        q = self.percentile / 100.0
        virtual = n * q + (1.0 - q) - 1.0
        lo = virtual.floor().clamp(min=0)
        gamma = virtual - lo
        lo_i = lo.long().clamp(max=used - 1)
        hi_i = torch.minimum(lo_i + 1, (n.long() - 1).clamp(min=0))
        a, b = torch.take(h, lo_i), torch.take(h, hi_i)  # tensor indices: no host sync
        diff = b - a
        value = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
        return torch.where(n > 0, value, torch.full_like(value, math.inf))

    def clip_(self, ctx: ClipContext) -> ClipResult:
        total = ctx.total
        slot = self._slot(total)
        t64 = total.to(torch.float64)
        self._history[slot] = torch.where(torch.isfinite(t64), t64, math.inf)
        self._count += 1
        thr = self.threshold().to(total.dtype)
        coef = torch.clamp(thr / (total + _EPS_TORCH), max=1.0)
        _scale_(ctx, coef)
        if not ctx.measured:
            return ClipResult(None, None, coef, thr, total)
        c = coef.to(ctx.norms)
        return ClipResult(ctx.norms * c, total.to(c) * c, c, thr.to(c), total)

    def state_dict(self) -> dict[str, Any]:
        used = 0 if self._history is None else min(self._count, self._history.numel())
        hist = torch.empty(0, dtype=torch.float64) if self._history is None else self._history[:used].clone()
        return {"history": hist, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        hist, self._count = state["history"], int(state["count"])
        if hist.numel():
            cap = self.window or max(256, 1 << (hist.numel() - 1).bit_length())
            self._history = torch.full((cap,), math.inf, dtype=torch.float64, device=hist.device)
            self._history[: hist.numel()] = hist


class ZClip(Clipper):
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

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is clipped, > 0.
        warmup_steps: number of finite norms that initialise the statistics, >= 1.
        max_norm: optional hard cap on the global norm.
        eps: added to :math:`\sigma` in the z-score.

    Raises:
        ValueError: an argument is outside its range.

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
        if not 0 < float(alpha) < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        self.alpha = float(alpha)
        self.z_thresh = _positive(z_thresh, "z_thresh")
        self.warmup_steps = int(warmup_steps)
        self.max_norm = None if max_norm is None else _positive(max_norm, "max_norm")
        self.eps = float(eps)
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.reset()

    def _repr_args(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }

    def reset(self) -> None:
        self._state: dict[str, Tensor] | None = None

    def _init_state(self, device: torch.device) -> dict[str, Tensor]:
        f64 = {"dtype": torch.float64, "device": device}
        return {
            "warm": torch.zeros(self.warmup_steps, **f64),
            "seen": torch.zeros((), dtype=torch.long, device=device),
            "mean": torch.zeros((), **f64),
            "var": torch.zeros((), **f64),
        }

    def clip_(self, ctx: ClipContext) -> ClipResult:
        total = ctx.total
        if self._state is None:
            self._state = self._init_state(total.device)
        s = self._state
        g = total.to(torch.float64)
        finite = torch.isfinite(g)
        warming = s["seen"] < self.warmup_steps
        # Warm-up: collect finite norms; initialise the statistics from them.
        slot = s["seen"].clamp(max=self.warmup_steps - 1)
        take = finite & warming
        s["warm"].index_put_((slot,), torch.where(take, g, torch.take(s["warm"], slot)))
        seen = s["seen"] + take
        init = take & (seen == self.warmup_steps)
        mean0 = s["warm"].mean()
        var0 = (s["warm"] - mean0).square().mean()
        # After warm-up: z-score clipping, EMA updated with the clipped norm.
        std = s["var"].sqrt()
        z = (g - s["mean"]) / (std + self.eps)
        spike = ~warming & (z > self.z_thresh)
        adaptive = s["mean"] + self.z_thresh * std / (z / self.z_thresh)
        clipped = torch.where(spike, adaptive, g)
        new_mean = self.alpha * s["mean"] + (1 - self.alpha) * clipped
        new_var = self.alpha * s["var"] + (1 - self.alpha) * (clipped - new_mean).square()
        update = ~warming & finite
        s["mean"] = torch.where(init, mean0, torch.where(update, new_mean, s["mean"]))
        s["var"] = torch.where(init, var0, torch.where(update, new_var, s["var"]))
        s["seen"] = seen
        # The bound and the coefficient (no host sync: all torch.where).
        bound = torch.where(spike, adaptive, torch.full_like(g, math.inf))
        if self.max_norm is not None:
            bound = bound.clamp(max=self.max_norm)
        coef64 = torch.where(g > bound, bound / (g + _EPS_TORCH), torch.ones_like(g))
        coef = coef64.to(total.dtype)
        _scale_(ctx, coef)
        if not ctx.measured:
            return ClipResult(None, None, coef, bound, total)
        c = coef.to(ctx.norms)
        return ClipResult(ctx.norms * c, total.to(c) * c, c, bound.to(c), total)

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            return {}
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = {k: v.clone() for k, v in state.items()} if state else None

    @property
    def mean(self) -> Tensor | None:
        """The EMA mean of the global norm (None before the first step)."""
        return None if self._state is None else self._state["mean"]

    @property
    def var(self) -> Tensor | None:
        """The EMA variance of the global norm (None before the first step)."""
        return None if self._state is None else self._state["var"]


class AGC(Clipper):
    r"""Adaptive gradient clipping, unit-wise (Brock et al., 2021).

    For each unit i (a row, i.e. an output unit, of a weight of ndim >= 2; the
    whole tensor for biases and scalars):

    .. math::
        \text{if } \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, \epsilon)} > \lambda:\quad
        G_i \leftarrow \lambda \frac{\max(\lVert W_i \rVert, \epsilon)}{\max(\lVert G_i \rVert, 10^{-6})} G_i

    All units of a tensor are clipped in one vectorised pass. The paper does
    not clip the final classifier: name it in ``exclude``.

    Args:
        clipping: the ratio bound :math:`\lambda` (0.01 suits large batches), > 0.
        eps: the floor :math:`\epsilon` of the weight norm, > 0.
        exclude: parameter names or glob patterns (``"fc.*"``) left unclipped;
            each must match a parameter.

    Raises:
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

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Iterable[str] = ()) -> None:
        self.clipping = _positive(clipping, "clipping")
        self.eps = _positive(eps, "eps")
        if isinstance(exclude, str):
            exclude = [exclude]
        self.exclude = tuple(exclude)
        self._mask: list[bool] | None = None

    def _repr_args(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def bind(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
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

    def clip_(self, ctx: ClipContext) -> ClipResult:
        if self._mask is None or len(self._mask) != len(ctx.params):
            self.bind(ctx.names, ctx.params)
        norms = ctx.norms
        total = ctx.total  # before the gradients change
        after = list(norms.unbind()) if ctx.measured else []
        for i, (p, g) in enumerate(zip(ctx.params, ctx.grads)):
            if g is None or self._mask[i]:
                continue
            acc = torch.float32 if g.dtype.itemsize < 4 else None
            if g.ndim <= 1:
                w_norm = torch.linalg.vector_norm(p.detach(), dtype=acc)
                g_norm = norms[i].to(w_norm)
            else:
                w_norm = torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1, dtype=acc)
                g_norm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1, dtype=acc)
            max_norm = w_norm.clamp(min=self.eps) * self.clipping
            factor = torch.where(g_norm > max_norm, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
            g.mul_(factor.reshape(factor.shape + (1,) * (g.ndim - 1)).to(g.dtype))
            if ctx.measured:
                after[i] = torch.linalg.vector_norm(g_norm * factor).to(norms)
        if not ctx.measured:
            return ClipResult(None, None, None, None, total)
        norms_after = torch.stack(after)
        total_after = torch.linalg.vector_norm(norms_after)
        total = total.to(total_after)
        thr = torch.full_like(total_after, math.nan)
        return ClipResult(norms_after, total_after, _ratio(total_after, total), thr, total)


class Chain(Clipper):
    """Apply several clippers in order, each seeing the previous one's output.

    A hard cap before an adaptive clipper protects the first steps, before the
    adaptive clipper's statistics exist: ``Chain(ClipByGlobalNorm(10.0), AutoClip())``.

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
        for c in self.clippers:
            c.bind(names, params)

    def clip_(self, ctx: ClipContext) -> ClipResult:
        first: ClipResult | None = None
        res: ClipResult | None = None
        thresholds = []
        for c in self.clippers:
            res = c.clip_(ctx if res is None else ctx.with_norms(res.norms, res.total))
            first = first or res
            thresholds.append(res.threshold)
        assert res is not None and first is not None
        if not ctx.measured:
            return ClipResult(None, None, None, None, first.norm)
        total = ctx.total.to(res.total)
        thr = torch.stack(thresholds).nan_to_num(nan=math.inf).min()
        thr = torch.where(torch.isinf(thr) & torch.stack(thresholds).isnan().all(), math.nan, thr)
        return ClipResult(res.norms, res.total, _ratio(res.total, total), thr, first.norm)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): c.state_dict() for i, c in enumerate(self.clippers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, c in enumerate(self.clippers):
            c.load_state_dict(state.get(str(i), {}))

    def reset(self) -> None:
        for c in self.clippers:
            c.reset()
