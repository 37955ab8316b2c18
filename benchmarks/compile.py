"""A whole training step under ``torch.compile``: graph breaks and rows, with and without gradwatch.

    python benchmarks/compile.py                  # explain counts for every variant, then eager-vs-compiled rows
    python benchmarks/compile.py --backend aot_eager --no-rows

For one step (``zero_grad``, forward, ``backward``, the clip or
``watch.step()``, ``optimizer.step()``) of ``clip_grad_norm_`` and of each
GradWatch variant (stepped by hand, or attached to the optimizer), compiled
and run three times, it prints ``torch._dynamo.explain``'s graph and break
counts, the graph breaks dynamo actually took (``counters["graph_break"]``,
which also counts the breaks ``explain`` folds away) and the recompiles. The
step has breaks that are not gradwatch's: ``Optimizer.zero_grad`` is marked
not traceable, ``Tensor.backward()`` is not traced without compiled autograd,
and ``Optimizer.step`` inserts graph breaks. The watch's step runs as one eager
island (``torch.compiler.disable``): its host bookkeeping -- the step counter and
the next row of its buffer -- changes every step, and traced it would recompile
the whole step every time until dynamo's recompile limit. Attached, that island
sits in the optimizer's step hook, where the optimizer breaks the graph anyway.
Then every variant runs the same six steps eagerly and compiled (``--backend``,
inductor by default) and the largest differences of the recorded norms, clip
coefficients and weights are printed.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

import gradwatch as gw

CLIPPERS = {
    "none": lambda: None,
    "ClipByGlobalNorm": lambda: gw.ClipByGlobalNorm(0.5),
    "ClipByNorm": lambda: gw.ClipByNorm(0.3),
    "ClipByValue": lambda: gw.ClipByValue(0.05),
    "AutoClip": lambda: gw.AutoClip(),
    "ZClip": lambda: gw.ZClip(warmup_steps=2),
    "AGC": lambda: gw.AGC(clipping=0.05),
}


def setup(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(6)]
    return model, data


def make_step(base: nn.Module, clipper: str | None, attach: bool):
    """A step function and what it records: ``clipper=None`` is the ``clip_grad_norm_`` step."""
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = None
    if clipper is not None:
        watch = gw.GradWatch(model, clipper=CLIPPERS[clipper](), detectors=[gw.NonFinite(), gw.Spike()])
        if attach:
            watch.attach(opt)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if watch is None:
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        elif not attach:
            watch.step()
        opt.step()

    return step, model, watch


def variants() -> list[tuple[str, str | None, bool]]:
    out: list[tuple[str, str | None, bool]] = [("clip_grad_norm_", None, False)]
    for name in CLIPPERS:
        out += [(f"watch + {name} (step)", name, False), (f"watch + {name} (attached)", name, True)]
    return out


def explain_counts(base: nn.Module, data: list) -> list[tuple[str, int, int, int, int]]:
    """Per variant: explain's graphs and breaks, and the breaks and recompiles of three compiled steps."""
    from torch._dynamo.utils import counters

    rows = []
    for label, clipper, attach in variants():
        step, _, watch = make_step(base, clipper, attach)
        torch._dynamo.reset()
        e = torch._dynamo.explain(step)(*data[0])
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, backend="eager")
        for x, y in data[:3]:
            compiled(x, y)
        taken = sum(counters["graph_break"].values())
        recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        rows.append((label, e.graph_count, e.graph_break_count, taken, recompiles))
        if watch is not None:
            watch.close()
    return rows


def rows_equal(base: nn.Module, data: list, backend: str) -> list[tuple[str, float, float, float]]:
    out = []
    for label, clipper, attach in variants()[1:]:
        results = []
        for compiled in (False, True):
            torch._dynamo.reset()
            step, model, watch = make_step(base, clipper, attach)
            fn = torch.compile(step, backend=backend) if compiled else step
            for x, y in data:
                fn(x, y)
            results.append((watch.history, [p.detach().clone() for p in model.parameters()]))
            watch.close()
        (he, we), (hc, wc) = results
        norms = float(np.max(np.abs(he.norms - hc.norms) / np.maximum(np.abs(he.norms), 1e-30)))
        coef = float(np.max(np.abs(he.clip_coef - hc.clip_coef)))
        weights = max(float((a - b).abs().max()) for a, b in zip(we, wc))
        out.append((label, norms, coef, weights))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--no-rows", action="store_true", help="only the explain counts")
    args = p.parse_args(argv)
    base, data = setup()
    print(f"torch {torch.__version__}, gradwatch {gw.__version__}\n")
    counts = explain_counts(base, data)
    print("| variant | explain: graphs | explain: breaks | breaks taken (3 steps) | recompiles |")
    print("|---|---:|---:|---:|---:|")
    for label, graphs, breaks, taken, recompiles in counts:
        print(f"| {label} | {graphs} | {breaks} | {taken} | {recompiles} |")
    ref = counts[0][3]
    for kind in ("attached", "step"):
        worst = max(r[3] for r in counts[1:] if r[0].endswith(f"({kind})"))
        verdict = "PASS" if worst <= ref else f"MISS by {worst - ref} (the watch's eager island)"
        print(f"{verdict}  breaks taken, watch {kind}: {worst} (clip_grad_norm_: {ref})")
    print(f"recompiles after the first step, any variant: {max(r[4] for r in counts)}")
    if not args.no_rows:
        print(f"\nEager vs compiled ({args.backend}), six steps:\n")
        print("| variant | norms (max rel diff) | clip_coef (max abs diff) | weights (max abs diff) |")
        print("|---|---:|---:|---:|")
        for label, n, c, w in rows_equal(base, data, args.backend):
            print(f"| {label} | {n:.1e} | {c:.1e} | {w:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
