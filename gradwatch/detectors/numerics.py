"""NaN and Inf in the gradients the optimizer is about to use, localised to parameters."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradwatch.detectors.base import CheckContext, by_arrival
from gradwatch.findings import Finding, Kind


class NumericsDetector:
    """Reports ``nan`` and ``inf`` from the per-parameter norms.

    A NaN anywhere in a gradient makes its norm NaN, so a NaN norm is proof. An infinite norm is
    either a real +/-Inf or finite values whose squares overflow float32 (|g| > ~1.8e19); when the
    gradients are still at hand the largest |value| tells them apart, and an overflow is left to
    the magnitude detector with the largest |value| standing in for the norm.
    """

    needs_statistics = True

    def check(self, ctx: CheckContext) -> list[Finding]:
        norms = ctx.host_norms()
        if np.isfinite(norms.numpy()).all():  # the common case, at a numpy call's cost
            return []
        nan_at = torch.isnan(norms)
        inf_at = torch.isinf(norms)
        positions = inf_at.nonzero().flatten().tolist()
        if positions and ctx.max_abs is not None:
            largest = ctx.max_abs(positions)
            for position, value in zip(positions, largest.tolist(), strict=True):
                if math.isfinite(value):
                    inf_at[position] = False
                    norms[position] = value  # a lower bound of the norm, for the exploding check
        findings = []
        for kind, mask in ((Kind.NAN, nan_at), (Kind.INF, inf_at)):
            affected = [ctx.indices[j] for j in mask.nonzero().flatten().tolist()]
            if affected:
                names = tuple(ctx.table.names[i] for i in by_arrival(ctx, affected))
                findings.append(
                    Finding(kind, ctx.step, names[0], value=float(len(names)), params=names)
                )
        return findings

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
