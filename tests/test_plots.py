"""Figures that read right: zeros on log axes, event markers in the legend, legends beside many lines,
and per-tensor bounds in plot_clipping never drawn as bounds on the global norm."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import gradwatch as gw
from gradwatch.history import History


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labels(ax):
    legend = ax.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend is not None else []


def _history_with_zeros():
    h = History(["w", "u"])
    h.append([0, 1, 2, 3], [[1.0, 1e-4], [2.0, 0.0], [3.0, 0.0], [4.0, 2e-4]])
    return h


def test_log_norms_draw_exact_zeros_at_a_floor_and_say_so():
    h = _history_with_zeros()
    ax = gw.plot_norms(h, log=True)
    u = next(line for line in ax.lines if line.get_label() == "u")
    y = np.asarray(u.get_ydata(), dtype=float)
    assert (y > 0).all()  # nothing left for the log axis to drop
    assert y[1] == y[2] == pytest.approx(1e-5)  # one decade below the smallest positive value (1e-4)
    assert ax.get_ylim()[0] <= 1e-5  # the floor is inside the axis
    assert any(lab.startswith("exactly 0 (drawn at 1e-05)") for lab in _labels(ax))
    # the zeros are marked, in the line's colour
    marks = [c for c in ax.collections if len(c.get_offsets()) == 2]
    assert marks and np.allclose(np.asarray(marks[0].get_offsets())[:, 0], [1, 2])


def test_linear_norms_keep_the_book_values_and_no_zero_legend():
    h = _history_with_zeros()
    ax = gw.plot_norms(h, log=False)
    u = next(line for line in ax.lines if line.get_label() == "u")
    np.testing.assert_array_equal(u.get_ydata(), h["u"])
    assert not any(lab.startswith("exactly 0") for lab in _labels(ax))


def test_taps_with_exact_zeros_stay_visible_on_a_log_axis():
    h = History(["w"])
    h.append([0, 1], [[1.0], [1.0]], taps={"h1": [0.5, 0.0], "h2": [1.0, 0.0], "h3": [2.0, 3.0]})
    ax = gw.plot_taps(h)
    step1 = next(line for line in ax.lines if line.get_label() == "step 1")
    y = np.asarray(step1.get_ydata(), dtype=float)
    assert y[0] == y[1] == pytest.approx(0.01) and y[2] == 3.0
    assert "exactly 0 (drawn at 1e-02)" in _labels(ax)


def test_event_markers_appear_in_the_legend_by_kind():
    h = History(["w", "u"])
    events = [gw.Event(1, "spike", "w", 50.0, 10.0), gw.Event(2, "vanishing", "u", 1e-3, 1e-2)]
    h.append([0, 1, 2], [[1.0, 1.0], [50.0, 1e-3], [1.0, 1e-3]], events=events)
    ax = gw.plot_norms(h, log=True)
    labels = _labels(ax)
    assert "spike event" in labels and "vanishing event" in labels
    assert not any("event" in lab for lab in _labels(gw.plot_norms(h, events=False)))


def test_many_clipped_parameters_keep_the_legend_off_the_data():
    names = [f"layer{i}.weight" for i in range(8)]
    h = History(names)
    norms = np.arange(1.0, 25.0).reshape(3, 8)
    h.append([0, 1, 2], norms, norms_clipped=norms / 2)
    ax = gw.plot_norms(h, clipped=True)
    labels = _labels(ax)
    assert labels.count("dashed: post-clip") == 1  # one entry for the style, not one per parameter
    assert not any(lab.endswith("(clipped)") for lab in labels)
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1  # placed beside the axes


def _watched_run(clipper):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    watch = gw.GradWatch(model, clipper=clipper)
    for _ in range(5):
        (100 * model(torch.randn(16, 4))).square().sum().backward()
        watch.step()
        model.zero_grad()
    watch.close()
    return watch.history


def test_plot_clipping_draws_a_per_tensor_bound_against_the_largest_tensor():
    h = _watched_run(gw.ClipByNorm(5.0))
    assert (h.total_clipped > 5.0).all()  # four tensors at 5 each: the global norm sits above the bound
    ax = gw.plot_clipping(h)
    labels = _labels(ax)
    assert "threshold (global norm)" not in labels
    assert "per-tensor bound (not a bound on the global norm)" in labels
    largest = next(line for line in ax.lines if line.get_label() == "largest tensor (post-clip)")
    np.testing.assert_allclose(largest.get_ydata(), h.norms_clipped.max(axis=1))
    assert (np.asarray(largest.get_ydata()) <= 5.0 * (1 + 1e-5)).all()
    assert ax.get_legend().get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1  # beside the data


def test_plot_clipping_draws_a_global_threshold_for_global_clipping():
    h = _watched_run(gw.ClipByGlobalNorm(1.0))
    ax = gw.plot_clipping(h)
    labels = _labels(ax)
    assert "threshold (global norm)" in labels and not any("per-tensor" in lab for lab in labels)
    assert "clipped (100% of steps)" in labels


def test_plot_clipping_threshold_choice_is_validated_and_honoured():
    h = _watched_run(gw.ClipByNorm(5.0))
    assert not any("bound" in lab for lab in _labels(gw.plot_clipping(h, threshold="none")))
    assert "threshold (global norm)" in _labels(gw.plot_clipping(h, threshold="global"))
    with pytest.raises(ValueError, match="threshold"):
        gw.plot_clipping(h, threshold="max")
