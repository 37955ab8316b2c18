"""The gradient noise scale ``B_simple``, measured online from the gradients a run already computes.

Under gradient accumulation (or data parallelism) every optimizer step sees the
gradient at two batch sizes: each backward call delivers the gradient of one
micro-batch (``B_small`` examples), and the step's gradient is their mean
(``B_big = n * B_small`` examples, ``n`` = micro-batches x ranks). The two
squared norms give unbiased estimates of ``|G|^2`` and ``tr(Sigma)``, whose
ratio is the critical-batch-size estimate ``B_simple`` of McCandlish et al.
(2018), *An Empirical Model of Large-Batch Training*, arXiv:1812.06162,
Appendix A.1. See :class:`NoiseScale` and the guide page ``guide/noise_scale``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gradwatch._compat import FSDPParamRef, fsdp_param_refs, scale_of
from gradwatch._validate import check_float, check_int, match_names
from gradwatch.contrib import SCALAR, Binding, Contributor, StepView
from gradwatch.distributed import check_process_group, is_dtensor, mesh_group
from gradwatch.norms import accumulation_dtype, sparse_values

__all__ = ["NoiseScale"]


_DOT_DTYPES = (torch.float32, torch.float64)
#: the columns, overall and per group
_COLUMNS = ("grad_sq", "trace", "b_simple")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _check_groups(groups: Any) -> dict[str, list[str]] | None:
    """``{name: [glob patterns]}`` from ``groups`` (a pattern or a sequence of them per name), or None.

    Raises:
        TypeError: ``groups`` is not a mapping, or a value not a string or a sequence of strings.
        ValueError: no group, or a name that is not letters, digits, ``_`` and ``-``.
    """
    if groups is None:
        return None
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be a mapping {{name: glob pattern(s)}} or None, got {type(groups).__name__}")
    if not groups:
        raise ValueError("groups must name at least one group (or be None)")
    out: dict[str, list[str]] = {}
    for name, patterns in groups.items():
        if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
            raise ValueError(
                f"groups: a name must be letters, digits, '_' and '-' (it becomes part of the "
                f"History.stats key 'noise.<name>.b_simple'), got {name!r}"
            )
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, Sequence) or not patterns or not all(isinstance(q, str) for q in patterns):
            raise TypeError(
                f"groups[{name!r}] must be a glob pattern or a non-empty sequence of them, got {patterns!r}"
            )
        out[name] = list(patterns)
    return out


def _read_into(g: Tensor, square: Tensor, norm: Tensor) -> None:
    """Write ``|g|^2`` into ``square`` or ``|g|`` into ``norm`` (0-d slots of a :class:`_Table`): one operation.

    A contiguous float32/float64 gradient is read by one ``torch.dot(g, g)`` on
    its flat view (BLAS; on CPU about 1.7x faster than ``vector_norm`` for a
    2048 x 2048 gradient with torch 2.13 on 2 cores, 0.24 vs 0.39 ms); any
    other (a strided view, half precision -- accumulated in float32 --,
    complex) by one ``vector_norm``. The result is written in place
    (``out=``): no new tensor per read (0-d tensors kept until the step made
    glibc's heap return and re-fault the 16 MB gradients of an MLP, +4 % step
    time); a gradient of another dtype or device than the table is read first
    and copied in.
    """
    if g.layout != torch.strided:
        g = sparse_values(g)
    if g.requires_grad:  # create_graph=True: the gradient is part of a graph
        g = g.detach()
    if g.dtype in _DOT_DTYPES and g.is_contiguous():
        flat = g.view(-1)
        if g.dtype == square.dtype and g.device == square.device:
            torch.dot(flat, flat, out=square)
        else:
            square.copy_(torch.dot(flat, flat))
        return
    acc = accumulation_dtype(g.dtype)
    if acc == norm.dtype and g.device == norm.device:
        torch.linalg.vector_norm(g, dtype=acc, out=norm)
    else:
        norm.copy_(torch.linalg.vector_norm(g, dtype=acc))


class _Table:
    """One step's reads: a slot per parameter and backward call for ``|c_j|^2`` (dot) and one for ``|c_j|``.

    Preallocated (``[2, rows * n]``, doubled when a step has more backward
    calls than rows) and zeroed once per step; its 0-d slots are views made
    once, so a hook allocates nothing.
    """

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype, rows: int = 4) -> None:
        self.n, self.rows = n, 0
        self._grow(rows, torch.zeros(2, 0, device=device, dtype=dtype))

    def _grow(self, rows: int, old: Tensor) -> None:
        t = old.new_zeros(2, rows * self.n)
        t[:, : old.shape[1]].copy_(old)
        self.t, self.rows = t, rows
        self.squares, self.norms = t[0].unbind(), t[1].unbind()

    def slots(self, call: int, i: int) -> tuple[Tensor, Tensor]:
        """The two slots of parameter ``i`` at its ``call``-th backward call of the step (0-based)."""
        if call >= self.rows:
            self._grow(2 * call, self.t)
        k = call * self.n + i
        return self.squares[k], self.norms[k]

    def total(self) -> Tensor:
        """``sum |c_j|^2`` over the slots (0-d): a sum, a dot and an add."""
        squares, norms = self.t.unbind()
        return squares.sum() + torch.dot(norms, norms)

    def per_param(self) -> Tensor:
        """``sum_j |c_j|^2`` of each parameter (``[n]``)."""
        squares, norms = self.t.view(2, self.rows, self.n).unbind()
        return squares.sum(0) + norms.square().sum(0)

    def clear(self) -> None:
        self.t.zero_()


_SUPPORTED = (
    "NoiseScale supports parameters on one process, under DDP, and sharded by fully_shard (FSDP2 on a 1-D "
    "mesh, HSDP on a 2-D replicate x shard mesh), not tensor parallelism (DTensor parameters on a tensor-parallel "
    "mesh, with or without fully_shard): its hooks would see shards of the micro-batch gradients"
)


def _fsdp_refs(names: list[str], params: list[Tensor]) -> list[FSDPParamRef] | None:
    """None without DTensor parameters; else every parameter's ``fully_shard`` reference.

    Raises:
        NotImplementedError: a parameter is tensor parallel (a DTensor not sharded by
            ``fully_shard``, or one it sharded further), a plain tensor next to sharded
            ones, or the parameters are sharded over different sets of ranks.
    """
    if not any(is_dtensor(p) for p in params):
        return None
    refs = fsdp_param_refs(params)
    for name, p, ref in zip(names, params, refs):
        why = None
        if ref is None:
            why = (
                "a DTensor that fully_shard did not shard (tensor parallel, or another DTensor engine)"
                if is_dtensor(p)
                else "a plain tensor next to parameters sharded by fully_shard (build the watch before the "
                "first forward, with every trainable parameter under fully_shard)"
            )
        elif ref.tensor_parallel:
            why = "a DTensor that fully_shard sharded further (tensor parallel + FSDP2)"
        if why is not None:
            raise NotImplementedError(f"{_SUPPORTED}; parameter {name!r} is {why}")
    if len({frozenset(p.device_mesh.mesh.flatten().tolist()) for p in params}) > 1:
        raise NotImplementedError(
            "NoiseScale: the parameters are sharded by fully_shard over different sets of ranks (per-parameter "
            "meshes): their micro-batch gradients are averaged over different numbers of ranks"
        )
    return [r for r in refs if r is not None]


class NoiseScale(Contributor):
    r"""The gradient noise scale ``B_simple = tr(Σ)/|G|²`` at every recorded step, sync-free.

    McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch
    Training* (2018), arXiv:1812.06162, Appendix A.1: from the squared norms of
    gradients taken at two batch sizes ``B_s < B_b``,

    .. math::

        |\mathcal{G}|^2 = \frac{B_b |G_{B_b}|^2 - B_s |G_{B_s}|^2}{B_b - B_s},\qquad
        \mathcal{S} = \frac{|G_{B_s}|^2 - |G_{B_b}|^2}{1/B_s - 1/B_b}

    are unbiased estimates of ``|G|²`` and ``tr(Σ)`` (``Σ`` the per-example
    gradient covariance), and ``B_simple = E[S]/E[|G|²]``, the batch size
    beyond which a larger batch stops cutting the number of steps.

    At a step with ``K`` backward calls on each of ``R`` data-parallel ranks,
    the ``n = K·R`` micro-batch gradients ``G_j`` (``B_s = batch_size``
    examples each) and their mean ``G_big`` (``B_b = n·B_s`` examples) give

    * ``s2 = mean_j |G_j|²``, ``b2 = |G_big|²``;
    * ``grad_sq = (B_b·b2 − B_s·s2)/(B_b − B_s)`` and
      ``trace = (s2 − b2)/(1/B_s − 1/B_b)``;
    * ``b_simple = E_trace/E_grad_sq`` with ``E_t = alpha·E_{t−1} + (1 − alpha)·x_t``,
      ``E_0 = x_0``, over the recorded steps whose ``grad_sq`` and ``trace`` are
      both finite (the others leave the averages as they were).

    **How the gradients are read.** A tensor hook on every parameter (its
    unsharded parameter under FSDP2, see below) receives
    ``c_j``, the gradient that backward call adds to ``.grad`` -- before it is
    added, so no copy is kept: one ``dot(c_j, c_j)`` (or ``vector_norm(c_j)``
    for half precision and strided views) per parameter per backward call,
    summed at the step. ``G_big`` is the step's gradient ``g`` as the watch
    measures it (pre-clip, AMP-unscaled, after DDP's or FSDP2's averaging), so
    ``b2 = total²``; each micro-batch gradient is taken in the same units,
    ``G_j = K·c_j/S`` where ``S`` is the factor between the hooks' gradients
    and ``g``: 1 without a ``GradScaler``, with one its scale (the device
    tensor, read from the watch's :class:`~gradwatch.Binding`). ``K·c_j`` is the micro-batch gradient of
    the mean loss when, as usual, each backward call carries ``loss / K``
    (mean convention: then ``g = G_big`` exactly). With the sum convention
    (``loss`` itself, ``g = K·G_big``) ``grad_sq`` and ``trace`` are
    ``K²`` times the mean-loss values; any scaling of the loss -- mean or sum,
    a per-example sum, a ``GradScaler``'s factor -- cancels in ``b_simple``.
    ``K`` is counted: the largest number of hook calls of any parameter since
    the previous step.

    ``n = 1`` (no accumulation, one process) has no second batch size: that
    step's three columns are NaN and a warning, given once, says why.

    Under ``torch.distributed`` the gradients are assumed to be averaged over
    the ``R`` ranks of the data-parallel group (DDP, FSDP2 and HSDP do that);
    the local sums and the backward counts go into one all-reduce of two
    numbers per step over that group (none with one rank), so every rank
    records the same row. Under FSDP2 and HSDP (``fully_shard`` on a 1-D mesh,
    or a 2-D replicate x shard mesh) the watched parameters are sharded
    DTensors, and the hooks go on their *unsharded* parameters -- the
    ``nn.Parameter`` FSDP2 puts into the module for forward and backward, which
    exists from the first forward (its all-gather) on: a forward hook on the
    ``fully_shard`` modules registers them then, before the first backward,
    and goes away. Its gradient is this rank's full micro-batch gradient
    ``c_j`` before the reduce-scatter (or before it is accumulated unsharded
    under ``set_requires_gradient_sync(False)``); ``R`` is the size of the whole
    mesh (replicate x shard) and ``b2`` the watch's total, already reduced over
    it. Tensor parallelism (DTensor parameters on a tensor-parallel mesh, with
    or without ``fully_shard``) is not supported: ``NotImplementedError`` when
    the watch is built. Hooks skip their work on steps the watch does not
    record (``every > 1``).

    Columns (``History.stats``): ``"noise.grad_sq"``, ``"noise.trace"``,
    ``"noise.b_simple"``, one float per recorded step; with ``groups``, the
    same three for each group, ``"noise.<group>.b_simple"`` and so on: the
    estimator restricted to the group's parameters (``G_j`` and ``G_big``
    cut to them; ``b2`` from the watch's per-parameter norms). Per-layer noise
    scales differ by orders of magnitude (Gray et al., *Normalization Layer
    Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in
    Transformers*, NeurIPS 2024); the groups cost one more reduction of the
    step's reads and one ``[G x P]`` product each for the two sums.

    Args:
        batch_size: ``B_s``, the examples of one backward call on one rank.
        alpha: the weight of the past in the moving averages, in ``[0, 1)``
            (0: ``b_simple`` is the step's own ratio).
        process_group: the data-parallel group the gradients are averaged
            over (a ``ProcessGroup`` or a 1-D ``DeviceMesh``); default: under
            FSDP2/HSDP the parameters' whole mesh (the world group when it
            spans every rank), else the world group when ``torch.distributed``
            is initialised, else none.
        groups: ``{name: glob pattern or patterns}`` over the watch's
            parameter names (``fnmatch``; overlapping groups and parameters in
            none are fine); names of letters, digits, ``_`` and ``-``.

    Raises:
        TypeError: ``batch_size`` is not an integer, ``alpha`` not a number,
            ``process_group`` not a group, ``groups`` not a mapping of
            patterns.
        ValueError: ``batch_size < 1``, ``alpha`` outside ``[0, 1)``, an
            empty ``groups`` or a bad group name; at bind, a pattern that
            matches no parameter.

    Example:
        Two micro-batches of two examples, ``w = 0``, per-example gradients
        ``-y·x = -1, -3`` and ``-5, -7``: ``G_1 = -2``, ``G_2 = -6``,
        ``G_big = -4``, so ``s2 = 20``, ``b2 = 16``, ``grad_sq = (4·16 − 2·20)/2
        = 12``, ``trace = (20 − 16)/(1/2 − 1/4) = 16``:

        >>> import torch, gradwatch as gw
        >>> lin = torch.nn.Linear(1, 1, bias=False); _ = torch.nn.init.zeros_(lin.weight)
        >>> watch = gw.GradWatch(lin, stats=[gw.NoiseScale(batch_size=2)])
        >>> x = torch.ones(2, 1)
        >>> for y in ([1.0, 3.0], [5.0, 7.0]):  # accumulation, mean convention: loss / K
        ...     loss = 0.5 * (lin(x).squeeze(1) - torch.tensor(y)).square().mean()
        ...     (loss / 2).backward()
        >>> watch.step()
        >>> s = watch.history.stats
        >>> s["noise.grad_sq"], s["noise.trace"], s["noise.b_simple"].round(4)
        (array([12.], dtype=float32), array([16.], dtype=float32), array([1.3333], dtype=float32))
    """

    prefix = "noise"

    def __init__(
        self,
        batch_size: int,
        alpha: float = 0.95,
        *,
        process_group: Any = None,
        groups: Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.alpha = check_float(alpha, "alpha", min=0.0, max=1.0, max_open=True)
        self.process_group = check_process_group(process_group)
        self.groups = _check_groups(groups)
        self._members: Tensor | None = None
        self._hot, self._boundary = True, False
        self._handles: list[Any] = []
        self._forward_handles: list[Any] = []
        self._pending: dict[int, FSDPParamRef] = {}
        self._mesh: Any = None
        self._matrices: dict[int, Tensor] = {}
        self._warned = False
        self._ema: Tensor | None = None
        self._started: Tensor | None = None

    # -- the watch sets ``hot`` once per step, before the step's contributors observe: a step boundary
    @property  # type: ignore[override]
    def hot(self) -> bool:
        """Whether the coming step is recorded (set by the watch once per step); hooks idle when it is not."""
        return self._hot

    @hot.setter
    def hot(self, value: bool) -> None:
        self._hot = bool(value)
        self._boundary = True  # what the hooks saw so far belongs to the step that just ran

    def bind(self, binding: Binding) -> None:
        """Register one tensor hook per parameter (under FSDP2/HSDP: on its unsharded parameter, at its first forward).

        Raises:
            NotImplementedError: tensor-parallel DTensor parameters (with or without
                ``fully_shard``), plain parameters next to ``fully_shard``-ed ones, or
                parameters sharded over different sets of ranks; the message names
                what is supported (one process, DDP, FSDP2, HSDP).
            ValueError: ``process_group`` given without ``torch.distributed`` initialised.
        """
        super().bind(binding)
        refs = _fsdp_refs(binding.names, binding.params)
        self._mesh = binding.params[0].device_mesh if refs is not None else None
        self._world = self._world_size()
        self._scaler = getattr(binding, "scaler", None) if binding.amp else None
        dev, dt = binding.device, binding.dtype
        self._ema = torch.zeros(2, device=dev, dtype=dt)  # [E_grad_sq, E_trace]
        self._started = torch.zeros((), device=dev, dtype=torch.bool)
        self._nan = torch.full((), math.nan, device=dev, dtype=dt)
        self._bind_groups(binding)
        self._matrices = {}
        self._table = _Table(len(binding.params), dev, dt)
        self._counts: list[int] = []
        self._reset()
        self.close()
        if refs is None:
            for i, p in enumerate(binding.params):
                self._handles.append(p.register_hook(self._contribution_hook(i)))
        else:
            self._hook_unsharded(refs)

    def _bind_groups(self, binding: Binding) -> None:
        """The ``[G, P]`` 0/1 membership of the parameters in the groups, and the groups' moving averages."""
        if self.groups is None:
            return
        host = torch.zeros(len(self.groups), len(binding.params), dtype=binding.dtype)
        for j, (name, patterns) in enumerate(self.groups.items()):
            host[j, match_names(patterns, binding.names, f"NoiseScale(groups={{{name!r}: ...}})")] = 1.0
        dev, dt, G = binding.device, binding.dtype, len(self.groups)
        self._members = host.to(dev)
        self._group_ema = torch.zeros(2, G, device=dev, dtype=dt)
        self._group_started = torch.zeros(G, device=dev, dtype=torch.bool)
        self._group_nan = torch.full((G,), math.nan, device=dev, dtype=dt)

    def _hook_unsharded(self, refs: list[FSDPParamRef]) -> None:
        """Hook each unsharded parameter once it exists: now, or after a forward of a module that manages it.

        FSDP2 creates a parameter's unsharded ``nn.Parameter`` at its first
        all-gather (in the forward pre-hook of its ``fully_shard`` module) and
        keeps it; a forward hook on those modules hooks it before its first
        backward, and the forward hooks go once every parameter is hooked.
        """
        self._pending = dict(enumerate(refs))
        modules = {id(m): m for r in refs for m in r.modules}
        self._forward_handles = [m.register_forward_hook(self._hook_ready) for m in modules.values()]
        self._hook_ready()

    def _hook_ready(self, *_: Any) -> None:
        """Register the tensor hooks of the pending unsharded parameters that exist now."""
        for i, ref in list(self._pending.items()):
            unsharded = ref.unsharded()
            if unsharded is not None:
                self._handles.append(unsharded.register_hook(self._contribution_hook(i)))
                del self._pending[i]
        if not self._pending:
            for h in self._forward_handles:
                h.remove()
            self._forward_handles = []

    def _world_size(self) -> int:
        """``R`` (1 without ``torch.distributed``); sets the group the step's all-reduce runs over."""
        self._dp_group: Any = None
        if not (dist.is_available() and dist.is_initialized()):
            if self.process_group is not None:
                raise ValueError("NoiseScale(process_group=...) needs torch.distributed to be initialised")
            return 1
        pg = self.process_group
        if pg is None and self._mesh is not None:  # FSDP2 / HSDP: all of the parameters' mesh
            self._dp_group = mesh_group(self._mesh, tuple(range(self._mesh.ndim)))
        else:  # a 1-D DeviceMesh, a ProcessGroup or None (the world)
            self._dp_group = pg.get_group() if hasattr(pg, "get_group") else pg
        return dist.get_world_size(self._dp_group)

    def _reset(self) -> None:
        """Forget the hooks' values: a new step begins."""
        if any(self._counts):
            self._table.clear()
        self._counts = [0] * len(self.binding.params)  # backward calls of each parameter since the last step
        self._boundary = False

    def _contribution_hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if not self._hot:
                return
            if self._boundary:
                self._reset()
            call = self._counts[i]
            self._counts[i] = call + 1
            _read_into(grad, *self._table.slots(call, i))

        return hook

    def columns(self) -> Mapping[str, int]:
        cols = {"grad_sq": SCALAR, "trace": SCALAR, "b_simple": SCALAR}
        if self.groups is not None:
            cols.update({f"group_{k}": len(self.groups) for k in _COLUMNS})
        return cols

    def observe(self, view: StepView) -> Mapping[str, Tensor]:
        """This step's ``grad_sq``, ``trace`` and ``b_simple`` (0-d device tensors; no host sync); per group too."""
        k_local, sq, sq_g = self._collect()
        b2 = view.total * view.total
        b2_g = None if self._members is None else torch.mv(self._members, view.norms.to(sq.dtype).square())
        if self._world > 1:  # one all-reduce of [sum |c|^2, backward calls, per group] over the data-parallel ranks
            n, sq, sq_g = self._all_reduce(k_local, sq, sq_g)
            x = self._estimates(sq, n, b2)
            x_g = None if sq_g is None else self._estimates(sq_g, n, b2_g)
        elif k_local < 2:
            self._warn_once(k_local)
            return self._values(None, None)
        else:
            m = self._matrix(k_local)
            x = torch.mv(m, torch.stack([sq, b2]))
            x_g = None if sq_g is None else m @ torch.stack([sq_g, b2_g])
        return self._values(x, x_g)

    def _collect(self) -> tuple[int, Tensor, Tensor | None]:
        """The step's backward calls (host), ``sum_j |c_j|^2`` and its per-group sums (unscaled); a new step begins."""
        k_local = max(self._counts, default=0)
        sq = self._table.total()
        sq_g = None if self._members is None else torch.mv(self._members, self._table.per_param())
        self._reset()
        scale = scale_of(self._scaler) if self._scaler is not None and self._scaler.is_enabled() else None
        if scale is not None:  # the hooks saw the scaled gradients S c_j (the scale of this step's backward calls)
            s2 = scale.to(sq.dtype).square()
            sq = (sq / s2).reshape(())
            sq_g = None if sq_g is None else sq_g / s2
        return k_local, sq, sq_g

    def _all_reduce(self, k_local: int, sq: Tensor, sq_g: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Sum ``[sum |c|^2, backward calls, *per group]`` over the ranks (one all-reduce): ``(n, sq, sq_g)``."""
        parts = [sq.reshape(1), torch.full((1,), float(k_local), device=sq.device, dtype=sq.dtype)]
        t = torch.cat(parts if sq_g is None else [*parts, sq_g])
        dist.all_reduce(t, group=self._dp_group)
        return t[1], t[0], (None if sq_g is None else t[2:])

    def _values(self, x: Tensor | None, x_g: Tensor | None) -> dict[str, Tensor]:
        """The columns from ``[grad_sq, trace]`` (and ``[2, G]`` per group); NaN for None; the averages move."""
        if x is None:
            out = dict.fromkeys(_COLUMNS, self._nan)
            x_g = None
        else:
            grad_sq, trace = x.unbind()
            out = {"grad_sq": grad_sq, "trace": trace, "b_simple": self._average(x, self._ema, self._started)}
        if self.groups is not None:
            if x_g is None:
                out.update({f"group_{k}": self._group_nan for k in _COLUMNS})
            else:
                b_g = self._average(x_g, self._group_ema, self._group_started)
                out.update({"group_grad_sq": x_g[0], "group_trace": x_g[1], "group_b_simple": b_g})
        return out

    def history_columns(self) -> Mapping[str, int]:
        """``noise.<column>`` and, per group, ``noise.<group>.<column>``: one number a step each."""
        groups = [f"{name}." for name in self.groups or ()]
        return {f"noise.{g}{k}": SCALAR for g in ("", *groups) for k in _COLUMNS}

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``noise.<column>``, and per group ``noise.<group>.<column>`` (one number a step each)."""
        out = {f"noise.{k}": cols[k] for k in _COLUMNS}
        for j, name in enumerate(self.groups or ()):
            out.update({f"noise.{name}.{k}": cols[f"group_{k}"][:, j] for k in _COLUMNS})
        return out

    def _estimates(self, sq: Tensor, n: Tensor, b2: Tensor) -> Tensor:
        """``[grad_sq, trace]`` from ``sum |c|^2`` over all ranks and ``n`` backward calls in all (device tensors).

        ``G_j = K c_j`` with ``K = n / R``, so ``s2 = K^2 sum|c|^2 / n = n sum|c|^2 / R^2``;
        ``grad_sq = (B_b b2 - B_s s2)/(B_b - B_s) = (n b2 - s2)/(n - 1)`` and
        ``trace = (s2 - b2)/(1/B_s - 1/B_b) = (s2 - b2) B_s n/(n - 1)``, with ``B_b = n B_s``.
        """
        s2 = sq * n / float(self._world**2)
        c = n / (n - 1)
        return torch.stack([(n * b2 - s2) / (n - 1), (s2 - b2) * c * float(self.batch_size)])

    def _matrix(self, n: int) -> Tensor:
        """``M`` with ``[grad_sq, trace] = M @ [sum|c|^2, b2]`` for ``n`` backward calls on one process (cached).

        One process: ``s2 = n sum|c|^2``, so with ``c = n/(n - 1)``:
        ``grad_sq = c (b2 - sum|c|^2)`` and ``trace = B_s c (n sum|c|^2 - b2)`` (see :meth:`_estimates`).
        """
        m = self._matrices.get(n)
        if m is None:
            c, bs = n / (n - 1), float(self.batch_size)
            m = torch.tensor([[-c, c], [bs * c * n, -bs * c]], dtype=self.binding.dtype, device=self.binding.device)
            self._matrices[n] = m
        return m

    def _average(self, x: Tensor, ema: Tensor, started: Tensor) -> Tensor:
        """Move ``ema`` (``[E_grad_sq, E_trace]``, each 0-d or ``[G]``) to ``x`` where both are finite.

        Returns ``E_trace / E_grad_sq`` (NaN before a finite step); ``ema`` and
        ``started`` are updated in place.
        """
        ok = torch.isfinite(x).all(0)
        moved = torch.where(started, torch.lerp(ema, x, 1.0 - self.alpha), x)
        torch.where(ok, moved, ema, out=ema)
        started.logical_or_(ok)
        e_grad_sq, e_trace = ema.unbind()
        return e_trace / e_grad_sq  # 0/0 = NaN until a finite step

    def _warn_once(self, n: int) -> None:
        if self._warned:
            return
        self._warned = True
        why = (
            "one backward call and one process: the step's gradient is the micro-batch gradient, so there is "
            "no second batch size to compare; accumulate gradients over K >= 2 backward calls per step or "
            "train data-parallel"
            if n == 1
            else "no backward call reached its hooks since the previous step (was the watch built after backward?)"
        )
        warnings.warn(f"NoiseScale: its columns are NaN at steps with {why}", UserWarning, stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        """The moving averages (``E_grad_sq``, ``E_trace``, whether they started; per group too), the warning flag."""
        assert self._ema is not None and self._started is not None
        state = {"ema": self._ema.clone(), "started": self._started.clone(), "warned": self._warned}
        if self.groups is not None:
            state.update(groups=list(self.groups), group_ema=self._group_ema.clone())
            state["group_started"] = self._group_started.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called by ``GradWatch.load_state_dict``).

        Raises:
            ValueError: ``state`` is not a NoiseScale state of the same groups, or this one is not bound.
        """
        keys = {"ema", "started", "warned"} | (
            set() if self.groups is None else {"groups", "group_ema", "group_started"}
        )
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"state must be a dict from NoiseScale.state_dict() with keys {sorted(keys)}")
        ema = torch.as_tensor(state["ema"])
        if ema.shape != (2,):
            raise ValueError(f"state['ema'] must hold 2 numbers (E_grad_sq, E_trace), got shape {tuple(ema.shape)}")
        if self._ema is None or self._started is None:
            raise ValueError("NoiseScale.load_state_dict: bind it first (pass it to a GradWatch)")
        if self.groups is not None and list(state["groups"]) != list(self.groups):
            raise ValueError(f"state is of groups {list(state['groups'])}, this NoiseScale has {list(self.groups)}")
        self._ema.copy_(ema)
        self._started.copy_(torch.as_tensor(state["started"]))
        if self.groups is not None:
            self._group_ema.copy_(torch.as_tensor(state["group_ema"]))
            self._group_started.copy_(torch.as_tensor(state["group_started"]))
        self._warned = bool(state["warned"])

    def close(self) -> None:
        """Remove the hooks."""
        for h in (*self._handles, *self._forward_handles):
            h.remove()
        self._handles, self._forward_handles, self._pending = [], [], {}

    def __repr__(self) -> str:
        groups = "" if self.groups is None else f", groups={self.groups}"
        return f"NoiseScale(batch_size={self.batch_size}, alpha={self.alpha}{groups})"
