"""One run of the digit-sum experiment (SRN or LSTM), gradwatch doing all watching and clipping."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from model import SRNClassifier

import gradwatch as gw

#: The clippers compared by the example, by name.
CLIPPERS = {
    "none": lambda: None,
    "ClipByNorm(5)": lambda: gw.ClipByNorm(5.0),
    "ClipByGlobalNorm(5)": lambda: gw.ClipByGlobalNorm(5.0),
    "ClipByGlobalNorm(1)": lambda: gw.ClipByGlobalNorm(1.0),
    "AutoClip()": lambda: gw.AutoClip(),
    "ZClip()": lambda: gw.ZClip(),
    "AGC(exclude=linear.*)": lambda: gw.AGC(exclude=["linear.*"]),  # the output layer unclipped, as the paper does
    "Chain(GlobalNorm(5), AutoClip)": lambda: gw.Chain(gw.ClipByGlobalNorm(5.0), gw.AutoClip()),
}


@dataclass
class Config:
    """The book's 6.2 settings by default; ``model="lstm"`` is practice 6.3's architecture in the same set-up."""

    model: str = "srn"
    length: int = 20
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.2
    seed: int = 0
    clipper: str = "none"
    eval_steps: int = 100
    tap_steps: tuple[int, ...] = ()  # steps at which to record ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖ for the LSTM)


@dataclass
class Result:
    config: Config
    test_acc: float
    best_dev_acc: float
    dev_curve: list[tuple[int, float]]
    history: gw.History
    losses: list[float] = field(default_factory=list)
    seconds: float = math.nan  # wall-clock time of the run
    cpu_seconds: float = math.nan  # CPU time of the process (unaffected by other jobs on a shared machine)

    def summary(self) -> dict[str, Any]:
        """Scalars of the run; for the LSTM, ``W``/``U``/``b`` are each the four gates' tensors together."""
        h = self.history
        w, u, b = (_joint_norm(h, f"rnn_model.{p}") for p in ("W", "U", "b"))
        return {
            "model": self.config.model,
            "clipper": self.config.clipper,
            "seed": self.config.seed,
            "epochs": self.config.epochs,
            "test_acc": self.test_acc,
            "best_dev_acc": self.best_dev_acc,
            "peak_W": float(np.nanmax(w)),
            "peak_U": float(np.nanmax(u)),
            "peak_b": float(np.nanmax(b)),
            "frac_U_below_1e-3": float(np.mean(u < 1e-3)),
            "clip_fraction": h.clip_fraction,
            "vanishing_events": len(h.events_of("vanishing")),
            "spike_events": len(h.events_of("spike")),
            "final_loss": self.losses[-1] if self.losses else math.nan,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


def _joint_norm(h: gw.History, prefix: str) -> np.ndarray:
    """L2 norm over the parameters named ``prefix`` or ``prefix_<gate>`` (the SRN's W, the LSTM's W_i..W_c)."""
    cols = [n for n in h.names if n == prefix or n.startswith(prefix + "_")]
    return np.sqrt(sum(h[n].astype(np.float64) ** 2 for n in cols))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(
    cfg: Config,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    on_step: Callable[[int, int], None] | None = None,
) -> Result:
    """Train, evaluating dev every ``eval_steps`` and at the end; test the best-dev model.

    ``on_step(step, total_steps)`` is called after every optimizer step (for progress bars).
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    model = SRNClassifier(cell=cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    watch = gw.GradWatch(
        model,
        clipper=CLIPPERS[cfg.clipper](),
        detectors=[gw.Vanishing(min_norm=1e-2, patience=10, action="ignore"), gw.Spike(action="ignore")],
        flush_every=250,
    )
    watch.attach(opt)
    x_train, y_train = (torch.from_numpy(a) for a in splits["train"])
    x_dev, y_dev = (torch.from_numpy(a) for a in splits["dev"])
    x_test, y_test = (torch.from_numpy(a) for a in splits["test"])
    n_batches = math.ceil(len(x_train) / cfg.batch_size)
    total_steps = cfg.epochs * n_batches
    best_dev, best_state, dev_curve, losses = -1.0, None, [], []
    step = 0
    for _ in range(cfg.epochs):
        for i in range(n_batches):  # no shuffle, as in the book
            xb = x_train[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            yb = y_train[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            tap = watch.tap if step in cfg.tap_steps else None
            loss = loss_fn(model(xb, tap=tap), yb)
            loss.backward()
            opt.step()  # GradWatch records the pre-clip norms, clips, then SGD steps
            opt.zero_grad()
            losses.append(loss.detach())  # kept on the device: no host sync per step
            step += 1
            if on_step is not None:
                on_step(step, total_steps)
            if step % cfg.eval_steps == 0 or step == total_steps:
                acc = accuracy(model, x_dev, y_dev)
                dev_curve.append((step, acc))
                if acc > best_dev:
                    best_dev, best_state = acc, copy.deepcopy(model.state_dict())
    watch.close()
    model.load_state_dict(best_state)
    losses_host = torch.stack(losses).tolist() if losses else []
    test_acc = accuracy(model, x_test, y_test)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    return Result(cfg, test_acc, best_dev, dev_curve, watch.history, losses_host, seconds, cpu_seconds)
