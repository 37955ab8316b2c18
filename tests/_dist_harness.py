"""Multi-process harness for distributed tests on CPU: spawned gloo ranks, tiny models, single-process references.

Reusable by any test that needs several ranks::

    from _dist_harness import run_ranks

    def work(rank, world):            # module-level, so spawned processes can import it
        ...                           # torch.distributed is initialised (gloo, 127.0.0.1)
        return {"norms": tensor}      # anything torch.save can store

    results = run_ranks(work, 2)      # [result of rank 0, result of rank 1]

Rank functions must live at module level of an importable module (tests/ is on
``sys.path`` under pytest). An exception on any rank fails the call with that
rank's traceback; a hang fails it after ``timeout`` seconds (collectives time
out after ``COLLECTIVE_TIMEOUT_S`` so one failing rank cannot hang the others).

:func:`run_scenarios` runs several named scenarios in one spawn (process start
costs seconds) and returns each scenario's result or its error, so one failing
scenario does not hide the others.

The models and data are deterministic from a seed, so a rank and the
single-process reference (:func:`reference_grads`) build identical weights and
the same global batch.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["GRADWATCH_TEST_OUT"] = out_dir
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 150.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes with gloo initialised.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message).
        TimeoutError: the ranks did not finish within ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(fn, world, free_port(), out_dir, args), nprocs=world, start_method="spawn", join=False
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world} ranks ran past {timeout} s")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a rank failed:\n{e}{_early_errors(out_dir)}") from None
        except TimeoutError as e:
            raise TimeoutError(f"{e}{_early_errors(out_dir)}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _early_errors(out_dir: str) -> str:
    """The tracebacks ranks wrote before a hang or a crash (a rank that raised leaves the others waiting)."""
    notes = sorted(Path(out_dir).glob("rank*.error.txt"))
    return "".join(f"\n\n-- {p.name} (written when it raised):\n{p.read_text()}" for p in notes)


class ScenarioError:
    """What a scenario that raised returns in place of its result."""

    def __init__(self, name: str, tb: str) -> None:
        self.name, self.traceback = name, tb

    def __repr__(self) -> str:
        return f"ScenarioError({self.name!r}):\n{self.traceback}"


def _scenarios(rank: int, world: int, scenarios: Sequence[Callable[[int, int], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fn in scenarios:
        try:
            out[fn.__name__] = fn(rank, world)
        except Exception:
            tb = traceback.format_exc()
            out[fn.__name__] = ScenarioError(fn.__name__, tb)
            # if the other ranks now wait in a collective this rank skipped, the run times out: leave the reason
            Path(os.environ["GRADWATCH_TEST_OUT"], f"rank{rank}.error.txt").write_text(f"{fn.__name__}:\n{tb}")
        dist.barrier()
    return out


def run_scenarios(scenarios: Sequence[Callable[[int, int], Any]], world: int, timeout: float = 150.0) -> list[dict]:
    """Run several scenario functions ``fn(rank, world)`` one after the other in one spawn.

    Returns:
        Per rank, ``{scenario name: result or ScenarioError}``.
    """
    return run_ranks(_scenarios, world, list(scenarios), timeout=timeout)


def result_of(results: list[dict], name: str) -> list[Any]:
    """The per-rank results of scenario ``name``; fails the test with the rank's traceback if it raised."""
    per_rank = [r[name] for r in results]
    for r, res in enumerate(per_rank):
        if isinstance(res, ScenarioError):
            raise AssertionError(f"scenario {name} failed on rank {r}:\n{res.traceback}")
    return per_rank


# --------------------------------------------------------------------------- tiny models and data


class MLP(nn.Module):
    """Linear(6, 10) -> tanh -> Linear(10, 5) -> tanh -> Linear(5, 3): ``up`` / ``down`` fit tensor parallel
    (``ColwiseParallel`` / ``RowwiseParallel``); 5 and 3 rows shard unevenly over 2 and 4 ranks."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.up = nn.Linear(6, 10, dtype=dtype)
        self.down = nn.Linear(10, 5, dtype=dtype)
        self.head = nn.Linear(5, 3, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def batch(step: int = 0, n: int = 8, seed: int = 1) -> tuple[Tensor, Tensor]:
    """The global batch of a step: ``x [n, 6]``, ``y [n, 3]``."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error: the mean over the batch, so data-parallel gradient averaging reproduces it."""
    return (model(x) - y).square().mean()


def reference_grads(step: int = 0, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The gradients of one single-process step on the global batch (a fresh :class:`MLP` if no model)."""
    model = MLP() if model is None else model
    model.zero_grad()
    loss_fn(model, *batch(step)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_norms(grads: dict[str, Tensor], norm_type: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-parameter and global norms of full gradients, in float64."""
    norms = torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads.values()])
    return norms, torch.linalg.vector_norm(norms, norm_type)


def reference_clipped_training(steps: int, max_norm: float, lr: float = 0.1) -> dict[str, Tensor]:
    """Weights after ``steps`` SGD steps with ``torch.nn.utils.clip_grad_norm_`` on the global batch."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def local_batch(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This data-parallel rank's equal share of the global batch."""
    x, y = batch(step)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def full(t: Tensor) -> Tensor:
    """A DTensor's full value (an all-gather: for test checks only), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grads_of(model: nn.Module) -> tuple[list[str], list[Tensor | None]]:
    """Names and gradients of the trainable parameters, in model order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.grad for _, p in named]


# --------------------------------------------------------------------------- the MLP under each engine (on every rank)


def mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None):
    """A CPU device mesh over the spawned ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def fsdp2_mlp(device_mesh) -> MLP:
    """:class:`MLP` with each Linear and the root ``fully_shard``-ed on ``device_mesh`` (1-D: FSDP2, 2-D: HSDP)."""
    from torch.distributed.fsdp import fully_shard

    model = MLP()
    for m in (model.up, model.down, model.head):
        fully_shard(m, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def tp_mlp(device_mesh) -> MLP:
    """:class:`MLP` with ``up`` column-wise and ``down`` row-wise parallel; ``head`` stays a plain module."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    return parallelize_module(MLP(), device_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def fsdp_tp_mlp(device_mesh_2d) -> MLP:
    """:class:`MLP` tensor-parallel over ``mesh["tp"]`` and ``fully_shard``-ed over ``mesh["dp"]``."""
    from torch.distributed.fsdp import fully_shard

    model = tp_mlp(device_mesh_2d["tp"])
    for m in (model.up, model.down, model.head):
        fully_shard(m, mesh=device_mesh_2d["dp"])
    fully_shard(model, mesh=device_mesh_2d["dp"])
    return model
