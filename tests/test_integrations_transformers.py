"""GradWatchCallback for the Hugging Face Trainer, against the Trainer's own numbers: its logged
``grad_norm`` (pre-clip), its ``max_grad_norm`` clipping, an uninterrupted run."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import gradwatch as gw
from gradwatch.integrations.transformers import STATE_FILE, GradWatchCallback

hf_logging.set_verbosity_error()


class Tokens(torch.utils.data.Dataset):
    """Synthetic token sequences (no download): next-token prediction on random ids."""

    def __init__(self, n: int = 32, length: int = 16, vocab: int = 128, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg)


def torch_contract_clip(accelerator):
    """``accelerator.clip_grad_norm_`` as accelerate versions before the DTensor-aware one (and builds without
    torch.distributed) run it: unscale, then ``torch.nn.utils.clip_grad_norm_`` -- which, at ``max_norm=inf``,
    multiplies every gradient by ``clamp(inf / (total + 1e-6), max=1)``: NaN when one gradient holds a NaN."""

    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    return clip_grad_norm_


def train(tmp_path, cb, *, model=None, resume=None, bind=True, extra=(), torch_clip=False, **kw) -> Trainer:
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=1,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(kw)
    trainer = Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=TrainingArguments(**args),
        train_dataset=Tokens(),
        callbacks=([] if cb is None else [cb]) + list(extra),
    )
    if torch_clip:
        trainer.accelerator.clip_grad_norm_ = torch_contract_clip(trainer.accelerator)
    if bind and isinstance(cb, GradWatchCallback):
        cb.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged(trainer: Trainer, key: str) -> np.ndarray:
    return np.array([row[key] for row in trainer.state.log_history if key in row])


def test_pre_clip_norm_equals_the_trainers_logged_grad_norm(tmp_path):
    """Accumulation 2, the Trainer clips at 0.5: one row per optimizer step, total == the Trainer's grad_norm."""
    cb = GradWatchCallback()
    trainer = train(tmp_path, cb, max_grad_norm=0.5)
    h = cb.history
    assert trainer.state.global_step == 4 and len(h) == 4
    np.testing.assert_array_equal(h.steps, np.arange(4))
    theirs = logged(trainer, "grad_norm")
    assert len(theirs) == 4 and (theirs > 0.5).all()  # the Trainer's clipping binds at every step
    np.testing.assert_allclose(h.total, theirs, rtol=1e-6)
    np.testing.assert_allclose(logged(trainer, "grad_norm/total"), theirs, rtol=1e-6)  # through its own logs
    np.testing.assert_allclose(logged(trainer, "grad_norm/transformer"), h.grouped(1)["transformer"], rtol=1e-6)
    assert "grad_norm/total_clipped" not in trainer.state.log_history[0]  # no gradwatch clipper


def test_callback_clipper_equals_the_trainers_max_grad_norm(tmp_path):
    bound = 0.5
    ours, theirs = tiny_gpt2(), tiny_gpt2()
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(bound))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # max_grad_norm=0: nothing to warn about
        t_ours = train(tmp_path / "a", cb, model=ours, max_grad_norm=0.0)
    rec = GradWatchCallback()
    t_theirs = train(tmp_path / "b", rec, model=theirs, max_grad_norm=bound)
    h = cb.history
    assert (h.clip_coef < 1).all()
    np.testing.assert_allclose(h.total, rec.history.total, rtol=1e-5)
    np.testing.assert_allclose(h.total, logged(t_ours, "grad_norm"), rtol=1e-6)
    np.testing.assert_allclose(logged(t_ours, "grad_norm/total_clipped"), bound, rtol=1e-5)
    np.testing.assert_allclose(logged(t_ours, "grad_norm"), logged(t_theirs, "grad_norm"), rtol=1e-5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q)


def test_warns_when_the_trainer_clips_too(tmp_path):
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(1.0))
    with pytest.warns(UserWarning, match="max_grad_norm"):
        train(tmp_path, cb, max_steps=1, max_grad_norm=1.0)
    assert len(cb.history) == 1


def test_resume_from_checkpoint_continues_autoclip_exactly(tmp_path):
    full = GradWatchCallback(clipper=gw.AutoClip(percentile=25.0))
    model_a = tiny_gpt2()
    train(tmp_path, full, model=model_a, max_grad_norm=0.0, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / STATE_FILE).is_file()
    resumed = GradWatchCallback(clipper=gw.AutoClip(percentile=25.0))
    model_b = tiny_gpt2(seed=1)  # other weights: everything comes from the checkpoint
    train(tmp_path / "b", resumed, model=model_b, resume=str(ckpt), max_grad_norm=0.0)
    a, b = full.history, resumed.history
    np.testing.assert_array_equal(b.steps, [2, 3])
    for col in ("total", "total_clipped", "clip_threshold"):
        np.testing.assert_allclose(getattr(b, col), getattr(a, col)[2:], rtol=1e-5, err_msg=col)
    # AutoClip's bound is numpy's percentile of every norm so far, those before the checkpoint included
    np.testing.assert_allclose(b.clip_threshold, [np.percentile(a.total[: i + 1], 25.0) for i in (2, 3)], rtol=1e-5)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q)


POISONED = "transformer.h.0.mlp.c_fc.weight"


class Poison(TrainerCallback):
    """Arms a gradient hook on one named parameter at optimizer step ``at``: it multiplies that gradient by
    ``factor`` (NaN: the gradient holds NaN; 1e4: a spike) -- the other parameters' gradients stay as they are."""

    def __init__(self, model, at: int, factor: float) -> None:
        self.at, self.factor, self.armed = at, factor, False
        dict(model.named_parameters())[POISONED].register_hook(lambda g: g * self.factor if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step == self.at


def test_nan_in_one_gradient_is_named_at_max_grad_norm_0(tmp_path):
    """max_grad_norm=0: the Trainer's clip_grad_norm_(params, inf) multiplies every gradient by NaN under torch's
    contract; the callback measures before it, so NonFinite names the one parameter whose gradient holds the NaN."""
    model = tiny_gpt2()
    cb = GradWatchCallback(detectors=[gw.NonFinite()])
    with pytest.warns(gw.GradientWarning, match="nonfinite"):
        trainer = train(
            tmp_path, cb, model=model, max_grad_norm=0.0, max_steps=2, extra=[Poison(model, 1, np.nan)], torch_clip=True
        )
    events = cb.history.events_of("nonfinite")
    assert [(e.step, e.name) for e in events] == [(1, POISONED)]
    assert np.isnan(logged(trainer, "grad_norm")[1])  # the Trainer logs the pre-clip norm: NaN


def test_skipped_step_logs_the_dropped_gradients_norm_not_zero(tmp_path):
    """max_grad_norm=1 and Threshold(action="skip"): the step's gradients are dropped before the Trainer clips;
    its logged grad_norm is their pre-clip norm (h.total), not the 0.0 of the gradients left."""
    model = tiny_gpt2()
    cb = GradWatchCallback(detectors=[gw.Threshold(1e3, action="skip")])
    with pytest.warns(gw.GradientWarning, match="threshold"):
        trainer = train(tmp_path, cb, model=model, max_grad_norm=1.0, max_steps=3, extra=[Poison(model, 1, 1e5)])
    h = cb.history
    assert [e.step for e in h.events_of("threshold")] == [1] and h.total[1] > 1e3
    theirs = logged(trainer, "grad_norm")
    np.testing.assert_allclose(theirs, h.total, rtol=1e-6)  # step 1 too: the norm that made it skip


def test_bind_adds_the_callback_once_and_an_unbound_one_warns(tmp_path):
    """No stack walking: bound, the callback wraps the Trainer's clipping (pre-clip rows) and puts it back;
    unbound, it says so and records after the Trainer's clipping."""
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=2, max_grad_norm=0.5, disable_tqdm=True
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())
    cb = GradWatchCallback()
    assert cb.bind(trainer) is cb and cb.bind(trainer) is cb
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, GradWatchCallback)] == [cb]
    with pytest.raises(TypeError, match=r"trainer must be a transformers\.Trainer"):
        GradWatchCallback().bind(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert (cb.history.total > 0.5).all()  # pre-clip
    assert "clip_grad_norm_" not in vars(trainer.accelerator) and "log" not in vars(trainer)  # put back

    unbound = GradWatchCallback()
    with pytest.warns(UserWarning, match=r"not bound to the Trainer .*cb\.bind\(trainer\)"):
        train(tmp_path / "u", unbound, bind=False, max_steps=2, max_grad_norm=0.5)
    np.testing.assert_allclose(unbound.history.total, 0.5, rtol=1e-5)  # after the Trainer's clipping, as it warns


class AttachInCallback(TrainerCallback):
    """The plain-API recipe: a GradWatch attached to the Trainer's (accelerate-wrapped) optimizer."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.wrapped = type(optimizer).__name__
        self.watch = gw.GradWatch(model, measure="step").attach(optimizer)


def test_attach_unwraps_accelerates_optimizer(tmp_path):
    cb = AttachInCallback()
    trainer = train(tmp_path, cb, max_grad_norm=0.0)
    assert cb.wrapped == "AcceleratedOptimizer"
    np.testing.assert_allclose(cb.watch.history.total, logged(trainer, "grad_norm"), rtol=1e-6)


def test_without_a_trainer_it_records_in_on_pre_optimizer_step_and_logs_in_on_log(tmp_path):
    """A loop that fires the events itself: the callback warns, records before the step, fills on_log's logs."""
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_grad_norm=0.0, report_to="none")
    state, control = TrainerState(), TrainerControl()
    cb = GradWatchCallback(log_groups=None)
    with pytest.warns(UserWarning, match=r"not bound to the Trainer .*cb\.bind\(trainer\)"):
        cb.on_train_begin(args, state, control, model=model)
    ref = []
    for batch in torch.utils.data.DataLoader(Tokens(12), batch_size=4):
        model(**batch).loss.backward()
        ref.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        cb.on_pre_optimizer_step(args, state, control)
        opt.step()
        opt.zero_grad()
    logs = {"loss": 1.0}
    cb.on_log(args, state, control, logs=logs)
    cb.on_train_end(args, state, control)
    np.testing.assert_allclose(cb.history.total, ref, rtol=1e-5)
    assert logs == {"loss": 1.0, "grad_norm/total": pytest.approx(ref[-1], rel=1e-5)}


class Fp16Accelerator:
    """accelerate's fp16 contract on CPU (where accelerate has no GradScaler): ``clip_grad_norm_``
    unscales through the GradScaler -- which raises if asked twice in one step -- then clips."""

    def __init__(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        self.scaler, self.optimizer = scaler, optimizer

    def unscale_gradients(self) -> None:
        self.scaler.unscale_(self.optimizer)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)


class LoopByHand(Trainer):
    """A Trainer whose loop the test runs step by step; the events come from its own method, as in train()."""

    def begin(self, cb: GradWatchCallback) -> None:
        cb.bind(self).on_train_begin(self.args, self.state, self.control, model=self.model)


def fp16_run(tmp_path, max_grad_norm: float, init_scale: float, steps: int = 3):
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_grad_norm=max_grad_norm, report_to="none")
    trainer = LoopByHand(model=model, args=args)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator = Fp16Accelerator(scaler, opt)
    cb = GradWatchCallback(detectors=[gw.NonFinite()])
    trainer.begin(cb)  # wraps trainer.accelerator.clip_grad_norm_ and hands the scaler to the watch
    theirs, weights = [], [[p.detach().clone() for p in model.parameters()]]
    for batch in list(torch.utils.data.DataLoader(Tokens(12), batch_size=4))[:steps]:
        scaler.scale(model(**batch).loss).backward()
        bound = max_grad_norm if max_grad_norm > 0 else float("inf")  # what Trainer._inner_training_loop passes
        theirs.append(float(trainer.accelerator.clip_grad_norm_(model.parameters(), bound)))
        cb.on_pre_optimizer_step(args, trainer.state, trainer.control)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        weights.append([p.detach().clone() for p in model.parameters()])
    cb.on_train_end(args, trainer.state, trainer.control)
    assert "clip_grad_norm_" not in vars(trainer.accelerator)  # put back
    return cb.history, np.array(theirs), weights


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_fp16_clip_wrapper_unscales_once_and_records_unscaled_pre_clip_norms(tmp_path, max_grad_norm):
    h, theirs, weights = fp16_run(tmp_path, max_grad_norm, init_scale=2.0**10)
    twin = tiny_gpt2()  # the same model without scaling: a power-of-2 scale is exact
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    ref = []
    for batch in list(torch.utils.data.DataLoader(Tokens(12), batch_size=4))[:3]:
        twin(**batch).loss.backward()
        ref.append(float(torch.nn.utils.clip_grad_norm_(twin.parameters(), max_grad_norm or float("inf"))))
        twin_opt.step()
        twin_opt.zero_grad()
    assert len(h) == 3 and not h.events
    np.testing.assert_array_equal(h.scale, 2.0**10)  # the Trainer's GradScaler, recorded
    np.testing.assert_allclose(h.total, theirs, rtol=1e-6)  # the pre-clip norm the Trainer logs
    np.testing.assert_allclose(h.total, ref, rtol=1e-6)  # unscaled
    for p, q in zip(weights[-1], twin.parameters()):
        torch.testing.assert_close(p, q)


def test_fp16_overflow_steps_are_labelled_amp_overflow(tmp_path):
    h, _, weights = fp16_run(tmp_path, 1.0, init_scale=2.0**127, steps=2)  # the scaled loss overflows
    np.testing.assert_array_equal(h.scale, [2.0**127, 2.0**126])
    assert h.events and {e.kind for e in h.events} == {"amp_overflow"}
    for w in weights[1:]:  # the scaler skipped both steps
        for p, q in zip(w, weights[0]):
            torch.testing.assert_close(p, q)


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="clipper"):
        GradWatchCallback(clipper="global")
    with pytest.raises(ValueError, match="every"):
        GradWatchCallback(every=0)
    with pytest.raises(TypeError, match="sinks"):
        GradWatchCallback(sinks=["run.csv"])
    with pytest.raises(RuntimeError, match="no train"):
        GradWatchCallback().history


def test_example_script_runs_and_writes_its_plot(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "transformers_gpt2.py"
    spec = importlib.util.spec_from_file_location("transformers_gpt2", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    png = example.main(["--out", str(tmp_path), "--steps", "6"])
    assert png.is_file() and png.stat().st_size > 10_000
    h = gw.History.load(tmp_path / "gpt2_history.npz")
    assert len(h) == 6 and np.isfinite(h.total).all()
    out = capsys.readouterr().out
    assert "recorded 6 optimizer steps" in out
    rel = float(out.split("grad_norm: ")[1].split()[0])
    assert rel <= 1e-6
