"""Every use of torch-private API in gradwatch, in one place.

A torch upgrade that changes one of these fails here, in the one test per shim
(``tests/test_compat.py``), not somewhere deep in a training run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "FSDPParamRef",
    "TorchDispatchMode",
    "flatten_cat",
    "foreach_clamp_",
    "foreach_copy_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sub_",
    "found_inf_safe",
    "fsdp_param_refs",
    "is_dtensor",
    "module_parameter",
    "reduced_after_hooks",
    "scale_of",
    "set_found_inf",
    "unscale_once",
    "unscaled_this_step",
]


def flatten_cat(tensors: Sequence[Tensor]) -> Tensor:
    """All ``tensors`` (one device and dtype, ndim >= 1) flattened into one ``[1, N]`` tensor, in one op.

    ``torch._chunk_cat(tensors, dim=0, num_chunks=1)``: FSDP2's copy-in
    kernel; ``torch.cat`` would need one view per tensor to flatten them.
    """
    return torch._chunk_cat(list(tensors), 0, 1)


def foreach_norm(
    tensors: Sequence[Tensor], norm_type: float = 2.0, dtype: torch.dtype | None = None
) -> Sequence[Tensor]:
    """``torch._foreach_norm`` where the device has it (CPU, CUDA, the private-use backend), else a loop.

    Same kernels as ``torch.nn.utils.get_total_norm``, hence the same bits.
    """
    kind = tensors[0].device.type
    if kind == "cpu" or kind == "cuda" or kind == torch._C._get_privateuse1_backend_name():
        return torch._foreach_norm(tensors if isinstance(tensors, list) else list(tensors), norm_type, dtype=dtype)
    return [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in tensors]


def foreach_mul(tensors: Sequence[Tensor], factor: Tensor) -> list[Tensor]:
    """``torch._foreach_mul``: every tensor times the 0-d ``factor``, in one call (new tensors)."""
    return list(torch._foreach_mul(list(tensors), factor))


def foreach_mul_(tensors: Sequence[Tensor], factors: Tensor | Sequence[Tensor] | float) -> None:
    """``torch._foreach_mul_``: every tensor scaled in place (one factor for all, or one each)."""
    torch._foreach_mul_(list(tensors), factors if isinstance(factors, (Tensor, float, int)) else list(factors))


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``torch._foreach_copy_``: ``dst[i].copy_(src[i])`` in one call."""
    torch._foreach_copy_(list(dst), list(src))


def foreach_sub_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``torch._foreach_sub_``: ``tensors[i] -= others[i]`` in one call."""
    torch._foreach_sub_(list(tensors), list(others))


def foreach_clamp_(tensors: Sequence[Tensor], low: float, high: float) -> None:
    """``torch._foreach_clamp_min_`` then ``torch._foreach_clamp_max_``: every element into ``[low, high]``."""
    torch._foreach_clamp_min_(list(tensors), low)
    torch._foreach_clamp_max_(list(tensors), high)


# -- DTensor -----------------------------------------------------------------------------
try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    _DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (False where torch has no DTensor).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return _DTensor is not None and isinstance(t, _DTensor)


# -- GradScaler ------------------------------------------------------------------------
def scale_of(scaler: Any) -> Tensor | None:
    """The scaler's current scale tensor (``GradScaler._scale``), None before its first use."""
    return getattr(scaler, "_scale", None)


def _unscaled_stage() -> Any:
    from torch.amp.grad_scaler import OptState

    return OptState.UNSCALED


def unscaled_this_step(scaler: Any, optimizer: Any | None = None) -> bool:
    """Whether ``scaler.unscale_`` already ran this step (for ``optimizer``, or for any optimizer).

    Reads ``GradScaler._per_optimizer_states``: the scaler's own record,
    which its ``update()`` resets every step.
    """
    states = getattr(scaler, "_per_optimizer_states", {})
    if optimizer is not None:
        return states.get(id(optimizer), {}).get("stage") is _unscaled_stage()
    return any(s.get("stage") is _unscaled_stage() for s in states.values())


def unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it already ran this step (``unscale_`` raises then)."""
    if not unscaled_this_step(scaler, optimizer):
        scaler.unscale_(optimizer)


# -- the optimizer's found_inf protocol (what GradScaler uses to skip fused steps) --------
def found_inf_safe(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``found_inf`` flag makes this step of ``optimizer`` a clean no-op.

    The fused optimizers (``fused=True``, ``_step_supports_amp_scaling``) skip
    their update when ``optimizer.found_inf`` is nonzero, and Adam, AdamW and
    Adagrad also take back their step count. One case is not clean: on its
    first step fused SGD with momentum allocates its momentum buffers
    uninitialised (``torch.empty_like``) and lets the kernel fill them; a
    skipped kernel leaves garbage that the next step applies. So SGD with
    momentum qualifies only once every parameter with a gradient has its buffer.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if getattr(optimizer, "found_inf", None) is not None:  # a GradScaler is using the protocol
        return False
    for group in optimizer.param_groups:
        if not group.get("fused"):
            return False
        if isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) != 0:
            state = optimizer.state
            if any(p.grad is not None and "momentum_buffer" not in state.get(p, ()) for p in group["params"]):
                return False
    return True


def set_found_inf(optimizer: torch.optim.Optimizer, flag: Tensor | None) -> None:
    """Set (a 0-d tensor, nonzero = skip) or remove (None) ``optimizer.found_inf``."""
    if flag is None:
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
    else:
        optimizer.found_inf = flag.to(torch.float32)


# -- optimizer hooks --------------------------------------------------------------------
def has_step_hooks(optimizer: Any) -> bool:
    """Whether ``optimizer`` was built by ``Optimizer.__init__`` (so its step hooks fire with it).

    Wrappers that subclass ``Optimizer`` without calling its ``__init__``
    (accelerate's ``AcceleratedOptimizer``) lack the hook dictionaries;
    ``LightningOptimizer`` reaches the wrapped optimizer's through
    ``__getattr__``, so hooks registered on it fire with the wrapped optimizer.
    Only an optimizer that owns them (in its instance ``__dict__``) counts.
    """
    own = getattr(optimizer, "__dict__", {})
    return "_optimizer_step_pre_hooks" in own and "_optimizer_step_post_hooks" in own


# -- DeviceMesh ------------------------------------------------------------------------
def flattened_group(mesh: Any) -> Any:
    """The process group of ``mesh`` flattened to one dimension (``DeviceMesh._flatten``)."""
    return mesh._flatten().get_group()


def root_mesh(mesh: Any) -> Any:
    """The mesh ``mesh`` was sliced from (``DeviceMesh._get_root_mesh``), or ``mesh`` itself."""
    return mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh


def module_parameter(module: torch.nn.Module, key: str) -> Tensor | None:
    """The parameter registered on ``module`` under ``key`` (no submodule path), or None.

    Reads ``module._parameters``: ``getattr`` would also find a plain tensor
    attribute of that name, and ``get_parameter`` walks a path and raises.
    """
    return module._parameters.get(key)


# -- FSDP2 (fully_shard) --------------------------------------------------------------
@dataclass(frozen=True)
class FSDPParamRef:
    """A parameter sharded by ``fully_shard`` (FSDP2, HSDP), as :func:`fsdp_param_refs` finds it.

    Attributes:
        modules: the modules ``fully_shard`` was applied to that manage it: their
            forward unshards it (creating its unsharded parameter the first time).
        tensor_parallel: it was a DTensor before ``fully_shard`` sharded it
            (tensor parallel, an SPMD mesh): its unsharded parameter is a DTensor too.
    """

    modules: tuple[torch.nn.Module, ...]
    tensor_parallel: bool
    fsdp_param: Any = field(repr=False)

    def unsharded(self) -> Tensor | None:
        """The unsharded parameter (``FSDPParam._unsharded_param``), None before the first all-gather.

        The ``nn.Parameter`` FSDP2 puts into the module for forward and
        backward: created at the first all-gather, then kept (its storage is
        freed and refilled), so its gradient in a backward call is this rank's
        unsharded local gradient, before FSDP2 reduce-scatters it.
        """
        return getattr(self.fsdp_param, "_unsharded_param", None)


def _fsdp_states() -> list[tuple[Any, tuple[torch.nn.Module, ...]]]:
    """Every live ``fully_shard`` state in this process with the modules it manages.

    Reads ``torch.distributed._composable_state._module_state_mapping`` (module ->
    weak reference to its state), where ``fully_shard`` registers each module.
    """
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - torch built without distributed support
        return []
    found: dict[int, tuple[Any, list[torch.nn.Module]]] = {}
    for module, ref in list(_module_state_mapping.items()):
        state = ref()
        if state is not None and hasattr(state, "_fsdp_param_groups"):
            found.setdefault(id(state), (state, []))[1].append(module)
    return [(state, tuple(modules)) for state, modules in found.values()]


def fsdp_param_refs(params: Sequence[Tensor]) -> list[FSDPParamRef | None]:
    """Per parameter, its :class:`FSDPParamRef` if it is a sharded parameter of a ``fully_shard`` module, else None.

    Matches ``params`` by identity against ``FSDPParam.sharded_param`` of every
    ``FSDPParamGroup`` (``FSDPState._fsdp_param_groups``) of every live
    ``fully_shard`` state, so no module is needed.

    Example:
        >>> fsdp_param_refs([torch.nn.Parameter(torch.zeros(2))])
        [None]
    """
    refs: dict[int, FSDPParamRef] = {}
    for state, modules in _fsdp_states():
        for group in state._fsdp_param_groups:
            for fp in group.fsdp_params:
                refs[id(fp.sharded_param)] = FSDPParamRef(modules, bool(fp.is_dtensor), fp)
    return [refs.get(id(p)) for p in params]


# -- data-parallel engines --------------------------------------------------------------
def reduced_after_hooks(params: Sequence[Tensor]) -> list[bool]:
    """Per parameter, whether a data-parallel engine reduces its gradient after the parameter's hooks ran.

    ``DistributedDataParallel``'s reducer registers its all-reduce on each
    parameter's gradient accumulator (the ``AccumulateGrad`` autograd node) and
    keeps that node alive; Horovod, DeepSpeed and Apex do the same. Autograd
    itself holds the node only while a graph that uses the parameter exists. A
    post-accumulate-grad hook fires before that all-reduce, so it sees the
    rank's local gradient, not the one the optimizer applies. The probe marks
    the node (``Node.metadata``), lets go of it and asks for it again: the mark
    survives only if something else holds the node. Parameters that DDP ignores
    (``_ddp_params_and_buffers_to_ignore``) are not held, nor those of a model
    without an engine, such as a pipeline stage. Call it between steps, when no
    graph is alive (a graph kept with ``retain_graph=True`` also holds the nodes).

    All False unless a process group of more than one rank is initialised
    (with one rank the reduction changes nothing). Relies on autograd keeping
    one ``AccumulateGrad`` node per leaf alive only while referenced: an
    implementation detail, hence here. Not seen: DDP's Python
    reducer under compiled autograd, which uses post-accumulate-grad hooks.

    Example:
        >>> reduced_after_hooks([torch.nn.Parameter(torch.zeros(2))])
        [False]
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [False] * len(params)
    if torch.distributed.get_world_size() <= 1:
        return [False] * len(params)
    return [p.requires_grad and p.is_leaf and _accumulator_held(p) for p in params]


def _accumulator_held(param: Tensor) -> bool:
    """Whether something besides autograd keeps ``param``'s gradient accumulator alive (a reducer does)."""
    from torch.autograd.graph import get_gradient_edge

    node = get_gradient_edge(param).node
    node.metadata[_PROBE] = True
    del node  # the last reference here: the node dies unless it is held elsewhere
    return bool(get_gradient_edge(param).node.metadata.pop(_PROBE, False))


_PROBE = "gradwatch.reduced_after_hooks"
