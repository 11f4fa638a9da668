"""The findings log: one JSON object per line, written and flushed the moment a finding is made."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from gradwatch.findings import Finding

FINDINGS_LOG_NAME = "gradwatch-findings.jsonl"
SCHEMA_VERSION = 1


def finding_record(
    finding: Finding, *, rank: int = 0, wall_time: float | None = None
) -> dict[str, Any]:
    """The JSON object the findings log holds for ``finding`` (schema version 1)."""
    return {
        "schema": SCHEMA_VERSION,
        "kind": finding.kind.value,
        "step": finding.step,
        "param": finding.param,
        "params": list(finding.params),
        "value": _json_number(finding.value),
        "threshold": _json_number(finding.threshold),
        "message": finding.message,
        "wall_time": time.time() if wall_time is None else wall_time,
        "rank": rank,
    }


class FindingsLog:
    """Appends each finding to ``<log_dir>/gradwatch-findings.jsonl``.

    Each line is flushed as it is written, so a process that crashes or is killed keeps every
    finding it reported.
    """

    def __init__(self, log_dir: str, *, rank: int = 0) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, FINDINGS_LOG_NAME)
        self._rank = rank
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        pass

    def write_histograms(self, step: int, names: Sequence[str], histograms: object) -> None:
        pass

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        pass

    def write_finding(self, finding: Finding) -> None:
        line = json.dumps(finding_record(finding, rank=self._rank), allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity; write those as the strings "nan", "inf", "-inf"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)
