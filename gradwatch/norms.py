"""Gradient norms in fused passes: pure functions, no state, no host syncs.

The functions here follow :func:`torch.nn.utils.get_total_norm` step for step
(group by device and dtype, ``torch._foreach_norm`` per group, the norm of the
stacked norms), so a total computed here has the same bits as torch's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grad_norms", "group_by_device_dtype", "stat_dtype", "total_norm"]


def group_by_device_dtype(
    tensors: Sequence[Tensor | None],
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]:
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
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]] = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        key = (t.device, t.dtype)
        if key not in groups:
            groups[key] = ([], [])
        groups[key][0].append(t)
        groups[key][1].append(i)
    return groups


def stat_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which gradwatch records the norms of tensors of ``dtypes``.

    float64 if any tensor is float64, otherwise float32: half-precision norms
    are accumulated and kept in float32.

    Example:
        >>> stat_dtype([torch.bfloat16, torch.float32])
        torch.float32
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _foreach_norms(tensors: list[Tensor], device: torch.device, norm_type: float) -> list[Tensor]:
    if device.type in ("cpu", "cuda") or device.type == torch._C._get_privateuse1_backend_name():
        return list(torch._foreach_norm(tensors, norm_type))
    return [torch.linalg.vector_norm(t, norm_type) for t in tensors]


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
    for (dev, dt), (group, positions) in group_by_device_dtype(tensors).items():
        if dt.is_floating_point and dt.itemsize < 4:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=torch.float32) for t in group]
        else:
            norms = _foreach_norms(group, dev, norm_type)
        idx = torch.tensor(positions, device=device)
        out.index_copy_(0, idx, torch.stack([n.to(device=device, dtype=dtype) for n in norms]))
    return out


def total_norm(tensors: Sequence[Tensor | None], norm_type: float = 2.0) -> Tensor:
    """The norm of all tensors together, bit-identical to ``torch.nn.utils.get_total_norm``.

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
    for (dev, _), (group, _) in group_by_device_dtype(present).items():
        norms.extend(_foreach_norms(group, dev, norm_type))
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)


def check_norm_type(norm_type: float) -> float:
    """Validate a p-norm order: any p > 0, or ``inf``."""
    p = float(norm_type)
    if not p > 0:  # also rejects NaN
        raise ValueError(f"norm_type must be a positive number or math.inf, got {norm_type!r}")
    return p
