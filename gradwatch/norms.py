"""The norms engine: every gradient's norm in fused passes, measured where it is cheapest.

Pure functions (:func:`grad_norms`, :func:`total_norm`) serve the clippers when
they run alone; :class:`NormMeter` serves :class:`~gradwatch.GradWatch`. Both
reduce through the same fused pass (:func:`write_norms`): tensors grouped by
device and dtype, one ``torch._foreach_norm`` per group -- the kernels of
:func:`torch.nn.utils.get_total_norm`, so a total computed here has torch's bits.

Two ways to read a gradient, and each wins somewhere (``benchmarks/overhead.py``):

* in a post-accumulate-grad hook, right after backward wrote the gradient and
  while it is still in cache: ``torch.dot(g, g)`` reads it at memory speed
  (``vector_norm`` runs single-threaded on CPU, 2-4x slower). Worth it for
  large tensors, where a later cold read costs milliseconds;
* in the fused pass at step time: a single call for any number of tensors.
  Worth it for small tensors, where per-call overhead is the whole cost.

``NormMeter(mode="auto")`` hooks the tensors of at least :data:`HOOK_MIN_NUMEL`
elements and measures the rest in the fused pass; ``"hook"`` and ``"step"``
force one way. Only ``"step"`` uses exactly the kernels of ``clip_grad_norm_``
(bit-identical norms); the hooks' float32 ``dot`` agrees to ~1e-6 relative.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradwatch._compat import foreach_copy_, foreach_norm, foreach_sub_, is_dtensor, reduced_after_hooks
from gradwatch._params import stat_dtype
from gradwatch._validate import check_float
from gradwatch.contrib import Binding, Contributor, StepView

__all__ = [
    "HOOK_MIN_NUMEL",
    "MODES",
    "NormMeter",
    "ReadyOrder",
    "WeightMeter",
    "WeightNorms",
    "accumulation_dtype",
    "grad_norms",
    "group_by_device_dtype",
    "sparse_values",
    "stat_dtype",
    "total_norm",
]

MODES = ("auto", "hook", "step")

#: In ``mode="auto"``, gradients with at least this many elements (256 KiB in
#: float32) are measured in hooks, the rest in the fused step-time pass.
HOOK_MIN_NUMEL = 1 << 16

Groups = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]


def group_by_device_dtype(tensors: Sequence[Tensor | None]) -> Groups:
    """Group tensors by ``(device, dtype)`` for ``torch._foreach_*`` calls.

    Groups appear in the order their first tensor appears (as in torch's own
    helper), tensors keep their order inside a group, and ``None`` entries are
    left out.

    Args:
        tensors: tensors, possibly with ``None`` holes (missing gradients).

    Returns:
        ``{(device, dtype): (tensors, positions)}`` where ``positions`` are the
        indices of the tensors in the input sequence.

    Example:
        >>> a, b = torch.ones(2), torch.ones(2, dtype=torch.float64)
        >>> groups = group_by_device_dtype([a, None, b])
        >>> [(str(dt), pos) for (_, dt), (_, pos) in groups.items()]
        [('torch.float32', [0]), ('torch.float64', [2])]
    """
    groups: Groups = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        ts, pos = groups.setdefault((t.device, t.dtype), ([], []))
        ts.append(t)
        pos.append(i)
    return groups


def check_norm_type(norm_type: float) -> float:
    """Validate a p-norm order: any p > 0, or ``math.inf``.

    Raises:
        TypeError: not a number (e.g. ``"fro"``).
        ValueError: not positive, or NaN.
    """
    return check_float(norm_type, "norm_type", min=0, min_open=True, allow_inf=True)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a norm of ``dtype`` values is accumulated in: float32 for half precision, else None (its own).

    Example:
        >>> accumulation_dtype(torch.bfloat16), accumulation_dtype(torch.float32)
        (torch.float32, None)
    """
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else None


def write_norms(
    out: Tensor, groups: Groups, norm_type: float = 2.0, index: Callable[[list[int]], Tensor] | None = None
) -> Tensor:
    """Write the ``norm_type``-norm of every grouped tensor into ``out`` at its position.

    One ``_foreach_norm`` per group. When one group covers every slot of
    ``out`` in order and the dtypes agree, the norms are stacked straight into
    ``out``; otherwise they are scattered with ``index_copy_``. Slots of no
    group are left as they are.

    Args:
        out: a 1-D tensor with one slot per input position.
        groups: from :func:`group_by_device_dtype`.
        norm_type: the p of the p-norm.
        index: maps positions to an index tensor on ``out.device`` (lets a
            caller cache them); default: a new tensor each call.

    Returns:
        ``out``.
    """
    for (_, dtype), (tensors, positions) in groups.items():
        acc = accumulation_dtype(dtype)
        norms = foreach_norm(tensors, norm_type, dtype=acc)
        if len(positions) == out.numel() and (acc or dtype) == out.dtype and norms[0].device == out.device:
            torch.stack(norms, out=out)  # positions are 0..P-1: the common one-group case
            continue
        idx = index(positions) if index is not None else torch.tensor(positions, device=out.device)
        out.index_copy_(0, idx, torch.stack(norms).to(device=out.device, dtype=out.dtype))
    return out


def sparse_values(t: Tensor) -> Tensor:
    """The stored values of a sparse COO tensor (duplicates summed), or ``t`` itself if dense.

    Their norm is the norm of the tensor, which is what torch would compute on ``t.to_dense()``.
    """
    return t.coalesce().values() if t.layout == torch.sparse_coo else t


def split_sparse(tensors: Sequence[Tensor | None]) -> tuple[list[Tensor | None], list[tuple[int, Tensor]]]:
    """Dense tensors (sparse ones replaced by None) and the ``(position, tensor)`` sparse ones."""
    sparse = [(i, t) for i, t in enumerate(tensors) if t is not None and t.layout != torch.strided]
    if not sparse:
        return list(tensors), []
    dense = list(tensors)
    for i, _ in sparse:
        dense[i] = None
    return dense, sparse


def write_sparse_norms(out: Tensor, sparse: list[tuple[int, Tensor]], norm_type: float = 2.0) -> Tensor:
    """Write the norms of sparse gradients (``nn.Embedding(sparse=True)``) into ``out``, one call each."""
    for i, t in sparse:
        out[i] = torch.linalg.vector_norm(sparse_values(t), norm_type, dtype=accumulation_dtype(t.dtype))
    return out


def grad_norms(
    tensors: Sequence[Tensor | None],
    norm_type: float = 2.0,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The ``norm_type``-norm of every tensor, in one fused pass per device and dtype.

    Args:
        tensors: the tensors (usually gradients); ``None`` entries give 0.
        norm_type: the p of the p-norm; ``math.inf`` for the largest absolute value.
        device: where the result lives (default: the first tensor's device).
        dtype: the result's dtype (default: :func:`stat_dtype` of the inputs).
            Half-precision tensors are always reduced in float32.

    Returns:
        A 1-D tensor with one norm per input, in input order.

    Example:
        >>> grad_norms([torch.tensor([3.0, 4.0]), None, torch.tensor([1.0])])
        tensor([5., 0., 1.])
    """
    present = [t for t in tensors if t is not None]
    if device is None:
        device = present[0].device if present else torch.device("cpu")
    if dtype is None:
        dtype = stat_dtype([t.dtype for t in present])
    out = torch.zeros(len(tensors), device=device, dtype=dtype)
    dense, sparse = split_sparse(tensors)
    write_norms(out, group_by_device_dtype(dense), norm_type)
    return write_sparse_norms(out, sparse, norm_type)


def total_norm(tensors: Sequence[Tensor | None], norm_type: float = 2.0) -> Tensor:
    """The norm of all tensors together, bit-identical to ``torch.nn.utils.get_total_norm``.

    (:func:`gradwatch.distributed.combine_norms` takes per-parameter norms instead.)

    Args:
        tensors: the tensors; ``None`` entries are skipped.
        norm_type: the p of the p-norm (``math.inf`` for the max-norm).

    Returns:
        A 0-d tensor on the first tensor's device (``tensor(0.)`` when empty).

    Example:
        >>> total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    first = present[0].device
    norms: list[Tensor] = []
    for group, _ in group_by_device_dtype(present).values():
        norms.extend(foreach_norm(group, norm_type))
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)


class ReadyOrder:
    """The order in which the parameters' gradients became ready in backward, since the last :meth:`reset`.

    Kept by post-accumulate-grad hooks that call :meth:`_mark_ready`; the
    first parameters in :attr:`order` are where a value entered the backward
    pass (what :class:`~gradwatch.NonFinite` reports first).
    """

    def __init__(self, n: int) -> None:
        self.order: list[int] = []
        self._fired = [False] * n
        self._handles: list = []

    def _mark_ready(self, i: int) -> None:
        if not self._fired[i]:
            self._fired[i] = True
            self.order.append(i)

    def reset(self) -> None:
        """Forget the ready order (call after each step)."""
        for i in self.order:
            self._fired[i] = False
        self.order.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


class NormMeter(ReadyOrder):
    """Writes this step's gradient L2 norms into a ``[P]`` tensor on ``device`` in ``dtype``.

    Args:
        params: the parameters, in model order.
        mode: ``"auto"``, ``"hook"`` or ``"step"``.
        device, dtype: where and how the norms are kept.
        track_order: register hooks on every parameter to record the order in
            which gradients become ready (even those measured at step time).

    Attributes:
        order: parameter indices in the order their gradients became ready
            since the last :meth:`reset` (with ``track_order`` or hooks).
        hot: whether the hooks measure on the coming backward (set by the
            watch: False on steps that neither record nor clip).
    """

    def __init__(
        self, params: Sequence[Tensor], mode: str, device: torch.device, dtype: torch.dtype, track_order: bool
    ) -> None:
        self.params = list(params)
        self.device, self.dtype = device, dtype
        P = len(self.params)
        self._sq = torch.zeros(P, device=device, dtype=dtype)  # hooks write squared norms here
        self._sq_views = list(self._sq.unbind())
        self.mode, self._track_order = mode, track_order
        self.hooked = [mode == "hook" or (mode == "auto" and p.numel() >= HOOK_MIN_NUMEL) for p in self.params]
        self._hooked_idx = [i for i in range(P) if self.hooked[i]]
        self._fused_idx = [i for i in range(P) if not self.hooked[i]]
        self._check_reduced = bool(self._hooked_idx)  # at the first measure: see _unhook_reduced
        self._index_of = IndexCache(device)
        # the common case, planned once: every gradient in one fused pass straight into the row
        same = all(p.device == device and p.dtype == dtype for p in self.params)
        self._one_pass = same and not self._hooked_idx and accumulation_dtype(dtype) is None
        self.hot = True
        super().__init__(P)
        if self._hooked_idx or track_order:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _square_into(self, i: int, g: Tensor) -> None:
        """Write ``‖g‖²`` of parameter ``i``'s gradient into its slot (any dtype, layout or graph)."""
        out = self._sq_views[i]
        g = sparse_values(g).detach()  # create_graph=True gradients are part of a graph
        if g.dtype.is_floating_point and not accumulation_dtype(g.dtype):
            flat = g.reshape(-1)
            if g.dtype == self.dtype and g.device == self.device:
                torch.dot(flat, flat, out=out)  # reads at memory speed, while the gradient is in cache
            else:  # e.g. the model was converted to float64 after the watch was built
                out.copy_(torch.dot(flat, flat))
        else:  # half precision (accumulated in float32), complex
            out.copy_(torch.linalg.vector_norm(g, dtype=accumulation_dtype(g.dtype)).square())

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        hooked = self.hooked

        def hook(param: Tensor) -> None:
            if hooked[i] and self.hot:
                self._square_into(i, param.grad)
            self._mark_ready(i)

        return hook

    def measure(self, grads: list[Tensor | None], missing: list[int], out: Tensor, hooks_valid: bool = True) -> Tensor:
        """Write the norms of ``grads`` into ``out`` (0 where missing); returns it.

        Args:
            grads: the gradients (``None`` where missing), in model order.
            missing: indices of the ``None`` entries.
            out: a ``[P]`` tensor (a named view of GradWatch's device row).
            hooks_valid: False when the gradients changed after backward (AMP
                unscaling): everything is then measured now.
        """
        if self._check_reduced:
            self._unhook_reduced()
        if self._one_pass and not missing and all(g.dtype is self.dtype and not g.is_sparse for g in grads):
            return torch.stack(foreach_norm(grads), out=out)  # what write_norms does, without planning
        if self._hooked_idx:
            for i in self._hooked_idx:  # gradients no hook saw this step (set by hand, or changed since)
                g = grads[i]
                if g is not None and (not self._fired[i] or not hooks_valid):
                    self._square_into(i, g)
            torch.sqrt(self._sq, out=out)
        rest = grads if not self._hooked_idx else [grads[i] if not self.hooked[i] else None for i in range(len(grads))]
        rest, sparse = split_sparse(rest)
        write_norms(out, group_by_device_dtype(rest), 2.0, self._index_of)
        write_sparse_norms(out, sparse, 2.0)
        if missing:
            out.index_fill_(0, self._index_of(missing), 0.0)
        return out

    def _unhook_reduced(self) -> None:
        """Once, at the first measure: gradients that a data-parallel engine reduces after the hooks move to the step.

        A watch built on the bare module before ``DistributedDataParallel``
        wrapped it cannot know; its hooks would see each rank's local gradient
        and a clipper or a skip would decide differently on every rank (the
        replicas fork). Those parameters are measured in the fused pass at the
        step from now on: after the all-reduce, as the optimizer applies them.
        """
        self._check_reduced = False
        owned = reduced_after_hooks([self.params[i] for i in self._hooked_idx])
        reduced = [i for i, r in zip(self._hooked_idx, owned) if r]
        if not reduced:
            return
        for i in reduced:
            self.hooked[i] = False
        self._hooked_idx = [i for i in self._hooked_idx if self.hooked[i]]
        self._fused_idx = sorted(self._fused_idx + reduced)
        if not self._hooked_idx and not self._track_order:
            self.remove()
        if self.mode == "hook":
            warnings.warn(
                f"GradWatch(measure='hook'): the gradients of {len(reduced)} parameter(s) are all-reduced by a "
                "data-parallel engine (DistributedDataParallel) after their hooks run, so hooks would see each "
                "rank's local gradients; they are measured at the step instead. Build the watch with "
                "measure='step' to silence this warning",
                UserWarning,
                stacklevel=4,
            )

    def total(self, norms: Tensor, out: Tensor | None = None) -> Tensor:
        """The global L2 norm of :meth:`measure`'s norms (written into ``out`` when given)."""
        return torch.linalg.vector_norm(norms, out=out) if out is not None else torch.linalg.vector_norm(norms)


class IndexCache:
    """Index tensors of parameter positions on one device, built once per distinct set of positions."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, positions: list[int]) -> Tensor:
        key = tuple(positions)
        idx = self._cache.get(key)
        if idx is None:
            idx = self._cache[key] = torch.tensor(positions, device=self.device)
        return idx


class WeightMeter:
    """Parameter norms ``‖W_t‖`` and applied updates ``‖W_{t+1} - W_t‖``, fused and sync-free.

    :meth:`norms` is one ``torch._foreach_norm`` per device and dtype.
    With ``update=True`` the meter keeps one scratch copy of the parameters
    (:attr:`nbytes`: their size, in their dtype): :meth:`snapshot` copies
    ``W_t`` into it before the optimizer step (one ``_foreach_copy_``), and
    :meth:`update` -- in the optimizer's post-step hook -- subtracts ``W_{t+1}``
    in place and takes the norms of the difference (``_foreach_sub_`` and
    ``_foreach_norm``). The subtraction is exact where ``W_t`` and ``W_{t+1}``
    are within a factor 2 of each other (Sterbenz), the usual case.

    Args:
        params: the parameters, in model order.
        update: keep the scratch copy for :meth:`update`.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> meter, out = WeightMeter([w], update=True), torch.zeros(1)
        >>> meter.norms(out)
        tensor([5.])
        >>> meter.snapshot(); w.grad = torch.tensor([0.0, 10.0]); opt.step(); meter.update(opt, out)
        tensor([1.])
    """

    def __init__(self, params: Sequence[Tensor], update: bool = False) -> None:
        self.params = list(params)
        self._groups = group_by_device_dtype(self.params)
        self._index = IndexCache(self.params[0].device)
        self._views: list[Tensor] = []
        self._subsets: dict[int, tuple[int, dict]] = {}
        self.nbytes = 0
        if update:
            views: list[Tensor | None] = [None] * len(self.params)
            for (device, dtype), (tensors, positions) in self._groups.items():
                flat = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)
                self.nbytes += flat.numel() * flat.element_size()
                offset = 0
                for t, i in zip(tensors, positions):
                    views[i] = flat[offset : offset + t.numel()].view(t.shape)
                    offset += t.numel()
            self._views = [v for v in views if v is not None]

    @torch.no_grad()
    def norms(self, out: Tensor) -> Tensor:
        """Write ``‖W‖`` of every parameter into ``out`` (``[P]``); returns it."""
        return write_norms(out, self._groups, 2.0, self._index)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the parameters ``W_t`` into the scratch buffer."""
        for tensors, positions in self._groups.values():
            foreach_copy_([self._views[i] for i in positions], tensors)

    def _subset(self, optimizer: torch.optim.Optimizer) -> dict:
        """``{(device, dtype): (scratch views, params, positions)}`` of the watched parameters ``optimizer`` steps."""
        cached = self._subsets.get(id(optimizer))
        if cached is not None and cached[0] == len(optimizer.param_groups):
            return cached[1]
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        groups: dict = {}
        for key, (tensors, positions) in self._groups.items():
            pick = [(t, i) for t, i in zip(tensors, positions) if id(t) in ids]
            if pick:
                groups[key] = ([self._views[i] for _, i in pick], [t for t, _ in pick], [i for _, i in pick])
        self._subsets[id(optimizer)] = (len(optimizer.param_groups), groups)
        return groups

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer, out: Tensor) -> Tensor:
        """After ``optimizer``'s step: ``‖W_{t+1} - W_t‖`` of its parameters into ``out``; returns it."""
        groups = self._subset(optimizer)
        for views, params, _ in groups.values():
            foreach_sub_(views, params)
        return write_norms(out, {k: (v, pos) for k, (v, _, pos) in groups.items()}, 2.0, self._index)


class WeightNorms(Contributor):
    """The contributor of ``GradWatch(param_norms=True, update_ratio=...)``: ``‖W_t‖`` and ``‖W_{t+1} - W_t‖``.

    ``‖W_t‖`` is measured at the step, before the optimizer updates the
    weights; with ``update=True`` the update is measured in each attached
    optimizer's post-step hook (:meth:`after_optimizer_step`) and written into
    the step's row in place (NaN until then, and for parameters no attached
    optimizer stepped). Stored as ``History.param_norms`` and
    ``History.update_norms``.

    Args:
        update: also measure the applied update (one scratch copy of the parameters).
    """

    prefix = "weights"

    def __init__(self, update: bool = False) -> None:
        self.update = update
        self._late: Tensor | None = None

    def bind(self, binding: Binding) -> None:
        """Set up the fused weight-norm pass (and the scratch copy for updates).

        Raises:
            NotImplementedError: DTensor parameters (their weight norms would be the local shards').
        """
        if any(is_dtensor(p) for p in binding.params):
            raise NotImplementedError(
                "param_norms and update_ratio are not supported for DTensor parameters (FSDP2, HSDP, tensor "
                "parallel) yet: their weight norms would be the local shards'"
            )
        super().bind(binding)
        self.meter = WeightMeter(binding.params, update=self.update)
        P = len(binding.params)
        self._norms = torch.zeros(P, device=binding.device, dtype=binding.dtype)
        self._nan = torch.full((P,), float("nan"), device=binding.device, dtype=binding.dtype)

    def columns(self) -> dict[str, int]:
        P = len(self.binding.params)
        return {"param_norms": P, "update_norms": P} if self.update else {"param_norms": P}

    def observe(self, view: StepView) -> dict[str, Tensor]:
        values = {"param_norms": self.meter.norms(self._norms)}
        if self.update:  # W_t, for the optimizer's post-step hook
            self.meter.snapshot()
            self._late = view.row[f"{self.prefix}.update_norms"]
            values["update_norms"] = self._nan
        return values

    def to_history(self, cols: dict) -> dict:
        return {"param_norms": cols["param_norms"], **({"update_norms": cols["update_norms"]} if self.update else {})}

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._late is not None:
            self.meter.update(optimizer, self._late)

    def __repr__(self) -> str:
        return f"WeightNorms(update={self.update})"
