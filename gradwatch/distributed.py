"""Distributed gradient norms: full per-parameter norms from local shards, one all-reduce per mesh.

Under FSDP2, HSDP and tensor parallelism every rank holds only a shard of each
gradient (a :class:`~torch.distributed.tensor.DTensor`). The norm of the shard
is not the norm of the gradient, and reducing over every rank over-counts the
replicated ones (HSDP's factor √2). This module computes, on every rank and
without gathering any gradient:

1. per parameter, the local sum of ``|g|^p`` of the local shard (one fused
   ``torch._foreach_norm`` per device and dtype; the max ``|g|`` for the inf-norm);
2. per device mesh, **one** all-reduce of the stacked local sums over the whole
   mesh, where a rank contributes a parameter's sum only if it holds a distinct
   shard of it: the rank contributes when its coordinate is 0 on every mesh
   dimension on which the gradient is replicated, so replicated copies are
   counted once and never summed (max-reduce for the inf-norm);
3. the ``1/p``-th power: the norm of each *full* gradient, bit-identical on every
   rank of the mesh.

Plain tensors (single process, DDP -- whose gradients are already averaged --
or parameters outside any mesh) are measured locally with no collective.

``Partial`` placements (a gradient that is a pending sum over a mesh dimension)
cannot be measured from local norms: the norm of a sum is not a function of the
summands' norms. The engine resolves them first with one all-reduce of the
local values per (mesh, dimensions, reduce op, dtype) -- the reduction the
optimizer would otherwise perform implicitly -- without writing the result back
to ``.grad``; after it those dimensions count as replicated. FSDP2, HSDP and
tensor parallel (``ColwiseParallel``/``RowwiseParallel``) produce no ``Partial``
gradients, so they pay nothing for this.

Every function here is free of host syncs: no ``.item()``, no data-dependent
Python branch; the collectives are issued on the tensors' devices.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradwatch._compat import flattened_group, is_dtensor, root_mesh
from gradwatch._validate import check_float
from gradwatch.norms import NormMeter, ReadyOrder, accumulation_dtype, group_by_device_dtype, stat_dtype, write_norms

__all__ = [
    "DistributedMeter",
    "NormReducer",
    "check_process_group",
    "combine_norms",
    "count_collectives",
    "full_norms",
    "get_rank",
    "get_world_size",
    "is_ddp",
    "is_dtensor",
    "local_tensor",
    "make_meter",
    "measure_mode",
    "mesh_group",
    "needs_reduction",
    "rank_path",
    "row_norms",
    "unwrap_ddp",
]

try:  # torch built without distributed support has no DTensor
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DeviceMesh = None  # type: ignore[assignment,misc]
    DTensor = None  # type: ignore[assignment,misc]

_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN"}


# --------------------------------------------------------------------------- small helpers


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself.

    In-place operations on the result change the DTensor: clippers scale
    ``local_tensor(p.grad)`` to clip a sharded gradient without redistributing it.

    Example:
        >>> t = torch.ones(2)
        >>> local_tensor(t) is t
        True
    """
    return t.to_local() if is_dtensor(t) else t


def get_rank(process_group: Any = None) -> int:
    """This process's rank in ``process_group`` (the default group when None); 0 without ``torch.distributed``.

    Example:
        >>> get_rank()
        0
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(_as_group(check_process_group(process_group)))


def get_world_size(process_group: Any = None) -> int:
    """The number of ranks in ``process_group`` (default group when None); 1 without ``torch.distributed``.

    Example:
        >>> get_world_size()
        1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_as_group(check_process_group(process_group)))


def rank_path(path: str | os.PathLike[str], rank: int | None = None) -> str:
    """``path`` with the rank inserted before its suffix: ``run.csv`` -> ``run.rank3.csv``.

    For sinks that write one file per rank.

    Args:
        path: the file name.
        rank: the rank (default: :func:`get_rank`).

    Example:
        >>> rank_path("logs/run.csv", 3)
        'logs/run.rank3.csv'
        >>> rank_path("run", 0)
        'run.rank0'
    """
    r = get_rank() if rank is None else rank
    base, ext = os.path.splitext(os.fspath(path))
    return f"{base}.rank{r}{ext}"


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is wrapped in :class:`torch.nn.parallel.DistributedDataParallel`.

    DDP all-reduces gradients in buckets during backward: a gradient seen in a
    parameter hook may still be the rank's local one, so a watch on a DDP model
    must measure at step time (the synchronized gradients).

    Example:
        >>> is_ddp(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a :class:`~torch.nn.parallel.DistributedDataParallel` wrapper, or ``model``.

    Its parameter names are the model's own (without DDP's ``module.`` prefix).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> unwrap_ddp(lin) is lin
        True
    """
    return model.module if is_ddp(model) else model


def check_process_group(value: Any, name: str = "process_group") -> Any:
    """Validate a process-group override: ``None``, a ``ProcessGroup`` or a 1-D ``DeviceMesh``.

    Args:
        value: the argument.
        name: the argument's name, for the error.

    Returns:
        ``value`` unchanged.

    Raises:
        TypeError: anything else (a rank list, a string, a multi-dimensional mesh).

    Example:
        >>> check_process_group(None) is None
        True
        >>> check_process_group([0, 1])
        Traceback (most recent call last):
        ...
        TypeError: process_group must be None, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, got list
    """
    if value is None:
        return None
    if dist.is_available() and isinstance(value, dist.ProcessGroup):
        return value
    if DeviceMesh is not None and isinstance(value, DeviceMesh):
        if value.ndim != 1:
            raise TypeError(f"{name} must be a 1-D DeviceMesh (slice it: mesh['pp']), got a {value.ndim}-D mesh")
        return value
    raise TypeError(
        f"{name} must be None, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, got {type(value).__name__}"
    )


def _as_group(pg: Any) -> Any:
    if DeviceMesh is not None and isinstance(pg, DeviceMesh):
        return pg.get_group()
    return pg


def _norm_type(norm_type: float) -> float:
    return check_float(norm_type, "norm_type", min=0, min_open=True, allow_inf=True)


# --------------------------------------------------------------------------- meshes and placements


def mesh_group(mesh: Any, dims: tuple[int, ...]) -> Any:
    """The process group spanning the mesh dimensions ``dims`` (this rank's slice).

    All of them: the world group when the mesh spans every rank, else the
    mesh flattened; several named dimensions: those flattened.

    Raises:
        NotImplementedError: some but not all dimensions of a mesh without dimension names.
    """
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    if len(dims) == mesh.ndim:
        if dist.is_initialized() and mesh.size() == dist.get_world_size():
            return dist.group.WORLD
        return flattened_group(mesh)
    names = mesh.mesh_dim_names
    if names is None:
        raise NotImplementedError(
            f"reducing over mesh dimensions {dims} of {mesh} needs named mesh dimensions (init_device_mesh(..., "
            "mesh_dim_names=...))"
        )
    return flattened_group(mesh[tuple(names[d] for d in dims)])


def _root_ranks(mesh: Any) -> frozenset[int]:
    root = root_mesh(mesh)
    return frozenset(root.mesh.flatten().tolist())


@dataclass(frozen=True)
class _Layout:
    """How a DTensor is laid out on its mesh, from this rank's point of view."""

    mesh: Any
    shard: tuple[tuple[int, int | None], ...]  # (mesh dim, tensor dim or None if unknown)
    partial: tuple[tuple[int, str], ...]  # (mesh dim, reduce op)
    replicate: tuple[int, ...]
    coordinate: tuple[int, ...]


def _layout(t: Tensor, name: str) -> _Layout:
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"parameter {name!r} lives on device mesh {mesh}, which does not include this rank")
    shard, partial, replicate = [], [], []
    for d, pl in enumerate(t.placements):
        if pl.is_replicate():
            replicate.append(d)
        elif pl.is_partial():
            op = str(getattr(pl, "reduce_op", "sum"))
            if op not in _OPS:
                raise ValueError(
                    f"parameter {name!r}: gradient placement Partial({op}) on mesh {mesh} is not supported "
                    f"(supported reduce ops: {', '.join(_OPS)})"
                )
            partial.append((d, op))
        else:  # Shard, _StridedShard or any other sharding placement
            shard.append((d, getattr(pl, "dim", None)))
    return _Layout(mesh, tuple(shard), tuple(partial), tuple(replicate), tuple(coord))


def _resolve_partials(locs: list[Tensor | None], layouts: list[_Layout | None]) -> tuple[list[Tensor | None], int]:
    """Partial local tensors replaced by their reduced values: one all-reduce per (mesh, dims, op, dtype).

    Returns the new list and the number of all-reduces issued.
    """
    batches: dict[tuple, list[int]] = {}
    for i, lay in enumerate(layouts):
        if lay is not None and lay.partial and locs[i] is not None:
            dims = tuple(d for d, _ in lay.partial)
            ops = {op for _, op in lay.partial}
            if len(ops) > 1:
                raise ValueError(f"a gradient on {lay.mesh} mixes Partial reduce ops {sorted(ops)}")
            batches.setdefault((lay.mesh, dims, ops.pop(), locs[i].dtype, locs[i].device), []).append(i)
    if not batches:
        return locs, 0
    out = list(locs)
    for (mesh, dims, op, _, _), idx in batches.items():
        flat = torch.cat([locs[i].reshape(-1) for i in idx])
        group = mesh_group(mesh, dims)
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
        if op == "avg":
            flat.div_(math.prod(mesh.size(d) for d in dims))
        for i, part in zip(idx, flat.split([locs[i].numel() for i in idx])):
            out[i] = part.view(locs[i].shape)
    return out, len(batches)


def _local_powers(locs: Sequence[Tensor | None], p: float, out: Tensor) -> None:
    """Write ``sum |x|^p`` (the max ``|x|`` for p = inf) of each local tensor into ``out`` (0 for None)."""
    groups = group_by_device_dtype(locs)
    if len(groups) != 1 or len(next(iter(groups.values()))[1]) != len(locs):
        out.zero_()
    write_norms(out, groups, p)
    if not math.isinf(p):
        out.pow_(p)


# --------------------------------------------------------------------------- full per-parameter norms


@dataclass
class _MeshPlan:
    mesh: Any
    group: Any
    positions: list[int]
    idx: Tensor | None  # None: the mesh covers every position, in order
    mask: Tensor | None  # True where this rank contributes (a distinct shard); None if everywhere


class NormReducer:
    """Full per-parameter gradient norms on every rank, planned once, one all-reduce per mesh per call.

    Build it once from the parameters (the plan -- meshes, process groups, which
    rank contributes which parameter -- is cached by the gradients' layouts) and
    call :meth:`norms` at every step, then :meth:`total` for the global norm.

    Args:
        names: the parameters' names (used in error messages), one per gradient.
        norm_type: the p of the p-norm, > 0, or ``math.inf``.
        process_group: an explicit override, for setups the meshes do not
            describe: the gradients given here are one part of a model whose
            other parts live on the other ranks of ``process_group`` -- e.g. the
            pipeline-parallel group of stages. Per-parameter norms stay those of
            this rank's parameters; :meth:`total` combines the global norm over
            the group (one more all-reduce of one number). A ``ProcessGroup`` or
            a 1-D ``DeviceMesh``.

    Raises:
        TypeError: ``process_group`` is not a ``ProcessGroup``/1-D ``DeviceMesh``.
        ValueError: ``norm_type`` is not positive.

    Example:
        >>> reducer = NormReducer(["w", "b"])
        >>> norms = reducer.norms([torch.tensor([3.0, 4.0]), None])
        >>> norms, reducer.total(norms)
        (tensor([5., 0.]), tensor(5.))
    """

    def __init__(
        self, names: Sequence[str] | None = None, *, norm_type: float = 2.0, process_group: Any = None
    ) -> None:
        self.names = list(names) if names is not None else None
        self.norm_type = _norm_type(norm_type)
        self.process_group = check_process_group(process_group)
        self._plans: dict[tuple, tuple[list[_MeshPlan], list[_Layout | None]]] = {}
        #: all-reduces issued by the last call of :meth:`norms` (Partial resolution included)
        self.last_collectives = 0
        self._partial_collectives = 0

    def _name(self, i: int) -> str:
        return self.names[i] if self.names is not None and i < len(self.names) else f"#{i}"

    def _plan(self, grads: Sequence[Tensor | None], device: torch.device):
        key = tuple(None if g is None else (g.device_mesh, g.placements) if is_dtensor(g) else 0 for g in grads)
        key = (*key, device)
        hit = self._plans.get(key)
        if hit is not None:
            return hit
        layouts: list[_Layout | None] = [
            _layout(g, self._name(i)) if g is not None and is_dtensor(g) else None for i, g in enumerate(grads)
        ]
        by_mesh: dict[Any, list[int]] = {}
        roots: dict[frozenset[int], tuple[int, Any]] = {}
        for i, lay in enumerate(layouts):
            if lay is None:
                continue
            by_mesh.setdefault(lay.mesh, []).append(i)
            roots.setdefault(_root_ranks(lay.mesh), (i, lay.mesh))
        if len(roots) > 1 and self.process_group is None:
            (i0, m0), (i1, m1) = list(roots.values())[:2]
            raise ValueError(
                f"parameter {self._name(i1)!r} lives on device mesh {m1}, which spans other ranks than the mesh "
                f"{m0} of parameter {self._name(i0)!r}: the global norm would differ between ranks. Pass "
                "process_group= (the group across which these parts' norms combine, e.g. the pipeline stages)"
            )
        P = len(grads)
        plans = []
        for mesh, pos in by_mesh.items():
            contrib = []
            for i in pos:
                lay = layouts[i]
                rep = lay.replicate + tuple(d for d, _ in lay.partial)  # Partial dims are replicated once resolved
                contrib.append(all(lay.coordinate[d] == 0 for d in rep))
            idx = None if pos == list(range(P)) else torch.tensor(pos, device=device)
            mask = None if all(contrib) else torch.tensor(contrib, device=device)
            group = mesh_group(mesh, tuple(range(mesh.ndim)))
            plans.append(_MeshPlan(mesh, group, pos, idx, mask))
        self._plans[key] = (plans, layouts)
        return plans, layouts

    def local_powers(self, grads: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
        """Per parameter, ``sum |g|^p`` of the local shard (max ``|g|`` for inf), Partial gradients resolved.

        The step before the reduction, for callers that fuse it with their own
        collective. Returns a ``[P]`` tensor (``out`` if given).
        """
        locs = [None if g is None else local_tensor(g) for g in grads]
        present = [t for t in locs if t is not None]
        if out is None:
            device = present[0].device if present else torch.device("cpu")
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
            out = torch.empty(len(grads), device=device, dtype=dtype)
        _, layouts = self._plan(grads, out.device)
        resolved, self._partial_collectives = _resolve_partials(locs, layouts)
        _local_powers(resolved, self.norm_type, out)
        return out

    def norms(self, grads: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
        """The norm of every full gradient, identical on every rank of its mesh.

        Args:
            grads: the gradients (DTensors, plain tensors or ``None`` for a
                missing gradient, recorded as 0), in parameter order. Must be
                given in the same order, with the same layouts, on every rank.
            out: optional ``[P]`` float tensor to write into.

        Returns:
            A ``[P]`` tensor (float32; float64 if a gradient is float64) on the
            gradients' (local) device.
        """
        s = self.local_powers(grads, out)
        plans, _ = self._plan(grads, s.device)
        inf = math.isinf(self.norm_type)
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        for plan in plans:
            v = s if plan.idx is None else s.index_select(0, plan.idx)
            if plan.mask is not None and not inf:  # where, not a product: inf * 0 would give NaN
                v = torch.where(plan.mask, v, 0.0)
            dist.all_reduce(v, op=op, group=plan.group)
            if plan.idx is not None:
                s.index_copy_(0, plan.idx, v)
            elif v is not s:
                s.copy_(v)
        self.last_collectives = len(plans) + self._partial_collectives
        if not inf:
            if self.norm_type == 2.0:
                s.sqrt_()
            else:
                s.pow_(1.0 / self.norm_type)
        return s

    def total(self, norms: Tensor) -> Tensor:
        """The global norm from the per-parameter norms (combined over ``process_group`` if one was given).

        Args:
            norms: the ``[P]`` output of :meth:`norms`.

        Returns:
            A 0-d tensor: ``‖norms‖_p``, identical on every rank.
        """
        p = self.norm_type
        if self.process_group is None:
            return torch.linalg.vector_norm(norms, p)
        if math.isinf(p):
            t = norms.amax() if norms.numel() else norms.new_zeros(())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_as_group(self.process_group))
            return t
        t = norms.pow(p).sum()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_as_group(self.process_group))
        return t.sqrt() if p == 2.0 else t.pow(1.0 / p)


def full_norms(
    grads: Sequence[Tensor | None],
    norm_type: float = 2.0,
    *,
    names: Sequence[str] | None = None,
    process_group: Any = None,
) -> Tensor:
    """The ``norm_type``-norm of each *full* gradient, computed from local shards, identical on every rank.

    A one-off :class:`NormReducer`; build one and reuse it at every step to
    keep the plan. DTensor gradients cost one all-reduce of ``P`` numbers per
    device mesh, over the mesh's sharded dimensions only; plain tensors none.

    Args:
        grads: gradients in parameter order (``None`` for a missing one: 0).
        norm_type: p > 0 or ``math.inf``.
        names: parameter names, for error messages.
        process_group: see :class:`NormReducer` (only the global norm uses it).

    Returns:
        A ``[P]`` tensor of norms.

    Raises:
        TypeError: ``process_group`` of the wrong type.
        ValueError: non-positive ``norm_type``; a gradient on a mesh that does
            not include this rank; DTensors on meshes spanning different ranks
            without ``process_group``.

    Example:
        >>> full_norms([torch.tensor([3.0, 4.0]), None, torch.tensor([-2.0])], norm_type=math.inf)
        tensor([4., 0., 2.])
    """
    return NormReducer(names, norm_type=norm_type, process_group=process_group).norms(grads)


def combine_norms(norms: Tensor, norm_type: float = 2.0, *, process_group: Any = None) -> Tensor:
    """The global norm ``‖norms‖_p`` of per-parameter full norms, combined over ``process_group`` if given.

    (:func:`gradwatch.norms.total_norm` takes the tensors themselves; this takes their norms.)

    Args:
        norms: the ``[P]`` output of :func:`full_norms`.
        norm_type: p > 0 or ``math.inf``.
        process_group: the group across which parts of the model combine (the
            pipeline stages); ``None``: no collective.

    Returns:
        A 0-d tensor.

    Example:
        >>> combine_norms(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    return NormReducer(norm_type=norm_type, process_group=process_group).total(norms)


def needs_reduction(params: Iterable[Tensor], process_group: Any = None) -> bool:
    """Whether the norms of ``params``' gradients need :class:`NormReducer` (a DTensor, or an override).

    Example:
        >>> needs_reduction([torch.zeros(2, requires_grad=True)])
        False
    """
    return process_group is not None or any(is_dtensor(p) for p in params)


class DistributedMeter(ReadyOrder):
    """A drop-in for the watch's ``NormMeter`` on sharded models: full L2 norms at step time, no hooks.

    Parameter hooks would see DTensor gradients (an all-gather per hooked
    parameter) or, under FSDP2, not fire for the sharded gradients at all, so
    everything is measured at the step with :class:`NormReducer`: one fused
    local pass, one all-reduce per mesh. With ``track_order`` the hooks only
    record the order in which gradients became ready (no tensor operation).

    Args:
        params: the parameters, in model order.
        names: their names.
        process_group: the :class:`NormReducer` override (pipeline stages).
        track_order: record the gradients' ready order in :attr:`order`.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> meter = DistributedMeter([p], ["p"])
        >>> out = torch.zeros(1)
        >>> meter.measure([p.grad], [], out), meter.total(out)
        (tensor([5.]), tensor(5.))
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str],
        *,
        process_group: Any = None,
        track_order: bool = False,
    ) -> None:
        self.params = list(params)
        self.reducer = NormReducer(names, process_group=process_group)
        self.hot = True
        ReadyOrder.__init__(self, len(self.params))
        if track_order:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def hook(param: Tensor) -> None:
            self._mark_ready(i)

        return hook

    def measure(self, grads: list[Tensor | None], missing: list[int], out: Tensor, hooks_valid: bool = True) -> Tensor:
        """Write the full L2 norm of every gradient into ``out`` (a contiguous ``[P]`` view; 0 where missing).

        ``missing`` and ``hooks_valid`` are accepted for the meter interface (a
        missing gradient is ``None`` in ``grads`` and gives 0; nothing is hooked).
        """
        return self.reducer.norms(grads, out=out)

    def total(self, norms: Tensor, out: Tensor | None = None) -> Tensor:
        """The global norm from :meth:`measure`'s norms (combined over the override group if any)."""
        t = self.reducer.total(norms)
        return t if out is None else out.copy_(t)


# --------------------------------------------------------------------------- unit-wise (row) norms for AGC


def row_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, *, names: Sequence[str] | None = None) -> list[Tensor]:
    """Unit-wise norms for AGC: per row (dim 0) of each tensor of ndim >= 2, the full row's norm.

    For a tensor of ndim >= 2 the result has one entry per *local* row (the rows
    of :func:`local_tensor`, so a clipper can scale them in place); each entry is
    the norm of the whole row of the full tensor. Rows are local, and need no
    collective, when only dim 0 is sharded (FSDP2's ``Shard(0)``); when other
    dimensions are sharded (tensor parallel's ``Shard(1)``) the row sums are
    all-reduced over those mesh dimensions -- one all-reduce per (mesh,
    dimensions), for all tensors together. For ndim <= 1 the unit is the whole
    tensor: a 0-d full norm. Gradients and weights can be passed together (AGC
    needs both).

    Args:
        tensors: DTensors or plain tensors.
        norm_type: p > 0 or ``math.inf``.
        names: names for error messages.

    Returns:
        One tensor per input (float32 for half-precision inputs).

    Raises:
        ValueError: a tensor on a mesh that does not include this rank, or
            sharded by a placement whose tensor dimension is unknown.

    Example:
        >>> row_norms([torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([3.0, 4.0])])
        [tensor([5., 1.]), tensor(5.)]
    """
    p = _norm_type(norm_type)
    inf = math.isinf(p)
    tensors = list(tensors)
    name = (lambda i: names[i]) if names is not None else (lambda i: f"#{i}")
    layouts = [_layout(t, name(i)) if is_dtensor(t) else None for i, t in enumerate(tensors)]
    locs, _ = _resolve_partials([local_tensor(t) for t in tensors], layouts)
    sums: list[Tensor] = []
    batches: dict[tuple, list[int]] = {}
    for i, (t, loc, lay) in enumerate(zip(tensors, locs, layouts)):
        acc = accumulation_dtype(loc.dtype)
        s = torch.linalg.vector_norm(loc.reshape(loc.shape[0], -1), p, dim=1, dtype=acc) if t.ndim >= 2 else None
        s = torch.linalg.vector_norm(loc, p, dtype=acc) if s is None else s
        sums.append(s if inf else s.pow(p))
        dims = _unit_dims(t, lay, name(i), inf, sums, i)
        if dims:
            batches.setdefault((lay.mesh, dims, sums[i].dtype), []).append(i)
    op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
    for (mesh, dims, _), idx in batches.items():
        flat = torch.cat([sums[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=op, group=mesh_group(mesh, dims))
        for i, part in zip(idx, flat.split([sums[i].numel() for i in idx])):
            sums[i] = part.view(sums[i].shape)
    if inf:
        return sums
    return [s.sqrt() if p == 2.0 else s.pow(1.0 / p) for s in sums]


def _unit_dims(t: Tensor, lay: _Layout | None, name: str, inf: bool, sums: list[Tensor], i: int) -> tuple[int, ...]:
    """The mesh dimensions a unit's local sum ``sums[i]`` is reduced over (zeroing a replicated copy's)."""
    if lay is None:
        return ()
    if t.ndim >= 2:
        if any(td is None for _, td in lay.shard):
            raise ValueError(f"tensor {name!r} on mesh {lay.mesh}: sharded along an unknown tensor dimension")
        return tuple(sorted(d for d, td in lay.shard if td != 0))
    if not lay.shard:
        return ()
    # the whole tensor is the unit: reduce over the whole mesh (so that all such units share one
    # all-reduce), each replicated copy counted once, as in NormReducer
    rep = lay.replicate + tuple(d for d, _ in lay.partial)
    if not inf and not all(lay.coordinate[d] == 0 for d in rep):
        sums[i] = torch.zeros_like(sums[i])
    return tuple(range(lay.mesh.ndim))


# --------------------------------------------------------------------------- counting collectives

_KINDS = (
    ("reduce_scatter", "reduce_scatter"),
    ("allreduce", "all_reduce"),
    ("allgather", "all_gather"),
    ("broadcast", "broadcast"),
    ("alltoall", "all_to_all"),
    ("send", "send"),
    ("recv", "recv"),
    ("barrier", "barrier"),
)


class CollectiveCount:
    """The collectives seen by :func:`count_collectives`: ``counts`` by kind, e.g. ``counts["all_reduce"]``."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __getitem__(self, kind: str) -> int:
        return self.counts[kind]

    @property
    def total(self) -> int:
        """All collectives together."""
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"CollectiveCount({dict(self.counts)})"


@contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """Count the ``torch.distributed`` collectives issued inside the block, at any depth.

    Counts the c10d operations (``c10d::allreduce_``, ``c10d::_allgather_base_``,
    ...) -- also those issued inside DTensor redistributions and FSDP -- with
    the PyTorch profiler, by kind: ``all_reduce``, ``all_gather``,
    ``reduce_scatter``, ``broadcast``, ``all_to_all``, ``send``, ``recv``,
    ``barrier``. For tests and benchmarks, not for the training loop (the
    profiler slows the block down). Do not run a ``TorchDispatchMode`` (such as
    :class:`~gradwatch.count_host_syncs`) inside the block: the profiler then
    sees each collective twice.

    Example:
        >>> with count_collectives() as c:
        ...     _ = torch.ones(2).sum()
        >>> c.total
        0
    """
    from torch.profiler import ProfilerActivity, profile

    result = CollectiveCount()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield result
    for e in prof.events():
        if not e.name.startswith("c10d::"):
            continue
        op = e.name[len("c10d::") :].lower()
        for key, kind in _KINDS:
            if key in op:
                result.counts[kind] += 1
                break


def measure_mode(model: Any, measure: str, scaler: Any, distributed: bool = False) -> str:
    """The measurement mode a watch uses: ``"step"`` with AMP, with DTensors and under DDP (``"hook"`` warns).

    Args:
        model: what the watch was given (a DDP-wrapped module is seen here;
            one wrapped later is found at the first step by the norm meter).
        measure: the ``measure`` argument.
        scaler: the ``scaler`` argument (gradients change when unscaled: hooks would see them scaled).
        distributed: the parameters are DTensors or a ``process_group`` is given.

    Example:
        >>> measure_mode(torch.nn.Linear(2, 2), "auto", None)
        'auto'
    """
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if scaler is not None or distributed:  # sharded gradients: no parameter hooks (they would gather)
        return "step"
    if measure == "hook" and ddp:  # a clipper or a skip would decide from each rank's own gradients
        warnings.warn(
            "GradWatch(measure='hook') on a DistributedDataParallel model: hooks see each rank's local "
            "gradients before DDP's all-reduce, so the synchronized gradients are measured at the step "
            "instead; pass measure='step' (the default 'auto' does the same) to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    return "step" if ddp else measure


def make_meter(
    names: list[str], params: list[Tensor], measure: str, process_group: Any = None, track_order: bool = False
) -> NormMeter | DistributedMeter:
    """The norm meter of a watch: :class:`DistributedMeter` for DTensor parameters or a ``process_group``
    (full norms from local shards, one all-reduce per mesh, no hooks), else a
    :class:`~gradwatch.norms.NormMeter` measuring in ``measure`` mode.

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> type(make_meter(["weight", "bias"], list(lin.parameters()), "auto")).__name__
        'NormMeter'
    """
    if needs_reduction(params, process_group):
        return DistributedMeter(params, names, process_group=process_group, track_order=track_order)
    dtype = stat_dtype([p.dtype for p in params])
    return NormMeter(params, measure, params[0].device, dtype, track_order)
