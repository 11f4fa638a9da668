"""Missing ``zero_grad`` and unexpected gradient accumulation.

Both look at the accumulated ``.grad`` the optimizer is about to use, through the hooks'
bookkeeping only (no tensor values): whether it still carries the previous step's gradient, and
how many backward passes went into it.
"""

from __future__ import annotations

from typing import Any

from gradwatch.detectors.base import CheckContext, by_arrival
from gradwatch.findings import Finding, Kind


class AccumulationDetector:
    """Reports ``missing_zero_grad`` and ``unexpected_accumulation``.

    Args:
        accumulation_steps: Backward passes the user means to accumulate per optimizer step.
    """

    needs_statistics = False

    def __init__(self, accumulation_steps: int = 1) -> None:
        self.accumulation_steps = accumulation_steps

    def check(self, ctx: CheckContext) -> list[Finding]:
        is_stale, passes_into = ctx.tracker.stale, ctx.tracker.passes_into
        findings = []
        stale = [i for i in ctx.indices if is_stale[i]]
        if stale:
            names = tuple(ctx.table.names[i] for i in by_arrival(ctx, stale))
            findings.append(Finding(Kind.MISSING_ZERO_GRAD, ctx.step, names[0], params=names))
        limit = self.accumulation_steps
        over = [i for i in ctx.indices if passes_into[i] > limit]
        if over:
            names = tuple(ctx.table.names[i] for i in by_arrival(ctx, over))
            passes = max(passes_into[i] for i in over)
            findings.append(
                Finding(
                    Kind.UNEXPECTED_ACCUMULATION,
                    ctx.step,
                    names[0],
                    value=float(passes),
                    threshold=float(limit),
                    params=names,
                )
            )
        return findings

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
