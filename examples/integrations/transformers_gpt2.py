"""gradwatch in a Hugging Face Trainer run: a tiny GPT-2, per-block norms, the Trainer's own grad_norm, a plot.

    python examples/integrations/transformers_gpt2.py [--out runs/integrations] [--steps 32]

A two-block GPT-2 built from a config (no download) learns synthetic token
sequences (each one counts up from a random start, modulo the vocabulary) with
``gradient_accumulation_steps=2`` and the Trainer's own clipping
(``max_grad_norm=1.0``). The callback records the pre-clip norm of every
parameter at every optimizer step and adds the global norm and one norm per
transformer block to the Trainer's logs. Prints how far its global norm is from
the ``grad_norm`` the Trainer logged (the same number), and writes
``gpt2_norms.png`` and ``gpt2_history.npz`` into the output folder. CPU, about
ten seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import gradwatch as gw
from gradwatch.integrations.transformers import GradWatchCallback

VOCAB, LENGTH = 64, 24


class CountingUp(torch.utils.data.Dataset):
    """Sequences start, start+1, ... (mod VOCAB): the model can learn them, the loss falls."""

    def __init__(self, n: int, seed: int = 0) -> None:
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def block(name: str) -> str:
    """Group a GPT-2 parameter name by transformer block ("transformer.h.0.attn..." -> "h.0")."""
    parts = name.split(".")
    return ".".join(parts[1:3]) if parts[1] == "h" else "embeddings" if parts[1] in ("wte", "wpe") else parts[1]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/integrations"))
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=LENGTH)
    cb = GradWatchCallback(log_groups=block)
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(
            output_dir=str(args.out / "gpt2"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            learning_rate=3e-3,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=CountingUp(16 * args.steps),
        callbacks=[cb],
    )
    cb.bind(trainer)  # callbacks are not handed their Trainer: this lets it measure before the Trainer clips
    trainer.train()

    h = cb.history
    h.save(args.out / "gpt2_history.npz")
    theirs = np.array([row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row])
    loss = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(h.steps, h.total, label="gradwatch: global norm (pre-clip)", linewidth=2.5, alpha=0.6)
    top.plot(h.steps, theirs, "k:", label="Trainer's logged grad_norm")
    top.axhline(1.0, color="red", linewidth=0.8, label="max_grad_norm")
    top.set_yscale("log")
    top.set_ylabel("gradient L2 norm")
    top.legend()
    top.set_title(f"tiny GPT-2, Trainer + GradWatchCallback (loss {loss[0]:.2f} -> {loss[-1]:.2f})")
    gw.plot_norms(h, ax=bottom, group_by=block, log=True)
    bottom.set_title("pre-clip norm per block")
    fig.tight_layout()
    png = args.out / "gpt2_norms.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)

    rel = np.abs(h.total - theirs).max() / theirs.max()
    print(f"recorded {len(h)} optimizer steps (state.global_step = {trainer.state.global_step})")
    print(f"max relative difference to the Trainer's grad_norm: {rel:.1e}")
    print(f"the Trainer's clipping bound on {np.mean(h.total > 1.0):.0%} of the steps")
    print(f"wrote {png} and {args.out / 'gpt2_history.npz'}")
    return png


if __name__ == "__main__":
    main()
