"""Missing ``zero_grad`` and unexpected gradient accumulation.

Both look at the accumulated ``.grad`` the optimizer is about to use, through the hooks'
bookkeeping only (no tensor values): whether it still carries the previous step's gradient, and
how many backward passes went into it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from gradwatch import _state
from gradwatch.detectors.base import CheckContext, Detector, Phase, Setup, by_arrival
from gradwatch.findings import Finding, Kind, _fmt_int, _names


def _missing_zero_grad(f: Finding) -> str:
    return (
        f"backward() added new gradients on top of the ones the previous optimizer step used "
        f"({_names(f)}): .grad was not reset between steps. Call optimizer.zero_grad() "
        f"(or model.zero_grad()) once per step, before loss.backward()."
    )


def _unexpected_accumulation(f: Finding) -> str:
    return (
        f"{_fmt_int(f.value)} backward passes accumulated into the gradient of {_names(f)} before "
        f"this optimizer step, but accumulation_steps={_fmt_int(f.threshold)}. Reset gradients "
        f"with optimizer.zero_grad() after every step, call backward() once per step, or pass the "
        f"accumulation_steps you intend to gradwatch.watch()."
    )


class AccumulationDetector(Detector):
    """Reports ``missing_zero_grad`` and ``unexpected_accumulation``.

    Reads the front end's ``accumulation_steps``: the backward passes the user means to
    accumulate per optimizer step.
    """

    name = "accumulation"
    kinds = MappingProxyType(
        {
            Kind.MISSING_ZERO_GRAD: _missing_zero_grad,
            Kind.UNEXPECTED_ACCUMULATION: _unexpected_accumulation,
        }
    )
    phase = Phase.AT_CHECK

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.accumulation_steps = setup.accumulation_steps

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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This detector keeps no history: its state is an empty dict.

        Raises:
            GradWatchTypeError: ``state`` is not a dict.
            GradWatchValueError: ``state`` holds a key.
        """
        _state.fields(state, ())
