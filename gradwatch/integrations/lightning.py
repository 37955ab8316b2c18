"""GradWatch inside PyTorch Lightning: record, check and clip at every optimizer step.

Lightning runs forward and backward *inside* ``optimizer.step(closure)``, so a
watch attached to the optimizer would see the previous step's gradients. The
callback calls :meth:`GradWatch.step` from ``on_before_optimizer_step`` instead:
that hook runs after the closure's backward, after AMP unscaling and after
DDP's all-reduce, before Lightning's own ``gradient_clip_val`` clipping and the
optimizer step, and once per optimizer step under ``accumulate_grad_batches``.

Works with ``lightning.pytorch`` and ``pytorch_lightning`` (the callback is an
instance of whichever ``Callback`` classes are installed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradwatch._compat import unscaled_this_step
from gradwatch.clip import Clipper
from gradwatch.detect import Detector
from gradwatch.history import History
from gradwatch.integrations import LatestRow, check_callback_args
from gradwatch.watch import GradWatch

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


def _to_device(state: Any, device: torch.device) -> Any:
    """``state`` with every tensor moved to ``device`` (checkpoints are often loaded onto the CPU)."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    return state


class GradWatchCallback(*_BASES):  # type: ignore[misc]
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

    The clipper's and detectors' state is saved in Lightning checkpoints and
    restored on resume (``trainer.fit(..., ckpt_path=...)``), so an adaptive
    clipper such as :class:`~gradwatch.AutoClip` continues exactly; the rows
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
        log_prefix: put in front of every logged name.
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

        Then ``pl.Trainer(callbacks=[cb]).fit(model, data)`` and read ``cb.history``.
    """

    def __init__(
        self,
        clipper: Clipper | None = None,
        detectors: Sequence[Detector] = (),
        sinks: Sequence[Any] = (),
        every: int = 1,
        log: bool = True,
        *,
        log_groups: int | str | Callable[[str], str] | None = 1,
        log_prefix: str = "grad_norm/",
        measure: str | None = None,
        flush_every: int = 100,
    ) -> None:
        self.detectors, self.sinks = check_callback_args(clipper, detectors, sinks, every, log, log_groups, log_prefix)
        self.clipper = clipper
        self.every = int(every)
        self._log = log  # not `self.log`: Lightning sets callback.log = pl_module.log
        self.log_groups = log_groups
        self.log_prefix = log_prefix
        self.measure = measure
        self.flush_every = flush_every
        self.watch: GradWatch | None = None
        self._latest: LatestRow | None = None
        self._pending_state: dict[str, Any] | None = None
        self._stepped = False
        self._logged_step: int | None = None
        self._open = False
        self._device = torch.device("cpu")
        self._scaler: Any | None = None

    # -- building the watch -----------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Build the watch on the module (now on its device), restoring checkpointed state."""
        previous = self.watch
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": Lightning's GradScaler
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        measure = self.measure or ("step" if scaler is not None or trainer.world_size > 1 else "auto")
        self._latest = LatestRow(self.log_groups, self.log_prefix, clipped=self.clipper is not None)
        sinks = [*self.sinks, self._latest] if self._log else list(self.sinks)
        self.watch = GradWatch(
            pl_module,
            clipper=self.clipper,
            detectors=self.detectors,
            sinks=sinks,
            every=self.every,
            flush_every=self.flush_every,
            measure=measure,
            scaler=self._scaler,
        )
        self._open = True
        self._device = next(p.device for p in pl_module.parameters())
        state = self._pending_state
        if state is None and previous is not None:  # a second fit() with the same callback: continue counting
            state = previous.state_dict()
        if state is not None:
            self.watch.load_state_dict(_to_device(state, self._device))
            self._pending_state = None
        self._stepped = False
        self._logged_step = None
        if self.clipper is not None and trainer.gradient_clip_val:
            warnings.warn(
                f"GradWatchCallback has a clipper ({self.clipper!r}) and Lightning's gradient_clip_val="
                f"{trainer.gradient_clip_val} is set too: the callback clips first, then Lightning clips again. "
                "Set gradient_clip_val=None to clip with gradwatch only.",
                UserWarning,
                stacklevel=2,
            )

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
        self.watch.step()
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At Lightning's logging steps, log the newest row through ``pl_module.log_dict``."""
        if not self._stepped or self.watch is None:
            return
        self._stepped = False
        n = trainer.log_every_n_steps
        if not self._log or not n or not (trainer.global_step % n == 0 or trainer.should_stop):
            return
        self.watch.flush()  # one device-to-host copy per logging step
        latest = self._latest
        if latest is not None and latest.step is not None and latest.step != self._logged_step:
            pl_module.log_dict(latest.metrics, on_step=True, on_epoch=False)
            self._logged_step = latest.step

    # -- the end ------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Flush the last rows, remove the hooks and close the sinks."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Keep what was recorded up to the exception (flush, close the sinks)."""
        self._close()

    def _close(self) -> None:
        if self.watch is not None and self._open:
            self._open = False
            self.watch.close()

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The watch's counters and the clipper's and detectors' state (saved in checkpoints)."""
        if self.watch is not None:
            return {"watch": self.watch.state_dict()}
        return {} if self._pending_state is None else {"watch": self._pending_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the watch is built if it is not yet."""
        state = state_dict.get("watch")
        if state is None:
            return
        if self.watch is not None and self._open:
            self.watch.load_state_dict(_to_device(state, self._device))
        else:
            self._pending_state = state

    # -- reading ------------------------------------------------------------------------
    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` of the last ``fit``.

        Raises:
            RuntimeError: the callback has not run yet.
        """
        if self.watch is None:
            raise RuntimeError("GradWatchCallback.history: no fit has run with this callback yet")
        return self.watch.history

    def __repr__(self) -> str:
        return f"GradWatchCallback(clipper={self.clipper!r}, every={self.every}, log={self._log})"
