r"""Per-example gradient norms: which examples of the batch made the gradient large.

The gradient of a batch is the sum of its examples' contributions,
:math:`\nabla_\theta L = \sum_i c_i`. :class:`PerExampleNorms` records
:math:`\lVert c_i \rVert` for every example :math:`i` of every recorded step,
without materialising the per-example gradients where that can be avoided.

For a layer that computes :math:`y_t = W a_t` at positions :math:`t` of one
example (tokens, pixels), the example's weight gradient is
:math:`G_i = \sum_t g_t a_t^\top` (:math:`g_t = \partial L / \partial y_t`), and
its squared norm is the *ghost norm* (Goodfellow 2015, arXiv:1510.01799; Li et
al. 2022, arXiv:2110.05679; Bu et al. 2023, arXiv:2205.10683)

.. math::

    \lVert G_i \rVert_F^2 = \sum_{t, t'} (a_t \cdot a_{t'})\,(g_t \cdot g_{t'}),

two :math:`T \times T` Gram matrices instead of a :math:`d_\text{out} \times
d_\text{in}` matrix per example. For each layer and shape the cheaper of the
two is used: the Gram matrices (about :math:`T^2 (d_\text{in} +
d_\text{out})` multiply-adds per example; from :math:`T = 64` on only their
lower triangle, by blocks) or :math:`G_i` itself (about :math:`T
d_\text{in} d_\text{out}`); with one position per example (an MLP) the
identity is :math:`\lVert a \rVert^2 \lVert g \rVert^2`. A bias is one more
input column of value 1: :math:`(a_t \cdot a_{t'} + 1)`.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from gradwatch._compat import module_parameter, scale_of
from gradwatch._validate import check_int
from gradwatch.contrib import SCALAR, Binding, Contributor, StepView

__all__ = ["PerExampleNorms"]

#: the covered module types, by what their hook computes
_NORMS = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)
_CONVS = (nn.Conv1d, nn.Conv2d)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b``, weight ``[in, out]``), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _kind(module: nn.Module) -> str | None:
    """Which per-example rule applies to ``module``'s own parameters (None: not covered)."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # MultiheadAttention's out_proj: F.multi_head_attention_forward uses its weight, not a call
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_hf_conv1d(module):
        return "hf_conv1d"
    if isinstance(module, nn.Embedding):
        return None if module.scale_grad_by_freq or module.max_norm is not None else "embedding"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, _CONVS):
        return "conv"
    return None


#: the per-element cost, in multiply-adds, of materialising a per-example gradient (write it, read it back)
_WRITE = 8
#: a ghost norm over T >= _SYM positions computes only the lower triangle of its Gram matrices, as diagonal
#: blocks of at least _SYM // 2 positions plus the off-diagonal blocks below them, halving recursively
#: (smaller blocks multiply less efficiently than they save)
_SYM = 64
#: a module not classified yet (``None`` in the cache: not covered)
_UNSEEN: Any = object()
#: a parameter used by at most this many calls of a pass gets its norm from cross terms of their factors
_PAIRWISE = 4


def _sqsum(d: Tensor) -> Tensor:
    """Per-example squared norm of ``d`` ``[B, ...]`` (one batched dot product)."""
    f = d.reshape(d.shape[0], 1, -1)
    return torch.bmm(f, f.mT).reshape(-1)


def _ghost(L: Tensor, R: Tensor, L2: Tensor, R2: Tensor) -> Tensor:
    """``sum_{t,s} (L_t . L2_s) (R_t . R2_s)`` for each of ``N`` (``L``: ``[N, T, r]``, ``R``: ``[N, T, c]``)."""
    return torch.bmm(L, L2.mT).mul_(torch.bmm(R, R2.mT)).sum((1, 2))


@functools.cache
def _blocks(T: int) -> int:
    """How many diagonal blocks the lower triangle of a ``T x T`` Gram matrix is cut into (1: the full matrix)."""
    m = 1
    while T % (2 * m) == 0 and T // (2 * m) >= _SYM // 2:
        m *= 2
    return m


@functools.cache
def _sym_fraction(T: int) -> float:
    """The share of the full Gram matrices' multiply-adds that :func:`_sym_ghost` computes for ``T`` positions."""
    m = _blocks(T)
    return 1.0 / m + sum(1.0 / (4 * k) for k in (2**i for i in range(m.bit_length() - 1)))


def _block_product(L: Tensor, R: Tensor, k: int, plus: float) -> Tensor:
    """Per-example sums of ``(L L^T) * (R R^T + plus)`` over the ``k`` blocks below the diagonal at one level."""
    N, T = L.shape[:2]
    Lv, Rv = L.reshape(N * k, T // k, -1), R.reshape(N * k, T // k, -1)
    h = T // (2 * k)
    a = torch.bmm(Rv[:, h:], Rv[:, :h].mT)
    if plus:
        a.add_(plus)
    return a.mul_(torch.bmm(Lv[:, h:], Lv[:, :h].mT)).reshape(N, -1).sum(1)


def _sym_ghost(L: Tensor, R: Tensor, plus: float = 0.0) -> Tensor:
    """``sum_{t,s} (L_t . L_s) (R_t . R_s + plus)`` for each of ``N`` from the lower triangle of the Gram matrices.

    The ``T`` positions are cut into ``m`` diagonal blocks (:func:`_blocks`; the
    full matrices, ``m = 1``, below ``T = 64``); the
    blocks below the diagonal are taken level by level (the lower-left half,
    then the lower-left quarter of each half, ...), each level one batched
    product per factor, and counted twice. ``plus`` adds a constant column
    ``sqrt(plus)`` to ``R`` (a bias: ``||sum_t L_t||^2`` is the bias's square norm).
    """
    N, T = L.shape[:2]
    m = _blocks(T)
    Ld, Rd = L.reshape(N * m, T // m, -1), R.reshape(N * m, T // m, -1)
    diag = torch.bmm(Rd, Rd.mT)
    if plus:
        diag.add_(plus)
    out = diag.mul_(torch.bmm(Ld, Ld.mT)).reshape(N, -1).sum(1)
    k = 1
    while k < m:
        out.add_(_block_product(L, R, k, plus), alpha=2.0)
        k *= 2
    return out


def _factored_sq(L: Tensor, R: Tensor, plus: float = 0.0) -> Tensor:
    """``||L_n^T [R_n, sqrt(plus)]||_F^2`` for each of ``N`` (``L``: ``[N, T, r]``, ``R``: ``[N, T, c]``).

    The per-example gradient of a weight (``sum_t L_t R_t^T``) with, for
    ``plus = 1``, its bias (``sum_t L_t``): by ``||L||^2 ||R||^2`` for one
    position, by the ghost norm when its multiply-adds are fewer, else
    materialised.
    """
    T, r = L.shape[1:]
    c = R.shape[-1]
    if T == 1:
        rr = R.square().sum((1, 2))
        if plus:
            rr.add_(plus)
        return rr.mul_(L.square().sum((1, 2)))
    if T * T * (r + c) * _sym_fraction(T) < (T + _WRITE) * r * c:
        return _sym_ghost(L, R, plus)
    out = _sqsum(torch.bmm(L.mT, R))
    return out.add_(_sqsum(L.sum(1)), alpha=plus) if plus else out


def _gather_rows(L: Tensor, idx: Tensor) -> Tensor:
    """``L[b, s, idx[b, t]]`` ``[B, T', T]`` (``L``: ``[B, T', V]``, ``idx``: ``[B, T]``)."""
    B, T2 = L.shape[:2]
    return torch.gather(L, 2, idx.long()[:, None, :].expand(B, T2, -1))


@dataclass
class _Outer:
    """Per-example gradient ``L_i^T R_i`` per group (``L``: ``[B, G, T, r]``, ``R``: ``[B, G, T, c]``).

    ``gathered``: for a tied output layer (``L`` its output gradient over a
    vocabulary), ``L`` already gathered at the indices of lookups of the same
    table, by the lookup's key; then ``L`` itself may be dropped (None).
    """

    L: Tensor | None
    R: Tensor
    shape: torch.Size
    gathered: dict[int, Tensor] = field(default_factory=dict)

    def sq(self) -> Tensor:
        B, G, T, r = self.L.shape
        s = _factored_sq(self.L.reshape(B * G, T, r), self.R.reshape(B * G, T, -1))
        return s if G == 1 else s.reshape(B, G).sum(1)

    def cross(self, other: _Outer) -> Tensor:
        """Per-example ``<G_i, G'_i>`` by the Gram matrices of the factors (``sum_{t,s} (L_t.L'_s) (R_t.R'_s)``)."""
        B, G, T, r = self.L.shape
        T2, c = other.L.shape[2], self.R.shape[-1]
        L, R = self.L.reshape(B * G, T, r), self.R.reshape(B * G, T, c)
        L2, R2 = other.L.reshape(B * G, T2, r), other.R.reshape(B * G, T2, c)
        return _ghost(L, R, L2, R2).reshape(B, -1).sum(1)

    def direct(self) -> Tensor:
        B = self.L.shape[0]
        return torch.matmul(self.L.mT, self.R).reshape(B, *self.shape)


@dataclass
class _Index:
    """An embedding's per-example gradient: rows ``idx`` ``[B, T]`` receive ``R`` ``[B, T, d]`` (padding zeroed)."""

    idx: Tensor
    R: Tensor
    shape: torch.Size
    key: int = 0  # ``id`` of the call (a tied output layer's backward may have gathered for it)

    def sq(self) -> Tensor:
        T, V = self.R.shape[1], self.shape[0]
        if T * T < _WRITE * (V + T):  # ghost norm, T x T x d multiply-adds: sum_{t,t'} [idx_t == idx_t'] (g_t . g_t')
            return self.cross(self)
        return _sqsum(self.direct())

    def cross(self, other: _Index) -> Tensor:
        """Per-example ``<E_i, E'_i>``: ``sum_{t,s} [idx_t == idx'_s] (R_t . R'_s)``."""
        same = (self.idx[:, :, None] == other.idx[:, None, :]).to(self.R.dtype)
        return torch.bmm(self.R, other.R.mT).mul_(same).reshape(self.R.shape[0], -1).sum(1)

    def cross_outer(self, other: _Outer) -> Tensor:
        """Per-example ``<E_i, L_i^T R_i>`` (one group, rows of ``L``): ``sum_{t,s} L_s[idx_t] (R_s . R_t)``."""
        at = other.gathered.pop(self.key, None)
        if at is None:
            at = _gather_rows(other.L[:, 0], self.idx)
        R = other.R[:, 0]  # [B, T', d]
        return torch.bmm(R, self.R.mT).mul_(at).reshape(R.shape[0], -1).sum(1)

    def direct(self) -> Tensor:
        B, _, d = self.R.shape
        V = self.shape[0]
        out = torch.zeros(B * V, d, device=self.R.device, dtype=self.R.dtype)
        rows = (self.idx + torch.arange(B, device=self.idx.device)[:, None] * V).reshape(-1)
        out.index_add_(0, rows, self.R.reshape(-1, d))
        return out.reshape(B, *self.shape)


@dataclass
class _Dense:
    """A per-example gradient that is cheap to hold: ``D`` ``[B, *shape]`` (biases, normalisation affines)."""

    D: Tensor

    def sq(self) -> Tensor:
        return _sqsum(self.D)

    def direct(self) -> Tensor:
        return self.D


def _inner(P: Any, Q: Any) -> Tensor:
    """Per-example ``<P_i, Q_i>`` of two calls' per-example gradients of one parameter (factored where it can)."""
    if isinstance(P, _Outer) and isinstance(Q, _Index):
        P, Q = Q, P
    if isinstance(P, _Index) and isinstance(Q, _Index):
        T, T2 = P.idx.shape[1], Q.idx.shape[1]
        if T * T2 < _WRITE * (2 * P.shape[0] + T + T2):
            return P.cross(Q)
    if isinstance(P, _Index) and isinstance(Q, _Outer) and Q.R.shape[1] == 1 and len(Q.shape) == 2:
        return P.cross_outer(Q)
    if isinstance(P, _Outer) and isinstance(Q, _Outer) and P.L.shape[1:2] == Q.L.shape[1:2]:
        (_, _, T, r), T2, c = P.L.shape, Q.L.shape[2], P.R.shape[-1]
        if Q.L.shape[-1] == r and Q.R.shape[-1] == c and T * T2 * (r + c) < (T + T2 + _WRITE) * r * c:
            return P.cross(Q)
    d = P.direct()
    return (d.reshape(d.shape[0], 1, -1) @ Q.direct().reshape(d.shape[0], -1, 1)).reshape(-1)


def _to_front(t: Tensor, dim: int) -> Tensor:
    return t if dim == 0 else t.movedim(dim, 0)


def _conv_cols(module: nn.Module, x: Tensor) -> Tensor:
    """im2col of a Conv1d/2d input: ``[B, C_in * prod(kernel), positions]`` (padding applied as the module does)."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    if isinstance(module, nn.Conv1d):
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        return F.unfold(x.unsqueeze(2), (1, k), dilation=(1, d), stride=(1, s))
    return F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)


@dataclass
class _Use:
    """One call of a covered module during a hot forward pass."""

    kind: str
    module: nn.Module
    entries: list[tuple[str, int]]  # (attribute name, watched index) of its watched parameters
    x: Tensor  # the input, detached (shares the storage autograd already keeps)
    batch: int
    done: bool = False  # its backward has run


@dataclass
class _Pass:
    """One forward-backward pass (one micro-batch) in progress."""

    batch: int | None = None
    uses: dict[int, int] = field(default_factory=dict)  # watched index -> calls in this pass
    sq: Tensor | None = None
    bufs: dict[int, Tensor] = field(default_factory=dict)  # per-example gradients of parameters used many times
    held: dict[int, list[Any]] = field(default_factory=dict)  # factored parts of parameters used a few times
    lookups: dict[int, list[_Use]] = field(default_factory=dict)  # embedding calls of parameters used a few times
    backward: bool = False


class PerExampleNorms(Contributor):
    r"""The L2 norm of each example's contribution to the step's gradient (``prefix="example"``).

    For a loss :math:`L = \frac1B \sum_i \ell_i` the contribution of example
    :math:`i` is :math:`\nabla_\theta \ell_i / B`; in general it is whatever
    the backward pass sends through that example's rows, so the recorded
    norms are of what you backpropagate. Columns, in ``History.stats``:

    * ``"example.norm"`` ``[S, E]``: :math:`\lVert c_i \rVert` over the covered
      parameters for each example :math:`i` of the step -- with gradient
      accumulation, every micro-batch's examples concatenated in order -- and
      NaN after the last example. ``E`` is the largest number of examples of a
      step so far (at most ``max_examples``).
    * ``"example.micro"`` ``[S, E]``: the micro-batch (``0, 1, ...`` within the
      step) each example came from.
    * ``"example.covered"`` ``[S]``: the fraction of the squared global gradient
      norm carried by the parameters the norms include (1 for a model made only
      of covered modules).

    Covered modules: ``nn.Linear`` (any leading dimensions), transformers'
    ``Conv1D`` (GPT-2's projections), ``nn.Embedding`` (not with
    ``max_norm`` or ``scale_grad_by_freq``), ``nn.LayerNorm`` / ``nn.RMSNorm``
    affine parameters and ``nn.Conv1d`` / ``nn.Conv2d`` (any padding mode,
    groups, stride, dilation), biases included. The per-example norm of a
    parameter called once per pass is computed in its module's backward by the
    ghost identity or directly, whichever is cheaper for the shape (see the
    module docstring); a parameter used by several calls (tied embeddings, a
    layer applied at every time step) has its per-example gradients summed
    over the calls before the norm -- for up to 4 calls by cross terms of
    their factors (``||sum_m G_m||^2 = sum_m ||G_m||^2 + 2 sum_{m<m'} <G_m,
    G_m'>``; a tied embedding against its output layer gathers the output
    gradient at the looked-up tokens), with more by materialising them.
    Other parameters with a gradient are
    named in one warning and left out (see ``"example.covered"``).

    The modules are found by the parameters the watch watches: one global
    module forward hook (``torch.nn.modules.module.register_module_forward_hook``)
    sees every module call; on a call of a covered module owning a watched
    parameter, during a recorded step's forward with gradients enabled, it
    keeps a reference to the input and hooks the output's gradient. Nothing
    else is done at steps that are not recorded (``every=N``).

    Examples are indexed along ``batch_dim`` of each covered module's input
    (convolutions: dimension 0). A pass's batch size is that of its first
    covered call; a call whose input has another size there (for example
    GPT-2's position embedding, looked up with ``position_ids`` of batch size
    1 and broadcast -- pass ``position_ids`` expanded to the batch) cannot be
    split by example: its parameters are named in a warning and left out.

    Cost: no host sync; at recorded steps, per covered call, the Gram
    matrices (``B T^2`` numbers) or the per-example gradient (``B`` times the
    parameter) -- the smaller in flops -- exist only during that module's
    backward, so the extra memory is bounded by one layer at a time, plus, for
    a parameter used by 2 to 4 calls, each call's input and output gradient
    until its last call's backward (more calls: ``B`` times that parameter
    until the pass ends). A convolution's input is unfolded (``prod(kernel)`` times its
    activation). The inputs are the tensors autograd keeps anyway.

    Args:
        batch_dim: the dimension of covered modules' inputs that indexes the
            examples (0 for ``[batch, ...]``; 1 for ``[seq, batch, ...]``).
        max_examples: the most examples stored per step (the device row holds
            this many); a step with more keeps the first ``max_examples`` and
            warns once.
        scaler: a ``torch.amp.GradScaler`` whose scaled loss's gradients the
            hooks see (the norms are divided by its scale); default: the
            watch's ``scaler``, if any.

    Raises:
        TypeError: ``batch_dim``/``max_examples`` not integers, or ``scaler``
            not a ``GradScaler``.
        ValueError: ``batch_dim`` < 0 or ``max_examples`` < 1.

    Example:
        >>> import torch, gradwatch as gw
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> watch = gw.GradWatch(model, stats=[gw.PerExampleNorms(max_examples=8)])
        >>> x = torch.randn(4, 3)
        >>> x[2] *= 1000.0  # one extreme example
        >>> model(x).square().mean().backward(); watch.step()
        >>> h = watch.history
        >>> h.stats["example.norm"].shape, int(h.stats["example.norm"][0].argmax())
        ((1, 4), 2)
        >>> round(float(h.stats["example.covered"][0]), 4)
        1.0
        >>> watch.close()
    """

    prefix = "example"

    def __init__(self, batch_dim: int = 0, *, max_examples: int = 256, scaler: Any = None) -> None:
        self.batch_dim = check_int(batch_dim, "batch_dim", min=0)
        self.max_examples = check_int(max_examples, "max_examples", min=1)
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler
        self._hot = True
        self._handle: Any = None
        self._pass = _Pass()
        self._step: list[tuple[Tensor, int]] = []  # (sq [B], batch) of this step's finished passes
        self._sealed: list[tuple[Tensor, int]] = []
        self._seen: set[int] = set()  # watched indices with a per-example contribution this step
        self._sealed_seen: frozenset[int] = frozenset()
        self._excluded: set[int] = set()
        self._warned: set[int] = set()
        self._widest = 0
        self._too_many = False
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._masks: dict[frozenset[int], Tensor] = {}
        self._micro: dict[tuple[int, ...], Tensor] = {}

    def __repr__(self) -> str:
        return f"PerExampleNorms(batch_dim={self.batch_dim}, max_examples={self.max_examples})"

    # -- the protocol -----------------------------------------------------------------
    @property  # type: ignore[override]
    def hot(self) -> bool:
        """Whether the coming step is recorded; the watch sets it at each step, which also seals the step's passes."""
        return self._hot

    @hot.setter
    def hot(self, value: bool) -> None:
        # the watch sets ``hot`` at the start of every step, before observing it: the passes since
        # the previous step are this step's (an unobserved step's are dropped at the next one)
        self._end_pass()
        self._sealed, self._sealed_seen = self._step, frozenset(self._seen)
        self._step, self._seen = [], set()
        self._hot = bool(value)

    def bind(self, binding: Binding) -> None:
        """Index the watched parameters and install the global module forward hook (the watch's scaler by default)."""
        if self.scaler is None:
            self.scaler = binding.scaler
        super().bind(binding)
        self._index = {id(p): i for i, p in enumerate(binding.params)}
        self._acc = binding.dtype
        self._nan = torch.full((self.max_examples,), math.nan, device=binding.device, dtype=binding.dtype)
        self._handle = register_module_forward_hook(self._forward, with_kwargs=True)

    def columns(self) -> dict[str, int]:
        return {"norm": self.max_examples, "micro": self.max_examples, "covered": SCALAR}

    def observe(self, view: StepView) -> dict[str, Tensor]:
        passes = self._sealed
        self._sealed = []
        self._warn_uncovered(view)
        cov = self._mask(self._sealed_seen)
        total2 = view.total.to(self._acc).square()
        covered = (view.norms.to(self._acc).square() * cov).sum() / total2
        if not passes:  # no covered call was backpropagated at this step: nothing measured
            return {"norm": self._nan, "micro": self._nan, "covered": self._nan[0]}
        sizes = tuple(b for _, b in passes)
        sq = torch.cat([s for s, _ in passes]) if len(passes) > 1 else passes[0][0]
        n = sq.shape[0]
        E = self.max_examples
        if n > E:
            if not self._too_many:
                self._too_many = True
                warnings.warn(
                    f"PerExampleNorms: step {view.step} has {n} examples; max_examples={E} keeps the first {E} "
                    f"(raise max_examples to keep them all)",
                    stacklevel=2,
                )
            sq, n = sq[:E], E
        self._widest = max(self._widest, n)
        norm = sq.sqrt()
        if self.scaler is not None:
            scale = scale_of(self.scaler)
            if scale is not None and self.scaler.is_enabled():
                norm = norm / scale.to(norm.dtype)
        norm = torch.cat([norm.to(self._acc), self._nan[n:]]) if n < E else norm.to(self._acc)
        return {"norm": norm, "micro": self._micro_of(sizes), "covered": covered}

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = max(self._widest, 1)
        return {
            "example.norm": cols["norm"][:, :w],
            "example.micro": cols["micro"][:, :w],
            "example.covered": cols["covered"],
        }

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pass = _Pass()
        self._step, self._sealed = [], []

    # -- host-side helpers (no device reads) -------------------------------------------
    def _mask(self, seen: frozenset[int]) -> Tensor:
        m = self._masks.get(seen)
        if m is None:
            host = torch.zeros(len(self.binding.params), dtype=self._acc)
            host[sorted(seen)] = 1.0
            m = self._masks[seen] = host.to(self.binding.device)
        return m

    def _micro_of(self, sizes: tuple[int, ...]) -> Tensor:
        m = self._micro.get(sizes)
        if m is None:
            host = torch.full((self.max_examples,), math.nan, dtype=self._acc)
            at = 0
            for k, b in enumerate(sizes):
                host[at : min(at + b, self.max_examples)] = float(k)
                at += b
            m = self._micro[sizes] = host.to(self.binding.device)
        return m

    def _warn_uncovered(self, view: StepView) -> None:
        missing = set(view.missing)
        new = [
            i
            for i in range(len(self.binding.params))
            if i not in self._sealed_seen and i not in missing and i not in self._warned
        ]
        if not new or not self._sealed_seen:
            return  # nothing measured this step (e.g. no hot forward): no verdict
        self._warned.update(new)
        names = ", ".join(self.binding.names[i] for i in new)
        warnings.warn(
            f"PerExampleNorms: no per-example gradient for {names}: not a parameter of a covered module call "
            f"(Linear, transformers Conv1D, Embedding, LayerNorm, RMSNorm, Conv1d, Conv2d); left out of "
            f"example.norm (see example.covered)",
            stacklevel=2,
        )

    def _classify(self, module: nn.Module) -> tuple[str, list[tuple[str, int]]] | None:
        got = self._modules.get(module, _UNSEEN)
        if got is _UNSEEN:
            kind = _kind(module)
            own = module.named_parameters(recurse=False)
            entries = [(n, self._index[id(p)]) for n, p in own if id(p) in self._index]
            got = self._modules[module] = (kind, entries) if kind is not None and entries else None
        if got is None:
            return None
        params = self.binding.params
        if any(module_parameter(module, n) is not params[i] for n, i in got[1]):
            return None  # parameters swapped (torch.func.functional_call): not the watched ones
        return got

    # -- the hooks -------------------------------------------------------------------
    def _forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._hot or not torch.is_grad_enabled():
            return
        got = self._classify(module)
        if got is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        kind, entries = got
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, Tensor):
            return
        if self._pass.backward:  # a forward after a backward: a new micro-batch
            self._end_pass()
        dim = 0 if kind == "conv" else self.batch_dim
        unbatched = x.dim() <= dim or (kind == "conv" and x.dim() == (2 if isinstance(module, nn.Conv1d) else 3))
        unbatched = unbatched or (kind in ("linear", "hf_conv1d", "norm") and x.dim() < 2)
        batch = -1 if unbatched else x.shape[dim]
        p = self._pass
        if p.batch is None and not unbatched:
            p.batch = batch
        if batch != p.batch:
            self._exclude(module, entries, x, p.batch)
            return
        use = _Use(kind, module, entries, x.detach(), batch)
        for _, i in entries:
            p.uses[i] = p.uses.get(i, 0) + 1
            if kind == "embedding":
                p.lookups.setdefault(i, []).append(use)
        output.register_hook(lambda g, use=use: self._backward(use, g))

    def _exclude(self, module: nn.Module, entries: list[tuple[str, int]], x: Tensor, batch: int | None) -> None:
        new = [i for _, i in entries if i not in self._excluded]
        self._excluded.update(new)
        if new:
            self._warned.update(new)
            names = ", ".join(self.binding.names[i] for i in new)
            warnings.warn(
                f"PerExampleNorms: {type(module).__name__} called with input of shape {tuple(x.shape)}, whose "
                f"dimension batch_dim={self.batch_dim} is not the pass's batch size {batch}: its parameters "
                f"({names}) cannot be split by example and are left out (a broadcast input such as GPT-2's "
                f"position_ids of batch size 1? pass it expanded to the batch)",
                stacklevel=3,
            )

    def _backward(self, use: _Use, g: Tensor) -> None:
        with torch.no_grad():
            p = self._pass
            p.backward = True
            use.done = True
            if all(p.uses[i] == 1 and i not in self._excluded for _, i in use.entries):
                self._seen.update(i for _, i in use.entries)  # its parameters' only call: one fused sum
                self._add(_CALL_SQ[use.kind](use, g, self.batch_dim, self._dtype(use, g)))
                return
            for i, part in _PARTS[use.kind](use, g, self.batch_dim, self._dtype(use, g)):
                if i in self._excluded:
                    continue
                self._seen.add(i)
                n = p.uses.get(i, 0)
                if n > _PAIRWISE:  # many calls: sum their per-example gradients first
                    d = part.direct()
                    p.bufs[i] = d if i not in p.bufs else p.bufs[i].add_(d)
                    continue
                self._add(part.sq() if n < 2 else self._shared(i, part, n))

    def _add(self, s: Tensor) -> None:
        """Add per-example squared norms ``[B]`` to the pass's."""
        p = self._pass
        if s.dtype != self._acc:
            s = s.to(self._acc)
        p.sq = s if p.sq is None else p.sq.add_(s)

    def _shared(self, i: int, part: Any, n: int) -> Tensor:
        """One of ``n`` calls of a parameter: ``||sum_m G_m||^2 = sum_m ||G_m||^2 + 2 sum_{m<m'} <G_m, G_m'>``."""
        held = self._pass.held.setdefault(i, [])
        s = part.sq()
        for q in held:
            s = s.add(_inner(q, part), alpha=2.0)
        if isinstance(part, _Outer):
            self._gather_for_lookups(i, part, n - 1 - len(held))
        held.append(part)
        if len(held) == n:  # its last call: the factors are no longer needed
            del self._pass.held[i]
        return s

    def _gather_for_lookups(self, i: int, part: _Outer, later: int) -> None:
        """A tied output layer: gather its output gradient now, at the tokens of the table's lookups still ahead.

        The gradient (``[B, T', V]``) is in cache now; if every call still to
        come is such a lookup, ``L`` is dropped (its memory freed early).
        """
        B, G, _, r = part.R.shape
        if G != 1 or len(part.shape) != 2 or part.L is None:
            return
        ahead = [u for u in self._pass.lookups.get(i, ()) if not u.done and u.x.dim() > self.batch_dim]
        if not ahead or part.L.shape[-1] != part.shape[0] or r != part.shape[1]:
            return
        for u in ahead:
            part.gathered[id(u)] = _gather_rows(part.L[:, 0], _to_front(u.x, self.batch_dim).reshape(B, -1))
        if len(ahead) == later:
            part.L = None

    def _end_pass(self) -> None:
        p = self._pass
        if p.backward:
            with torch.no_grad():
                for buf in p.bufs.values():
                    self._add(_sqsum(buf))
            if p.sq is not None and p.batch is not None:
                self._step.append((p.sq, p.batch))
        self._pass = _Pass()

    @staticmethod
    def _dtype(use: _Use, g: Tensor) -> torch.dtype:
        """The dtype a call's factors are read in: the input's and gradient's, at least float32."""
        dt = torch.promote_types(use.x.dtype if use.x.is_floating_point() else g.dtype, g.dtype)
        return torch.promote_types(dt, torch.float32)


def _cast(t: Tensor, dt: torch.dtype) -> Tensor:
    return t if t.dtype == dt else t.to(dt)


def _linear_sq(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> Tensor:
    """Per-example squared norm of one call's weight and bias gradients together (Linear, Conv1D).

    With ``a_t`` extended by a constant 1 the bias is one more column of the
    weight: ``||[G_i, b_i]||^2 = sum_{t,s} (g_t . g_s) (a_t . a_s + 1)``.
    """
    B = use.batch
    gg = _cast(_to_front(g, bd).reshape(B, -1, g.shape[-1]), dt)
    names = [n for n, _ in use.entries]
    if "weight" not in names:
        return _sqsum(gg.sum(1))
    a = _cast(_to_front(use.x, bd).reshape(B, -1, use.x.shape[-1]), dt)
    return _factored_sq(gg, a, 1.0 if "bias" in names else 0.0)


def _norm_sq(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> Tensor:
    """Per-example squared norm of a LayerNorm's / RMSNorm's weight and bias gradients together."""
    parts = [part.D for _, part in _norm_parts(use, g, bd, dt)]
    d = parts[0] if len(parts) == 1 else torch.stack(parts, 1)
    return d.square().reshape(use.batch, -1).sum(1)


def _parts_sq(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> Tensor:
    """Per-example squared norm of one call's parameters, summed over its parts."""
    parts = [part.sq() for _, part in _PARTS[use.kind](use, g, bd, dt)]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _linear_parts(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> list[tuple[int, Any]]:
    """``nn.Linear`` (``W a``: ``G = g a^T``) and transformers ``Conv1D`` (``a W``: ``G = a g^T``)."""
    B, m = use.batch, use.module
    a = _to_front(use.x, bd).reshape(B, 1, -1, use.x.shape[-1]).to(dt)
    gg = _to_front(g, bd).reshape(B, 1, -1, g.shape[-1]).to(dt)
    out: list[tuple[int, Any]] = []
    for name, i in use.entries:
        if name == "bias":
            out.append((i, _Dense(gg.sum((1, 2)))))
        else:
            shape = module_parameter(m, name).shape
            out.append((i, _Outer(gg, a, shape) if use.kind == "linear" else _Outer(a, gg, shape)))
    return out


def _embedding_parts(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> list[tuple[int, Any]]:
    """``nn.Embedding``: the looked-up rows receive the output's gradient (nothing at ``padding_idx``)."""
    B, m = use.batch, use.module
    idx = _to_front(use.x, bd).reshape(B, -1)
    gg = _to_front(g, bd).reshape(B, idx.shape[1], -1).to(dt)
    if m.padding_idx is not None:
        gg = gg * (idx != m.padding_idx).unsqueeze(-1).to(dt)
    return [(i, _Index(idx, gg, module_parameter(m, name).shape, id(use))) for name, i in use.entries]


def _norm_parts(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> list[tuple[int, Any]]:
    """``nn.LayerNorm`` / ``nn.RMSNorm``: weight ``sum_t g_t * xhat_t``, bias ``sum_t g_t`` (``xhat`` recomputed)."""
    B, m = use.batch, use.module
    shape = tuple(m.normalized_shape)
    x = _to_front(use.x, bd).to(dt)
    if isinstance(m, nn.LayerNorm):
        xhat = F.layer_norm(x, shape, None, None, m.eps)
    else:
        xhat = F.rms_norm(x, list(shape), None, m.eps)
    gg = _to_front(g, bd).to(dt).reshape(B, -1, *shape)
    xhat = xhat.reshape(B, -1, *shape)
    return [(i, _Dense(gg.sum(1) if name == "bias" else (gg * xhat).sum(1))) for name, i in use.entries]


def _conv_parts(use: _Use, g: Tensor, bd: int, dt: torch.dtype) -> list[tuple[int, Any]]:
    """``nn.Conv1d/2d``: per group, ``G = g cols^T`` over the output positions (``cols``: the unfolded input)."""
    B, m = use.batch, use.module
    cols = _conv_cols(m, use.x.to(dt))  # [B, C_in * prod(kernel), T]
    G, T = m.groups, cols.shape[-1]
    gg = g.to(dt).reshape(B, m.out_channels, T)
    out: list[tuple[int, Any]] = []
    for name, i in use.entries:
        if name == "bias":
            out.append((i, _Dense(gg.sum(-1))))
        else:
            L, R = gg.reshape(B, G, -1, T).mT, cols.reshape(B, G, -1, T).mT
            out.append((i, _Outer(L, R, module_parameter(m, name).shape)))
    return out


_PARTS = {
    "linear": _linear_parts,
    "hf_conv1d": _linear_parts,
    "embedding": _embedding_parts,
    "norm": _norm_parts,
    "conv": _conv_parts,
}
#: one call's parameters, each used once in the pass: their per-example squared norms summed in one go
_CALL_SQ = {"linear": _linear_sq, "hf_conv1d": _linear_sq, "embedding": _parts_sq, "norm": _norm_sq, "conv": _parts_sq}
