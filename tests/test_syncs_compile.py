"""``count_host_syncs`` and ``torch.compile``: inside the context compiled code runs (and is counted)
eagerly; afterwards it runs compiled again."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import gradwatch as gw


def _compiled(fn: Callable) -> tuple[Callable, dict[str, int]]:
    """``torch.compile(fn)`` with a backend that counts how often its compiled graph runs."""
    calls = {"graph": 0}

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        forward = gm.forward

        def run(*args):
            calls["graph"] += 1
            return forward(*args)

        return run

    return torch.compile(fn, backend=backend), calls


def test_compiled_code_runs_and_is_counted_eagerly_inside_the_context():
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.sin() * 2).sum()

    cf, calls = _compiled(f)
    x = torch.randn(8)
    cf(x)
    assert calls["graph"] == 1
    with gw.count_host_syncs() as c:
        y = cf(x)
        _ = y.item()
    assert calls["graph"] == 1  # the compiled graph did not run
    assert c.ops["sin"] == 1 and c.ops["mul"] == 1 and c.ops["sum"] == 1 and c.syncs == 1
    assert torch.equal(y, f(x))


def test_compiled_code_runs_compiled_again_after_the_context():
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x.cos() + 1).sum()

    cf, calls = _compiled(f)
    x = torch.randn(8)
    cf(x)
    with gw.count_host_syncs():
        cf(x)
    cf(x)
    cf(x)
    assert calls["graph"] == 3  # 1 before, 2 after: the context left the function compiled
    with pytest.raises(ValueError), gw.count_host_syncs():  # the stance is restored on an exception too
        cf(x)
        raise ValueError("boom")
    cf(x)
    assert calls["graph"] == 4
