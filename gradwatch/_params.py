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
