"""The contributor protocol: every part of a step's row declares, measures and maps its own columns.

A :class:`~gradwatch.GradWatch` row is assembled from *contributors*. The
watch's own parts -- the clipper's columns, the AMP scaler's, the weight and
update norms, each detector -- are contributors, and so is every statistic a
user passes as ``GradWatch(model, stats=[...])``. A contributor

1. has a :attr:`~Contributor.prefix` (``"noise"``); its columns are stored as
   ``"<prefix>.<column>"``;
2. is bound once to the watched parameters (:meth:`~Contributor.bind`, one
   :class:`Binding` for every contributor);
3. declares its per-step columns once (:meth:`~Contributor.columns`: ``{column:
   width}``, :data:`SCALAR` for one number a step), so the watch reserves them in
   its device row -- as torchmetrics declares state with ``add_state``;
4. at every observed step returns its device tensors for those columns from a
   :class:`StepView` (:meth:`~Contributor.observe`; no host sync);
5. at a flush maps its host columns to what :class:`~gradwatch.History` stores
   (:meth:`~Contributor.to_history`: a History column such as ``"scale"``, or
   ``"<prefix>.<column>"`` for :attr:`History.stats`) and turns rows into
   events (:meth:`~Contributor.events`).

The data path reads one way: the meter measures into the row, each contributor
observes in order (the clipper first: it acts on the gradients), one op writes
their values into the row, and a flush copies the rows to the host in one
transfer and hands each contributor its columns back by name.

Example: the cosine between this step's gradient and the previous step's,
a statistic that keeps one flat copy of the gradient as state.

    >>> import torch, gradwatch as gw
    >>> class GradCosine(gw.Contributor):
    ...     prefix = "cos"
    ...     def bind(self, binding):
    ...         super().bind(binding)
    ...         self.prev = None
    ...     def columns(self):
    ...         return {"prev": gw.SCALAR}
    ...     def observe(self, view):
    ...         g = torch.cat([x.reshape(-1) for x in view.grads if x is not None])
    ...         if self.prev is None:
    ...             cos = torch.full((), float("nan"))
    ...         else:
    ...             cos = torch.nn.functional.cosine_similarity(g, self.prev, dim=0)
    ...         self.prev = g.clone()
    ...         return {"prev": cos}
    >>> lin = torch.nn.Linear(2, 1)
    >>> watch = gw.GradWatch(lin, stats=[GradCosine()])
    >>> for x in ([1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]):
    ...     lin.zero_grad(); lin(torch.tensor([x])).sum().backward(); watch.step()
    >>> watch.history.stats["cos.prev"].round(3).tolist()
    [nan, 1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch._params import Binding
from gradwatch.detect import Event, Record

__all__ = ["SCALAR", "Binding", "Contributor", "StepView"]

#: the width of a column holding one 0-d value per step (``[S]`` on the host; any other width ``w`` is ``[S, w]``)
SCALAR = 0


@dataclass
class StepView:
    """What contributors see on the device at one observed step.

    Attributes:
        step: the optimizer step index.
        norms: ``[P]`` pre-clip L2 norms of the gradients (0 where missing).
        total: 0-d global L2 norm (over all ranks' shards in distributed runs).
        missing: indices of the parameters whose ``.grad`` is None.
        grads: the gradients, in model order (None where missing); a clipper
            observing before you may have scaled them in place.
        params: the watched parameters.
        row: views of this step's device row by full column name
            (``"<prefix>.<column>"``), for a value known only after the step
            (write it in place from :meth:`Contributor.after_optimizer_step`;
            return a placeholder from :meth:`Contributor.observe`).
    """

    step: int
    norms: Tensor
    total: Tensor
    missing: list[int]
    grads: list[Tensor | None]
    params: list[Tensor]
    row: Mapping[str, Tensor]


class Contributor:
    """Base class of everything that adds columns to a step's row (see the module docstring).

    Subclasses set :attr:`prefix` and override :meth:`columns` and
    :meth:`observe`; the defaults of :meth:`to_history` (store every column in
    :attr:`History.stats <gradwatch.History.stats>` as ``"<prefix>.<column>"``)
    and :meth:`events` (none) suit a statistic.

    Attributes:
        prefix: the name space of this contributor's columns (letters, digits, ``_``).
        binding: the :class:`Binding`, set by :meth:`bind`.
        action: what the watch does with this contributor's events (None: nothing;
            detectors have ``"warn"``, ``"raise"``, ``"skip"``, ``"ignore"`` or a callable).
        every_step: observe at every step, not only recorded ones (a clipper must).
        uses_order: :meth:`events` reads ``rec.order`` (the order in which the
            gradients became ready); the watch tracks it only when asked.
        hot: set by the watch exactly once per step, at the start of that step's
            measurement (before any ``observe``), for the *coming* step: whether
            its backward is observed (hooks of a statistic can skip their work
            when it is not). A statistic that keeps per-step state can make it a
            property whose setter closes the step (``NoiseScale`` and
            ``PerExampleNorms`` do).
    """

    prefix: str = "stat"
    action: Any = None
    every_step: bool = False
    uses_order: bool = False
    hot: bool = True

    def bind(self, binding: Binding) -> None:
        """Called once by the watch, before :meth:`columns`.

        Args:
            binding: the watched parameters and the row's device and dtype.
        """
        self.binding = binding

    def columns(self) -> Mapping[str, int]:
        """``{column: width}`` (:data:`SCALAR` for one number) kept per step, after :meth:`bind`."""
        return {}

    def observe(self, view: StepView) -> Mapping[str, Tensor]:
        """This step's device tensors, one per declared column (``[width]`` or 0-d for :data:`SCALAR`).

        Runs under ``torch.no_grad()``; must not read device values on the host.
        """
        return {}

    def to_history(self, cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map the host columns of flushed rows to what :class:`~gradwatch.History` stores.

        Args:
            cols: ``{column: [n] or [n, width] array}`` for the ``n`` flushed rows.

        Returns:
            ``{key: array}``: a key with a dot (``"<prefix>.<column>"``) goes to
            :attr:`History.stats`, any other key is a :meth:`History.append` column.
        """
        return {f"{self.prefix}.{k}": v for k, v in cols.items()}

    def history_columns(self) -> Mapping[str, int]:
        """The ``History.stats`` keys :meth:`to_history` returns, with their widths (:data:`SCALAR`: one number).

        Sinks declare and write these (``History.meta["stats"]``). Override it
        with :meth:`to_history` when that renames or splits the row's columns;
        default: ``"<prefix>.<column>"`` for each of :meth:`columns`.
        """
        return {f"{self.prefix}.{k}": w for k, w in self.columns().items()}

    def events(self, rec: Record) -> Sequence[Event]:
        """The events of one flushed row (``rec.values`` holds this contributor's columns)."""
        return ()

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called after each attached optimizer's step, while the step's row is still on the device."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint with :meth:`GradWatch.state_dict`."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def close(self) -> None:
        """Remove hooks and release resources (called once by :meth:`GradWatch.close`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
