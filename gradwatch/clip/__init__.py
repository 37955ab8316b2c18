"""Gradient clippers: by value, per-tensor norm, global norm, AutoClip, AGC, ZClip, Chain.

Every clipper works two ways:

* alone, as ``clipper(parameters) -> Tensor``: it reads ``p.grad``, clips in
  place and returns the pre-clip global norm, like
  :func:`torch.nn.utils.clip_grad_norm_`;
* inside :class:`gradwatch.GradWatch`, which has already measured every
  gradient's L2 norm: :meth:`Clipper.clip_` reuses those norms, so no clipper
  but :class:`ClipByValue` and :class:`AGC` (and :class:`ClipByGlobalNorm` for
  ``norm_type != 2``) reads the gradients a second time to measure them.

Like torch's own clipping, the clippers that scale every gradient by one
coefficient are split into **measure** (the norm the decision uses), **decide**
(the coefficient and the bound, from the norm and the clipper's state) and
**act** (scale the gradients): :class:`GlobalClipper` runs the three and builds
the :class:`ClipResult`; :class:`ClipByGlobalNorm`, :class:`AutoClip` and
:class:`ZClip` only implement :meth:`GlobalClipper.decide`.

Everything runs on the gradients' device: thresholds, histories and moving
averages are tensors, and no clipper reads a value back to the host, so a
clipped step costs no host synchronisation. The number of tensor operations a
clipper dispatches per step does not grow with the number of parameter tensors
nor with their shapes (AGC: with the number of distinct ``ndim``, and one
reduction per tensor of ``AGC.batch_numel`` elements or more), which is what a
step costs on a GPU, where every operation is a kernel launch; see
``benchmarks/ops.py``.

Non-finite gradients follow torch: a NaN anywhere makes the global norm NaN and,
through the coefficient, every clipped gradient NaN; an Inf makes the
coefficient 0. Clipping is not the tool that protects weights from NaN --
:class:`gradwatch.NonFinite` with ``action="skip"`` is. The adaptive clippers
(:class:`AutoClip`, :class:`ZClip`) leave non-finite norms out of their
statistics, so one bad step cannot poison the thresholds of the next ones.

Sparse gradients (``nn.Embedding(sparse=True)``) are scaled by the clippers that
scale whole tensors (:class:`ClipByGlobalNorm`, :class:`ClipByNorm`,
:class:`AutoClip`, :class:`ZClip`); :class:`ClipByValue` and :class:`AGC` raise
``NotImplementedError`` naming the parameter. Complex gradients are measured as
torch measures them (the L2 norm of the moduli); :class:`ClipByValue` rejects
them, as ``torch.clamp`` does.

Modules: :mod:`~gradwatch.clip.base` (:class:`ClipContext`, :class:`ClipResult`,
:class:`Clipper`, :class:`GlobalClipper`), :mod:`~gradwatch.clip.simple`
(:class:`ClipByValue`, :class:`ClipByNorm`, :class:`ClipByGlobalNorm`),
:mod:`~gradwatch.clip.autoclip`, :mod:`~gradwatch.clip.zclip`,
:mod:`~gradwatch.clip.agc`, :mod:`~gradwatch.clip.chain`; every public name is
importable from :mod:`gradwatch.clip` (and from :mod:`gradwatch`).
"""

from gradwatch.clip.agc import AGC
from gradwatch.clip.autoclip import SKETCH_RELATIVE_ERROR, AutoClip
from gradwatch.clip.base import ClipContext, Clipper, ClipResult, GlobalClipper
from gradwatch.clip.chain import Chain
from gradwatch.clip.simple import ClipByGlobalNorm, ClipByNorm, ClipByValue
from gradwatch.clip.zclip import ZClip

__all__ = [
    "AGC",
    "SKETCH_RELATIVE_ERROR",
    "AutoClip",
    "Chain",
    "ClipByGlobalNorm",
    "ClipByNorm",
    "ClipByValue",
    "ClipContext",
    "ClipResult",
    "Clipper",
    "GlobalClipper",
    "ZClip",
]
