"""Inputs for the sink contract tests, and logger look-alikes that keep every call."""

from __future__ import annotations

import math
import pathlib
import types
from typing import Any

import torch

from gradwatch._histograms import GradientHistograms, histogram_rows
from gradwatch.findings import Finding, Kind
from gradwatch.sinks import Sink

NAMES = ["fc.weight", "fc.bias", "out.weight"]
BINS = 8

NAN_FINDING = Finding(Kind.NAN, 10, "fc.weight", params=("fc.weight", "fc.bias"))
INF_FINDING = Finding(Kind.INF, 10, "fc.bias", value=math.inf, params=("fc.bias",))
MODEL_FINDING = Finding(Kind.SKIPPED_STEP, 11, None, params=("fc.weight",))


def nonfinite_histograms() -> GradientHistograms:
    """One row per name: some NaN, only NaN and ±Inf, and finite values only."""
    grads = [
        torch.tensor([1.0, math.nan, 2.0, -3.0]),
        torch.tensor([math.nan, math.inf, -math.inf]),
        torch.tensor([0.5, -0.25, 0.125, 4.0]),
    ]
    return GradientHistograms(histogram_rows(grads, BINS))


def empty_histograms() -> GradientHistograms:
    return GradientHistograms(histogram_rows([], BINS))


def feed(sink: Sink) -> None:
    """Every call the core makes, with the edge cases a sink must take: NaN and Inf norms, a
    check of no parameter (no norm, total NaN), histograms and ratios holding NaN and Inf, and
    findings without a rank, with rank 0 and with rank 3."""
    inf, nan = math.inf, math.nan
    sink.write_check(0, NAMES, torch.tensor([nan, inf, 3.0]), 3.0)
    sink.write_check(1, NAMES, torch.tensor([1.0, 2.0, 2.0]), 3.0)
    sink.write_check(10, NAMES, torch.tensor([nan, nan, inf]), nan)
    sink.write_check(11, [], torch.zeros(0), nan)
    sink.write_histograms(10, NAMES, nonfinite_histograms())
    sink.write_histograms(11, [], empty_histograms())
    sink.write_update_ratios(10, NAMES, torch.tensor([nan, 0.25, inf]))
    sink.write_update_ratios(11, [], torch.zeros(0))
    sink.write_finding(NAN_FINDING, rank=0)
    sink.write_finding(INF_FINDING, rank=3)
    sink.write_finding(MODEL_FINDING)
    sink.flush()


def snapshot(directory: pathlib.Path | None) -> dict[str, bytes]:
    """Every file under ``directory`` with its content (empty for ``None``)."""
    if directory is None or not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


class RecordingLogger:
    """A Lightning logger look-alike (``log_metrics``, ``save``, ``finalize``) keeping its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.calls.append(("log_metrics", dict(metrics), step))

    def save(self) -> None:
        self.calls.append(("save",))

    def finalize(self, status: str) -> None:
        self.calls.append(("finalize", status))

    def metrics(self) -> list[tuple[dict[str, Any], int | None]]:
        return [(call[1], call[2]) for call in self.calls if call[0] == "log_metrics"]


class FakeHistogram:
    """What ``wandb.Histogram(np_histogram=(counts, edges))`` keeps."""

    def __init__(self, *, np_histogram: tuple[Any, Any]) -> None:
        counts, edges = np_histogram
        assert len(edges) == len(counts) + 1
        self.counts = [float(c) for c in counts]
        self.edges = [float(e) for e in edges]


def fake_wandb() -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.Histogram = FakeHistogram  # type: ignore[attr-defined]
    return module


class _Run:
    """Stands for a ``wandb`` run: only its module is looked at."""


_Run.__module__ = "wandb.sdk.wandb_run"


class WandbLikeLogger(RecordingLogger):
    """A ``WandbLogger`` look-alike: a W&B run as experiment, and ``log_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.experiment = _Run()

    def log_text(
        self,
        key: str,
        columns: list[str] | None = None,
        data: list[list[Any]] | None = None,
        dataframe: Any = None,
        step: int | None = None,
    ) -> None:
        self.calls.append(("log_text", key, columns, [list(row) for row in data or []], step))


class _MlflowClient:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self._calls = calls

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._calls.append(("experiment.log_text", run_id, text, artifact_file))


class MlflowLikeLogger(RecordingLogger):
    """An ``MLflowLogger`` look-alike: a ``run_id``, and an ``MlflowClient`` as experiment."""

    @property
    def run_id(self) -> str:
        return "run-1"

    @property
    def experiment(self) -> _MlflowClient:
        return _MlflowClient(self.calls)


class BrokenSink(Sink):
    """Fails at every write; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def write_check(self, step: int, names: Any, norms: torch.Tensor, total_norm: float) -> None:
        self.calls += 1
        raise OSError("disk full")

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        self.calls += 1
        raise OSError("disk full")

    def close(self) -> None:
        self.closed = True
