"""Parameters that never get a gradient, and parameters that get one but that no optimizer updates.

Both work from the hooks' record of which parameters received gradients, and from the watched
optimizers' parameter groups; no tensor values are read.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from gradwatch import _checks, _state
from gradwatch.detectors.base import CheckContext, Detector, Option, Phase, Setup
from gradwatch.findings import Finding, Kind, _fmt_int, _names, _plural

IDLE_OPTIMIZER = "idle_optimizer"
"""``no_grad``'s cause when a whole optimizer steps and none of its parameters ever receives a
gradient."""


def _no_grad(f: Finding) -> str:
    if f.cause == IDLE_OPTIMIZER:
        return (
            f"the optimizer of {_names(f)} has stepped {_fmt_int(f.value)} times and none of its "
            f"parameters has received a gradient: they are not connected to the loss (a forward "
            f"pass under torch.no_grad(), a .detach(), or a module the loss never uses), so "
            f"this optimizer trains nothing. Connect them, or leave this optimizer out."
        )
    return (
        f"{_names(f)} {_plural(f, 'requires', 'require')} grad but received no gradient in "
        f"{_fmt_int(f.value)} backward passes: not connected to the loss (a .detach(), "
        f"torch.no_grad(), or a layer the forward pass never uses). Connect "
        f"{_plural(f, 'it', 'them')}, or freeze {_plural(f, 'it', 'them')} with "
        f"requires_grad_(False)."
    )


def _not_in_optimizer(f: Finding) -> str:
    return (
        f"{_names(f)} {_plural(f, 'receives', 'receive')} gradients but no watched optimizer "
        f"updates {_plural(f, 'it', 'them')} (created after the optimizer?). Build the optimizer "
        f"after the model is complete, or add {_plural(f, 'it', 'them')} with "
        f"optimizer.add_param_group()."
    )


class CoverageDetector(Detector):
    """Reports ``no_grad`` and ``not_in_optimizer``, each once per parameter.

    ``no_grad_after``: backward passes after which a trainable parameter that has never received
    a gradient is reported. Only passes that reached the parameter's optimizer (gave gradients to
    some of its parameters) count, so a generator that steps once per five discriminator passes
    is not reported. A watched optimizer none of whose parameters has ever received a gradient
    is reported once it has stepped ``no_grad_after`` times (cause ``"idle_optimizer"``, all its
    parameters named). A parameter no watched optimizer holds and that never receives a
    gradient is not trained, by design (a target network, an EMA or teacher copy): silent.
    Which optimizer owns which parameter, and the passes that reached each, come from
    :attr:`CheckContext.coverage`.
    """

    name = "coverage"
    kinds = MappingProxyType({Kind.NO_GRAD: _no_grad, Kind.NOT_IN_OPTIMIZER: _not_in_optimizer})
    options = (
        Option(
            "no_grad_after",
            5,
            lambda name, value, _: _checks.int_at_least(name, value, 1),
            "backward passes reaching its optimizer before a parameter with no gradient is "
            "reported",
        ),
    )
    phase = Phase.AT_CHECK

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.no_grad_after: int = setup.options.no_grad_after
        self._reported_no_grad: set[int] = set()
        self._reported_orphans: set[int] = set()
        self._seen_received = -1
        self._seen_optimized: frozenset[int] | None = None

    def check(self, ctx: CheckContext) -> list[Finding]:
        if ctx.coverage is None:
            return []
        coverage = ctx.coverage
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
            passes = coverage.passes_reaching(candidates)
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
            for _, steps, positions in coverage.idle():
                idle = [
                    i
                    for i in positions
                    if table.params[i].requires_grad and i not in self._reported_no_grad
                ]
                if steps < self.no_grad_after or not idle:
                    continue
                self._reported_no_grad.update(idle)
                names = tuple(table.names[i] for i in idle)
                findings.append(
                    Finding(
                        Kind.NO_GRAD,
                        ctx.step,
                        names[0],
                        value=float(steps),
                        threshold=float(self.no_grad_after),
                        params=names,
                        cause=IDLE_OPTIMIZER,
                    )
                )
        optimized = coverage.optimized
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
        """Restore what :meth:`state_dict` saved; every field is checked before any changes.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A reported position is not one of this model's parameters.
        """
        fields = _state.fields(state, ("reported_no_grad", "reported_orphans"))
        no_grad, orphans = (
            self._positions(name, fields[name]) for name in ("reported_no_grad", "reported_orphans")
        )
        self._reported_no_grad = no_grad
        self._reported_orphans = orphans
        self._seen_received = -1
        self._seen_optimized = None

    def _positions(self, name: str, value: object) -> set[int]:
        last = self.setup.num_params - 1
        return {
            _state.integer(f"{name}[{i}]", position, 0, last)
            for i, position in enumerate(_state.sequence(name, value))
        }
