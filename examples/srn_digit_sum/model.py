"""The simple RNN of NNDL practice 6.1 and its sequence classifier, in PyTorch.

``h_t = tanh(x_t W + h_{t-1} U + b)``, ``h_0 = 0``; the last state goes through
a linear layer to 19 classes (the sums 0..18). Parameter names and the
initialisation (Xavier-uniform everywhere, ``b`` included; zero linear bias)
follow the book's Paddle code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SRN(nn.Module):
    """Simple recurrent network, ``h_t = tanh(x_t W + h_{t-1} U + b)``.

    Args:
        input_size: size of x_t.
        hidden_size: size of h_t.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.W = nn.Parameter(nn.init.xavier_uniform_(torch.empty(input_size, hidden_size)))
        self.U = nn.Parameter(nn.init.xavier_uniform_(torch.empty(hidden_size, hidden_size)))
        self.b = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, hidden_size)))

    def forward(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        """Run over ``x`` ``[batch, length, input_size]``; returns the last state.

        ``tap(tensor, name)`` (e.g. ``GradWatch.tap``) is applied to each hidden
        state ``h_t`` (named ``h1`` ... ``hL``) to record ``‖∂L/∂h_t‖``.
        """
        h = x.new_zeros(x.shape[0], self.hidden_size)
        for t in range(x.shape[1]):
            h = torch.tanh(x[:, t] @ self.W + h @ self.U + self.b)
            if tap is not None:
                h = tap(h, f"h{t + 1}")
        return h


class Embedding(nn.Module):
    """A lookup table ``W`` ``[num_embeddings, dim]`` (Xavier-uniform)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_embeddings, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.embedding, not W[x]: the backward of advanced indexing accumulates in
        # a thread-dependent order on CPU, and the chaotic exploding SRN would then
        # follow a different path on every run.
        return F.embedding(x, self.W)


class SRNClassifier(nn.Module):
    """Digits -> embedding -> SRN -> last state -> linear -> 19 logits.

    The parameters, in the book's order: ``rnn_model.W``, ``rnn_model.U``,
    ``rnn_model.b``, ``embedding.W``, ``linear.weight``, ``linear.bias``.
    """

    def __init__(self, num_digits: int = 10, input_size: int = 32, hidden_size: int = 32, num_classes: int = 19):
        super().__init__()
        self.rnn_model = SRN(input_size, hidden_size)
        self.embedding = Embedding(num_digits, input_size)
        self.linear = nn.Linear(hidden_size, num_classes)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        return self.linear(self.rnn_model(self.embedding(x), tap=tap))
