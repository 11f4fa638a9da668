"""NaN and Inf in the gradients the optimizer is about to use, localised to parameters."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np

from gradwatch import _state
from gradwatch.detectors.base import CheckContext, Detector, Phase, by_arrival
from gradwatch.findings import Finding, Kind, _names, _where


def _nan(f: Finding) -> str:
    return (
        f"the gradient of {_where(f)} holds NaN (affected, in backward order: {_names(f)}). The "
        f"first of them is nearest to where the NaN entered: look for log(0), 0/0, sqrt of a "
        f"negative or an overflowing loss there; torch.autograd.detect_anomaly() names the "
        f"operation."
    )


def _inf(f: Finding) -> str:
    return (
        f"the gradient of {_where(f)} holds +/-Inf or values too large to square in float32 "
        f"(affected, in backward order: {_names(f)}). Lower the learning rate, clip gradients "
        f"(torch.nn.utils.clip_grad_norm_), or use torch.amp.GradScaler with float16."
    )


class NumericsDetector(Detector):
    """Reports ``nan`` and ``inf`` from the per-parameter norms.

    A NaN anywhere in a gradient makes its norm NaN, so a NaN norm is proof. An infinite norm is
    either a real +/-Inf or finite values whose squares overflow float32 (|g| > ~1.8e19); the
    check's statistics tell them apart (:attr:`CheckContext.overflowed`, from the largest
    |value| while the gradients are still at hand), and an overflow is left to the magnitude
    detector, which reads :attr:`CheckContext.magnitudes`.
    """

    name = "numerics"
    kinds = MappingProxyType({Kind.NAN: _nan, Kind.INF: _inf})
    phase = Phase.STATISTICS

    def check(self, ctx: CheckContext) -> list[Finding]:
        norms = ctx.host_norms().numpy()
        if np.isfinite(norms).all():  # the common case, at a numpy call's cost
            return []
        nan_at = np.isnan(norms)
        inf_at = np.isinf(norms)
        if ctx.overflowed is not None:
            inf_at &= ~ctx.overflowed.numpy()
        findings = []
        for kind, mask in ((Kind.NAN, nan_at), (Kind.INF, inf_at)):
            affected = [ctx.indices[j] for j in np.flatnonzero(mask).tolist()]
            if affected:
                names = tuple(ctx.table.names[i] for i in by_arrival(ctx, affected))
                findings.append(
                    Finding(kind, ctx.step, names[0], value=float(len(names)), params=names)
                )
        return findings

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This detector keeps no history: its state is an empty dict.

        Raises:
            GradWatchTypeError: ``state`` is not a dict.
            GradWatchValueError: ``state`` holds a key.
        """
        _state.fields(state, ())
