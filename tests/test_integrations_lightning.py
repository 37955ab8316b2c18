"""GradWatchCallback for PyTorch Lightning, against references: a plain-PyTorch twin's accumulated
gradients, Lightning's own ``gradient_clip_val``, an uninterrupted run, the CSV logger's file."""

from __future__ import annotations

import copy
import csv
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw
from gradwatch.integrations.lightning import GradWatchCallback

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


class Net(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.optimizer, self.lr = optimizer, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x**2).sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 4) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def fit(model: Net, cb: GradWatchCallback | None, ds: TensorDataset, **kw) -> pl.Trainer:
    trainer = pl.Trainer(**{**QUIET, "callbacks": [] if cb is None else [cb], **kw})
    trainer.fit(model, loader(ds))
    return trainer


def test_accumulated_gradient_norms_match_a_plain_pytorch_twin():
    """accumulate_grad_batches=2: one row per optimizer step, holding the norms of both micro-batches' sum."""
    model = Net(lr=0.05)
    twin = copy.deepcopy(model)
    ds = data(32)
    cb = GradWatchCallback()
    trainer = fit(model, cb, ds, max_steps=4, accumulate_grad_batches=2)
    h = cb.history
    assert trainer.global_step == 4 and len(h) == 4
    np.testing.assert_array_equal(h.steps, np.arange(4))
    assert h.names == [n for n, _ in twin.named_parameters()]

    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    batches = list(loader(ds))
    ref, first_only = [], []
    for k in range(4):
        opt.zero_grad()
        for j in range(2):
            x, y = batches[2 * k + j]
            (F.mse_loss(twin(x), y) / 2).backward()  # Lightning divides the loss by accumulate_grad_batches
            if j == 0:
                first_only.append([p.grad.norm().item() for p in twin.parameters()])
        ref.append([p.grad.norm().item() for p in twin.parameters()])
        opt.step()
    ref = np.array(ref)
    np.testing.assert_allclose(h.norms, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h.total, np.linalg.norm(ref, axis=1), rtol=1e-5)
    # what an optimizer-attached watch records under Lightning (the first micro-batch only) is far off
    assert np.abs(np.array(first_only) - ref).max() > 1e-3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_callback_clipper_equals_lightning_gradient_clip_val():
    bound = 0.5
    ours = Net()
    theirs = copy.deepcopy(ours)
    ds = data(32)
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(bound))
    fit(ours, cb, ds, max_steps=6)
    rec = GradWatchCallback()  # records the pre-clip norms of the run Lightning clips
    fit(theirs, rec, ds, max_steps=6, gradient_clip_val=bound, gradient_clip_algorithm="norm")
    h, r = cb.history, rec.history
    assert (h.clip_coef < 1).sum() >= 4  # the bound binds
    np.testing.assert_allclose(h.total, r.total, rtol=1e-6)
    np.testing.assert_allclose(h.total_clipped[h.clip_coef < 1], bound, rtol=1e-5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_every_thins_the_rows_but_clips_every_step():
    ours = Net()
    theirs = copy.deepcopy(ours)
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5), every=2)
    fit(ours, cb, data(32), max_steps=5)
    fit(theirs, None, data(32), max_steps=5, gradient_clip_val=0.5)
    np.testing.assert_array_equal(cb.history.steps, [0, 2, 4])
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class CountingCallback(GradWatchCallback):
    """Counts host syncs and device-to-host copies inside the callback's per-step hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts: dict[str, list[tuple[int, int]]] = {"step": [], "batch_end": []}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with gw.count_host_syncs() as c:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.counts["step"].append((c.syncs, c.host_copies))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with gw.count_host_syncs() as c:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.counts["batch_end"].append((c.syncs, c.host_copies))


def test_no_host_sync_per_step_one_copy_per_logging_step(tmp_path):
    cb = CountingCallback(clipper=gw.AutoClip(), detectors=[gw.NonFinite(), gw.Spike(), gw.Vanishing(min_norm=1e-9)])
    fit(Net(), cb, data(32), max_steps=8, log_every_n_steps=4, logger=CSVLogger(tmp_path, name="n"))
    assert cb.counts["step"] == [(0, 0)] * 8
    # logging steps 4 and 8 (global_step % 4 == 0): one flush, one copy; the other steps: nothing
    assert [c for c, _ in cb.counts["batch_end"]] == [0] * 8
    assert [h for _, h in cb.counts["batch_end"]] == [0, 0, 0, 1, 0, 0, 0, 1]


def test_warns_once_when_lightning_clips_too():
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(1.0))
    with pytest.warns(UserWarning, match="gradient_clip_val") as rec:
        fit(Net(), cb, data(16), max_steps=3, gradient_clip_val=1.0)
    assert sum("gradient_clip_val" in str(w.message) for w in rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(Net(), GradWatchCallback(), data(16), max_steps=1, gradient_clip_val=1.0)  # nothing to warn about


def test_bf16_mixed_records_finite_rows_close_to_float32():
    model = Net()
    twin = copy.deepcopy(model)
    cb, ref = GradWatchCallback(), GradWatchCallback()
    trainer = fit(model, cb, data(32), max_steps=5, precision="bf16-mixed")
    fit(twin, ref, data(32), max_steps=5)
    h = cb.history
    assert len(h) == trainer.global_step == 5
    assert np.isfinite(h.norms).all() and np.isfinite(h.total).all()
    assert (h.total > 0).all()
    # same weights and batch at step 0: bf16 autocast changes the gradient by bf16 rounding only
    np.testing.assert_allclose(h.total[0], ref.history.total[0], rtol=0.05)


def test_fp16_grad_scaler_rows_are_unscaled():
    """16-mixed with a GradScaler (scale 256): Lightning unscales before the hook, so rows hold unscaled norms."""
    model = Net()
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    cb, ref = GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5)), GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5))
    fit(model, cb, data(32), max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    fit(twin, ref, data(32), max_steps=4)
    h = cb.history
    assert scaler.get_scale() == 256.0 and len(h) == 4  # no overflow, no skipped step
    np.testing.assert_array_equal(h.scale, 256.0)  # the precision plugin's scaler, recorded
    np.testing.assert_allclose(h.total, ref.history.total, rtol=2e-3)  # fp16 autocast rounding, not a factor 256
    np.testing.assert_allclose(h.total_clipped, 0.5, rtol=1e-5)  # the clipper saw unscaled gradients too
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_fp16_overflow_steps_are_labelled_amp_overflow():
    """A scale of 2**40 overflows fp16: each step is recorded, labelled amp_overflow, and the scale halves."""
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    cb = GradWatchCallback(detectors=[gw.NonFinite()])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    fit(model, cb, data(32), max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    h = cb.history
    np.testing.assert_array_equal(h.scale, [2.0**40, 2.0**39, 2.0**38])
    assert {e.kind for e in h.events} == {"amp_overflow"} and {e.step for e in h.events} == {0, 1, 2}
    for p, q in zip(model.parameters(), before):  # the scaler skipped every step
        torch.testing.assert_close(p, q)


def test_csv_logger_receives_global_clipped_and_group_norms(tmp_path):
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5))
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(Net(), cb, data(32), max_steps=6, logger=logger, log_every_n_steps=2)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"grad_norm/total", "grad_norm/total_clipped", "grad_norm/encoder", "grad_norm/head"} <= columns
    assert not any(c.startswith("grad_norm/encoder.") for c in columns)  # groups, not one column per tensor
    h = cb.history
    logged = [r for r in rows if r["grad_norm/total"]]
    assert [int(r["step"]) for r in logged] == [1, 3, 5]  # Lightning's logging steps (log_every_n_steps=2)
    for r in logged:
        s = int(r["step"])
        assert float(r["grad_norm/total"]) == pytest.approx(h.total[s], rel=1e-6)
        assert float(r["grad_norm/total_clipped"]) == pytest.approx(h.total_clipped[s], rel=1e-6)
        g = h.grouped(1)
        assert float(r["grad_norm/encoder"]) == pytest.approx(g["encoder"][s], rel=1e-6)
        assert float(r["grad_norm/head"]) == pytest.approx(g["head"][s], rel=1e-6)


def test_log_groups_options(tmp_path):
    for groups, expect, absent in [
        (None, {"g/total"}, {"g/head"}),
        ("params", {"g/total", "g/head.weight", "g/encoder.0.bias"}, {"g/encoder"}),
        (lambda name: name.split(".")[-1], {"g/total", "g/weight", "g/bias"}, {"g/head"}),
    ]:
        cb = GradWatchCallback(log_groups=groups, log_prefix="g/")
        trainer = fit(Net(), cb, data(16), max_steps=2, log_every_n_steps=1)
        got = {k for k in trainer.logged_metrics if k.startswith("g/")}
        assert expect <= got and not (absent & got), (groups, got)
    cb = GradWatchCallback(log=False)
    trainer = fit(Net(), cb, data(16), max_steps=2, log_every_n_steps=1)
    assert not any(k.startswith("grad_norm/") for k in trainer.logged_metrics) and len(cb.history) == 2


def test_checkpoint_resume_continues_autoclip_exactly(tmp_path):
    ds = data(32)
    base = Net(optimizer="adam", lr=0.01)
    full = GradWatchCallback(clipper=gw.AutoClip(percentile=25.0))
    model_a = copy.deepcopy(base)
    fit(model_a, full, ds, max_epochs=2)
    first = GradWatchCallback(clipper=gw.AutoClip(percentile=25.0))
    trainer = fit(copy.deepcopy(base), first, ds, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    second = GradWatchCallback(clipper=gw.AutoClip(percentile=25.0))
    model_b = Net(optimizer="adam", lr=0.01)  # fresh weights: everything comes from the checkpoint
    trainer = pl.Trainer(**{**QUIET, "callbacks": [second], "max_epochs": 2})
    trainer.fit(model_b, loader(ds), ckpt_path=tmp_path / "half.ckpt")
    a, b = full.history, second.history
    half = len(first.history)
    assert len(a) == 2 * half and half == 8
    np.testing.assert_array_equal(b.steps, a.steps[half:])
    for col in ("total", "total_clipped", "clip_coef", "clip_threshold"):
        np.testing.assert_allclose(getattr(b, col), getattr(a, col)[half:], rtol=1e-6, err_msg=col)
    # AutoClip's bound is numpy's percentile of every norm so far, those before the checkpoint included
    ref = [np.percentile(a.total[: i + 1], 25.0) for i in range(half, 2 * half)]
    np.testing.assert_allclose(b.clip_threshold, ref, rtol=1e-5)
    assert (a.clip_coef[half:] < 1).any()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q)


def test_two_callbacks_in_one_trainer_each_resume_their_own_state(tmp_path):
    """Each configuration has its own state_key: both callbacks' states are in one checkpoint, and each
    resumed callback continues as its uninterrupted twin does."""
    ds = data(32)

    def pair():
        return [
            GradWatchCallback(clipper=gw.AutoClip(percentile=25.0), log_prefix="auto/"),
            GradWatchCallback(clipper=gw.ZClip(warmup_steps=3), detectors=[gw.Spike()], log_prefix="z/"),
        ]

    base = Net(optimizer="adam", lr=0.01)
    full = pair()
    fit(copy.deepcopy(base), None, ds, max_epochs=2, callbacks=full)
    first = pair()
    assert first[0].state_key != first[1].state_key
    trainer = fit(copy.deepcopy(base), None, ds, max_epochs=1, callbacks=first)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = torch.load(tmp_path / "half.ckpt", weights_only=False)["callbacks"]
    assert {first[0].state_key, first[1].state_key} <= set(saved)
    second = pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # both states found: nothing to warn about
        trainer = pl.Trainer(**{**QUIET, "callbacks": second, "max_epochs": 2})
        trainer.fit(Net(optimizer="adam", lr=0.01), loader(ds), ckpt_path=tmp_path / "half.ckpt")
    half = len(first[0].history)
    for a, b in zip(full, second):
        np.testing.assert_array_equal(b.history.steps, a.history.steps[half:])
        for col in ("total", "clip_threshold", "total_clipped"):
            np.testing.assert_allclose(getattr(b.history, col), getattr(a.history, col)[half:], rtol=1e-6, err_msg=col)


def test_resuming_without_the_callbacks_state_warns_once(tmp_path):
    ds = data(16)
    trainer = fit(Net(), None, ds, max_steps=2)  # trained without gradwatch
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    cb = GradWatchCallback(clipper=gw.AutoClip())
    with pytest.warns(UserWarning, match="without GradWatchCallback's state") as rec:
        trainer = pl.Trainer(**{**QUIET, "callbacks": [cb], "max_steps": 4})
        trainer.fit(Net(), loader(ds), ckpt_path=tmp_path / "plain.ckpt")
    assert sum("GradWatchCallback's state" in str(w.message) for w in rec) == 1
    np.testing.assert_array_equal(cb.history.steps, [0, 1])  # the counter starts afresh, as it says

    # a checkpoint whose state sits under the key used before state_key held the configuration is read
    ckpt = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    ckpt["callbacks"]["GradWatchCallback"] = {"watch": {"step": 7, "clipper": None, "detectors": []}}
    torch.save(ckpt, tmp_path / "old.ckpt")
    cb = GradWatchCallback()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = pl.Trainer(**{**QUIET, "callbacks": [cb], "max_steps": 4})
        trainer.fit(Net(), loader(ds), ckpt_path=tmp_path / "old.ckpt")
    assert not any("GradWatchCallback's state" in str(w.message) for w in rec)
    np.testing.assert_array_equal(cb.history.steps, [7, 8])


class SelfAttached(Net):
    """The plain API inside a LightningModule: a GradWatch attached to the module's own optimizer."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        self.watch = gw.GradWatch(self).attach(opt)
        return opt

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.torch_pre_clip = [*getattr(self, "torch_pre_clip", []), torch.nn.utils.get_total_norm(grads).item()]
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # Lightning's own clipping


def test_attach_records_after_lightnings_clipping_the_callback_before_it():
    """attach measures after Lightning's closure -- which holds Lightning's gradient_clip_val clipping -- so
    its norms are post-clip; the callback's are the pre-clip norms torch measures when Lightning clips."""
    model = SelfAttached()
    cb = GradWatchCallback()
    fit(model, cb, data(32), max_steps=6, gradient_clip_val=0.5)
    attached = model.watch.history.total
    pre = np.array(model.torch_pre_clip)
    assert len(attached) == len(pre) == len(cb.history) == 6 and (pre > 0.5).sum() >= 4  # the bound binds
    assert (attached <= 0.5 * (1 + 1e-5)).all()  # post-clip
    np.testing.assert_allclose(attached, np.minimum(pre, 0.5), rtol=1e-5)
    np.testing.assert_allclose(cb.history.total, pre, rtol=1e-6)  # pre-clip
    model.watch.close()


class EveryOther(torch.utils.data.Sampler):
    """Rank r of 2 reads samples r, r+2, r+4, ...: two ranks' batches of 4 are one batch of 8 in order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n // 2

    def __iter__(self):
        return iter(range(torch.distributed.get_rank(), self.n, 2))


class SaveRankResults(pl.Callback):
    """Writes each rank's history and weights (ddp_spawn runs the callbacks in child processes)."""

    def __init__(self, cb: GradWatchCallback, folder: Path) -> None:
        self.cb, self.folder = cb, folder

    def on_fit_end(self, trainer, pl_module):
        r = trainer.global_rank
        self.cb.history.save(self.folder / f"rank{r}.npz")
        torch.save([p.detach().clone() for p in pl_module.parameters()], self.folder / f"rank{r}.pt")


def test_ddp_two_ranks_record_the_all_reduced_gradient(tmp_path):
    """2 CPU ranks x batch 4 == one process x batch 8: same rows on both ranks, equal to the single process."""
    model = Net()
    single = copy.deepcopy(model)
    cb = GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5))
    trainer = pl.Trainer(
        **{**QUIET, "devices": 2, "strategy": "ddp_spawn", "max_steps": 3, "use_distributed_sampler": False},
        callbacks=[cb, SaveRankResults(cb, tmp_path)],
    )
    ds = data(48)
    trainer.fit(model, DataLoader(ds, batch_size=4, sampler=EveryOther(len(ds))))
    ref = GradWatchCallback(clipper=gw.ClipByGlobalNorm(0.5))
    trainer = pl.Trainer(**{**QUIET, "callbacks": [ref], "max_steps": 3})
    trainer.fit(single, loader(data(48), batch_size=8))
    h0, h1 = gw.History.load(tmp_path / "rank0.npz"), gw.History.load(tmp_path / "rank1.npz")
    np.testing.assert_array_equal(h0.norms, h1.norms)  # identical rows on every rank
    np.testing.assert_allclose(h0.norms, ref.history.norms, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h0.total_clipped, 0.5, rtol=1e-5)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for a, b, c in zip(w0, w1, single.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # one clip coefficient on all ranks
        torch.testing.assert_close(a, c.detach())


class CompiledEncoder(Net):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.compile(self.encoder, backend="eager")


def test_compiled_submodule_is_named_and_measured_like_the_eager_one():
    torch.manual_seed(0)
    compiled = CompiledEncoder()
    eager = Net()
    eager.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in compiled.state_dict().items()})
    a, b = GradWatchCallback(), GradWatchCallback()
    fit(compiled, a, data(16), max_steps=2)
    fit(eager, b, data(16), max_steps=2)
    assert next(n for n, _ in compiled.named_parameters()) == "encoder._orig_mod.0.weight"
    assert a.history.names == b.history.names == [n for n, _ in eager.named_parameters()]
    np.testing.assert_allclose(a.history.norms, b.history.norms, rtol=1e-6)


def test_skip_detector_leaves_weights_untouched():
    class Poisoned(Net):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * torch.tensor(float("nan")) if self.global_step == 1 else loss

    model = Poisoned()
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    cb = GradWatchCallback(detectors=[gw.NonFinite(action="skip")])
    with pytest.warns(gw.GradientWarning):
        trainer = pl.Trainer(**{**QUIET, "callbacks": [cb, Spy()], "max_steps": 3})
        trainer.fit(model, loader(data(16)))
    h = cb.history
    assert [e.kind for e in h.events] and {e.step for e in h.events} == {1}
    for p, q in zip(seen[1], seen[2]):  # the NaN step changed nothing
        torch.testing.assert_close(p, q)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_argument_errors_name_the_argument():
    with pytest.raises(TypeError, match="clipper"):
        GradWatchCallback(clipper=1.0)
    with pytest.raises(TypeError, match="detectors"):
        GradWatchCallback(detectors=[gw.ClipByGlobalNorm(1.0)])
    with pytest.raises(ValueError, match="every"):
        GradWatchCallback(every=0)
    with pytest.raises(TypeError, match="log must"):
        GradWatchCallback(log="yes")
    with pytest.raises(ValueError, match="log_groups"):
        GradWatchCallback(log_groups=0)
    with pytest.raises(ValueError, match="log_groups must be one of 'params'"):
        GradWatchCallback(log_groups="param")
    with pytest.raises(TypeError, match="log_prefix"):
        GradWatchCallback(log_prefix=None)
    with pytest.raises(RuntimeError, match="no fit"):
        GradWatchCallback().history


def test_example_script_runs_and_writes_its_plot(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "lightning_autoclip.py"
    spec = importlib.util.spec_from_file_location("lightning_autoclip", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    png = example.main(["--out", str(tmp_path), "--steps", "16"])
    assert png.is_file() and png.stat().st_size > 10_000
    h = gw.History.load(tmp_path / "lightning_history.npz")
    assert len(h) == 16 and h.clip_fraction > 0
    assert {e.step for e in h.events_of("spike")} >= {7, 15}  # the bad batches (every 8th step)
    assert "recorded 16 optimizer steps" in capsys.readouterr().out
    with open(tmp_path / "lightning" / "version_0" / "metrics.csv") as f:
        assert "grad_norm/total_clipped" in next(csv.reader(f))
