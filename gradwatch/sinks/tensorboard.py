"""TensorBoard output: gradient norms and findings as standard event files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gradwatch.findings import Finding

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class TensorBoardSink:
    """Writes under ``log_dir`` (tensorboard must be installed).

    Tags: ``gradwatch/grad_norm/total`` every check, ``gradwatch/grad_norm/<param>`` every
    ``param_every`` steps, ``gradwatch/findings/<kind>`` (count so far) and a text entry
    ``gradwatch/findings`` for every finding, at the step it was found.
    """

    def __init__(self, log_dir: str, *, param_every: int = 10) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer: SummaryWriter = SummaryWriter(log_dir=log_dir)
        self._param_every = param_every
        self._counts: dict[str, int] = {}

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        writer = self._writer
        if math.isfinite(total_norm):
            writer.add_scalar("gradwatch/grad_norm/total", total_norm, step)
        if self._param_every and step % self._param_every == 0:
            for name, norm in zip(names, norms.tolist(), strict=True):
                writer.add_scalar(f"gradwatch/grad_norm/{name}", norm, step)

    def write_finding(self, finding: Finding) -> None:
        kind = finding.kind.value
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._writer.add_scalar(f"gradwatch/findings/{kind}", self._counts[kind], finding.step)
        self._add_text(
            "gradwatch/findings", f"**{kind}** `{finding.param}`: {finding.message}", finding.step
        )

    def _add_text(self, tag: str, text: str, step: int) -> None:
        # SummaryWriter.add_text would file it under "<tag>/text_summary"; keep the tag as given.
        from torch.utils.tensorboard.summary import text as text_summary

        summary = text_summary(tag, text)  # type: ignore[no-untyped-call]
        summary.value[0].tag = tag
        self._writer._get_file_writer().add_summary(summary, step)  # type: ignore[no-untyped-call]

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
