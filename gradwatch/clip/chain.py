"""Chain: several clippers applied in order."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gradwatch._params import Binding
from gradwatch.clip.base import ClipContext, Clipper, ClipResult

__all__ = ["Chain"]


class Chain(Clipper):
    """Apply several clippers in order, each seeing the previous one's output.

    A hard cap before an adaptive clipper protects the first steps, before the
    adaptive clipper's statistics exist: ``Chain(ClipByGlobalNorm(10.0), AutoClip())``.
    The recorded threshold is the smallest of the clippers' thresholds (NaN if
    none has a global bound).

    Args:
        *clippers: the clippers, applied left to right.

    Raises:
        TypeError: an argument is not a :class:`Clipper`.
        ValueError: no clipper given.

    Example:
        >>> from gradwatch.clip import ClipByGlobalNorm, ClipByValue
        >>> p = torch.nn.Parameter(torch.zeros(1)); p.grad = torch.tensor([8.0])
        >>> Chain(ClipByValue(4.0), ClipByGlobalNorm(2.0))([p])
        tensor(8.)
        >>> p.grad
        tensor([2.0000])
    """

    def __init__(self, *clippers: Clipper) -> None:
        if not clippers:
            raise ValueError("Chain needs at least one clipper")
        for i, c in enumerate(clippers):
            if not isinstance(c, Clipper):
                raise TypeError(f"Chain argument {i} must be a gradwatch Clipper, got {type(c).__name__}")
        self.clippers = tuple(clippers)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.clippers))})"

    def bind(self, binding: Binding) -> None:
        """Bind every clipper of the chain."""
        for c in self.clippers:
            c.bind(binding)

    @torch.no_grad()
    def clip_(self, ctx: ClipContext) -> ClipResult:
        """Run the clippers in order."""
        first: ClipResult | None = None
        res: ClipResult | None = None
        thr: Tensor | None = None
        for c in self.clippers:
            res = c.clip_(ctx if res is None else ctx.with_norms(res.norms, res.total))
            first = first or res
            if ctx.measured:
                assert res.threshold is not None
                thr = res.threshold if thr is None else torch.fmin(thr, res.threshold)  # NaN = no bound
        assert res is not None and first is not None
        if not ctx.measured:
            return ClipResult(None, None, None, None, first.norm)
        assert res.total is not None and thr is not None
        coef = torch.nan_to_num(res.total / ctx.total.to(res.total), nan=1.0, posinf=math.inf)
        return ClipResult(res.norms, res.total, coef, thr, first.norm)

    def state_dict(self) -> dict[str, Any]:
        """The state of each clipper, keyed by position."""
        return {"type": "Chain", **{str(i): c.state_dict() for i, c in enumerate(self.clippers)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state holds another number of clippers, or one of
                them does not match.
        """
        saved = [k for k in state if k != "type"] if isinstance(state, dict) else []
        if saved and sorted(saved) != sorted(str(i) for i in range(len(self.clippers))):
            raise ValueError(
                f"state was saved by a Chain of {len(saved)} clippers; this Chain has {len(self.clippers)}"
            )
        self._check_state(state, [str(i) for i in range(len(self.clippers))])
        for i, c in enumerate(self.clippers):
            c.load_state_dict(state.get(str(i), {}))

    def reset(self) -> None:
        """Reset every clipper of the chain."""
        for c in self.clippers:
            c.reset()
