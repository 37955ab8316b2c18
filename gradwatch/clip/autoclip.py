"""AutoClip: the global norm clipped to a percentile of its history (exact, then a log histogram)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._validate import check_float, check_int
from gradwatch.clip.base import _EPS_TORCH, GlobalClipper

__all__ = ["SKETCH_RELATIVE_ERROR", "AutoClip"]

# AutoClip's histogram after the exact phase: log-spaced buckets [lo * g^j, lo * g^(j+1)) over
# [1e-20, 1e20); a bucket's representative 2 g / (1 + g) * lower is within (g - 1) / (g + 1) < 1e-3
# relative of every value in it.
_SKETCH_LO, _SKETCH_HI, _SKETCH_GAMMA = 1e-20, 1e20, 1.002
#: the relative error bound of AutoClip's percentile after the exact phase
SKETCH_RELATIVE_ERROR = (_SKETCH_GAMMA - 1) / (_SKETCH_GAMMA + 1)
_INT32_MAX = 2**31 - 1


class _Sketch:
    """Cumulative counts over fixed log-spaced buckets, in two levels: O(sqrt(buckets)) work per step.

    The buckets -- one for [0, lo), the 46,098 log buckets of [lo, hi), one for
    [hi, inf), padded with empty ones to a multiple of ``F`` -- are cut into
    ``C`` = 181 blocks of ``F`` = 256 (46,336 in all). ``blocks[1 + j]`` counts the finite values
    in blocks 0..j (``blocks[0]`` = 0, the last entry a sentinel); row j of
    ``fine`` counts, cumulatively, the values of block j in its buckets 0..i
    (column 0 is a dummy 0, row ``C`` a sentinel). Inserting a value updates the
    ``C`` block counts and one row of ``F``; a rank is found with one binary
    search in the blocks and one in a row. NaN and inf are below no upper bound,
    so they are never counted.

    Example:
        >>> sk = _Sketch(torch.device("cpu"), torch.float32)
        >>> sk.C, sk.F, sk.counts().numel(), int(torch.isfinite(sk.uppers).sum()) - 1  # blocks, per block, all, log
        (181, 256, 46336, 46098)
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

    def ranks(self, r: Tensor) -> Tensor:
        """The representatives of the values of the 0-based ranks ``floor(r)`` (``r``: 1-D float64)."""
        j = torch.searchsorted(self.inclusive, r, right=True)  # the blocks holding the ranks
        within = r - torch.take(self.blocks, j)  # rank inside the block
        i = torch.searchsorted(self.fine.index_select(0, j), within.unsqueeze(1), right=True)
        return torch.take(self.table, torch.add(i.view(-1), j, alpha=self.F + 1))


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
      two-level count update and two binary searches per step over the 46,336
      buckets (46,098 log-spaced ones, one for [0, 1e-20), one for [1e20, inf)
      and padding to 181 blocks of 256), however long the run.

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
        self._negq = torch.tensor([-q, 1.0 - q], **f64)  # ranks (n - 1) q and (n - 1) q + 1, given n
        self._ends = torch.tensor([1.0, 0.0], **f64), torch.tensor([0.0, 1.0], **f64)
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
        q = self.percentile / 100.0
        if self._sketch is not None:
            r = torch.add(self._negq, self._sketch.finite, alpha=q)  # [v, v + 1], v = (n - 1) q, float64
            ab = self._sketch.ranks(r)
        else:
            assert self._buf is not None
            srt = torch.sort(self._buf).values  # non-finite (the sentinel) and unused slots sort last
            r = torch.add(self._negq, torch.searchsorted(srt, self._sentinel), alpha=q)  # n: the finite values
            # ranks floor(v) and floor(v) + 1; the latter may be the sentinel, weighted by 0 then
            ab = torch.take(srt, r.long())
        # numpy's linear interpolation a + frac(v) (b - a) as the dot product of [a, b] with [1 - frac(v), frac(v)]
        weights = torch.lerp(*self._ends, torch.frac(r))
        return torch.dot(ab, weights if weights.dtype == ab.dtype else weights.to(ab.dtype))

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
