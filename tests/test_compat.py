"""One test per torch-private shim in gradwatch/_compat.py: a torch upgrade that breaks one fails here."""

import pytest
import torch

from gradwatch import _compat


def test_foreach_norm_matches_vector_norm_bits():
    ts = [torch.randn(5), torch.randn(3, 4)]
    got = _compat.foreach_norm(ts, 2.0)
    assert [g.item() for g in got] == [t.norm().item() for t in torch._foreach_norm(ts, 2.0)]
    half = _compat.foreach_norm([torch.randn(7).bfloat16()], 2.0, dtype=torch.float32)
    assert half[0].dtype == torch.float32


def test_scale_of_reads_the_grad_scalers_scale():
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    assert _compat.scale_of(scaler) is None  # lazily created
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale(p.sum()).backward()
    assert _compat.scale_of(scaler).item() == 128.0
    scaler.step(opt)


def test_unscale_once_tracks_the_scalers_per_optimizer_stage():
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale(p.sum()).backward()
    assert not _compat.unscaled_this_step(scaler, opt) and not _compat.unscaled_this_step(scaler)
    _compat.unscale_once(scaler, opt)
    _compat.unscale_once(scaler, opt)  # a second call is a no-op, not torch's RuntimeError
    assert _compat.unscaled_this_step(scaler, opt) and _compat.unscaled_this_step(scaler)
    assert torch.equal(p.grad, torch.ones(2))
    scaler.step(opt)
    scaler.update()
    assert not _compat.unscaled_this_step(scaler, opt)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_found_inf_protocol_skips_a_fused_step(momentum):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, fused=True)
    p.grad = torch.ones(3)
    # fused SGD with momentum allocates uninitialised buffers on its first step: not safe yet
    assert _compat.found_inf_safe(opt) is (momentum == 0)
    opt.step()
    assert _compat.found_inf_safe(opt)
    before = p.detach().clone()
    _compat.set_found_inf(opt, torch.tensor(True))
    opt.step()
    assert torch.equal(p, before)
    _compat.set_found_inf(opt, None)
    assert not hasattr(opt, "found_inf")
    opt.step()
    assert not torch.equal(p, before)
    assert not _compat.found_inf_safe(torch.optim.SGD([p], lr=0.1))  # not fused


def test_has_step_hooks_tells_real_optimizers_from_hookless_wrappers():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)

    class Wrapper(torch.optim.Optimizer):  # subclasses Optimizer without calling its __init__ (accelerate does)
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert _compat.has_step_hooks(opt) and not _compat.has_step_hooks(Wrapper(opt))


def test_dispatch_mode_sees_local_scalar_dense():
    seen = []

    class Spy(_compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.ones(2).sum().item()
    assert torch.ops.aten._local_scalar_dense.default in seen


def test_device_mesh_flatten_and_root_on_a_one_process_mesh(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        group = _compat.flattened_group(mesh)
        assert dist.get_world_size(group) == 1
        assert _compat.root_mesh(mesh["tp"]) is mesh
    finally:
        dist.destroy_process_group()
