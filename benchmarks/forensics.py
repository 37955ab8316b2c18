"""What the flight recorder, parameter norms and update ratios add to a training step.

    python benchmarks/forensics.py              # ops per step and step times (a few minutes on 2 busy cores)
    python benchmarks/forensics.py --no-timing  # ops per step only (deterministic, seconds)

Variants, all with ``Spike`` and ``NonFinite`` detectors (``action="ignore"``) on
the same model and optimizer (SGD):

* ``every=100`` -- the sparse log people keep to stay cheap;
* ``every=1`` -- a row at every step;
* ``every=100 + recorder`` -- the sparse log with a ``FlightRecorder()``: every
  step measured and detected on the device, rows kept every 100 steps;
* ``every=1 + param_norms`` and ``every=1 + update_ratio``.

Ops per step: the aten operations dispatched per optimizer step, averaged over
100 steady-state steps (flushes included, ``flush_every=100``), minus the plain
step's (forward, backward, ``optimizer.step``) -- on a GPU each is at least one
kernel launch. Step times: CPU time of the stepping thread (``time.thread_time``,
one torch thread), so that other jobs on a shared machine do not count; medians
over interleaved rounds (each round runs every variant once, in turn), printed
as the ratio to the plain step. Models:
an MLP with 4 small tensors (per-call overhead dominates), one with 32 small
tensors, and a 3 x ``Linear(512)`` MLP (bandwidth matters more).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradwatch as gw

STEPS = 100


def mlp(layers: int, width: int) -> nn.Module:
    mods: list[nn.Module] = []
    for i in range(layers):
        if i:
            mods.append(nn.Tanh())
        mods.append(nn.Linear(width, width))
    return nn.Sequential(*mods)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "mlp 4 x 16": (lambda: mlp(2, 16), 16),
    "mlp 32 x 16": (lambda: mlp(16, 16), 16),
    "mlp 3 x 512": (lambda: mlp(3, 512), 512),
}


def detectors() -> list[gw.Detector]:
    return [gw.Spike(action="ignore"), gw.NonFinite(action="ignore")]


VARIANTS: dict[str, Callable[[nn.Module], gw.GradWatch | None]] = {
    "plain": lambda m: None,
    "every=100": lambda m: gw.GradWatch(m, every=100, detectors=detectors()),
    "every=1": lambda m: gw.GradWatch(m, every=1, detectors=detectors()),
    "every=100 + recorder": lambda m: gw.GradWatch(m, every=100, detectors=detectors(), recorder=gw.FlightRecorder()),
    "every=1 + param_norms": lambda m: gw.GradWatch(m, detectors=detectors(), param_norms=True),
    "every=1 + update_ratio": lambda m: gw.GradWatch(m, detectors=detectors(), update_ratio=True),
}


class Setup:
    """One model, optimizer and (optional) watch, stepping on fixed data."""

    def __init__(self, model_fn: Callable[[], nn.Module], width: int, variant: str) -> None:
        torch.manual_seed(0)
        self.model = model_fn()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.watch = VARIANTS[variant](self.model)
        if self.watch is not None:
            self.watch.attach(self.opt)
        self.x = torch.randn(32, width)

    def step(self) -> None:
        self.opt.zero_grad()
        self.model(self.x).square().mean().backward()
        self.opt.step()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


def ops_per_step(model_fn: Callable[[], nn.Module], width: int, variant: str) -> float:
    s = Setup(model_fn, width, variant)
    for _ in range(30):
        s.step()
    with gw.count_host_syncs() as c:
        for _ in range(STEPS):
            s.step()
    s.close()
    assert c.syncs == 0, f"{variant}: {c.syncs} host syncs"
    return sum(c.ops.values()) / STEPS


def timings(model_fn: Callable[[], nn.Module], width: int, rounds: int, steps: int) -> dict[str, float]:
    setups = {v: Setup(model_fn, width, v) for v in VARIANTS}
    for s in setups.values():
        for _ in range(20):
            s.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, s in setups.items():
            t0 = time.thread_time()
            for _ in range(steps):
                s.step()
            times[v].append((time.thread_time() - t0) / steps)
    for s in setups.values():
        s.close()
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-timing", action="store_true", help="op counts only")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # thread_time() sees this thread only
    names = list(VARIANTS)[1:]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("aten ops per step added to the plain step (average over 100 steps, flushes included)\n")
    print(f"| model | plain step | {' | '.join(names)} |")
    print("|---|---:|" + "---:|" * len(names))
    for label, (fn, width) in MODELS.items():
        base = ops_per_step(fn, width, "plain")
        added = [ops_per_step(fn, width, v) - base for v in names]
        print(f"| {label} | {base:.0f} | " + " | ".join(f"+{a:.1f}" for a in added) + " |")
    if args.no_timing:
        return 0
    print("\nstep CPU time, median over interleaved rounds: plain step, then each variant's ratio to it\n")
    print(f"| model | plain step | {' | '.join(names)} |")
    print("|---|---:|" + "---:|" * len(names))
    for label, (fn, width) in MODELS.items():
        steps = 50 if width < 512 else 10
        t = timings(fn, width, args.rounds, steps)
        print(
            f"| {label} | {t['plain'] * 1e6:.0f} us | " + " | ".join(f"{t[v] / t['plain']:.2f}x" for v in names) + " |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
