import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def mlp(depth: int = 3, width: int = 8, dtype=torch.float32) -> torch.nn.Sequential:
    layers = []
    for i in range(depth):
        layers.append(torch.nn.Linear(width, width, dtype=dtype))
        if i < depth - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)
