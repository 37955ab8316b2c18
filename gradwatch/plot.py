"""Matplotlib figures of a History; every function returns the Axes and accepts ``ax=``.

matplotlib is imported only when a function is called (``pip install
"gradwatch[plot]"``). The functions draw on whatever backend is active and
never call ``plt.show()``; they work headless with the Agg backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch.history import History

__all__ = ["plot_clipping", "plot_compare", "plot_heatmap", "plot_norms", "plot_taps"]

_INSTALL = 'gradwatch plotting needs matplotlib: pip install "gradwatch[plot]" (or pip install matplotlib)'


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return plt


def _axes(ax):
    if ax is not None:
        return ax
    plt = _pyplot()
    _, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    return ax


def _finish(ax: Any, log: bool, ylabel: str = "gradient L2 norm", xlabel: str | None = "step") -> Any:
    """The common dressing of a line plot: scale, labels, legend, grid."""
    if log:
        ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def _window(h: History, steps: slice | range | Sequence[int] | None) -> np.ndarray:
    """Row mask of the recorded steps inside ``steps`` (all rows for None)."""
    if steps is None:
        return np.ones(len(h), bool)
    if isinstance(steps, slice):
        lo = -np.inf if steps.start is None else steps.start
        hi = np.inf if steps.stop is None else steps.stop
        return (h.steps >= lo) & (h.steps < hi)
    return np.isin(h.steps, np.asarray(list(steps)))


def plot_norms(
    h: History,
    names: Sequence[str] | None = None,
    ax: Any = None,
    *,
    steps: slice | range | Sequence[int] | None = None,
    log: bool = False,
    clipped: bool = False,
    events: bool = True,
    group_by: Any = None,
) -> Any:
    """Gradient norms of chosen parameters over the optimizer steps.

    Draws one line per parameter (pre-clip); ``clipped=True`` adds the
    post-clip norms dashed, and ``events=True`` marks the steps where a
    detector fired on that parameter. With ``names=["rnn_model.W",
    "rnn_model.U", "rnn_model.b"]`` and ``steps=range(40)`` it is figure 6.8 of
    the NNDL textbook.

    Args:
        h: the history.
        names: parameters to draw (default: all, or the first 10 if more).
        ax: an Axes to draw on (default: a new figure).
        steps: which steps to show: a ``range``, ``slice`` or list of step indices.
        log: log-scale y axis.
        clipped: also draw the post-clip norms.
        events: mark detector events on the drawn parameters.
        group_by: aggregate parameters first (see :meth:`History.grouped`).

    Returns:
        The matplotlib Axes.

    Raises:
        KeyError: an unknown name (the message lists the closest ones).
        ImportError: matplotlib is missing (the message says what to install).

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w", "b"]); h.append([0, 1, 2], [[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]])
        >>> ax = plot_norms(h, names=["w"])
        >>> len(ax.lines)
        1
    """
    ax = _axes(ax)
    if group_by is not None:
        h = h.grouped(group_by)
    names = list(names) if names is not None else h.names[:10]
    rows = _window(h, steps)
    x = h.steps[rows]
    for name in names:
        y = h[name][rows]
        (line,) = ax.plot(x, y, label=name, linewidth=1.4)
        if clipped and name in h.names:
            yc = h.norms_clipped[rows, h.names.index(name)]
            ax.plot(x, yc, linestyle="--", color=line.get_color(), linewidth=1.0, label=f"{name} (clipped)")
        if events:
            hits = [e for e in h.events if e.name == name and e.step in set(x.tolist())]
            if hits:
                ev_x = [e.step for e in hits]
                ev_y = [y[np.searchsorted(x, s)] for s in ev_x]
                ax.scatter(ev_x, np.nan_to_num(ev_y, nan=0.0), marker="x", color=line.get_color(), zorder=3)
    return _finish(ax, log)


def plot_heatmap(
    h: History,
    ax: Any = None,
    *,
    names: Sequence[str] | None = None,
    log: bool = True,
    max_labels: int = 40,
    group_by: Any = None,
) -> Any:
    """Parameters x steps image of the gradient norms (log colour scale by default).

    With more than ``max_labels`` parameters only every k-th row is labelled, so
    the labels stay readable for models with hundreds of tensors.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["a", "b"]); h.append([0, 1], [[1.0, 10.0], [100.0, 0.0]])
        >>> ax = plot_heatmap(h)
        >>> ax.images[0].get_array().shape
        (2, 2)
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm, Normalize

    ax = _axes(ax)
    if group_by is not None:
        h = h.grouped(group_by)
    names = list(names) if names is not None else h.names
    data = np.stack([h[n] for n in names]) if names else np.zeros((0, len(h)))
    finite = data[np.isfinite(data) & (data > 0)] if log else data[np.isfinite(data)]
    if log and finite.size:
        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
        data = np.where(data > 0, data, np.nan)
    else:
        norm = Normalize(vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    steps = h.steps
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5) if len(steps) else None
    im = ax.imshow(data, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis", extent=extent)
    every = max(1, int(np.ceil(len(names) / max_labels)))
    ticks = list(range(0, len(names), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([names[i] for i in ticks], fontsize="x-small" if len(names) > 20 else "small")
    ax.set_xlabel("step")
    plt.colorbar(im, ax=ax, label="gradient L2 norm")
    return ax


def plot_clipping(h: History, ax: Any = None, *, log: bool = True) -> Any:
    """The global norm before and after clipping, the threshold, and where clipping bound.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w"]); h.append([0, 1], [[3.0], [0.5]], total_clipped=[1.0, 0.5], clip_coef=[1 / 3, 1.0])
        >>> len(plot_clipping(h).lines)
        2
    """
    ax = _axes(ax)
    x = h.steps
    ax.plot(x, h.total, label="global norm (pre-clip)", linewidth=1.4)
    ax.plot(x, h.total_clipped, label="global norm (post-clip)", linewidth=1.2)
    thr = h.clip_threshold
    if np.isfinite(thr).any():
        ax.plot(x, thr, linestyle=":", color="black", label="threshold")
    bound = h.clip_coef < 1
    if bound.any():
        ax.scatter(
            x[bound], h.total[bound], s=10, color="red", zorder=3, label=f"clipped ({bound.mean():.0%} of steps)"
        )
    return _finish(ax, log)


def plot_compare(
    runs: Mapping[str, History] | Iterable[History],
    ax: Any = None,
    *,
    name: str | None = None,
    clipped: bool = False,
    log: bool = True,
) -> Any:
    """Several runs' global norms (or one parameter's norm) on one Axes.

    Args:
        runs: ``{label: history}``, or histories (labelled run 0, run 1, ...).
        ax: an Axes to draw on.
        name: a parameter to compare instead of the global norm.
        clipped: compare the post-clip values.
        log: log-scale y axis.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> a = History(["w"]); a.append([0, 1], [[1.0], [2.0]])
        >>> len(plot_compare({"a": a, "b": a}).lines)
        2
    """
    ax = _axes(ax)
    items = runs.items() if isinstance(runs, Mapping) else ((f"run {i}", h) for i, h in enumerate(runs))
    for label, h in items:
        if name is None:
            y = h.total_clipped if clipped else h.total
        else:
            y = h.norms_clipped[:, h.names.index(name)] if clipped else h[name]
        ax.plot(h.steps, y, label=label, linewidth=1.2)
    return _finish(ax, log, f"{'post' if clipped else 'pre'}-clip {name or 'global'} gradient norm")


def plot_taps(
    h: History,
    steps: Sequence[int] | None = None,
    ax: Any = None,
    *,
    names: Sequence[str] | None = None,
    log: bool = True,
) -> Any:
    """Gradient norms of tapped tensors (e.g. ``‖∂L/∂h_t‖`` over t), one line per step.

    Args:
        h: a history with taps (:meth:`GradWatch.tap`).
        steps: the steps to draw (default: every step with taps, at most 6).
        ax: an Axes to draw on.
        names: the tapped tensors, in x order (default: all, in tap order).
        log: log-scale y axis.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w"]); h.append([0], [[1.0]], taps={"h1": [0.1], "h2": [1.0]})
        >>> len(plot_taps(h).lines)
        1
    """
    ax = _axes(ax)
    names = list(names) if names is not None else h.tap_names
    cols = [h.tap_names.index(n) for n in names]
    taps = h.taps[:, cols] if cols else np.zeros((len(h), 0))
    has = np.isfinite(taps).any(axis=1)
    rows = np.flatnonzero(has) if steps is None else np.flatnonzero(np.isin(h.steps, list(steps)) & has)
    if steps is None:
        rows = rows[np.linspace(0, len(rows) - 1, min(6, len(rows))).round().astype(int)] if len(rows) else rows
    x = np.arange(1, len(names) + 1)
    for r in rows:
        ax.plot(x, taps[r], marker="o", markersize=3, label=f"step {h.steps[r]}")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize="x-small", rotation=90 if len(names) > 12 else 0)
    return _finish(ax, log, xlabel=None)
