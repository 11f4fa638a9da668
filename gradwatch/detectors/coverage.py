"""Parameters that never get a gradient, and parameters that get one but that no optimizer updates.

Both work from the hooks' record of which parameters received gradients, and from the watched
optimizers' parameter groups; no tensor values are read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch.detectors.base import CheckContext
from gradwatch.findings import Finding, Kind


class CoverageDetector:
    """Reports ``no_grad`` and ``not_in_optimizer``, each once per parameter.

    Args:
        no_grad_after: Backward passes after which a trainable parameter that has never received
            a gradient is reported. Only passes that reached the parameter's optimizer (gave
            gradients to some of its parameters) count, so a generator that steps once per five
            discriminator passes is not reported.
        optimized: Returns the set of parameter positions the watched optimizers update, or
            ``None`` while that is not known yet.
        passes_reaching: Returns, for each given position, the backward passes that reached the
            optimizer owning it (all passes for a parameter no optimizer owns).
    """

    needs_statistics = False

    def __init__(
        self,
        no_grad_after: int,
        optimized: Callable[[], frozenset[int] | None],
        passes_reaching: Callable[[list[int]], list[int]],
    ) -> None:
        self.no_grad_after = no_grad_after
        self._optimized = optimized
        self._passes_reaching = passes_reaching
        self._reported_no_grad: set[int] = set()
        self._reported_orphans: set[int] = set()
        self._seen_received = -1
        self._seen_optimized: frozenset[int] | None = None

    def check(self, ctx: CheckContext) -> list[Finding]:
        tracker = ctx.tracker
        table = ctx.table
        findings = []
        received = tracker.received
        unaccounted = len(table) - tracker.received_count - len(self._reported_no_grad)
        if tracker.backward_passes >= self.no_grad_after and unaccounted > 0:
            candidates = [
                i
                for i in range(len(table))
                if not received[i]
                and table.params[i].requires_grad
                and i not in self._reported_no_grad
            ]
            passes = self._passes_reaching(candidates)
            missing = [
                (i, n) for i, n in zip(candidates, passes, strict=True) if n >= self.no_grad_after
            ]
            if missing:
                self._reported_no_grad.update(i for i, _ in missing)
                names = tuple(table.names[i] for i, _ in missing)
                findings.append(
                    Finding(
                        Kind.NO_GRAD,
                        ctx.step,
                        names[0],
                        value=float(max(n for _, n in missing)),
                        threshold=float(self.no_grad_after),
                        params=names,
                    )
                )
        optimized = self._optimized()
        if optimized is not None and (
            optimized is not self._seen_optimized or tracker.received_count != self._seen_received
        ):
            self._seen_optimized = optimized
            self._seen_received = tracker.received_count
            orphans = [
                i
                for i in range(len(table))
                if received[i] and i not in optimized and i not in self._reported_orphans
            ]
            if orphans:
                self._reported_orphans.update(orphans)
                names = tuple(table.names[i] for i in orphans)
                findings.append(Finding(Kind.NOT_IN_OPTIMIZER, ctx.step, names[0], params=names))
        return findings

    def state_dict(self) -> dict[str, Any]:
        return {
            "reported_no_grad": sorted(self._reported_no_grad),
            "reported_orphans": sorted(self._reported_orphans),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reported_no_grad = {int(i) for i in state["reported_no_grad"]}
        self._reported_orphans = {int(i) for i in state["reported_orphans"]}
        self._seen_received = -1
        self._seen_optimized = None
