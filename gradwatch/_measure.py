"""NormMeter: every parameter's gradient L2 norm, measured where it is cheapest.

Two ways to read a gradient, and each wins somewhere (see ``benchmarks/overhead.py``):

* in a post-accumulate-grad hook, right after backward wrote the gradient and
  while it is still in cache: ``torch.dot(g, g)`` reads it at memory speed
  (``vector_norm`` runs single-threaded on CPU, 2-4x slower). Worth it for
  large tensors, where a later cold read costs milliseconds;
* in one fused ``torch._foreach_norm`` per (device, dtype) at step time: a
  single call for any number of tensors. Worth it for small tensors, where the
  per-call and per-hook overhead (~10 µs each) is the whole cost.

``mode="auto"`` hooks the tensors of at least :data:`HOOK_MIN_NUMEL` elements
and measures the rest in the fused pass; ``"hook"`` and ``"step"`` force one
way. Only ``"step"`` uses exactly the kernels of ``clip_grad_norm_`` (and so
gives bit-identical norms); the hooks' float32 ``dot`` agrees to ~1e-6 relative
and is usually closer to the float64 value than ``vector_norm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

MODES = ("auto", "hook", "step")

#: In ``mode="auto"``, gradients with at least this many elements (256 KiB in
#: float32) are measured in hooks, the rest in the fused step-time pass.
HOOK_MIN_NUMEL = 1 << 16


def _is_half(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize < 4


class NormMeter:
    """Writes this step's gradient norms into a ``[P]`` tensor on ``device`` in ``dtype``.

    Args:
        params: the parameters, in model order.
        mode: ``"auto"``, ``"hook"`` or ``"step"``.
        device, dtype: where and how the norms are kept.
        track_order: register hooks on every parameter to record the order in
            which gradients become ready (even those measured at step time).
    """

    def __init__(
        self, params: Sequence[Tensor], mode: str, device: torch.device, dtype: torch.dtype, track_order: bool
    ) -> None:
        self.params = list(params)
        self.device, self.dtype = device, dtype
        P = len(self.params)
        self._sq = torch.zeros(P, device=device, dtype=dtype)  # hooks write squared norms here
        self._sq_views = list(self._sq.unbind())
        self.hooked = [mode == "hook" or (mode == "auto" and p.numel() >= HOOK_MIN_NUMEL) for p in self.params]
        self._any_hooked = any(self.hooked)
        self._hooked_idx = [i for i in range(P) if self.hooked[i]]
        fused: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            if not self.hooked[i]:
                fused.setdefault((p.device, p.dtype), []).append(i)
        self._fused = {k: (idx, torch.tensor(idx, device=device)) for k, idx in fused.items()}
        (dev0, dt0), idx0 = next(iter(fused.items())) if len(fused) == 1 else ((None, None), [])
        # the common case: one group, nothing hooked -> foreach + stack straight into `norms`
        same_dtype = dt0 is not None and (dt0 == dtype or (_is_half(dt0) and dtype == torch.float32))
        self._direct = len(idx0) == P and dev0 == device and same_dtype
        self._fns = [self._square_fn(i) for i in range(P)]
        self.hot = True  # measure in hooks on the coming step?
        self.fired = [False] * P
        self.order: list[int] = []
        self.touched = False  # a hook fired since the last reset()
        self._handles = []
        if self._any_hooked or track_order:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _square_fn(self, i: int) -> Callable[[Tensor], None]:
        """Writes ``‖g‖²`` of parameter ``i``'s gradient into its slot."""
        p, out = self.params[i], self._sq_views[i]
        if _is_half(p.dtype) or p.dtype.is_complex or not p.dtype.is_floating_point:
            return lambda g: out.copy_(
                torch.linalg.vector_norm(g, dtype=torch.float32 if _is_half(g.dtype) else None).square()
            )
        if p.dtype == self.dtype and p.device == self.device:

            def direct(g: Tensor) -> None:
                flat = g.reshape(-1)
                torch.dot(flat, flat, out=out)

            return direct

        def converted(g: Tensor) -> None:
            flat = g.reshape(-1)
            out.copy_(torch.dot(flat, flat))

        return converted

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        square = self._fns[i] if self.hooked[i] else None
        fired, order = self.fired, self.order

        def hook(param: Tensor) -> None:
            if square is not None and self.hot:
                square(param.grad)
            if not fired[i]:
                fired[i] = True
                order.append(i)
            self.touched = True

        return hook

    def measure(self, grads: list[Tensor | None], missing: list[int], out: Tensor, hooks_valid: bool = True) -> Tensor:
        """Write the norms of ``grads`` into ``out``; returns it.

        Args:
            grads: the gradients (``None`` where missing), in model order.
            missing: indices of the ``None`` entries (recorded as 0).
            out: a ``[P]`` tensor (a row of GradWatch's device buffer).
            hooks_valid: False when the gradients changed after backward (AMP
                unscaling): everything is then measured now.
        """
        if self._direct and not missing:
            torch.stack(
                torch._foreach_norm(grads, 2, dtype=torch.float32 if _is_half(grads[0].dtype) else None), out=out
            )
            return out
        if self._any_hooked:
            for i in self._hooked_idx:  # gradients no hook saw this step (set by hand, or changed since)
                g = grads[i]
                if g is not None and (not self.fired[i] or not hooks_valid):
                    self._fns[i](g)
            torch.sqrt(self._sq, out=out)
        for (device, dtype), (idx, idx_t) in self._fused.items():
            present = [i for i in idx if grads[i] is not None]
            if not present:
                continue
            acc = torch.float32 if _is_half(dtype) else None
            gs = [grads[i] for i in present]
            if device.type in ("cpu", "cuda"):
                norms = torch._foreach_norm(gs, 2, dtype=acc)
            else:
                norms = [torch.linalg.vector_norm(g, dtype=acc) for g in gs]
            if len(present) < len(idx):
                idx_t = torch.tensor(present, device=self.device)
            out.index_copy_(0, idx_t, torch.stack(norms).to(device=self.device, dtype=self.dtype))
        if missing:
            out.index_fill_(0, torch.tensor(missing, device=self.device), 0.0)
        return out

    def reset(self) -> None:
        """Forget which hooks fired (call after each step)."""
        for i in self.order:
            self.fired[i] = False
        self.order.clear()
        self.touched = False

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
