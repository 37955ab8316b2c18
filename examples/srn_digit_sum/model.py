"""The simple RNN of NNDL practice 6.1, the LSTM of practice 6.3, and their sequence classifier.

SRN: ``h_t = tanh(x_t W + h_{t-1} U + b)``, ``h_0 = 0``. LSTM (practice 6.3,
the architectural repair): input, forget and output gates and a memory cell
``c_t = f_t * c_{t-1} + i_t * tanh(x_t W_c + h_{t-1} U_c + b_c)``,
``h_t = o_t * tanh(c_t)``. The last state goes through a linear layer to 19
classes (the sums 0..18). Parameter names and the initialisation
(Xavier-uniform everywhere, biases of the recurrent layer included; zero linear
bias) follow the book's Paddle code.
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


class LSTM(nn.Module):
    """Long short-term memory with one weight per gate, as the book writes it (practice 6.3).

    ``i, f, o = sigmoid(x_t W_* + h_{t-1} U_* + b_*)``,
    ``c_t = f * c_{t-1} + i * tanh(x_t W_c + h_{t-1} U_c + b_c)``, ``h_t = o * tanh(c_t)``,
    ``h_0 = c_0 = 0``. Keeping a parameter per gate lets gradwatch record each
    gate's gradient norm (``rnn_model.W_f`` ...).

    Without a tap the sequence runs in ``torch.lstm`` (the kernel behind
    ``nn.LSTM``: the loop over time in C++, three times faster than a Python
    loop on this model) on the concatenated per-gate weights; with a tap, the
    same equations run step by step in Python so that ``h_t`` and ``c_t``
    exist as tensors whose gradients can be recorded. Both give the same
    values to float rounding (checked in the example's tests).

    Args:
        input_size: size of x_t.
        hidden_size: size of h_t and c_t.
    """

    GATES = ("i", "f", "o", "c")
    _TORCH_ORDER = ("i", "f", "c", "o")  # torch.lstm's gate order: input, forget, cell, output

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        for prefix, rows in (("W", input_size), ("U", hidden_size), ("b", 1)):
            for g in self.GATES:
                weight = nn.init.xavier_uniform_(torch.empty(rows, hidden_size))
                self.register_parameter(f"{prefix}_{g}", nn.Parameter(weight))

    def _stacked(self, prefix: str, order: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([getattr(self, f"{prefix}_{g}") for g in order], 1)

    def forward(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        """Run over ``x`` ``[batch, length, input_size]``; returns the last hidden state.

        ``tap(tensor, name)`` is applied to each ``h_t`` (columns ``h1`` ... ``hL``)
        and then to each ``c_t`` (``c1`` ... ``cL``).
        """
        n = self.hidden_size
        zeros = x.new_zeros(x.shape[0], n)
        if tap is None:
            order = self._TORCH_ORDER
            w_ih, w_hh = self._stacked("W", order).t(), self._stacked("U", order).t()
            b = self._stacked("b", order).view(-1)
            state = (zeros.unsqueeze(0), zeros.unsqueeze(0))
            _, h, _ = torch.lstm(
                x, state, [w_ih, w_hh, b, torch.zeros_like(b)], True, 1, 0.0, self.training, False, True
            )
            return h[0]
        xw = x @ self._stacked("W", self.GATES) + self._stacked("b", self.GATES)  # all time steps at once
        u = self._stacked("U", self.GATES)
        h, c, cells = zeros, zeros, []
        for t in range(x.shape[1]):
            z = xw[:, t] + h @ u
            gates = torch.sigmoid(z[:, : 3 * n])
            i, f, o = gates[:, :n], gates[:, n : 2 * n], gates[:, 2 * n :]
            c = f * c + i * torch.tanh(z[:, 3 * n :])
            h = tap(o * torch.tanh(c), f"h{t + 1}")
            cells.append(c)
        for t, c_t in enumerate(cells):  # the c columns follow the h columns
            tap(c_t, f"c{t + 1}")
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
    """Digits -> embedding -> SRN (or LSTM) -> last state -> linear -> 19 logits.

    The parameters, in the book's order: ``rnn_model.W``, ``rnn_model.U``,
    ``rnn_model.b``, ``embedding.W``, ``linear.weight``, ``linear.bias``
    (with ``cell="lstm"``: ``rnn_model.W_i`` ... ``rnn_model.b_c`` in place of the three SRN tensors).
    """

    def __init__(
        self,
        num_digits: int = 10,
        input_size: int = 32,
        hidden_size: int = 32,
        num_classes: int = 19,
        cell: str = "srn",
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        self.rnn_model = CELLS[cell](input_size, hidden_size)
        self.embedding = Embedding(num_digits, input_size)
        self.linear = nn.Linear(hidden_size, num_classes)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        return self.linear(self.rnn_model(self.embedding(x), tap=tap))


#: The recurrent layers, by name.
CELLS = {"srn": SRN, "lstm": LSTM}
