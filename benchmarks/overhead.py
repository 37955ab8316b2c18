"""What watching and clipping add to a training step, measured side by side.

    python benchmarks/overhead.py                 # all three models (~3 min on 2 cores)
    python benchmarks/overhead.py --models srn --rounds 200

Every variant trains its own copy of the model; one round runs one step of
every variant, in a new random order each round, so slow drifts of the machine
(turbo, other processes) hit all variants alike. Reported: the median step
time, the median over rounds of the ratio to the plain step (and to
``clip_grad_norm_``) of the same round, and the host syncs a
variant adds per step (``aten._local_scalar_dense`` calls, counted on an extra
step, minus the plain step's own: ``nn.TransformerEncoder`` syncs by itself).
Last, per model, recording's added time next to the memory floor -- the
cheapest single read of all gradients, measured apart from the step -- so its
ratio to the floor is visible. ``benchmarks/ops.py`` counts operations per step.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "srn_digit_sum"))

import gradwatch as gw


def srn_task():
    from model import SRNClassifier

    torch.manual_seed(0)
    model = SRNClassifier()
    x, y = torch.randint(0, 10, (64, 20)), torch.randint(0, 19, (64,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    return model, lambda m: loss_fn(m(x), y), lambda ps: torch.optim.SGD(ps, lr=1e-3)


def transformer_task():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    x = torch.randn(16, 64, 256)
    return model, lambda m: m(x).square().mean(), lambda ps: torch.optim.AdamW(ps, lr=1e-4)


def mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048))
    x = torch.randn(256, 2048)
    return model, lambda m: m(x).square().mean(), lambda ps: torch.optim.SGD(ps, lr=1e-3)


TASKS = {"srn": srn_task, "transformer": transformer_task, "mlp": mlp_task}
MAX_NORM = 1.0

# name -> (GradWatch kwargs or None, extra work after backward or None)
VARIANTS: dict[str, tuple[dict | None, Callable | None]] = {
    "plain": (None, None),
    "watch (auto)": ({}, None),
    "watch (hooks)": ({"measure": "hook"}, None),
    "watch (step pass)": ({"measure": "step"}, None),
    "watch + detectors": ({"detectors": [gw.NonFinite(), gw.Spike(), gw.Vanishing()]}, None),
    "clip_grad_norm_": (None, lambda m: nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM, foreach=True)),
    "watch + ClipByGlobalNorm": ({"clipper": lambda: gw.ClipByGlobalNorm(MAX_NORM)}, None),
    "watch + ClipByNorm": ({"clipper": lambda: gw.ClipByNorm(MAX_NORM)}, None),
    "watch + ClipByValue": ({"clipper": lambda: gw.ClipByValue(1e-3)}, None),
    "watch + AutoClip": ({"clipper": lambda: gw.AutoClip()}, None),
    "watch + ZClip": ({"clipper": lambda: gw.ZClip()}, None),
    "watch + AGC": ({"clipper": lambda: gw.AGC()}, None),
    "watch + Chain(GlobalNorm, AutoClip)": (
        {"clipper": lambda: gw.Chain(gw.ClipByGlobalNorm(5.0), gw.AutoClip())},
        None,
    ),
    "seed-style .item() logging": (None, lambda m: [torch.norm(p.grad).item() for p in m.parameters()]),
}


class Runner:
    def __init__(
        self, base: nn.Module, loss: Callable, make_opt: Callable, kwargs: dict | None, extra: Callable | None
    ):
        self.model = copy.deepcopy(base)
        self.loss, self.extra = loss, extra
        self.opt = make_opt(self.model.parameters())
        self.watch = None
        if kwargs is not None:
            kw = {k: (v() if k == "clipper" else copy.deepcopy(v)) for k, v in kwargs.items()}
            self.watch = gw.GradWatch(self.model, **kw).attach(self.opt)
        self.times: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.model).backward()
        if self.extra is not None:
            self.extra(self.model)
        self.opt.step()

    def timed_step(self) -> None:
        t = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - t)

    def syncs_per_step(self) -> int:
        with gw.count_host_syncs() as c:
            self.step()
        return c.syncs


def bench(task: str, rounds: int, warmup: int, variants: list[str]) -> list[dict]:
    base, loss, make_opt = TASKS[task]()
    runners = {v: Runner(base, loss, make_opt, *VARIANTS[v]) for v in variants}
    order = list(runners.values())
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(order)  # a fresh order every round: no variant always follows the same one
        for runner in order:
            runner.step() if r < warmup else runner.timed_step()
    plain = statistics.median(runners["plain"].times)
    plain_times = runners["plain"].times
    base_syncs = runners["plain"].syncs_per_step()  # the model's own (TransformerEncoder has some)
    clip_times = runners["clip_grad_norm_"].times
    rows = []
    for name, runner in runners.items():
        med = statistics.median(runner.times)
        # ratios paired round by round: drifts of the machine cancel out
        paired = statistics.median(t / p for t, p in zip(runner.times, plain_times))
        rows.append(
            {
                "model": task,
                "variant": name,
                "median_ms": med * 1e3,
                "vs_plain": paired,
                "added_ms": (med - plain) * 1e3,
                "vs_clip_grad_norm": statistics.median(t / c for t, c in zip(runner.times, clip_times)),
                "syncs_per_step": runner.syncs_per_step() - base_syncs,
                "params": sum(1 for _ in base.parameters()),
            }
        )
    return rows


def read_cost(task: str, rounds: int) -> dict:
    """Time one read of all gradients, by method, isolated from the step's noise.

    ``hooks (dot)``: ``torch.dot(g, g)`` in post-accumulate-grad hooks, while the
    gradient is in cache (the hook time summed); ``foreach_norm (step)``: one
    ``torch._foreach_norm`` after backward, as ``clip_grad_norm_`` does;
    ``dot (step)``: ``torch.dot`` per tensor after backward.
    """
    model, loss, _ = TASKS[task]()
    params = list(model.parameters())
    spent = [0.0]
    on = [False]

    def hook(p: torch.Tensor) -> None:
        if on[0]:
            t = time.perf_counter()
            flat = p.grad.reshape(-1)
            torch.dot(flat, flat)
            spent[0] += time.perf_counter() - t

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    times: dict[str, list[float]] = {"hooks (dot)": [], "foreach_norm (step)": [], "dot (step)": []}
    for r in range(rounds + 2):
        for name in times:
            model.zero_grad(set_to_none=True)
            on[0], spent[0] = name == "hooks (dot)", 0.0
            loss(model).backward()
            grads = [p.grad for p in params]
            t = time.perf_counter()
            if name == "foreach_norm (step)":
                torch._foreach_norm(grads)
            elif name == "dot (step)":
                for g in grads:
                    flat = g.reshape(-1)
                    torch.dot(flat, flat)
            dt = time.perf_counter() - t
            if r >= 2:
                times[name].append(spent[0] if name == "hooks (dot)" else dt)
    for h in handles:
        h.remove()
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def report(rows: list[dict]) -> str:
    lines = [
        "| model | variant | median step (ms) | vs plain | added (ms) | vs clip_grad_norm_ | added host syncs / step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['params']} tensors) | {r['variant']} | {r['median_ms']:.3f} | {r['vs_plain']:.4f} "
            f"| {r['added_ms']:+.3f} | {r['vs_clip_grad_norm']:.4f} | {r['syncs_per_step']} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The targets of issue #2 and #3, each with its measured value."""
    get = {(r["model"], r["variant"]): r for r in rows}
    out = []

    def check(label: str, value: float, limit: float) -> None:
        out.append(f"{'PASS' if value <= limit else 'MISS'}  {label}: {value:.4f} (target <= {limit})")

    for model, limit in (("srn", 1.02), ("transformer", 1.01), ("mlp", 1.01)):
        if (model, "watch (auto)") in get:
            check(f"{model}: recording / plain", get[model, "watch (auto)"]["vs_plain"], limit)
        if (model, "watch + ClipByGlobalNorm") in get:
            check(
                f"{model}: watch+global clip / clip_grad_norm_",
                get[model, "watch + ClipByGlobalNorm"]["vs_clip_grad_norm"],
                1.02,
            )
        g = get.get((model, "watch + ClipByGlobalNorm"))
        for name in ("watch + AutoClip", "watch + ZClip"):
            if g and (model, name) in get:
                check(f"{model}: {name} / watch+ClipByGlobalNorm", get[model, name]["median_ms"] / g["median_ms"], 1.1)
    if ("mlp", "watch + AGC") in get:
        check(
            "mlp: AGC / watch+ClipByGlobalNorm",
            get["mlp", "watch + AGC"]["median_ms"] / get["mlp", "watch + ClipByGlobalNorm"]["median_ms"],
            2.0,
        )
    syncs = max(r["syncs_per_step"] for r in rows if r["variant"].startswith("watch"))
    out.append(f"{'PASS' if syncs == 0 else 'MISS'}  host syncs per step, every GradWatch variant: {syncs} (target 0)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default: 300 srn, 25 others)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    args = p.parse_args(argv)
    variants = list(dict.fromkeys(["plain", "clip_grad_norm_", *args.variants]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, gradwatch {gw.__version__}", flush=True)
    rows = []
    for task in args.models:
        rounds = args.rounds or (300 if task == "srn" else 25)
        t = time.perf_counter()
        rows += bench(task, rounds, args.warmup, variants)
        print(f"{task}: {rounds} rounds in {time.perf_counter() - t:.0f} s", flush=True)
    print(report(rows))
    print("\n".join(targets(rows)))
    print("\nOne read of all gradients, by method (median ms, isolated from the step):")
    print("| model | " + " | ".join(["hooks (dot)", "foreach_norm (step)", "dot (step)"]) + " |")
    print("|---|---:|---:|---:|")
    costs = {}
    for task in args.models:
        costs[task] = read_cost(task, 10 if task != "srn" else 100)
        print(f"| {task} | " + " | ".join(f"{v:.3f}" for v in costs[task].values()) + " |")
    print("\n" + floor_report(rows, costs))
    if "srn" in args.models:
        print("\n" + profile_report("srn", ["watch (auto)", "watch + ClipByGlobalNorm"]))
    return 0


def profile_report(task: str, variants: list[str], steps: int = 2000) -> str:
    """Where a watched step's added time goes, per step: the watch's own torch ops and its Python.

    The ``watch.step()`` of each variant alone, on one step's gradients
    (timed apart from forward and backward), split by cProfile into the torch
    calls it makes and the top gradwatch functions by self time. cProfile adds
    its own cost to every Python call, so the Python shares are upper bounds.
    """
    import cProfile
    import pstats

    base, loss, _ = TASKS[task]()
    lines = [f"Inside watch.step() on the {task} (us per step; torch ops vs gradwatch's Python, by self time):"]
    for variant in variants:
        kwargs = {k: (v() if k == "clipper" else v) for k, v in VARIANTS[variant][0].items()}
        model = copy.deepcopy(base)
        loss(model).backward()
        watch = gw.GradWatch(model, flush_every=100, **kwargs)
        for _ in range(200):
            watch.step()
        t = time.perf_counter()
        for _ in range(steps):
            watch.step()
        wall = (time.perf_counter() - t) / steps * 1e6
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            watch.step()
        prof.disable()
        stats = pstats.Stats(prof).stats
        own = [(tt, f"{Path(f).stem}.{fn}") for (f, _, fn), (_, _, tt, _, _) in stats.items() if "gradwatch" in f]
        ops = sum(tt for (f, _, fn), (_, _, tt, _, _) in stats.items() if f == "~" and "torch" in fn)
        own.sort(reverse=True)
        top = ", ".join(f"{name} {tt / steps * 1e6:.1f}" for tt, name in own[:6])
        lines.append(
            f"- {variant}: {wall:.1f} us per watch.step() without the profiler; under it: torch calls "
            f"{ops / steps * 1e6:.1f}, gradwatch Python {sum(t for t, _ in own) / steps * 1e6:.1f} (top: {top})"
        )
        watch.close()
    return "\n".join(lines)


def floor_report(rows: list[dict], costs: dict[str, dict[str, float]]) -> str:
    """Recording's added time next to the memory floor: the cheapest single read of all gradients."""
    lines = [
        "| model | recording added (ms, paired ratio x plain step) | floor: one read of the gradients (ms) "
        "| added / floor |",
        "|---|---:|---:|---:|",
    ]
    for task, cost in costs.items():
        rec = next((r for r in rows if r["model"] == task and r["variant"] == "watch (auto)"), None)
        plain = next((r for r in rows if r["model"] == task and r["variant"] == "plain"), None)
        if rec is None or plain is None:
            continue
        added = (rec["vs_plain"] - 1.0) * plain["median_ms"]  # from the paired ratio: steadier than a difference
        floor = min(cost.values())
        lines.append(f"| {task} | {added:+.3f} | {floor:.3f} | {added / floor:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
