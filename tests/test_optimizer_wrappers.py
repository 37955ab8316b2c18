"""Optimizer wrappers: Lightning's ``LightningOptimizer`` (attach, manual optimization) and wrappers or
optimizers with state of their own under ``action="skip"`` (schedule-free, torch_optimizer's Lookahead)."""

from __future__ import annotations

import copy
import logging

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
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
