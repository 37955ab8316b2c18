"""Checks that need a GPU: skipped without CUDA (run them on a CUDA machine)."""

import copy

import numpy as np
import pytest
import torch

import gradwatch as gw

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model_on_cuda():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10)).cuda()


@cuda
@pytest.mark.parametrize(
    "clipper",
    [None, gw.ClipByGlobalNorm(1.0), gw.ClipByNorm(1.0), gw.ClipByValue(0.01), gw.AutoClip(), gw.ZClip(), gw.AGC()],
    ids=repr,
)
@pytest.mark.parametrize("measure", ["auto", "hook", "step"])
def test_watched_training_loop_never_syncs_on_cuda(clipper, measure):
    model = model_on_cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = gw.GradWatch(
        model,
        clipper=copy.deepcopy(clipper),
        detectors=[gw.NonFinite(action="skip"), gw.Spike(), gw.Vanishing()],
        measure=measure,
        flush_every=50,
    )
    watch.attach(opt)
    x = torch.randn(64, 512, device="cuda")
    for _ in range(3):  # warm up (lazy state creation)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    h = watch.history
    assert len(h) == 23
    expected = [torch.linalg.vector_norm(p.grad).item() for p in model.parameters()]
    if clipper is None:
        np.testing.assert_allclose(h.norms[-1], expected, rtol=1e-5)


@cuda
def test_global_clip_matches_torch_on_cuda():
    a = model_on_cuda()
    b = copy.deepcopy(a)
    x = torch.randn(64, 512, device="cuda")
    for m in (a, b):
        m(x).square().sum().backward()
    ours = gw.ClipByGlobalNorm(0.5)(a.parameters())
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert torch.equal(ours, ref)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
