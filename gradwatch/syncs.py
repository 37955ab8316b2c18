"""Counting host synchronisations: the measure of a sync-free training step."""

from __future__ import annotations

from collections import Counter
from typing import Any

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

    The counts describe *eager* code. ``torch.compile`` does not run under a
    ``TorchDispatchMode`` such as this one: inside the context a compiled
    function or model runs eagerly (its results are the eager ones, which can
    differ from the compiled ones in the last bits) and every aten op it
    dispatches is counted, including syncs that a compiled graph would have
    kept or removed. The context sets the compiler's stance to
    ``"force_eager"`` (``torch.compiler.set_stance``) while it is active, so
    that the compiled functions it ran are compiled again afterwards; without
    that, torch marks a frame it meets under a dispatch mode as not
    compilable and keeps running it eagerly after the context.

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
        self._stances: list[Any] = []

    def __enter__(self) -> count_host_syncs:
        stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        self._stances.append(stance("force_eager") if stance is not None else None)
        try:
            return super().__enter__()
        except BaseException:
            self._restore_stance()
            raise

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._restore_stance()

    def _restore_stance(self) -> None:
        stance = self._stances.pop()
        if stance is not None:
            stance.__exit__(None, None, None)

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
