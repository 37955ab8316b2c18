"""Adapters that run a :class:`~gradwatch.GradWatch` inside a trainer's own loop.

* :mod:`gradwatch.integrations.lightning` -- ``GradWatchCallback`` for PyTorch Lightning
  (``lightning.pytorch`` or ``pytorch_lightning``);
* :mod:`gradwatch.integrations.transformers` -- ``GradWatchCallback`` for the Hugging Face ``Trainer``.

Each module imports its trainer when it is imported, so this package itself
needs neither. What both share lives here: the argument checks and the small
sink that keeps the newest recorded row for the trainer's loggers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gradwatch._validate import check_bool, check_choice, check_instance, check_int
from gradwatch.clip import Clipper
from gradwatch.detect import Detector
from gradwatch.history import History
from gradwatch.sinks import check_sinks

__all__: list[str] = []

#: what ``log_groups`` accepts besides a module depth or a function
_PARAMS = "params"


def check_callback_args(
    clipper: Any, detectors: Sequence[Any], sinks: Sequence[Any], every: Any, log: Any, log_groups: Any, log_prefix: Any
) -> tuple[list[Detector], list[Any]]:
    """Check a callback's arguments early (at construction, not at the first step).

    Returns:
        The detectors and sinks as lists.

    Raises:
        TypeError: a wrong kind of value; the message names the argument.
        ValueError: ``every`` < 1 or ``log_groups`` < 1.

    Example:
        >>> check_callback_args(None, (), (), 0, True, 1, "")
        Traceback (most recent call last):
        ...
        ValueError: every must be an integer in [1, inf], got 0
    """
    if clipper is not None:
        check_instance(clipper, "clipper", Clipper, "a gradwatch Clipper or None")
    detectors = [check_instance(d, "detectors", Detector, "a list of gradwatch Detector objects") for d in detectors]
    check_int(every, "every", min=1)
    check_bool(log, "log")
    if not (log_groups is None or log_groups == _PARAMS or callable(log_groups)):
        if isinstance(log_groups, str):
            check_choice(log_groups, "log_groups", (_PARAMS,))
        check_int(log_groups, "log_groups", min=1)
    check_instance(log_prefix, "log_prefix", str, "a string")
    return detectors, check_sinks(sinks)


class LatestRow:
    """A GradWatch sink that keeps the newest recorded row as ``{metric name: float}``.

    The trainer callbacks log that row through the trainer's own loggers at
    the trainer's logging steps, after a :meth:`GradWatch.flush` -- one
    device-to-host copy per logging step, none in between.

    Metric names: ``{prefix}total`` (pre-clip global norm), ``{prefix}total_clipped``
    (with a clipper) and one ``{prefix}{group}`` per group of parameters
    (pre-clip L2 norm of the group's gradients).

    Args:
        groups: a module depth (``1``: ``"encoder.layers.0.w"`` -> ``"encoder"``),
            a function from parameter name to group name, ``"params"`` (one
            metric per parameter) or None (global norms only).
        prefix: put in front of every metric name.
        clipped: log ``total_clipped`` too.

    Example:
        >>> sink = LatestRow(groups=1, prefix="grad_norm/", clipped=False)
        >>> sink.open(["enc.0.w", "enc.1.w", "head.w"], {})
        >>> h = History(["enc.0.w", "enc.1.w", "head.w"]); h.append([7], [[3.0, 4.0, 12.0]])
        >>> sink.write(h)
        >>> sink.step, sink.metrics
        (7, {'grad_norm/total': 13.0, 'grad_norm/enc': 5.0, 'grad_norm/head': 12.0})
    """

    def __init__(self, groups: int | str | Callable[[str], str] | None, prefix: str, clipped: bool) -> None:
        self.groups = groups
        self.prefix = prefix
        self.clipped = clipped
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def open(self, names: list[str], meta: dict[str, Any]) -> None:
        """Nothing to open: the rows stay in memory."""

    def write(self, chunk: History) -> None:
        """Keep the last row of ``chunk``."""
        if not len(chunk):
            return
        p = self.prefix
        metrics = {f"{p}total": float(chunk.total[-1])}
        if self.clipped:
            metrics[f"{p}total_clipped"] = float(chunk.total_clipped[-1])
        if self.groups is not None:
            by = chunk if self.groups == _PARAMS else chunk.grouped(self.groups)
            for name, value in zip(by.names, by.norms[-1]):
                metrics[f"{p}{name}"] = float(value)
        self.step = int(chunk.steps[-1])
        self.metrics = metrics

    def close(self) -> None:
        """Nothing to close."""

    def __repr__(self) -> str:
        return f"LatestRow(groups={self.groups!r}, prefix={self.prefix!r})"
