"""GradWatch inside the Hugging Face ``Trainer``: pre-clip norms at every optimizer step.

Where the Trainer touches the gradients at an optimizer step (``_inner_training_loop``)::

    backward of the last micro-batch (DDP all-reduces here)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)   # unscales (fp16), measures, clips
                                                                     # (max_grad_norm=0: inf, measures only)
    callbacks.on_pre_optimizer_step    <- the gradients are already clipped here
    optimizer.step(); callbacks.on_optimizer_step; zero_grad; ...; log({"grad_norm": grad_norm, ...})

No callback event sits between the backward and the clipping, so the
callback wraps the Trainer's ``accelerator.clip_grad_norm_`` for the duration
of ``train()``: the wrapper unscales (``accelerator.unscale_gradients()``, a
no-op without fp16 AMP), runs :meth:`GradWatch.step` on the accumulated,
unscaled, all-reduced, pre-clip gradients, then lets the Trainer clip as
before. The recorded global norm is therefore the ``grad_norm`` the Trainer
logs (the same kernels: equal to the last bit with ``measure="step"``), and a
gradwatch clipper acts before the Trainer's own clipping. Nothing here reads a
value back to the host; metrics are added to the Trainer's own logs at its
logging steps (one device-to-host copy per logging step).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "gradwatch.integrations.transformers needs Hugging Face transformers and accelerate: "
        "pip install transformers accelerate (from a clone of gradwatch: pip install -e '.[transformers]')"
    ) from exc

from gradwatch._compat import unscaled_this_step
from gradwatch.clip import Clipper
from gradwatch.detect import Detector
from gradwatch.history import History
from gradwatch.integrations import LatestRow, check_callback_args
from gradwatch.watch import GradWatch

__all__ = ["STATE_FILE", "GradWatchCallback"]

#: the file in each ``checkpoint-<step>`` folder that holds the callback's state
STATE_FILE = "gradwatch.pt"


def _find_trainer(max_depth: int = 12) -> tuple[Trainer | None, Any]:
    """The ``Trainer`` whose loop is calling this callback event, and its ``resume_from_checkpoint``.

    Callbacks are not handed the Trainer, so look at the frames of the call:
    the event was raised from a method of the Trainer (``self``).
    """
    here = inspect.currentframe()
    frame = here.f_back if here is not None else None
    try:
        for _ in range(max_depth):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner, frame.f_locals.get("resume_from_checkpoint")
            frame = frame.f_back
        return None, None
    finally:
        del here, frame  # no reference cycles through the frames


class _Patch:
    """Shadow ``obj.name`` with an instance attribute; :meth:`undo` puts back what was there."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name = obj, name
        self.had = name in vars(obj)
        self.old = vars(obj).get(name)
        setattr(obj, name, value)

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.name, self.old)
        else:
            vars(self.obj).pop(self.name, None)


class GradWatchCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`~gradwatch.GradWatch` on the Trainer's model.

    At every optimizer step (one row per ``state.global_step`` under
    ``gradient_accumulation_steps``) it records the pre-clip, unscaled norms of
    the accumulated gradient, runs the detectors and applies the clipper --
    before the Trainer's own ``max_grad_norm`` clipping (see the module
    docstring for where). ``h.total`` equals the ``grad_norm`` the Trainer
    logs. To clip with gradwatch instead of the Trainer, pass a clipper and set
    ``TrainingArguments(max_grad_norm=0)`` (the callback warns if both clip).

    With ``log=True`` the newest row is added to the Trainer's training logs at
    its logging steps (``logging_steps``), so ``state.log_history`` and every
    ``report_to`` integration (TensorBoard, W&B, MLflow, ...) receive it:
    ``{log_prefix}total``, ``{log_prefix}total_clipped`` (with a clipper) and one
    ``{log_prefix}{group}`` per group of parameters.

    With fp16 AMP the watch gets the Trainer's ``GradScaler``: the scale is
    recorded and overflow steps are labelled ``"amp_overflow"``.

    The clipper's and detectors' state is written to ``gradwatch.pt`` in every
    checkpoint folder and restored by ``trainer.train(resume_from_checkpoint=...)``,
    so AutoClip's history continues exactly.

    Args:
        clipper: a :class:`~gradwatch.Clipper` applied at every optimizer step, or None.
        detectors: :class:`~gradwatch.Detector` objects.
        sinks: :class:`~gradwatch.Sink` objects.
        every: record every ``every``-th optimizer step (the clipper runs at all).
        log: add the newest row to the Trainer's logs.
        log_groups: per-group norms to log: a module depth (default ``1``; for
            a GPT-2 ``"transformer"``, ``"lm_head"``; use ``3`` for one column per
            block), a function from parameter name to group name, ``"params"``
            or None (global norms only).
        log_prefix: put in front of every logged name.
        measure: GradWatch's ``measure`` (None: ``"step"`` with fp16 AMP or
            several processes, else ``"auto"``).
        flush_every: GradWatch's ``flush_every``.

    Raises:
        TypeError, ValueError: an argument of the wrong kind or range (named in the message).

    Example:
        >>> import gradwatch as gw
        >>> from gradwatch.integrations.transformers import GradWatchCallback
        >>> cb = GradWatchCallback(clipper=gw.AutoClip(), log_groups=3)
        >>> cb.watch is None  # the watch is built when train() starts
        True

        Then ``Trainer(..., args=TrainingArguments(..., max_grad_norm=0), callbacks=[cb]).train()``
        and read ``cb.history``.
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
        self.log = log
        self.log_groups = log_groups
        self.log_prefix = log_prefix
        self.measure = measure
        self.flush_every = flush_every
        self.watch: GradWatch | None = None
        self._latest: LatestRow | None = None
        self._patches: list[_Patch] = []
        self._stepped = False  # the watch has stepped since the last optimizer step
        self._logged_step: int | None = None
        self._open = False
        self._warned_fallback = False
        self._scaler: Any | None = None
        self._accelerator: Any | None = None

    # -- start --------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Build the watch, restore its state when resuming, and wrap the Trainer's clipping."""
        trainer, resume = _find_trainer()
        self._close()
        previous = self.watch
        if model is None:
            model = trainer.model if trainer is not None else None
        if model is None:
            raise RuntimeError("GradWatchCallback.on_train_begin was called without the model")
        scaler = getattr(trainer.accelerator, "scaler", None) if trainer is not None else None  # fp16 AMP
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._accelerator = trainer.accelerator if trainer is not None else None
        measure = self.measure or ("step" if args.fp16 or args.world_size > 1 else "auto")
        self._latest = LatestRow(self.log_groups, self.log_prefix, clipped=self.clipper is not None)
        self.watch = GradWatch(
            model,
            clipper=self.clipper,
            detectors=self.detectors,
            sinks=[*self.sinks, self._latest] if self.log else list(self.sinks),
            every=self.every,
            flush_every=self.flush_every,
            measure=measure,
            scaler=self._scaler,
        )
        self._open = True
        self._stepped = False
        self._logged_step = None
        device = next(p.device for p in model.parameters())
        saved = self._saved_state(args, state, resume)
        if saved is not None:
            self.watch.load_state_dict(torch.load(saved, map_location=device, weights_only=True)["watch"])
        elif previous is not None:  # a second train() with the same callback: continue counting
            self.watch.load_state_dict(previous.state_dict())
        if self.clipper is not None and args.max_grad_norm and args.max_grad_norm > 0:
            warnings.warn(
                f"GradWatchCallback has a clipper ({self.clipper!r}) and TrainingArguments.max_grad_norm="
                f"{args.max_grad_norm} clips too: gradwatch clips first, then the Trainer. "
                "Set max_grad_norm=0 to clip with gradwatch only.",
                UserWarning,
                stacklevel=2,
            )
        if trainer is None:
            warnings.warn(
                "GradWatchCallback could not find the Trainer that runs it: it records in on_pre_optimizer_step, "
                "after the Trainer's clipping (post-clip norms unless max_grad_norm=0), and logs through on_log",
                UserWarning,
                stacklevel=2,
            )
            return
        accelerator = trainer.accelerator
        self._patches.append(_Patch(accelerator, "clip_grad_norm_", self._wrap_clip(accelerator)))
        self._patches.append(_Patch(trainer, "log", self._wrap_log(trainer.log)))

    def _saved_state(self, args: Any, state: Any, resume: Any) -> str | None:
        folder = resume if isinstance(resume, (str, os.PathLike)) else None
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder is None:
            return None
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            return path
        warnings.warn(
            f"resuming from {os.fspath(folder)!r} without {STATE_FILE}: the clipper and detectors start afresh",
            UserWarning,
            stacklevel=3,
        )
        return None

    # -- the measurement point ----------------------------------------------------------
    def _wrap_clip(self, accelerator: Any) -> Callable[..., Any]:
        clip = accelerator.clip_grad_norm_  # the bound method (or whatever was there)

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kw: Any) -> Any:
            if not self._open or self._stepped:
                return clip(parameters, max_norm, norm_type, **kw)
            if math.isinf(max_norm):  # max_grad_norm=0: the Trainer only measures, for its grad_norm log
                total = clip(parameters, max_norm, norm_type, **kw)  # unscales; the pre-clip norm
                self._step()
                return total
            accelerator.unscale_gradients()  # a no-op unless fp16 AMP
            self._step()
            undo = _Patch(accelerator, "unscale_gradients", lambda *a, **k: None)  # unscaled once already
            try:
                return clip(parameters, max_norm, norm_type, **kw)
            finally:
                undo.undo()

        return clip_grad_norm_

    def _step(self) -> None:
        assert self.watch is not None
        self.watch.step()
        self._stepped = True

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step the watch here if the Trainer did not go through ``accelerator.clip_grad_norm_``."""
        if not self._open:
            return
        if not self._stepped:
            if args.max_grad_norm and args.max_grad_norm > 0 and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    "GradWatchCallback measured after the Trainer's gradient clipping (it did not call "
                    "accelerator.clip_grad_norm_): the rows hold post-clip norms",
                    UserWarning,
                    stacklevel=2,
                )
            if self._scaler is not None and not unscaled_this_step(self._scaler):
                self._accelerator.unscale_gradients()  # the Trainer's own path did not unscale
            self._step()
        self._stepped = False

    # -- logging ------------------------------------------------------------------------
    def _new_metrics(self) -> dict[str, float]:
        if not self.log or self.watch is None or self._latest is None:
            return {}
        self.watch.flush()  # one device-to-host copy per logging step
        latest = self._latest
        if latest.step is None or latest.step == self._logged_step:
            return {}
        self._logged_step = latest.step
        return dict(latest.metrics)

    def _wrap_log(self, log: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if self._open and "loss" in logs:  # the training logs, not evaluation or the final summary
                logs.update(self._new_metrics())
            return log(logs, *args, **kwargs)

        return wrapped

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        """Without the Trainer at hand (no wrapped ``log``), add the metrics here for the callbacks after this one."""
        if self._open and not self._patches and logs is not None and "loss" in logs:
            logs.update(self._new_metrics())

    # -- checkpoints and the end ----------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the clipper's and detectors' state next to the Trainer's checkpoint."""
        if self.watch is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save({"watch": self.watch.state_dict()}, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the Trainer back as it was, flush the last rows and close the sinks."""
        self._close()

    def _close(self) -> None:
        for p in reversed(self._patches):
            p.undo()
        self._patches.clear()
        if self.watch is not None and self._open:
            self._open = False
            self.watch.close()

    @property
    def history(self) -> History:
        """The recorded :class:`~gradwatch.History` of the last ``train()``.

        Raises:
            RuntimeError: the callback has not run yet.
        """
        if self.watch is None:
            raise RuntimeError("GradWatchCallback.history: no train() has run with this callback yet")
        return self.watch.history

    def __repr__(self) -> str:
        return f"GradWatchCallback(clipper={self.clipper!r}, every={self.every}, log={self.log})"
