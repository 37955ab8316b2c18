"""GradWatch inside the Hugging Face ``Trainer``: pre-clip norms at every optimizer step.

Where the Trainer touches the gradients at an optimizer step (``_inner_training_loop``)::

    backward of the last micro-batch (DDP all-reduces here)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)   # unscales (fp16), measures, clips
                                                                     # (max_grad_norm=0: inf, measures only)
    callbacks.on_pre_optimizer_step    <- the gradients are already clipped here
    optimizer.step(); callbacks.on_optimizer_step; zero_grad; ...; log({"grad_norm": grad_norm, ...})

No callback event sits between the backward and the clipping, and callbacks
are not handed the Trainer, so the callback is bound to its Trainer
explicitly (:meth:`GradWatchCallback.bind`) and wraps the Trainer's
``accelerator.clip_grad_norm_`` for the duration of ``train()``: the wrapper
unscales (``accelerator.unscale_gradients()``, a no-op without fp16 AMP), runs
:meth:`GradWatch.step` on the accumulated, unscaled, all-reduced gradients
before anything scales them -- also with ``max_grad_norm=0``, where the
Trainer's ``clip_grad_norm_(params, inf)`` would multiply every gradient by NaN
if one held a NaN -- then lets the Trainer clip as before. The recorded global
norm is therefore the ``grad_norm`` the Trainer logs (the same kernels: equal
to the last bit with ``measure="step"``), and a gradwatch clipper acts before
the Trainer's own clipping. Nothing here reads a value back to the host;
metrics are added to the Trainer's own logs at its logging steps (one
device-to-host copy per logging step).
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "gradwatch.integrations.transformers needs Hugging Face transformers and accelerate: "
        "pip install transformers accelerate (from a clone of gradwatch: pip install -e '.[transformers]')"
    ) from exc

from gradwatch._compat import unscaled_this_step
from gradwatch._validate import check_instance
from gradwatch.integrations._base import WatchCallback

__all__ = ["STATE_FILE", "GradWatchCallback"]

#: the file in each ``checkpoint-<step>`` folder that holds the callback's state
STATE_FILE = "gradwatch.pt"


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


def _total_norm(grads: list[torch.Tensor | None], norm_type: float) -> torch.Tensor:
    """The global ``norm_type``-norm of ``grads`` (what ``clip_grad_norm_`` returns), on their device."""
    total = torch.nn.utils.get_total_norm([g for g in grads if g is not None], norm_type)
    return total.full_tensor() if hasattr(total, "full_tensor") else total  # DTensor gradients


class GradWatchCallback(WatchCallback, TrainerCallback):
    """A ``transformers.TrainerCallback`` that runs a :class:`~gradwatch.GradWatch` on the Trainer's model.

    At every optimizer step (one row per ``state.global_step`` under
    ``gradient_accumulation_steps``) it records the pre-clip, unscaled norms of
    the accumulated gradient, runs the detectors and applies the clipper --
    before the Trainer's own ``max_grad_norm`` clipping (see the module
    docstring for where). ``h.total`` equals the ``grad_norm`` the Trainer
    logs. To clip with gradwatch instead of the Trainer, pass a clipper and set
    ``TrainingArguments(max_grad_norm=0)`` (the callback warns if both clip).

    Callbacks are not handed their Trainer, so give it with :meth:`bind`
    (``GradWatchCallback(...).bind(trainer)``, which also adds the callback to
    the Trainer). Unbound, the callback warns and records in
    ``on_pre_optimizer_step``: after the Trainer's clipping.

    With ``log=True`` the newest row is added to the Trainer's training logs at
    its logging steps (``logging_steps``), so ``state.log_history`` and every
    ``report_to`` integration (TensorBoard, W&B, MLflow, ...) receive it:
    ``{log_prefix}total``, ``{log_prefix}total_clipped`` (with a clipper) and one
    ``{log_prefix}{group}`` per group of parameters.

    A detector with ``action="skip"`` drops the step's gradients before the
    Trainer clips; the Trainer then logs, as ``grad_norm`` of that step, the
    pre-clip norm of the dropped gradients (``h.total``: NaN or Inf for a
    non-finite step), not the 0.0 of the empty gradients it would measure.

    With fp16 AMP the watch gets the Trainer's ``GradScaler``: the scale is
    recorded and overflow steps are labelled ``"amp_overflow"``.

    The clipper's and detectors' state is written to ``gradwatch.pt`` in every
    checkpoint folder and restored by ``trainer.train(resume_from_checkpoint=...)``,
    so AutoClip's history continues exactly; resuming without that file warns.

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

        Then ``trainer = Trainer(..., args=TrainingArguments(..., max_grad_norm=0))``,
        ``cb.bind(trainer)``, ``trainer.train()`` and read ``cb.history``.
    """

    _run_name = "train()"
    _trainer: weakref.ref[Trainer] | None = None  # set by bind()
    _resume: Any = None  # train()'s resume_from_checkpoint, while a bound Trainer trains
    _patches: list[_Patch] = []  # noqa: RUF012 - replaced, never mutated, per instance
    _warned_fallback = False
    _accelerator: Any = None
    _optimizer: Any = None

    # -- the Trainer --------------------------------------------------------------------
    def bind(self, trainer: Trainer) -> GradWatchCallback:
        """Give the callback the Trainer that runs it; add the callback to ``trainer`` if it is not there yet.

        With its Trainer the callback measures inside the Trainer's
        ``accelerator.clip_grad_norm_`` (pre-clip, before anything scales the
        gradients), adds its metrics through ``trainer.log`` and learns the
        ``resume_from_checkpoint`` given to ``trainer.train``. Only a weak
        reference to the Trainer is kept.

        Returns:
            ``self``, so ``cb = GradWatchCallback(...).bind(trainer)`` works.

        Raises:
            TypeError: ``trainer`` is not a ``transformers.Trainer``.

        Example:
            >>> import tempfile
            >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=8))
            >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to="none")
            >>> trainer = Trainer(model=model, args=args)
            >>> cb = GradWatchCallback().bind(trainer)
            >>> cb in trainer.callback_handler.callbacks
            True
        """
        check_instance(trainer, "trainer", Trainer, "a transformers.Trainer")
        if self._trainer is not None and self._trainer() is trainer:
            return self
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self._trainer = weakref.ref(trainer)
        train = trainer.train

        def train_noting_the_checkpoint(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            self._resume = resume_from_checkpoint
            try:
                return train(resume_from_checkpoint, *args, **kwargs)
            finally:
                self._resume = None

        train_noting_the_checkpoint.__doc__ = train.__doc__
        trainer.train = train_noting_the_checkpoint
        return self

    # -- start --------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        """Build the watch, restore its state when resuming, and wrap the bound Trainer's clipping and logging."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None and model is not None and model is not trainer.model:
            trainer = None  # bound to another Trainer than the one running now
        if model is None and trainer is not None:
            model = trainer.model
        if model is None:
            raise RuntimeError("GradWatchCallback.on_train_begin was called without the model")
        accelerator = trainer.accelerator if trainer is not None else None
        scaler = getattr(accelerator if accelerator is not None else optimizer, "scaler", None)  # fp16 AMP
        self._accelerator, self._optimizer = accelerator, optimizer
        saved = self._checkpoint_file(args, state)
        if saved is not None:
            self._pending_state = torch.load(saved, map_location="cpu", weights_only=True)["watch"]
        self._build_watch(model, scaler=scaler, fused=bool(args.fp16) or args.world_size > 1)
        if self.clipper is not None and args.max_grad_norm and args.max_grad_norm > 0:
            self._warn_double_clip(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm}",
                "Set max_grad_norm=0 to clip with gradwatch only.",
            )
        if trainer is None:
            warnings.warn(
                "GradWatchCallback is not bound to the Trainer that runs it (call cb.bind(trainer) before train()): "
                "it records in on_pre_optimizer_step, after the Trainer's clipping (post-clip norms unless "
                "max_grad_norm=0, and a NaN gradient has reached every parameter by then), and logs through on_log",
                UserWarning,
                stacklevel=2,
            )
            return
        self._patches = [
            _Patch(accelerator, "clip_grad_norm_", self._wrap_clip(accelerator)),
            _Patch(trainer, "log", self._wrap_log(trainer.log)),
        ]

    def _checkpoint_file(self, args: Any, state: Any) -> str | None:
        """The state file of the checkpoint this run resumes from, if it resumes (warns if it lacks the file)."""
        if state.global_step == 0:  # the Trainer restored no checkpoint
            return None
        folder = self._resume
        if folder is True:
            folder = get_last_checkpoint(args.output_dir)
        if not isinstance(folder, (str, os.PathLike)) and isinstance(args.resume_from_checkpoint, str):
            folder = args.resume_from_checkpoint  # what HF's example scripts pass to train()
        if not isinstance(folder, (str, os.PathLike)):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            return path
        self._warn_no_state(f"{os.fspath(folder)!r} (no {STATE_FILE})")
        return None

    # -- the measurement point ----------------------------------------------------------
    def _wrap_clip(self, accelerator: Any) -> Callable[..., Any]:
        clip = accelerator.clip_grad_norm_  # the bound method (or whatever was there)

        def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kw: Any) -> Any:
            if not self._open or self._stepped or self.watch is None:
                return clip(parameters, max_norm, norm_type, **kw)
            accelerator.unscale_gradients()  # a no-op unless fp16 AMP
            grads = [p.grad for p in self.watch.params]
            measure_only = math.isinf(max_norm)  # max_grad_norm=0: the Trainer wants its grad_norm log only
            pre = _total_norm(grads, norm_type) if measure_only else None  # reads the gradients, scales nothing
            # the watch sees the gradients before anything scales them, whatever max_norm is: the Trainer's
            # clip_grad_norm_(params, inf) multiplies every gradient by inf/(nan+1e-6) = NaN if one holds a NaN
            self._step_watch()
            if all(p.grad is None for p in self.watch.params) and any(g is not None for g in grads):
                # a detector skipped the step (dropped the gradients): log their pre-clip norm, not 0.0
                return pre if pre is not None else torch.tensor(self.watch.history.total[-1])
            if measure_only:
                return pre  # clip_grad_norm_(params, inf) would only multiply every gradient by 1
            undo = _Patch(accelerator, "unscale_gradients", lambda *a, **k: None)  # unscaled once already
            try:
                return clip(parameters, max_norm, norm_type, **kw)
            finally:
                undo.undo()

        return clip_grad_norm_

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Step the watch here if the Trainer did not go through ``accelerator.clip_grad_norm_``."""
        if not self._open:
            return
        if not self._stepped:
            if self._patches and args.max_grad_norm and args.max_grad_norm > 0 and not self._warned_fallback:
                self._warned_fallback = True
                warnings.warn(
                    "GradWatchCallback measured after the Trainer's gradient clipping (it did not call "
                    "accelerator.clip_grad_norm_): the rows hold post-clip norms",
                    UserWarning,
                    stacklevel=2,
                )
            if self._scaler is not None and not unscaled_this_step(self._scaler):  # the Trainer did not unscale
                if self._accelerator is not None:
                    self._accelerator.unscale_gradients()
                else:
                    self._scaler.unscale_(getattr(self._optimizer, "optimizer", self._optimizer))
            self._step_watch()
        self._stepped = False

    # -- logging ------------------------------------------------------------------------
    def _wrap_log(self, log: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            if self._open and "loss" in logs:  # the training logs, not evaluation or the final summary
                logs.update(self._new_metrics())
            return log(logs, *args, **kwargs)

        return wrapped

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        """Unbound (no wrapped ``log``), add the metrics here for the callbacks after this one."""
        if self._open and not self._patches and logs is not None and "loss" in logs:
            logs.update(self._new_metrics())

    # -- checkpoints and the end ----------------------------------------------------------
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the clipper's and detectors' state next to the Trainer's checkpoint."""
        saved = self._saved_state()
        if saved is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save({"watch": saved}, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Put the Trainer back as it was, flush the last rows and close the sinks."""
        self._close()

    def _close(self) -> None:
        for p in reversed(self._patches):
            p.undo()
        self._patches = []
        super()._close()
