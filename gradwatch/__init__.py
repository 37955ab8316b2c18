"""gradwatch: watch, detect and clip PyTorch gradients without host syncs.

Example:
    >>> import torch, gradwatch as gw
    >>> model = torch.nn.Linear(4, 2)
    >>> watch = gw.GradWatch(model, clipper=gw.ClipByGlobalNorm(5.0), detectors=[gw.NonFinite()])
    >>> model(torch.randn(3, 4)).sum().backward(); watch.step()
    >>> watch.history.names
    ['weight', 'bias']
"""

from importlib.metadata import PackageNotFoundError, version

from gradwatch.clip import (
    AGC,
    AutoClip,
    Chain,
    ClipByGlobalNorm,
    ClipByNorm,
    ClipByValue,
    ClipContext,
    Clipper,
    ClipResult,
    GlobalClipper,
    ZClip,
)
from gradwatch.contrib import SCALAR, Binding, Contributor, StepView
from gradwatch.detect import (
    Detector,
    Event,
    GradientAnomalyError,
    GradientWarning,
    NonFinite,
    Spike,
    Threshold,
    Vanishing,
)
from gradwatch.forensics import FlightRecorder, find_onsets
from gradwatch.history import History
from gradwatch.incidents import Incident, Onset
from gradwatch.plot import (
    plot_clipping,
    plot_compare,
    plot_heatmap,
    plot_incident,
    plot_norms,
    plot_stats,
    plot_stats_heatmap,
    plot_taps,
)
from gradwatch.sinks import CallbackSink, CSVSink, JSONLSink, Sink, TensorBoardSink, read_csv, read_jsonl
from gradwatch.stats import NoiseScale, PerExampleNorms
from gradwatch.syncs import count_host_syncs
from gradwatch.watch import GradWatch

try:
    __version__ = version("gradwatch")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AGC",
    "SCALAR",
    "AutoClip",
    "Binding",
    "CSVSink",
    "CallbackSink",
    "Chain",
    "ClipByGlobalNorm",
    "ClipByNorm",
    "ClipByValue",
    "ClipContext",
    "ClipResult",
    "Clipper",
    "Contributor",
    "Detector",
    "Event",
    "FlightRecorder",
    "GlobalClipper",
    "GradWatch",
    "GradientAnomalyError",
    "GradientWarning",
    "History",
    "Incident",
    "JSONLSink",
    "NoiseScale",
    "NonFinite",
    "Onset",
    "PerExampleNorms",
    "Sink",
    "Spike",
    "StepView",
    "TensorBoardSink",
    "Threshold",
    "Vanishing",
    "ZClip",
    "__version__",
    "count_host_syncs",
    "find_onsets",
    "plot_clipping",
    "plot_compare",
    "plot_heatmap",
    "plot_incident",
    "plot_norms",
    "plot_stats",
    "plot_stats_heatmap",
    "plot_taps",
    "read_csv",
    "read_jsonl",
]
