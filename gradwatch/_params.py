"""The watched parameters: named and trainable, what they are bound to, what happened to them since."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch._compat import module_parameter


def named_trainable(obj: object, argname: str) -> tuple[list[str], list[Tensor]]:
    """Names and parameters of ``obj`` that require a gradient, each tensor once.

    Args:
        obj: an ``nn.Module``, an iterable of ``(name, parameter)`` pairs, an
            iterable of tensors, or a single tensor.
        argname: the argument's name, for error messages.

    Names of wrapped modules drop the wrappers' parts (``torch.compile``'s
    ``_orig_mod.``), so a compiled model is named like the eager one.

    Raises:
        TypeError: ``obj`` is none of the above.
        ValueError: two parameters share a name.
    """
    if isinstance(obj, nn.Module):
        pairs: list[tuple[str, Tensor]] = list(obj.named_parameters())
    elif isinstance(obj, Tensor):
        pairs = [("0", obj)]
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, dict)):
        pairs = []
        for i, item in enumerate(obj):
            if isinstance(item, Tensor):
                pairs.append((str(i), item))
            elif (
                isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Tensor)
            ):
                pairs.append(item)
            else:
                raise TypeError(
                    f"{argname} must be an nn.Module or an iterable of (name, parameter) "
                    f"pairs or of tensors; item {i} is {type(item).__name__}"
                )
    else:
        raise TypeError(
            f"{argname} must be an nn.Module or an iterable of (name, parameter) pairs, got {type(obj).__name__}"
        )
    names: list[str] = []
    params: list[Tensor] = []
    seen: set[int] = set()
    for name, p in pairs:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        names.append(clean_name(name))
        params.append(p)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"{argname} has several parameters named {', '.join(map(repr, repeated[:5]))}; names must be unique "
            "(prefix them, e.g. [('enc.' + n, p) for n, p in enc.named_parameters()])"
        )
    return names, params


#: what ``torch.compile`` (``_orig_mod``) and activation checkpointing wrappers put into parameter names
_WRAPPER_PARTS = ("_orig_mod", "_checkpoint_wrapped_module")


def clean_name(name: str) -> str:
    """A parameter name as the eager, unwrapped model names it.

    Example:
        >>> clean_name("_orig_mod.encoder.0.weight")
        'encoder.0.weight'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def stat_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype in which gradwatch records the norms of tensors of ``dtypes``.

    float64 if any tensor is float64 (or complex128), otherwise float32:
    half-precision norms are accumulated and kept in float32.

    Example:
        >>> stat_dtype([torch.bfloat16, torch.float32])
        torch.float32
    """
    return torch.float64 if any(d in (torch.float64, torch.complex128) for d in dtypes) else torch.float32


@dataclass(frozen=True)
class Binding:
    """What every contributor is bound to, once, when the watch is built.

    Attributes:
        names: the watched parameters' names, in model order (``P`` of them).
        params: the watched parameters, in the same order.
        device: where the row lives (the first parameter's device).
        dtype: the dtype of the row (float32 for half-precision models).
        amp: whether a ``GradScaler`` unscales the gradients (non-finite steps are overflows).
        scaler: that ``GradScaler`` (None without one): hooks that read gradients
            during backward see them scaled by its ``get_scale()``.
    """

    names: list[str]
    params: list[Tensor]
    device: torch.device
    dtype: torch.dtype
    amp: bool = False
    scaler: Any = None

    @classmethod
    def of(cls, names: Sequence[str], params: Sequence[Tensor], amp: bool = False) -> Binding:
        """The binding of ``params`` (device: the first one's, CPU if none; dtype: float64 if any
        parameter is float64 or complex128, else float32 -- half precision is recorded in float32).

        Example:
            >>> Binding.of(["w"], [torch.zeros(2, dtype=torch.bfloat16)]).dtype
            torch.float32
        """
        device = params[0].device if params else torch.device("cpu")
        return cls(list(names), list(params), device, stat_dtype([p.dtype for p in params]), amp)


class ParamGuard:
    """Notices what happened to a watched model after the watch was built.

    * moved or converted in a way that replaced its parameters (``model.to(...)``
      on another device, ``nn.Module._apply``): :meth:`check_same` raises at the
      next step, instead of measuring tensors the optimizer no longer updates;
    * parameters frozen when the watch was built that now receive gradients,
      or parameters an optimizer steps that the watch does not know:
      :meth:`check_unwatched` / :meth:`unknown` warn once.

    Args:
        model: the watched module (or an iterable of named parameters: nothing to guard).
        params: the watched parameters, in model order.
    """

    def __init__(self, model: object, params: list[Tensor]) -> None:
        self.first = params[0]
        self.device = self.first.device
        self._owner: weakref.ref | None = None
        self._key = ""
        self._frozen: list[tuple[str, Tensor]] = []
        self._warned = False
        if isinstance(model, nn.Module):
            for name, p in model.named_parameters():
                if p is self.first and self._owner is None:
                    prefix, _, self._key = name.rpartition(".")
                    self._owner = weakref.ref(model.get_submodule(prefix))
            self._frozen = [(clean_name(n), p) for n, p in model.named_parameters() if not p.requires_grad]

    def check_same(self) -> None:
        """Raise if the model's first parameter was replaced or moved since the watch was built."""
        owner = self._owner() if self._owner is not None else None
        current = module_parameter(owner, self._key) if owner is not None else None
        current = self.first if current is None else current
        if current is not self.first or self.first.device != self.device:
            raise RuntimeError(
                f"the model's parameters changed after the GradWatch was built (now on {current.device}, "
                f"watched on {self.device}): build the GradWatch after moving or converting the model"
            )

    def check_unwatched(self) -> None:
        """Warn once about frozen-at-build parameters that now receive gradients."""
        if not self._warned:
            late = [name for name, p in self._frozen if p.grad is not None]
            if late:
                self._warned = True
                warn_unwatched(late)

    def unknown(self, params: list[Tensor]) -> None:
        """Warn once about ``params``: an attached optimizer steps them, the watch does not know them."""
        if not self._warned:
            self._warned = True
            names = {id(p): n for n, p in self._frozen}
            warn_unwatched([names.get(id(p), f"<{tuple(p.shape)} tensor>") for p in params])


def warn_unwatched(names: list[str]) -> None:
    """The one-time warning about parameters that get gradients but are not watched."""
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    warnings.warn(
        f"gradwatch: {len(names)} parameter(s) receive gradients but are not watched or clipped "
        f"({shown}): they were frozen or not in the model when the GradWatch was built. "
        "Build the GradWatch after unfreezing / adding parameter groups.",
        UserWarning,
        stacklevel=4,
    )
