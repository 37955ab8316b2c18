"""GradWatch inside PyTorch Lightning: record, check and clip at every optimizer step.

Lightning runs forward, backward, AMP unscaling and its own
``gradient_clip_val`` clipping *inside* the closure of ``optimizer.step(closure)``,
so a watch attached to the optimizer (which steps after the closure) records
the clipped gradients. The callback calls :meth:`GradWatch.step` from
``on_before_optimizer_step`` instead: that hook runs after the closure's
backward, after AMP unscaling and after DDP's all-reduce, before Lightning's
clipping and the optimizer step, and once per optimizer step under
``accumulate_grad_batches``.

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the callback is an
instance of whichever ``Callback`` classes are installed).
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch._compat import unscaled_this_step
from gradwatch.integrations._base import WatchCallback

_BASES: list[type] = []
try:  # the unified package
    from lightning.pytorch.callbacks import Callback as _LightningCallback

    _BASES.append(_LightningCallback)
except ImportError:
    pass
try:  # the standalone package
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _BASES.append(_PLCallback)
except ImportError:
    pass
if not _BASES:
    raise ImportError(
        "gradwatch.integrations.lightning needs PyTorch Lightning: pip install pytorch-lightning "
        "(or lightning; from a clone of gradwatch: pip install -e '.[lightning]')"
    )

__all__ = ["GradWatchCallback"]


class GradWatchCallback(WatchCallback, *_BASES):  # type: ignore[misc]
    """A Lightning ``Callback`` that runs a :class:`~gradwatch.GradWatch` on the LightningModule.

    At every optimizer step it records the pre-clip, unscaled norms of the
    accumulated gradient (one row per ``trainer.global_step``, whatever
    ``accumulate_grad_batches`` is), runs the detectors and applies the
    clipper before the update. With ``log=True`` it logs the newest row through
    ``pl_module.log_dict`` at Lightning's logging steps (``log_every_n_steps``),
    so every configured logger (TensorBoard, CSV, W&B, MLflow, ...) receives
    it: ``{log_prefix}total``, ``{log_prefix}total_clipped`` (with a clipper)
    and one ``{log_prefix}{group}`` per group of parameters. The full
    per-parameter record of every step is :attr:`history`.

    The clipper's and detectors' state is saved in Lightning checkpoints under
    :attr:`state_key` and restored on resume (``trainer.fit(..., ckpt_path=...)``),
    so an adaptive clipper such as :class:`~gradwatch.AutoClip` continues
    exactly; resuming from a checkpoint without that state warns. The rows
    recorded before the checkpoint are not part of it (save them with a sink
    or ``cb.history.save``).

    Under AMP (``precision="16-mixed"``) the watch gets the precision plugin's
    ``GradScaler`` (``scaler=``): Lightning unscales before the hook, the scale
    is recorded (``History.scale``) and overflow steps are labelled
    ``"amp_overflow"``. The norms are then measured in one fused pass at the
    step (``measure="step"``), as they are under multi-process strategies
    (DDP), where the hook sees the all-reduced gradient.

    Args:
        clipper: a :class:`~gradwatch.Clipper` applied before every optimizer
            step, or None. Leave Lightning's ``gradient_clip_val`` unset when
            you pass one (both would clip; the callback warns).
        detectors: :class:`~gradwatch.Detector` objects.
        sinks: :class:`~gradwatch.Sink` objects (files, TensorBoard, ...).
        every: record every ``every``-th optimizer step (the clipper runs at all).
        log: log the newest row through the trainer's loggers.
        log_groups: per-group norms to log: a module depth (default ``1``,
            e.g. ``"encoder"``, ``"head"``), a function from parameter name to
            group name, ``"params"`` (every parameter: can be hundreds of
            columns) or None (global norms only).
        log_prefix: put in front of every logged name (give each of several
            callbacks in one Trainer its own).
        measure: GradWatch's ``measure`` (None: ``"step"`` under AMP or with
            several processes, else ``"auto"``).
        flush_every: GradWatch's ``flush_every``.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or range (named
            in the message).

    Example:
        >>> import gradwatch as gw
        >>> from gradwatch.integrations.lightning import GradWatchCallback
        >>> cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(1.0), detectors=[gw.NonFinite()])
        >>> cb.watch is None  # the watch is built when fit() starts
        True
        >>> cb.state_key[:70]  # the clipper, the detectors' types, log_prefix
        "GradWatchCallback{'clipper': 'ClipByGlobalNorm(max_norm=1.0, norm_type"

        Then ``pl.Trainer(callbacks=[cb]).fit(model, data)`` and read ``cb.history``.
    """

    _run_name = "fit"
    _loaded = False  # a checkpoint's state reached load_state_dict since the last on_train_start

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint's ``"callbacks"``.

        Made of what the state belongs to -- the clipper, the detectors' types
        and ``log_prefix`` -- so several callbacks in one Trainer keep apart, and
        a resumed run with the same configuration finds its own.
        """
        return self._generate_state_key(
            clipper=repr(self.clipper), detectors=[type(d).__name__ for d in self.detectors], log_prefix=self.log_prefix
        )

    # -- building the watch -----------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Build the watch on the module (now on its device), restoring checkpointed state."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": Lightning's GradScaler
        self._build_watch(pl_module, scaler=scaler, fused=scaler is not None or trainer.world_size > 1)
        if self.clipper is not None and trainer.gradient_clip_val:
            self._warn_double_clip(
                f"Lightning's gradient_clip_val={trainer.gradient_clip_val}",
                "Set gradient_clip_val=None to clip with gradwatch only.",
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Warn once if this fit resumes from a checkpoint that holds no state of this callback."""
        if trainer.ckpt_path is not None and not self._loaded:
            self._warn_no_state(f"{str(trainer.ckpt_path)!r}")
        self._loaded = False

    # -- every optimizer step ---------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Any, pl_module: torch.nn.Module, optimizer: Any) -> None:
        """Measure, check, clip and record this step's (accumulated, unscaled) gradients."""
        if self.watch is None or not self._open:
            return
        scaler = self._scaler
        if scaler is not None and not unscaled_this_step(scaler, optimizer):
            # Lightning unscales before this hook, except for optimizers that unscale inside their
            # own step (fused ones; GradScaler.step accepts them unscaled) and when it skipped backward
            if all(p.grad is None for p in pl_module.parameters()):
                return
            scaler.unscale_(optimizer)
        self._step_watch()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At Lightning's logging steps, log the newest row through ``pl_module.log_dict``."""
        if not self._stepped or self.watch is None:
            return
        self._stepped = False
        n = trainer.log_every_n_steps
        if not self._log or not n or not (trainer.global_step % n == 0 or trainer.should_stop):
            return
        metrics = self._new_metrics()  # one device-to-host copy per logging step
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    # -- the end ------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Flush the last rows, remove the hooks and close the sinks."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Keep what was recorded up to the exception (flush, close the sinks)."""
        self._close()

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The watch's counters and the clipper's and detectors' state (saved in checkpoints)."""
        state = self._saved_state()
        return {} if state is None else {"watch": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the watch is built if it is not yet."""
        state = state_dict.get("watch")
        if state is not None:
            self._restore_state(state)
            self._loaded = True

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Read a checkpoint written before :attr:`state_key` held the configuration (one callback only)."""
        states = checkpoint.get("callbacks") or {}
        legacy = type(self).__qualname__
        if self.state_key not in states and legacy in states:
            mine = [cb for cb in trainer.callbacks if isinstance(cb, GradWatchCallback)]
            if mine == [self]:
                self.load_state_dict(states[legacy])
