"""Counting host synchronisations: the measure of a sync-free training step."""

from __future__ import annotations

from collections import Counter

import torch

from gradwatch._compat import TorchDispatchMode

__all__ = ["count_host_syncs"]

#: ops that read a device value back to the host (``.item()``, ``float(t)``,
#: ``bool(t)``, a data-dependent ``if``) dispatch to this
_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default}


class count_host_syncs(TorchDispatchMode):
    """Context manager counting the ops that force a device-to-host read.

    Every ``.item()``, ``float(t)``, ``bool(t)`` and ``if t:`` dispatches to
    ``aten._local_scalar_dense``; that is what :attr:`syncs` counts, on any
    device (on CPU nothing waits, but the same code would stall a GPU).
    :attr:`host_copies` counts copies to the CPU that keep the dtype (a
    transfer, not a cast), and :attr:`ops` every op seen by name.

    Example:
        >>> import torch
        >>> with count_host_syncs() as c:
        ...     t = torch.ones(3).sum()
        ...     _ = t.item()
        >>> c.syncs
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0
        self.host_copies = 0
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.syncs += 1
        elif func is torch.ops.aten._to_copy.default:
            dev = kwargs.get("device")
            if (
                dev is not None
                and torch.device(dev).type == "cpu"
                and kwargs.get("dtype", args[0].dtype) == args[0].dtype
            ):
                self.host_copies += 1
        elif func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.host_copies += 1
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)
