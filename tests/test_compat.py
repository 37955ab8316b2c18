"""One test per torch-private shim in gradwatch/_compat.py: a torch upgrade that breaks one fails here."""

import numpy as np
import pytest
import torch

from gradwatch import _compat


def test_foreach_norm_matches_a_float64_reference_and_torchs_total_norm_bits():
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, generator=gen), torch.randn(3, 4, generator=gen)]
    got = _compat.foreach_norm(ts, 2.0)
    ref = [np.sqrt(np.sum(t.double().numpy() ** 2)) for t in ts]  # independent: numpy, float64
    np.testing.assert_allclose([g.item() for g in got], ref, rtol=1e-6)
    # the public get_total_norm reduces the same per-tensor kernels: its total has these bits
    assert torch.linalg.vector_norm(torch.stack(got)).item() == torch.nn.utils.get_total_norm(ts).item()
    assert _compat.foreach_norm(ts, 1.0)[1].item() == pytest.approx(ts[1].abs().sum().item(), rel=1e-6)
    half = _compat.foreach_norm([torch.full((7,), 300.0).bfloat16()], 2.0, dtype=torch.float32)
    assert half[0].dtype == torch.float32 and half[0].item() == pytest.approx(300.0 * 7**0.5, rel=1e-6)


def test_flatten_cat_is_one_op_and_equals_cat_of_flattened_tensors():
    from gradwatch._compat import flatten_cat
    from gradwatch.syncs import count_host_syncs

    ts = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 3, 2)]
    with count_host_syncs() as c:
        flat = flatten_cat(ts)
    assert sum(c.ops.values()) == 1
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in ts]).unsqueeze(0))
    c = torch.tensor(0.5)
    assert all(torch.equal(a, t * c) for a, t in zip(_compat.foreach_mul(ts, c), ts))


def test_foreach_in_place_shims_match_plain_tensor_ops():
    a, b = torch.tensor([1.0, -4.0, 9.0]), torch.tensor([[2.0, -3.0]])
    _compat.foreach_mul_([a, b], torch.tensor(0.5))
    assert a.tolist() == [0.5, -2.0, 4.5] and b.tolist() == [[1.0, -1.5]]
    _compat.foreach_mul_([a, b], [torch.tensor(2.0), torch.tensor(-1.0)])
    assert a.tolist() == [1.0, -4.0, 9.0] and b.tolist() == [[-1.0, 1.5]]
    _compat.foreach_clamp_([a, b], -2.0, 2.0)
    assert a.tolist() == [1.0, -2.0, 2.0] and b.tolist() == [[-1.0, 1.5]]
    dst = [torch.zeros(3), torch.zeros(1, 2)]
    _compat.foreach_copy_(dst, [a, b])
    _compat.foreach_sub_(dst, [torch.ones(3), torch.ones(1, 2)])
    assert dst[0].tolist() == [0.0, -3.0, 1.0] and dst[1].tolist() == [[-2.0, 0.5]]


def test_module_parameter_finds_only_a_registered_parameter():
    lin = torch.nn.Linear(2, 1)
    lin.register_buffer("running", torch.zeros(1))
    assert _compat.module_parameter(lin, "weight") is lin.weight
    assert _compat.module_parameter(lin, "running") is None  # a buffer, not a parameter
    assert _compat.module_parameter(lin, "missing") is None
    lin.weight = torch.nn.Parameter(torch.ones(1, 2))  # replaced: the new one is found
    assert torch.equal(_compat.module_parameter(lin, "weight"), torch.ones(1, 2))


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


def test_accumulator_probe_sees_a_held_gradient_accumulator():
    from torch.autograd.graph import get_gradient_edge

    p = torch.nn.Parameter(torch.zeros(2))
    assert not _compat._accumulator_held(p)  # nothing but autograd: the node dies between the two looks
    held = get_gradient_edge(p).node  # what DDP's reducer does: keep the node alive
    assert _compat._accumulator_held(p)
    del held
    assert not _compat._accumulator_held(p)
    assert _compat.reduced_after_hooks([p]) == [False]  # no process group: nothing reduces


def test_fsdp_param_refs_find_the_unsharded_parameter_after_the_first_forward(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        params = list(model.parameters())
        refs = _compat.fsdp_param_refs([*params, torch.nn.Parameter(torch.zeros(1))])
        assert refs[-1] is None  # not sharded by fully_shard
        assert [r.modules for r in refs[:-1]] == [(model[0],)] * 2 + [(model,)] * 2
        assert not any(r.tensor_parallel for r in refs[:-1])
        assert all(r.unsharded() is None for r in refs[:-1])  # before the first all-gather
        model(torch.ones(5, 3))  # the first forward creates the unsharded parameters
        unsharded = [r.unsharded() for r in refs[:-1]]
        assert all(isinstance(u, torch.nn.Parameter) and not _compat.is_dtensor(u) for u in unsharded)
        assert [u.shape for u in unsharded] == [p.shape for p in params]
        seen = {}
        for i, u in enumerate(unsharded):  # a tensor hook on it sees the gradient of each backward call
            u.register_hook(lambda g, i=i: seen.__setitem__(i, g.clone()))
        model(torch.ones(5, 3)).sum().backward()
        assert all(r.unsharded() is u for r, u in zip(refs, unsharded))  # kept, not re-created
        for i, p in enumerate(params):  # one rank: the reduce-scattered gradient is the unsharded one
            assert torch.equal(seen[i], p.grad.full_tensor())
    finally:
        dist.destroy_process_group()
