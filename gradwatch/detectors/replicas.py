"""Data-parallel replicas that no longer train the same model.

Under ``DistributedDataParallel`` every rank's optimizer should use the same, all-reduced
gradients. When the wrapper is bypassed (``model.module(x)``), ``no_sync()`` is left on for the
last micro-batch, or a rank changes its gradients after the all-reduce, the ranks' gradients
differ and the replicas drift apart, silently; a checkpoint loaded on one rank only makes the
weights differ while the gradients agree. Every ``replica_every`` checks each rank's
per-parameter gradient and weight norms are reduced to their smallest and largest over the
ranks, in one collective of four values per parameter made on the device in the check (its
answer rides in the check's one host copy); this detector compares them
(:attr:`CheckContext.replica_low` and ``replica_high``).
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from gradwatch import _checks
from gradwatch.detectors.base import CheckContext, Detector, Option, Phase
from gradwatch.findings import Finding, Kind, _fmt, _names

TOLERANCE = 1e-3
"""Relative difference between the ranks' norms of one gradient, (largest - smallest) /
largest, above which the replicas differ. All-reduced gradients are bit-for-bit equal on every
rank (compression hooks included: every rank receives the same reduced values)."""
WEIGHT_TOLERANCE = 1e-6
"""The same for the weights, which the same steps on the same gradients keep bit-for-bit equal
(a few float32 roundings of a norm at most)."""

GRADIENTS = "gradients"
WEIGHTS = "weights"


def _replica_divergence(f: Finding) -> str:
    by = f"by {_fmt(f.value)} of the largest, limit {_fmt(f.threshold)}"
    if f.cause == WEIGHTS:
        return (
            f"the weights of {_names(f)} differ between data-parallel ranks (the ranks' norms "
            f"differ {by}) although their gradients agree: the replicas started apart or were "
            f"changed on one rank (a checkpoint loaded on rank 0 only, a weight edited on one "
            f"rank). Load checkpoints on every rank (or before wrapping the model in "
            f"DistributedDataParallel, which broadcasts rank 0's weights), and change weights "
            f"on every rank alike."
        )
    return (
        f"the gradients of {_names(f)} differ between data-parallel ranks (the ranks' norms "
        f"differ {by}): the replicas no longer train the same model. Call the "
        f"DistributedDataParallel wrapper, not model.module, in the forward pass; leave "
        f"no_sync() for the last micro-batch of each accumulation window; and change no "
        f"gradient on one rank only after backward()."
    )


class ReplicaDetector(Detector):
    """Reports ``replica_divergence`` for the parameters whose gradient norms differ between
    ranks by more than :data:`TOLERANCE` (relative; ``cause`` ``"gradients"``), or, when the
    gradients agree, whose weight norms differ by more than :data:`WEIGHT_TOLERANCE`
    (``"weights"``), at a check where the ranks' norms were reduced (every ``replica_every``
    checks, under a ``DistributedDataParallel`` model). Names them by relative difference,
    largest first (``value`` is the largest). Gradients that are non-finite or absent on some
    rank are not compared (the ``nan``/``inf`` rules see them).
    """

    name = "replicas"
    kinds = MappingProxyType({Kind.REPLICA_DIVERGENCE: _replica_divergence})
    options = (
        Option(
            "replica_every",
            10,
            lambda name, value, _: _checks.int_at_least(name, value, 1),
            "checks between comparisons of the data-parallel ranks' gradients",
        ),
    )
    phase = Phase.STATISTICS

    def check(self, ctx: CheckContext) -> list[Finding]:
        if ctx.replica_low is None or ctx.replica_high is None:
            return []
        low = ctx.replica_low.numpy().astype(np.float64)
        high = ctx.replica_high.numpy().astype(np.float64)
        comparable = (low >= 0) & np.isfinite(high) & (high > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = np.where(comparable, (high - low) / high, 0.0)
        count = len(ctx.replica_positions)
        for cause, part, limit in (
            (GRADIENTS, spread[:count], TOLERANCE),
            (WEIGHTS, spread[count:], WEIGHT_TOLERANCE),
        ):
            diverged = np.flatnonzero(part > limit)
            if not len(diverged):
                continue
            order = diverged[np.argsort(-part[diverged], kind="stable")]
            names = tuple(ctx.table.names[ctx.replica_positions[j]] for j in order[:5])
            return [
                Finding(
                    Kind.REPLICA_DIVERGENCE,
                    ctx.step,
                    names[0],
                    value=float(part[order[0]]),
                    threshold=limit,
                    params=names,
                    cause=cause,
                )
            ]
        return []
