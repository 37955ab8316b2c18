"""A whole training step under torch.compile with a watch: rows equal to eager, no recompiles, few graph breaks."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gradwatch as gw


def run(base, data, *, compiled, attach, clipper):
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, clipper=clipper(), detectors=[gw.NonFinite(), gw.Spike(warmup_steps=2)])
    if attach:
        watch.attach(opt)

    def step(x, y):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if not attach:
            watch.step()
        opt.step()

    fn = torch.compile(step, backend="aot_eager") if compiled else step
    for i, (x, y) in enumerate(data):
        if i == 3 and compiled:  # compiled by now: a recompile from here on is an error
            with torch._dynamo.config.patch(error_on_recompile=True):
                for x2, y2 in data[3:]:
                    fn(x2, y2)
            break
        fn(x, y)
    watch.close()
    return watch.history, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("clipper", [lambda: gw.ClipByGlobalNorm(0.5), lambda: gw.ZClip(warmup_steps=2)])
def test_compiled_step_records_what_eager_records_without_recompiling(attach, clipper):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen) * 5) for _ in range(8)]
    data[6] = (data[6][0], data[6][1] * 100)  # a spike: ZClip clips it
    torch._dynamo.reset()
    he, we = run(base, data, compiled=False, attach=attach, clipper=clipper)
    hc, wc = run(base, data, compiled=True, attach=attach, clipper=clipper)
    assert hc.steps.tolist() == list(range(8))
    assert (he.clip_coef < 1).any()  # the clip binds: the compiled step must clip the same way
    np.testing.assert_allclose(hc.norms, he.norms, rtol=1e-6)
    np.testing.assert_allclose(hc.clip_coef, he.clip_coef, rtol=1e-6)
    for a, b in zip(wc, we):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_graph_breaks_of_a_watched_step_next_to_clip_grad_norm():
    """Documented: attached, the watch adds no graph break; stepped by hand, one (its eager island)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(4, 8), torch.randn(4, 2)

    def breaks(kind):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(0.5)) if kind != "torch" else None
        if kind == "attached":
            watch.attach(opt)

        def step():
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if kind == "torch":
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            elif kind == "by hand":
                watch.step()
            opt.step()

        torch._dynamo.reset()
        counters.clear()
        fn = torch.compile(step, backend="eager")
        for _ in range(3):
            fn()
        return sum(counters["graph_break"].values())

    reference = breaks("torch")
    assert breaks("attached") <= reference
    assert breaks("by hand") == reference + 1
