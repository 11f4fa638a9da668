"""Gradient statistics and findings through a Lightning logger: CSV, W&B, MLflow, ..."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch

from gradwatch import _checks
from gradwatch._histograms import GradientHistograms
from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError
from gradwatch.sinks.base import Sink
from gradwatch.sinks.tensorboard import finding_markdown

FINDINGS_ARTIFACT = "gradwatch/findings.md"
"""The MLflow artifact that holds the findings so far, one line each."""

FINDINGS_COLUMNS = ("step", "rank", "kind", "param", "message")
"""The columns of the W&B table ``gradwatch/findings``."""


class LoggerSink(Sink):
    """Writes gradwatch's scalars through ``logger.log_metrics``, with the TensorBoard sink's tags.

    ``logger`` is any Lightning logger, of ``lightning.pytorch`` or ``pytorch_lightning``
    (``CSVLogger``, ``WandbLogger``, ``MLflowLogger``, ...), or any object with a
    ``log_metrics(metrics, step)`` method; neither Lightning nor a tracking library is imported
    here. It sends ``gradwatch/grad_norm/total`` at every check, ``gradwatch/grad_norm/<param>``
    every ``param_every`` steps (0: never), ``gradwatch/sgd_update_ratio/<param>`` whenever the
    core sends ratios, ``gradwatch/grad_nan/<param>`` and ``gradwatch/grad_inf/<param>`` at
    histogram steps, and ``gradwatch/findings/<kind>`` (findings of that kind so far) at the
    step of each finding. Where the backend can take more, it gets more:

    - W&B (a ``wandb`` module already imported and the logger's ``experiment`` one of its
      runs): histograms ``gradwatch/grad/<param>`` as ``wandb.Histogram`` of the finite values,
      and the table ``gradwatch/findings`` (all findings so far) through ``logger.log_text``.
      Both go through ``logger.log_metrics``, on the x-axis Lightning gives W&B.
    - MLflow (a logger with a ``run_id``): the findings so far, rewritten to the run's artifact
      ``gradwatch/findings.md`` with ``logger.experiment.log_text``.
    - Any other logger: the scalars only.

    Non-finite values: a total norm that is NaN (no finite gradient norm) and an update ratio
    that is NaN (unknown) are left out, as in TensorBoard. A NaN or Inf per-parameter norm is
    measured data and is sent as it is: ``CSVLogger`` writes ``nan``/``inf``, W&B keeps them in
    the run's history (its line charts draw no NaN point), other loggers get the float. MLflow
    stores ±Inf as the largest float and some of its pages fail on NaN, so there such a norm is
    left out; the NaN/Inf counts and the findings say what happened.

    The logger stays Lightning's: :meth:`flush` calls ``logger.save()`` (also after each
    finding, so that a run killed right after keeps it), and :meth:`close` flushes and then
    drops every later write, but never closes or finalises the logger.

    A Lightning ``TensorBoardLogger`` is not for this sink: give its ``experiment`` (a
    ``SummaryWriter``) to :class:`~gradwatch.sinks.TensorBoardSink`, which also writes raw
    histograms, text and the gradient-flow figure (``GradWatchCallback`` does this by itself for
    the Trainer's ``TensorBoardLogger``).

    Args:
        logger: The logger.
        param_every: Steps between per-parameter gradient norms (0: none).

    Raises:
        GradWatchTypeError: ``logger`` has no ``log_metrics`` method, or ``param_every`` is not
            an int.
        GradWatchValueError: ``param_every`` is negative.

    Example:
        >>> import pathlib, tempfile, torch
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> logger = CSVLogger(tempfile.mkdtemp())
        >>> sink = LoggerSink(logger)
        >>> sink.write_check(0, ["fc.weight"], torch.tensor([0.5]), 0.5)
        >>> sink.close()  # saves the logger, and leaves it open
        >>> print(pathlib.Path(logger.log_dir, "metrics.csv").read_text().strip())
        gradwatch/grad_norm/fc.weight,gradwatch/grad_norm/total,step
        0.5,0.5,0
    """

    def __init__(self, logger: Any, *, param_every: int = 10) -> None:
        # ``Any``: a logger of either Lightning namespace, or a look-alike; none is imported.
        if isinstance(logger, type) or not callable(getattr(logger, "log_metrics", None)):
            raise GradWatchTypeError(
                f"LoggerSink: logger must be a Lightning logger (an object with a "
                f"log_metrics(metrics, step) method); got {_checks.received(logger)}"
            )
        if isinstance(param_every, bool) or not isinstance(param_every, int):
            raise GradWatchTypeError(
                f"LoggerSink: param_every must be an int >= 0; got "
                f"{type(param_every).__name__} {param_every!r:.40}"
            )
        if param_every < 0:
            raise GradWatchValueError(
                f"LoggerSink: param_every must be an int >= 0; got {param_every}"
            )
        self.logger = logger
        self._param_every = param_every
        # Looked up on the class: Lightning's DummyLogger answers every attribute.
        self._mlflow = hasattr(type(logger), "run_id")
        self._counts: dict[str, int] = {}
        self._findings: list[tuple[Finding, int]] = []
        self._closed = False

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        if self._closed:
            return
        metrics: dict[str, Any] = {}
        if math.isfinite(total_norm):
            metrics["gradwatch/grad_norm/total"] = float(total_norm)
        if self._param_every and step % self._param_every == 0:
            for name, norm in zip(names, norms.tolist(), strict=True):
                if not self._mlflow or math.isfinite(norm):
                    metrics[f"gradwatch/grad_norm/{name}"] = norm
        self._log(metrics, step)

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        if self._closed:
            return
        metrics: dict[str, Any] = {}
        nans, infs = histograms.nan.tolist(), histograms.inf.tolist()
        for name, nan, inf in zip(names, nans, infs, strict=True):
            metrics[f"gradwatch/grad_nan/{name}"] = nan
            metrics[f"gradwatch/grad_inf/{name}"] = inf
        wandb = self._wandb()
        if wandb is not None:
            for j, (name, finite) in enumerate(zip(names, histograms.finite.tolist(), strict=True)):
                if finite > 0:  # no finite value: nothing to draw, the counts above say why
                    counts = histograms.counts[j].numpy()
                    edges = histograms.edges(j).numpy()
                    metrics[f"gradwatch/grad/{name}"] = wandb.Histogram(
                        np_histogram=(counts, edges)
                    )
        self._log(metrics, step)

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        if self._closed:
            return
        self._log(
            {
                f"gradwatch/sgd_update_ratio/{name}": ratio
                for name, ratio in zip(names, ratios.tolist(), strict=True)
                if math.isfinite(ratio)
            },
            step,
        )

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        if self._closed:
            return
        kind = finding.kind.value
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._log({f"gradwatch/findings/{kind}": float(self._counts[kind])}, finding.step)
        self._findings.append((finding, rank or 0))
        self._write_findings_text(finding.step)
        self.flush()  # findings are rare; a run killed right after keeps them

    def _write_findings_text(self, step: int) -> None:
        """Every finding so far, as a W&B table or an MLflow artifact (each replaces the last)."""
        if self._wandb() is not None and callable(getattr(type(self.logger), "log_text", None)):
            rows = [[f.step, r, f.kind.value, f.param or "", f.message] for f, r in self._findings]
            self.logger.log_text(
                key="gradwatch/findings", columns=list(FINDINGS_COLUMNS), data=rows, step=step
            )
        elif self._mlflow:
            run_id = self.logger.run_id
            log_text = getattr(getattr(self.logger, "experiment", None), "log_text", None)
            if isinstance(run_id, str) and callable(log_text):
                lines = [f"- {finding_markdown(f, rank=r)}\n" for f, r in self._findings]
                log_text(run_id, "".join(lines), FINDINGS_ARTIFACT)

    def _wandb(self) -> types.ModuleType | None:
        """The ``wandb`` module when it is imported and the logger writes to one of its runs."""
        wandb = sys.modules.get("wandb")
        if wandb is None:
            return None
        experiment = getattr(self.logger, "experiment", None)
        return wandb if type(experiment).__module__.partition(".")[0] == "wandb" else None

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if metrics:
            self.logger.log_metrics(metrics, step)

    def flush(self) -> None:
        if self._closed:
            return
        save = getattr(self.logger, "save", None)
        if callable(save):
            save()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
