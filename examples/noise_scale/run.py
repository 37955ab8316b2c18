"""Measured gradient noise scale against the batch size where doubling it stops halving the steps.

    python examples/noise_scale/run.py                  # ~30 s on 2 cores; writes out/noise_scale.png
    python examples/noise_scale/run.py --out /tmp/ns    # figure and numbers elsewhere
    python examples/noise_scale/run.py --quick          # fewer batch sizes (a smoke test)

A tiny causal transformer (one pre-norm layer, d=32) learns a random Markov
chain over 16 symbols from sequences of 16 tokens, generated here (nothing is
downloaded). The loss floor is the chain's entropy rate ``H``; the target is
0.03 nats above the true chain's own loss on 1,024 held-out sequences
(close to ``H``; measured on the same sequences, so their sampling noise
cancels).

1. **Steps to the target at several batch sizes** (Adam, the best of four
   learning rates per batch size, searched upwards from the previous batch
   size's best). McCandlish et al. (2018, arXiv:1812.06162)
   predict ``S(B) = S_min (1 + B_crit / B)``: below ``B_crit`` doubling the
   batch halves the steps, above it the steps stop falling. ``S`` is linear in
   ``1/B``, so a least-squares line gives ``S_min`` (intercept) and ``B_crit``
   (slope / intercept).
2. **B_simple measured by gradwatch** during one run at 8 x 8 (8 sequences per
   backward call, 8 accumulated calls per step), with
   ``gw.NoiseScale(batch_size=8, alpha=0.8)``: its value at the step where the target is
   reached, in sequences.

The paper finds ``B_crit`` within a small factor of ``B_simple`` (``B_simple``
ignores the curvature of the loss). The script prints both and draws
``noise_scale.png``: steps to target against batch size with the fitted curve
and both batch sizes marked, and ``B_simple`` over the measured run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw

V, T = 16, 16  # vocabulary, sequence length
MARGIN = 0.03  # target = the true chain's held-out loss + MARGIN (nats)
LRS = (1e-3, 3e-3, 1e-2, 3e-2)
ALPHA = 0.8  # NoiseScale's moving average: B_simple rises fast in a run this short, a long memory lags
EVAL_EVERY = 5


class Chain:
    """A random Markov chain over ``V`` symbols (Dirichlet(0.3) rows): sequences and the entropy rate."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        alpha = torch.full((V, V), 0.3)
        self.P = torch._standard_gamma(alpha, generator=g)
        self.P /= self.P.sum(1, keepdim=True)
        pi = torch.full((V,), 1.0 / V)
        for _ in range(500):
            pi = pi @ self.P
        self.pi = pi
        self.entropy = float(-(pi[:, None] * self.P * self.P.clamp_min(1e-30).log()).sum())

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(n, T + 1, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.pi, n, replacement=True, generator=g)
        for t in range(T):
            x[:, t + 1] = torch.multinomial(self.P[x[:, t]], 1, generator=g).squeeze(1)
        return x[:, :-1], x[:, 1:]


class TinyTransformer(nn.Module):
    """Embedding + learned positions, one causal pre-norm encoder layer (d=32, 2 heads), a linear head."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.zeros(T, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, V)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(x) + self.pos, src_mask=self.mask, is_causal=True))


def xent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))


class Data:
    def __init__(self, chain: Chain, pool: int = 60_000) -> None:
        self.x, self.y = chain.sample(pool, seed=1)
        self.xe, self.ye = chain.sample(1024, seed=2)
        # the true chain's loss on these very sequences: the floor the target is measured from (paired, so the
        # sampling noise of the held-out set cancels)
        self.floor = float(-chain.P[self.xe, self.ye].log().mean())
        self.target = self.floor + MARGIN

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(self.x), (n,), generator=g)
        return self.x[i], self.y[i]

    @torch.no_grad()
    def eval_loss(self, model: nn.Module) -> float:
        return float(xent(model, self.xe, self.ye))


def steps_to_target(data: Data, batch: int, lr: float, limit: int, seed: int = 0) -> int | None:
    """Adam steps of ``batch`` sequences until the held-out loss is below the target (None past ``limit``)."""
    torch.manual_seed(seed)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 10)
    for step in range(1, limit + 1):
        opt.zero_grad(set_to_none=True)
        xent(model, *data.batch(batch, g)).backward()
        opt.step()
        if step % EVAL_EVERY == 0 and data.eval_loss(model) < data.target:
            return step
    return None


def sweep(data: Data, batches: list[int], max_steps: int) -> dict[int, tuple[int, float]]:
    """Per batch size (ascending): the fewest steps to the target over the learning rates, and that rate.

    The search starts at the previous batch size's best rate and moves up the
    grid while the steps fall (the best rate grows with the batch); a run slower
    than the best so far stops early.
    """
    out: dict[int, tuple[int, float]] = {}
    start = 0
    for b in batches:
        best: tuple[int, float] | None = None
        for i in range(start, len(LRS)):
            limit = max_steps if best is None else best[0] - 1
            s = steps_to_target(data, b, LRS[i], limit)
            if s is None or (best is not None and s >= best[0]):
                if best is not None:
                    break
                continue
            best, start = (s, LRS[i]), i
        if best is not None:
            out[b] = best
        print(f"  batch {b:>4}: {'-' if best is None else best[0]:>5} steps (lr {'-' if best is None else best[1]:g})")
    return out


def fit(steps: dict[int, tuple[int, float]]) -> tuple[float, float]:
    """``S = S_min (1 + B_crit / B)`` by least squares of ``S`` on ``1/B``, relative errors: (S_min, B_crit)."""
    b = np.array(sorted(steps), dtype=float)
    s = np.array([steps[int(k)][0] for k in b], dtype=float)
    A = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]  # rows divided by S: relative residuals
    (s_min, slope), *_ = np.linalg.lstsq(A, np.ones_like(s), rcond=None)
    return float(s_min), float(slope / s_min)


def measure(data: Data, lr: float, bs: int = 8, k: int = 8, limit: int = 3000) -> dict:
    """One run of ``k`` accumulated micro-batches of ``bs`` sequences with NoiseScale: B_simple at the target."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    watch = gw.GradWatch(model, stats=[gw.NoiseScale(batch_size=bs, alpha=ALPHA)], flush_every=limit).attach(opt)
    g = torch.Generator().manual_seed(10)
    losses, reached = [], None
    for step in range(1, limit + 1):
        opt.zero_grad(set_to_none=True)
        for _ in range(k):
            (xent(model, *data.batch(bs, g)) / k).backward()
        opt.step()
        if step % EVAL_EVERY == 0:
            losses.append((step, data.eval_loss(model)))
            if losses[-1][1] < data.target:
                reached = step
                break
    h = watch.history
    watch.close()
    b = h.stats["noise.b_simple"]
    last = slice(-20, None)
    return {
        "steps": h.steps.tolist(),
        "b_simple": b.tolist(),
        "ratio": (h.stats["noise.trace"] / h.stats["noise.grad_sq"]).tolist(),
        "losses": losses,
        "reached": reached,
        "b_simple_at_target": float(b[-1]),
        "ratio_of_means_last20": float(h.stats["noise.trace"][last].mean() / h.stats["noise.grad_sq"][last].mean()),
    }


def draw(path: Path, steps: dict, s_min: float, b_crit: float, run: dict, big: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    b = np.array(sorted(steps), dtype=float)
    a1.loglog(b, [steps[int(k)][0] for k in b], "o", label="measured (best of 4 learning rates)")
    grid = np.geomspace(b.min() / 1.5, b.max() * 1.5, 100)
    a1.loglog(
        grid, s_min * (1 + b_crit / grid), "-", label=f"fit $S_{{min}}(1 + B_{{crit}}/B)$, $B_{{crit}}$={b_crit:.0f}"
    )
    a1.axvline(b_crit, color="C1", ls=":", lw=1)
    a1.axvline(
        run["b_simple_at_target"],
        color="C2",
        ls="--",
        label=f"$B_{{simple}}$ measured = {run['b_simple_at_target']:.0f}",
    )
    a1.set_xlabel("batch size (sequences)")
    a1.set_ylabel("steps to target loss")
    a1.legend(fontsize=8)
    a1.set_title("steps to the target loss against batch size")
    a2.semilogy(run["steps"], np.abs(run["ratio"]), ".", ms=2, color="0.7", label="|trace / grad_sq| of each step")
    a2.semilogy(run["steps"], run["b_simple"], "-", color="C2", label=f"noise.b_simple (ratio of EMAs, alpha={ALPHA})")
    a2.axhline(big, color="0.4", ls=":", lw=1, label=f"batch of the run ({big})")
    a2.set_xlabel("step")
    a2.set_ylabel("sequences")
    a2.set_title("gw.NoiseScale during one run (8 x 8 accumulated)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--quick", action="store_true", help="three batch sizes, shorter runs")
    ap.add_argument("--seed", type=int, default=0, help="the Markov chain's seed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    t0 = time.perf_counter()
    chain = Chain(args.seed)
    data = Data(chain)
    print(
        f"entropy rate H = {chain.entropy:.4f} nats; the chain's loss on the held-out set {data.floor:.4f}; "
        f"target loss {data.target:.4f}"
    )
    batches = [4, 16, 64] if args.quick else [4, 8, 16, 32, 64, 128, 256]
    print("steps to the target (Adam):")
    steps = sweep(data, batches, max_steps=1500 if args.quick else 4000)
    if len(steps) < 3:
        print("too few batch sizes reached the target: no fit")
        return 1
    s_min, b_crit = fit(steps)
    lr = steps.get(64, next(iter(steps.values())))[1]
    run = measure(data, lr, limit=1500 if args.quick else 3000)
    print(f"fit: S_min = {s_min:.0f} steps, B_crit = {b_crit:.0f} sequences")
    print(
        f"gw.NoiseScale, 8 x 8 accumulated, lr {lr:g}: B_simple = {run['b_simple_at_target']:.0f} sequences "
        f"at step {run['reached']} (target reached)"
    )
    print(f"  (mean trace / mean grad_sq over its last 20 steps: {run['ratio_of_means_last20']:.0f})")
    print(f"B_simple / B_crit = {run['b_simple_at_target'] / b_crit:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    draw(args.out / "noise_scale.png", steps, s_min, b_crit, run, big=64)
    summary = {
        "entropy": chain.entropy,
        "floor": data.floor,
        "target": data.target,
        "steps": {str(k): {"steps": v[0], "lr": v[1]} for k, v in steps.items()},
        "s_min": s_min,
        "b_crit": b_crit,
        "b_simple_at_target": run["b_simple_at_target"],
        "ratio_of_means_last20": run["ratio_of_means_last20"],
        "reached": run["reached"],
    }
    (args.out / "noise_scale.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'noise_scale.png'} and noise_scale.json in {time.perf_counter() - t0:.0f} s")
    return 0 if math.isfinite(b_crit) else 1


if __name__ == "__main__":
    raise SystemExit(main())
