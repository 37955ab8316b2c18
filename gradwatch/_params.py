"""Turning what users pass into a list of named, trainable parameters."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def named_trainable(obj: object, argname: str) -> tuple[list[str], list[Tensor]]:
    """Names and parameters of ``obj`` that require a gradient, each tensor once.

    Args:
        obj: an ``nn.Module``, an iterable of ``(name, parameter)`` pairs, an
            iterable of tensors, or a single tensor.
        argname: the argument's name, for error messages.

    Raises:
        TypeError: ``obj`` is none of the above.
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
        names.append(name)
        params.append(p)
    return names, params
