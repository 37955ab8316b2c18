"""Tensor operations per training step: what recording, each clipper and each detector add.

    python benchmarks/ops.py                 # op-count tables + AutoClip's cost over a run (~1 min)
    python benchmarks/ops.py --no-timing     # op counts only (deterministic, a few seconds)

On a GPU every tensor operation is at least one kernel launch (~5-10 us), so for
models with many parameter tensors the number of operations a step dispatches --
not the bytes it reads -- is what monitoring and clipping cost. A
``TorchDispatchMode`` (:class:`gradwatch.count_host_syncs`) counts the aten
operations of one steady-state step (after 30 warm-up steps, so ZClip and the
detectors are past their warm-up); the table shows the count minus the plain
step's (forward, backward, ``optimizer.step``) on MLPs with 4 and 64 parameter
tensors and a small transformer (24 tensors of 5 shapes), next to the target of
issue #20 (``TARGET``: at most 24, the same for every model). A second table
counts the operations inside ``clipper.clip_`` alone, given the norms the watch
measured -- the clipper's own share, whatever the watch around it does. Op counts are deterministic, so
``tests/test_ops.py`` guards them with upper bounds.

The timing part measures AutoClip's per-step cost (one ``clip_`` call) with
10^3, 10^5 and 10^6 recorded norms (the state is pre-filled), next to a full sort
of the history -- the previous implementation's per-step work -- and checks the
percentile against ``numpy.percentile``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import gradwatch as gw
from gradwatch.clip import ClipContext

WARMUP = 30
#: issue #20: every clipper and detector adds at most this many operations to a training step
#: (a watch with it, minus the plain step), whatever the number of parameter tensors and shapes
TARGET = 24


def mlp(tensors: int) -> nn.Module:
    """``tensors / 2`` layers of ``Linear(16, 16)`` (weight and bias each), Tanh between them."""
    layers: list[nn.Module] = []
    for i in range(tensors // 2):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(16, 16))
    return nn.Sequential(*layers)


def transformer() -> nn.Module:
    """A 2-layer ``nn.TransformerEncoder``, d_model 32 (24 parameter tensors of 5 shapes)."""
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-4": (lambda: mlp(4), (8, 16)),
    "mlp-64": (lambda: mlp(64), (8, 16)),
    "transformer": (transformer, (4, 8, 32)),
}


def _prefilled_autoclip() -> gw.AutoClip:
    """AutoClip past its exact phase: 10^5 norms already counted in the histogram."""
    clip = gw.AutoClip()
    rng = np.random.default_rng(0)
    clip.load_state_dict({"count": 10**5, "history": torch.from_numpy(np.exp(rng.normal(size=10**5)))})
    return clip


CLIPPERS: dict[str, Callable[[], gw.Clipper]] = {
    "ClipByValue": lambda: gw.ClipByValue(1e-3),
    "ClipByNorm": lambda: gw.ClipByNorm(1e-2),
    "ClipByGlobalNorm": lambda: gw.ClipByGlobalNorm(1e-2),
    "ClipByGlobalNorm(norm_type=1)": lambda: gw.ClipByGlobalNorm(1e-2, norm_type=1.0),
    "AutoClip (exact phase)": lambda: gw.AutoClip(),
    "AutoClip (histogram phase)": _prefilled_autoclip,
    "AutoClip(window=100)": lambda: gw.AutoClip(window=100),
    "ZClip": lambda: gw.ZClip(),
    "AGC": lambda: gw.AGC(),
    "Chain(ClipByGlobalNorm, AutoClip)": lambda: gw.Chain(gw.ClipByGlobalNorm(1.0), gw.AutoClip()),
}

DETECTORS: dict[str, Callable[[], gw.Detector]] = {
    "NonFinite": lambda: gw.NonFinite(),
    "Threshold": lambda: gw.Threshold(1e3),
    "Spike": lambda: gw.Spike(),
    "Spike(per_param=True)": lambda: gw.Spike(per_param=True),
    "Vanishing": lambda: gw.Vanishing(),
}


def _variants() -> dict[str, dict | None]:
    """Variant name -> GradWatch keyword arguments (factories), or None for no watch."""
    out: dict[str, dict | None] = {"plain": None, "clip_grad_norm_": None, "recording": {}}
    out.update({f"+ {k}": {"clipper": v} for k, v in CLIPPERS.items()})
    out.update({f"+ {k}": {"detectors": v} for k, v in DETECTORS.items()})
    return out


class _Run:
    """One model, optimizer and (optionally) watch, stepped on fixed data."""

    def __init__(self, model_name: str, variant: str, kwargs: dict | None) -> None:
        make, shape = MODELS[model_name]
        torch.manual_seed(0)
        self.model = make()
        self.x = torch.randn(*shape)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.variant = variant
        self.watch = None
        if kwargs is not None:
            kw = {"flush_every": 1000}
            if "clipper" in kwargs:
                kw["clipper"] = kwargs["clipper"]()
            if "detectors" in kwargs:
                kw["detectors"] = [kwargs["detectors"]()]
            self.watch = gw.GradWatch(self.model, **kw)
            self.watch.attach(self.opt)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(self.x).square().mean().backward()
        if self.variant == "clip_grad_norm_":
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.opt.step()

    def counted_step(self, warmup: int = WARMUP) -> tuple[int, int, Counter]:
        for _ in range(warmup):
            self.step()
        with gw.count_host_syncs() as c:
            self.step()
        return sum(c.ops.values()), c.syncs, c.ops


@functools.cache
def step_ops(model_name: str, variant: str, warmup: int = WARMUP) -> tuple[int, int, Counter]:
    """Operations and host syncs of one steady-state step of ``variant`` on ``model_name``.

    ``warmup`` steps run first (30: past ZClip's and the detectors' warm-up).
    """
    return _Run(model_name, variant, _variants()[variant]).counted_step(warmup)


def added_ops(model_name: str) -> dict[str, tuple[int, int]]:
    """Per variant: (operations, host syncs) added to the plain step."""
    base_ops, base_syncs, _ = step_ops(model_name, "plain")
    out = {}
    for variant in _variants():
        if variant == "plain":
            continue
        ops, syncs, _ = step_ops(model_name, variant)
        out[variant] = (ops - base_ops, syncs - base_syncs)
    return out


def clipper_ops(model_name: str, clipper_name: str) -> tuple[int, int]:
    """Operations and host syncs inside ``clip_`` alone, with the norms a watch passes.

    One backward; before each of the ``WARMUP + 1`` calls the gradients are
    restored (outside the counted call), so only the clipper's work is counted.
    """
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make()
    model(torch.randn(*shape)).square().mean().backward()
    names, params = zip(*model.named_parameters())
    saved = [p.grad.clone() for p in params]
    clip = CLIPPERS[clipper_name]()
    clip.bind(gw.Binding.of(list(names), list(params)))
    counted = None
    for step in range(WARMUP + 1):
        for p, g in zip(params, saved):
            p.grad.copy_(g * (1 + 0.1 * (step % 3)))
        norms = torch.stack([p.grad.norm() for p in params])
        ctx = ClipContext(params, names, norms, torch.linalg.vector_norm(norms), step)
        if step < WARMUP:
            clip.clip_(ctx)
        else:
            with gw.count_host_syncs() as counted:
                clip.clip_(ctx)
    assert counted is not None
    return sum(counted.ops.values()), counted.syncs


def autoclip_cost(sizes: tuple[int, ...] = (10**3, 10**5, 10**6), calls: int = 300) -> list[dict]:
    """AutoClip's per-step cost (one ``clip_``) with ``n`` norms recorded, vs a full sort of ``n`` values.

    The sizes are measured round-robin, one call each per round, so that a
    drifting load on the machine hits them alike; medians over the rounds.
    """
    rng = np.random.default_rng(0)
    p = nn.Parameter(torch.zeros(16))
    hists = {n: np.exp(rng.normal(size=n)) * 3 for n in sizes}
    clips = {}
    for n, hist in hists.items():
        clips[n] = gw.AutoClip()
        clips[n].load_state_dict({"count": n, "history": torch.from_numpy(hist)})
    sorted_in = {n: torch.from_numpy(h) for n, h in hists.items()}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    sort_times: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(calls + 5):
        p.grad = torch.full((16,), 0.25 * (1 + (i % 7)))
        norms = p.grad.norm().reshape(1)
        for n in sizes:
            ctx = ClipContext([p], ["p"], norms, norms[0], i)
            t = time.perf_counter()
            clips[n].clip_(ctx)
            dt = time.perf_counter() - t
            if i >= 5:
                times[n].append(dt)
            if i < 25:  # the full sorts are slow: a few rounds suffice
                t = time.perf_counter()
                torch.sort(sorted_in[n])
                sort_times[n].append(time.perf_counter() - t)
    rows = []
    for n, hist in hists.items():
        check = gw.AutoClip()  # accuracy: the percentile of a fresh history of n norms against numpy
        check.load_state_dict({"count": n, "history": torch.from_numpy(hist)})
        got, ref = float(check.threshold()), float(np.percentile(hist, 10.0))
        rows.append(
            {
                "n": n,
                "step_ms": statistics.median(times[n]) * 1e3,
                "sort_ms": statistics.median(sort_times[n]) * 1e3,
                "rel_err": abs(got - ref) / ref,
                "phase": "exact" if n < gw.AutoClip.exact_limit else "histogram",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-timing", action="store_true", help="op counts only")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # op counts do not depend on it; timings are steadier on a shared machine
    print(f"torch {torch.__version__}, gradwatch {gw.__version__}\n")

    results = {m: added_ops(m) for m in args.models}
    print(
        "Operations added to one steady-state training step (minus the plain step's), host syncs added; "
        f"target: a clipper or detector adds <= {TARGET}, the same for every model (any number of tensors "
        "and shapes), no sync:\n"
    )
    print("| variant | " + " | ".join(args.models) + f" | <= {TARGET}, flat, no sync |")
    print("|---|" + "---:|" * len(args.models) + "---|")
    misses = []
    for variant in results[args.models[0]]:
        cells = []
        for m in args.models:
            ops, syncs = results[m][variant]
            cells.append(f"{ops}" + (f" ({syncs} syncs)" if syncs else ""))
        verdict = ""
        if variant.startswith("+ "):
            counts = {results[m][variant] for m in args.models}
            met = len(counts) == 1 and all(n <= TARGET and not syncs for n, syncs in counts)
            verdict = "PASS" if met else "MISS"
            if not met:
                misses.append(variant[2:])
        print(f"| {variant} | " + " | ".join(cells) + f" | {verdict} |")
    print(
        f"\n{'PASS' if not misses else 'MISS'}  target <= {TARGET} ops per step"
        + (f"; missed by: {', '.join(misses)}" if misses else " for every clipper and detector")
    )

    print("\nOperations inside clipper.clip_ alone (given the watch's norms), host syncs:\n")
    print("| clipper | " + " | ".join(args.models) + " |")
    print("|---|" + "---:|" * len(args.models))
    for name in CLIPPERS:
        cells = []
        for m in args.models:
            ops, syncs = clipper_ops(m, name)
            cells.append(f"{ops}" + (f" ({syncs} syncs)" if syncs else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")

    if not args.no_timing:
        print(
            "\nAutoClip per step with n norms recorded (median of 300 clip_ calls, sizes interleaved, ms),"
            " next to a full sort of n values:\n"
        )
        print("| recorded norms | phase | AutoClip step (ms) | full sort of the history (ms) | rel. error vs numpy |")
        print("|---:|---|---:|---:|---:|")
        rows = autoclip_cost()
        for r in rows:
            print(f"| {r['n']:,} | {r['phase']} | {r['step_ms']:.3f} | {r['sort_ms']:.3f} | {r['rel_err']:.1e} |")
        ratio = rows[-1]["step_ms"] / rows[0]["step_ms"]
        print(f"\n{'PASS' if ratio <= 2 else 'MISS'}  AutoClip step at 10^6 / at 10^3: {ratio:.2f} (target <= 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
