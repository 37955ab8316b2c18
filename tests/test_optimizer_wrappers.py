"""Optimizer wrappers: Lightning's ``LightningOptimizer`` (attach, manual optimization) and wrappers or
optimizers with state of their own under ``action="skip"`` (schedule-free, torch_optimizer's Lookahead)."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import schedulefree
import torch
import torch.nn.functional as F
import torch_optimizer
from pytorch_lightning.core.optimizer import LightningOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw
from gradwatch._compat import has_step_hooks
from gradwatch.gate import unwrap_optimizer

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


# -- LightningOptimizer -------------------------------------------------------------------
def test_attach_lightning_optimizer_records_the_inner_optimizers_step():
    m = nn.Linear(3, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    wrapper = LightningOptimizer(opt)
    assert unwrap_optimizer(wrapper) is opt  # the object whose step hooks fire
    assert has_step_hooks(opt) and not has_step_hooks(wrapper)
    watch = gw.GradWatch(m)
    watch.attach(wrapper)
    m(torch.ones(2, 3)).sum().backward()
    expected = [torch.linalg.vector_norm(p.grad).item() for p in m.parameters()]
    opt.step()
    h = watch.history
    assert h.steps.tolist() == [0]
    torch.testing.assert_close(torch.as_tensor(h.norms[0]), torch.tensor(expected))
    watch.attach(wrapper)  # attaching again (the wrapper or the optimizer) does nothing
    watch.attach(opt)
    opt.zero_grad()
    m(torch.ones(2, 3)).sum().backward()
    opt.step()
    assert watch.history.steps.tolist() == [0, 1]
    watch.close()


class Manual(pl.LightningModule):
    """Manual optimization; attaches the watch to ``self.optimizers()`` (a LightningOptimizer)."""

    def __init__(self, watch_it: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.watch_it = watch_it
        self.watch: gw.GradWatch | None = None
        self.grad_norms: list[list[float]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        assert isinstance(opt, LightningOptimizer)
        if self.watch_it:
            if self.watch is None:
                self.watch = gw.GradWatch(self.net)
            self.watch.attach(opt)
        x, y = batch
        opt.zero_grad()
        self.manual_backward(F.mse_loss(self.net(x), y))
        self.grad_norms.append([torch.linalg.vector_norm(p.grad).item() for p in self.net.parameters()])
        opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_lightning_manual_optimization_records_one_row_per_step():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    watched = Manual(watch_it=True)
    reference = Manual(watch_it=False)
    reference.load_state_dict(copy.deepcopy(watched.state_dict()))
    for module in (watched, reference):
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=3,
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, DataLoader(data, batch_size=8))
        assert trainer.global_step == 3
    h = watched.watch.history
    assert h.names == [n for n, _ in watched.net.named_parameters()]
    assert h.steps.tolist() == [0, 1, 2]
    # the reference never saw gradwatch: same gradients, so the watch measured the steps that ran
    torch.testing.assert_close(torch.as_tensor(h.norms), torch.tensor(reference.grad_norms))
    torch.testing.assert_close(torch.as_tensor(h.norms), torch.tensor(watched.grad_norms))
    for p, q in zip(watched.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    watched.watch.close()


# -- action="skip" on optimizers with per-step state of their own ----------------------------
X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(make_opt: Callable, poisoned: set[int], steps: int, watched: bool, closure: bool = False):
    """Steps ``0..steps-1``; a poisoned step has a NaN loss (the watched run skips it, the twin omits it)."""
    model = _model()
    opt = make_opt(model)
    watch = None
    if watched:
        watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")], flush_every=1)
        watch.attach(opt)
    losses = []
    for i in range(steps):
        if i in poisoned and not watched:
            continue  # the twin: this step never happened

        def loss_fn(i: int = i) -> torch.Tensor:
            opt.zero_grad()
            loss = (model(X * (i + 1)) ** 2).mean()
            loss = loss * math.nan if i in poisoned else loss
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if closure:
                losses.append(opt.step(loss_fn))
            else:
                loss_fn()
                opt.step()
    if watch is not None:
        assert [e.step for e in watch.history.events] and {e.step for e in watch.history.events} <= poisoned
        assert watch.history.steps.tolist() == list(range(steps))
        watch.close()
    return model, opt, losses


def _assert_same_state(a: object, b: object, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _schedulefree(model: nn.Module) -> torch.optim.Optimizer:
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.05, warmup_steps=3)
    opt.train()
    return opt


@pytest.mark.parametrize("closure", [False, True])
def test_skip_on_schedule_free_leaves_weights_and_its_state_as_if_the_step_never_ran(closure):
    skipped, opt, losses = _train(_schedulefree, {0, 2}, 5, watched=True, closure=closure)
    twin, twin_opt, _ = _train(_schedulefree, {0, 2}, 5, watched=False, closure=closure)
    for p, q in zip(skipped.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["k"] == twin_opt.param_groups[0]["k"] == 3
    _assert_same_state(opt.state_dict(), twin_opt.state_dict())  # k, weight_sum, lr_max, z, exp_avg_sq
    if closure:
        assert math.isnan(losses[2].item()) and not math.isnan(losses[1].item())  # a skipped step returns its loss


def _lookahead(model: nn.Module) -> torch.optim.Optimizer:
    return torch_optimizer.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2, alpha=0.5)


@pytest.mark.parametrize("closure", [False, True])
def test_skip_on_lookahead_skips_its_whole_step(closure):
    skipped, opt, losses = _train(_lookahead, {1, 4}, 6, watched=True, closure=closure)
    twin, twin_opt, _ = _train(_lookahead, {1, 4}, 6, watched=False, closure=closure)
    for p, q in zip(skipped.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert [g["counter"] for g in opt.param_groups] == [g["counter"] for g in twin_opt.param_groups]
    _assert_same_state(opt.optimizer.state_dict(), twin_opt.optimizer.state_dict())  # momentum, counter
    # slow weights (Lookahead.state_dict() itself fails on torch >= 2.0: no state-dict hook dicts)
    slow = [opt.state[p]["slow_param"] for p in skipped.parameters()]
    _assert_same_state(slow, [twin_opt.state[p]["slow_param"] for p in twin.parameters()])
    assert all(torch.isfinite(p).all() for p in skipped.parameters())
    if closure:
        assert math.isnan(losses[1].item()) and not math.isnan(losses[0].item())


def test_lookahead_step_is_restored_when_the_watch_closes():
    model = _model()
    opt = _lookahead(model)
    watch = gw.GradWatch(model, detectors=[gw.NonFinite(action="skip")])
    watch.attach(opt)
    watch.attach(opt)  # attaching again does nothing
    assert "step" in vars(opt)
    watch.close()
    assert "step" not in vars(opt)
