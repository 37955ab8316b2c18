"""gradwatch in a PyTorch Lightning run: AutoClip, spike detection, metrics in the CSV logger, a plot.

    python examples/integrations/lightning_autoclip.py [--out runs/integrations] [--steps 48]

A small MLP regresses a smooth function; every 16th batch has its targets
multiplied by 30 (a "bad batch"), so its gradient spikes. The callback records
every optimizer step (``accumulate_grad_batches=2``: one row per step, the
accumulated gradient), clips with AutoClip before the update, flags the spikes
and logs the global, clipped and per-module norms through Lightning's
``CSVLogger``. Writes ``lightning_clipping.png`` (pre/post-clip global norm and
per-module norms), ``lightning_history.npz`` and the logger's ``metrics.csv``
into the output folder. CPU, about ten seconds.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch as gw
from gradwatch.integrations.lightning import GradWatchCallback

BAD_EVERY = 16  # every 16th batch (every 8th optimizer step) is a bad one


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss", loss, on_step=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def dataset(batches: int, batch_size: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 8).unsqueeze(1))
    for b in range(BAD_EVERY - 1, batches, BAD_EVERY):
        y[b * batch_size : (b + 1) * batch_size] *= 30.0
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/integrations"))
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    torch.manual_seed(0)

    cb = GradWatchCallback(clipper=gw.AutoClip(percentile=10.0), detectors=[gw.Spike(warmup_steps=6, action="ignore")])
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=CSVLogger(args.out, name="lightning", version=0),
        log_every_n_steps=1,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(dataset(2 * args.steps), batch_size=16, shuffle=False)
    trainer.fit(Regressor(), data)

    h = cb.history
    h.save(args.out / "lightning_history.npz")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    gw.plot_clipping(h, ax=top)
    top.set_title("Lightning + GradWatchCallback(AutoClip): global gradient norm")
    gw.plot_norms(h, ax=bottom, group_by=1, log=True)
    bottom.set_title("pre-clip norm per module")
    fig.tight_layout()
    png = args.out / "lightning_clipping.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)

    spikes = sorted({e.step for e in h.events_of("spike")})
    print(f"recorded {len(h)} optimizer steps (trainer.global_step = {trainer.global_step})")
    print(f"AutoClip bound {h.clip_fraction:.0%} of the steps; spikes flagged at steps {spikes}")
    print(f"max pre-clip global norm {h.total.max():.3g}, max post-clip {h.total_clipped.max():.3g}")
    print(f"wrote {png}, {args.out / 'lightning_history.npz'} and {Path(trainer.logger.log_dir) / 'metrics.csv'}")
    return png


if __name__ == "__main__":
    main()
