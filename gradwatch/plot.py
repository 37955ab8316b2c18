"""Matplotlib figures of a History; every function returns the Axes and accepts ``ax=``.

matplotlib is imported only when a function is called (install it with
``pip install matplotlib``, or the ``plot`` extra from a clone of gradwatch:
``pip install -e ".[plot]"``). The functions draw on whatever backend is
active and never call ``plt.show()``; they work headless with the Agg backend.

On a log axis, exact zeros (a gradient that is exactly 0, e.g. no gradient
reaching an early RNN state) cannot be drawn; these functions draw them one
decade below the smallest positive value with an open triangle marker, and the
legend says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch._validate import check_choice, check_int
from gradwatch.history import History
from gradwatch.incidents import Incident

__all__ = [
    "plot_clipping",
    "plot_compare",
    "plot_heatmap",
    "plot_incident",
    "plot_norms",
    "plot_stats",
    "plot_stats_heatmap",
    "plot_taps",
    "pyplot",
]

_INSTALL = (
    "gradwatch plotting needs matplotlib: pip install matplotlib "
    '(the "gradwatch[plot]" extra; from a clone of gradwatch: pip install -e ".[plot]")'
)
#: Marker of each detector kind in :func:`plot_norms` (others: ``"o"``).
_EVENT_MARKERS = {"vanishing": "v", "spike": "^", "threshold": "x", "nonfinite": "X", "amp_overflow": "D"}
#: More legend entries than this and the legend moves outside the axes, to the right.
_LEGEND_INSIDE_MAX = 8


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported on first use.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    return plt


def _axes(ax):
    if ax is not None:
        return ax
    plt = pyplot()
    _, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    return ax


def _finish(
    ax: Any,
    log: bool,
    ylabel: str = "gradient L2 norm",
    xlabel: str | None = "step",
    extra: Sequence[Any] = (),
    outside: bool = False,
) -> Any:
    """The common dressing of a line plot: scale, labels, legend, grid.

    ``extra`` are legend-only handles (line styles, marker kinds) that are not
    drawn on the axes. A legend with more than ``_LEGEND_INSIDE_MAX`` entries
    (or any legend, with ``outside=True``) goes outside the axes, to the right,
    so that it never covers the data.
    """
    if log:
        ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = [*handles, *extra], [*labels, *(h.get_label() for h in extra)]
    if handles and (outside or len(handles) > _LEGEND_INSIDE_MAX):
        ax.legend(handles, labels, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif handles:
        ax.legend(handles, labels, fontsize="small")
    ax.grid(True, alpha=0.3)
    return ax


def _zero_floor(series: Iterable[np.ndarray]) -> float | None:
    """Where to draw exact zeros on a log axis: one decade below the smallest positive value.

    Returns None when no series holds an exact zero. Series that hold only
    zeros are drawn at ``1e-12`` (below any gradient norm of interest).
    """
    series = [np.asarray(y, dtype=float) for y in series]
    if not any((y == 0).any() for y in series):
        return None
    pos = np.concatenate([y[np.isfinite(y) & (y > 0)] for y in series]) if series else np.zeros(0)
    if not pos.size:
        return 1e-12
    return float(10.0 ** (np.floor(np.log10(pos.min())) - 1))


def _draw_zeros(ax: Any, x: np.ndarray, y: np.ndarray, floor: float | None, color: Any) -> np.ndarray:
    """Replace exact zeros of ``y`` by ``floor`` and mark them; returns the values to draw."""
    if floor is None:
        return y
    zero = y == 0
    if zero.any():
        ax.scatter(x[zero], np.full(int(zero.sum()), floor), marker="v", facecolors="none", edgecolors=color, zorder=3)
    return np.where(zero, floor, y)


def _key(label: str, **style: Any) -> Any:
    """A legend-only handle (not drawn on any axes)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], label=label, **style)


def _zero_key(floor: float | None) -> list[Any]:
    if floor is None:
        return []
    return [_key(f"exactly 0 (drawn at {floor:.0e})", marker="v", linestyle="none", color="gray", fillstyle="none")]


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
    post-clip norms dashed (one legend entry says so), and ``events=True``
    marks the steps where a detector fired on that parameter, in the
    parameter's colour, one marker per kind (``v`` vanishing, ``^`` spike,
    ``x`` threshold, ``X`` non-finite), each kind in the legend. A legend of
    more than eight entries is placed beside the axes. With ``log=True``, exact
    zeros are drawn one decade below the smallest positive value and marked.
    With ``names=["rnn_model.W", "rnn_model.U", "rnn_model.b"]`` and
    ``steps=range(40)`` it is figure 6.8 of the NNDL textbook (linear axis, as
    in the book; ``log=True`` shows the small norms).

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
    series = {name: h[name][rows] for name in names}
    clipped_series = {}
    if clipped:
        clipped_series = {n: h.norms_clipped[rows, h.names.index(n)] for n in names if n in h.names}
    floor = _zero_floor([*series.values(), *clipped_series.values()]) if log else None
    shown = set(x.tolist())
    kinds: list[str] = []
    for name in names:
        y = series[name]
        (line,) = ax.plot(x, y if floor is None else np.where(y == 0, floor, y), label=name, linewidth=1.4)
        color = line.get_color()
        _draw_zeros(ax, x, y, floor, color)
        if name in clipped_series:
            yc = _draw_zeros(ax, x, clipped_series[name], floor, color)
            ax.plot(x, yc, linestyle="--", color=color, linewidth=1.0)
        if events:
            for kind in dict.fromkeys(e.kind for e in h.events if e.name == name and e.step in shown):
                ev_x = np.array([e.step for e in h.events if e.name == name and e.kind == kind and e.step in shown])
                ev_y = y[np.searchsorted(x, ev_x)]
                if log:  # a non-positive value would vanish on the log axis
                    ev_y = np.where(ev_y > 0, ev_y, floor if floor is not None else np.nan)
                marker = _EVENT_MARKERS.get(kind, "o")
                ax.scatter(ev_x, np.nan_to_num(ev_y, nan=0.0), marker=marker, color=color, zorder=4, s=30)
                if kind not in kinds:
                    kinds.append(kind)
    extra = [_key("dashed: post-clip", linestyle="--", color="gray", linewidth=1.0)] if clipped_series else []
    extra += [_key(f"{k} event", marker=_EVENT_MARKERS.get(k, "o"), linestyle="none", color="gray") for k in kinds]
    return _finish(ax, log, extra=extra + _zero_key(floor))


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
    plt = pyplot()
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


def plot_clipping(h: History, ax: Any = None, *, log: bool = True, threshold: str = "auto") -> Any:
    """The global norm before and after clipping, the clipper's bound, and where clipping bound.

    What ``History.clip_threshold`` holds depends on the clipper: a bound on
    the global norm for ``ClipByGlobalNorm``, ``AutoClip``, ``ZClip`` and a
    ``Chain`` of them (drawn as "threshold (global norm)"), but the
    *per-tensor* bound for ``ClipByNorm`` -- after which the global norm may
    well lie above it -- and NaN where there is no single bound (``ClipByValue``,
    ``AGC``). A per-tensor bound is drawn against the largest post-clip tensor
    norm instead, never as if it bounded the global norm. The legend stands
    beside the axes.

    Args:
        h: the history.
        ax: an Axes to draw on (default: a new figure).
        log: log-scale y axis.
        threshold: how to draw ``clip_threshold``: ``"auto"`` (per-tensor if
            the clipper is a ``ClipByNorm`` or the post-clip global norm ever
            exceeds the bound, global otherwise), ``"global"``,
            ``"per-tensor"``, or ``"none"``.

    Returns:
        The matplotlib Axes.

    Raises:
        ValueError: ``threshold`` is not one of the four choices.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w"]); h.append([0, 1], [[3.0], [0.5]], total_clipped=[1.0, 0.5], clip_coef=[1 / 3, 1.0])
        >>> len(plot_clipping(h).lines)
        2
    """
    threshold = check_choice(threshold, "threshold", ("auto", "global", "per-tensor", "none"))
    ax = _axes(ax)
    x = h.steps
    ax.plot(x, h.total, label="global norm (pre-clip)", linewidth=1.4)
    ax.plot(x, h.total_clipped, label="global norm (post-clip)", linewidth=1.2)
    thr = np.asarray(h.clip_threshold, dtype=float)
    finite = np.isfinite(thr)
    if threshold != "none" and finite.any():
        if threshold == "auto":
            clipper = str(h.meta.get("clipper") or "")
            post = np.asarray(h.total_clipped, dtype=float)
            both = finite & np.isfinite(post)
            exceeds = bool((post[both] > thr[both] * (1 + 1e-5) + 1e-12).any())
            threshold = "per-tensor" if clipper.startswith("ClipByNorm(") or exceeds else "global"
        if threshold == "global":
            ax.plot(x, thr, linestyle=":", color="black", label="threshold (global norm)")
        else:
            ax.plot(
                x, h.norms_clipped.max(axis=1), linewidth=1.0, color="tab:green", label="largest tensor (post-clip)"
            )
            ax.plot(x, thr, linestyle=":", color="black", label="per-tensor bound (not a bound on the global norm)")
    bound = h.clip_coef < 1
    if bound.any():
        ax.scatter(
            x[bound], h.total[bound], s=10, color="red", zorder=3, label=f"clipped ({bound.mean():.0%} of steps)"
        )
    return _finish(ax, log, outside=True)  # the pre-clip line spans the whole width: keep the legend beside it


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

    On a log axis, exact zeros (no gradient at all reached that tensor) are
    drawn one decade below the smallest positive value, marked with open
    triangles, and named in the legend.

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
    floor = _zero_floor([taps[r] for r in rows]) if log else None
    for r in rows:
        (line,) = ax.plot(x, taps[r], marker="o", markersize=3, label=f"step {h.steps[r]}")
        if floor is not None:
            line.set_ydata(_draw_zeros(ax, x, taps[r], floor, line.get_color()))
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize="x-small", rotation=90 if len(names) > 12 else 0)
    return _finish(ax, log, xlabel=None, extra=_zero_key(floor))


def plot_incident(
    incident: Incident,
    names: Sequence[str] | None = None,
    ax: Any = None,
    *,
    top: int = 5,
    log: bool = True,
) -> Any:
    """An incident's window: gradient norms per step, the trigger and the onsets marked.

    Draws the pre-clip norm of the ``top`` earliest-onset parameters (or of
    ``names``) and the global norm (grey), a vertical line at the trigger step,
    and a dot at each drawn parameter's onset.

    Args:
        incident: the :class:`Incident`.
        names: parameters to draw (default: the first ``top`` onsets, or the
            first ``top`` parameters if none departed).
        ax: an Axes to draw on (default: a new figure).
        top: how many parameters by default, >= 1.
        log: log-scale y axis (exact zeros are left out).

    Returns:
        The matplotlib Axes.

    Raises:
        KeyError: an unknown name.
        ImportError: matplotlib is missing.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> from gradwatch import Incident, find_onsets
        >>> w = History(["a", "b"]); w.append(range(4), [[1, 1], [1, 1], [1, 9], [20, 90]])
        >>> ax = plot_incident(Incident(3, "spike", None, 92.2, 10.0, w, find_onsets(w)))
        >>> [line.get_label() for line in ax.lines[:3]]
        ['b', 'a', 'global norm']
    """
    top = check_int(top, "top", min=1)
    h = incident.history
    if names is None:
        names = [o.name for o in incident.onset[:top]] or h.names[:top]
    names = list(names)
    for n in names:
        h[n]  # KeyError with the closest names
    ax = _axes(ax)
    x = h.steps

    def shown(y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        return np.where(y > 0, y, np.nan) if log else y

    onset = {o.name: o for o in incident.onset}
    for n in names:
        (line,) = ax.plot(x, shown(h[n]), label=n, linewidth=1.4)
        o = onset.get(n)
        if o is not None and o.step in set(x.tolist()):
            y = shown(h[n])[int(np.searchsorted(x, o.step))]
            ax.scatter([o.step], [y], color=line.get_color(), s=40, zorder=4, edgecolor="black")
    ax.plot(x, shown(h.total), color="0.5", linewidth=1.0, linestyle=":", label="global norm")
    trig = incident.kind if incident.kind != "mark" else f"mark: {incident.reason or ''}".rstrip(": ")
    ax.axvline(incident.step, color="crimson", linewidth=1.0, linestyle="--", label=f"trigger ({trig})")
    ax.scatter([], [], color="white", edgecolor="black", s=40, label="onset")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(f"incident at step {incident.step}: steps {incident.start}..{incident.end}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return ax


def plot_stats(
    h: History,
    names: Sequence[str] | None = None,
    ax: Any = None,
    *,
    log: bool = False,
    reduce: str = "max",
) -> Any:
    """The columns of statistics (``History.stats``) over the steps, one line each.

    A ``[S]`` column is drawn as it is; a ``[S, w]`` column (e.g. one value per
    example) is drawn as its per-step ``reduce`` over the ``w`` values (NaN
    left out). Use :func:`plot_stats_heatmap` for the whole matrix.

    Args:
        h: a history with statistics (``GradWatch(stats=[...])``).
        names: the columns (``"<prefix>.<column>"``); default: all.
        ax: an Axes to draw on (default: a new figure).
        log: log-scale y axis.
        reduce: ``"max"``, ``"mean"`` or ``"median"`` for ``[S, w]`` columns.

    Returns:
        The matplotlib Axes.

    Raises:
        KeyError: a name that is not a statistic of ``h`` (the message lists them).
        ValueError: an unknown ``reduce``.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w"]); h.append([0, 1], [[1.0], [2.0]], stats={"noise.b_simple": [3.0, 4.0]})
        >>> ax = plot_stats(h, ["noise.b_simple"])
        >>> ax.lines[0].get_ydata().tolist()
        [3.0, 4.0]
    """
    check_choice(reduce, "reduce", ("max", "mean", "median"))
    stats = h.stats
    names = list(stats) if names is None else list(names)
    for n in names:
        if n not in stats:
            raise KeyError(f"no statistic named {n!r} in this history; statistics are {sorted(stats)}")
    ax = _axes(ax)
    for n in names:
        y = np.asarray(stats[n], dtype=np.float64)
        label = n
        if y.ndim == 2:
            fn = {"max": np.nanmax, "mean": np.nanmean, "median": np.nanmedian}[reduce]
            with warnings.catch_warnings():  # all-NaN rows (no value that step) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                y = fn(y, axis=1) if y.shape[1] else np.full(len(y), np.nan)
            label = f"{n} ({reduce})"
        ax.plot(h.steps, y, label=label, linewidth=1.2)
    return _finish(ax, log, ylabel="value" if len(names) != 1 else names[0])


def plot_stats_heatmap(h: History, name: str, ax: Any = None, *, log: bool = True) -> Any:
    """A ``[S, w]`` statistic (e.g. ``"example.norm"``) as an image: steps across, its ``w`` entries down.

    Args:
        h: a history with the statistic.
        name: the ``[S, w]`` column of ``History.stats``.
        ax: an Axes to draw on.
        log: colour by ``log10`` of the value (non-positive values blank).

    Returns:
        The matplotlib Axes.

    Raises:
        KeyError: ``name`` is not a statistic of ``h``.
        ValueError: the statistic is one number per step.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> h = History(["w"]); h.append([0, 1], [[1.0], [2.0]], stats={"example.norm": [[1.0, 2.0], [3.0, np.nan]]})
        >>> plot_stats_heatmap(h, "example.norm").images[0].get_array().shape
        (2, 2)
    """
    stats = h.stats
    if name not in stats:
        raise KeyError(f"no statistic named {name!r} in this history; statistics are {sorted(stats)}")
    m = np.asarray(stats[name], dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"{name!r} holds one number per step: draw it with plot_stats")
    ax = _axes(ax)
    with np.errstate(all="ignore"):
        shown = np.where(m > 0, np.log10(m), np.nan) if log else m
    steps = h.steps
    extent = (steps[0] - 0.5, steps[-1] + 0.5, m.shape[1] - 0.5, -0.5) if len(steps) else None
    im = ax.imshow(shown.T, aspect="auto", interpolation="nearest", extent=extent)
    ax.figure.colorbar(im, ax=ax, label=f"log10 {name}" if log else name)
    ax.set_xlabel("step")
    ax.set_ylabel("index")
    return ax
