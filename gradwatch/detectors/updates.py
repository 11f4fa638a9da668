"""Optimizer steps that cannot move the weights.

A scheduler or warm-up multiplier that starts at 0 and stays there, or an update too small for
the weights' precision to record: the loop runs, the loss does not move, and nothing errs.
Reads the learning rates of the optimizer's parameter groups at the check, the accumulated
``.grad`` norms the optimizer is about to use, and, at the checks where the weight norms are
taken for the update ratios, those norms.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

import torch

from gradwatch import _state
from gradwatch.detectors.base import CheckContext, Detector, Phase, Setup, by_arrival
from gradwatch.findings import Finding, Kind, _fmt_int, _names

ZERO_LR = "zero_lr"
UNCHANGED = "unchanged"

ZERO_LR_CHECKS = 5
"""Consecutive checks at which every parameter group holding a gradient has learning rate 0
before ``no_update`` is reported: a warm-up that starts at 0 rises after its first step."""


def _no_update(f: Finding) -> str:
    if f.cause == UNCHANGED:
        return (
            f"the weights of {_names(f)} are bit-for-bit what they were {_fmt_int(f.value)} "
            f"optimizer steps ago, though their gradients were not zero: the steps did not "
            f"move them. The update is too small for the weights' precision (low-precision "
            f"weights with a small learning rate: keep float32 master weights), or something "
            f"restores the weights after each step."
        )
    return (
        f"the learning rate is 0 in every parameter group that holds gradients, at "
        f"{_fmt_int(f.value)} checks in a row, while the gradients of {_names(f)} are not zero: "
        f"optimizer.step() cannot move the weights. Check the scheduler or warm-up "
        f"(LambdaLR multiplying by 0, a warm-up that never starts, a scheduler stepped once "
        f"per epoch) and the lr the optimizer was built with."
    )


class NoUpdateDetector(Detector):
    """Reports ``no_update``.

    Zero learning rate: at :data:`ZERO_LR_CHECKS` consecutive checks of an optimizer, every
    parameter group holding a checked gradient has learning rate exactly 0 and some checked
    gradient has a finite norm above 0. Unchanged weights: at a check where the weight norms are
    taken, every parameter whose gradient had a finite norm above 0 at the optimizer's previous
    such check, with some group's learning rate not 0 then, has a weight norm equal bit for bit
    to its norm then, although the optimizer has taken steps with gradients since.

    Healthy look-alikes stay silent: a warm-up whose first step has lr 0 and then rises; a
    frozen backbone (a group with lr 0) beside a group that trains; frozen parameters (no
    gradient, not checked); steps ``on_nonfinite="skip"`` emptied (not counted as updates);
    ``SparseAdam`` leaving untouched rows (the other rows change the norm); a model whose
    gradients are all exactly zero (nothing to move).
    """

    name = "no_update"
    kinds = MappingProxyType({Kind.NO_UPDATE: _no_update})
    phase = Phase.STATISTICS

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self._streak: dict[int, int] = {}
        # Per group: (updates, lr not all 0, {position: (weight norm, gradient norm)}) at the
        # latest check with weight norms. Not saved: a resumed run compares from its first one.
        self._weights: dict[int, tuple[int, bool, dict[int, tuple[float, float]]]] = {}

    def check(self, ctx: CheckContext) -> list[Finding]:
        norms = ctx.host_norms()
        moving = [
            i
            for i, n in zip(ctx.indices, norms.tolist(), strict=True)
            if math.isfinite(n) and n > 0.0
        ]
        findings = []
        zero_lr = bool(ctx.learning_rates) and all(lr == 0.0 for lr in ctx.learning_rates)
        streak = self._streak.get(ctx.group, 0) + 1 if zero_lr and moving else 0
        self._streak[ctx.group] = streak
        if streak >= ZERO_LR_CHECKS:
            names = tuple(ctx.table.names[i] for i in by_arrival(ctx, moving))
            findings.append(
                Finding(Kind.NO_UPDATE, ctx.step, names[0], float(streak), 0.0, names, ZERO_LR)
            )
        if ctx.weight_norms is not None:
            findings += self._unchanged(ctx, norms, ctx.weight_norms, zero_lr)
        return findings

    def _unchanged(
        self, ctx: CheckContext, norms: torch.Tensor, weights: torch.Tensor, zero_lr: bool
    ) -> list[Finding]:
        current = dict(
            zip(ctx.indices, zip(weights.tolist(), norms.tolist(), strict=True), strict=True)
        )
        previous = self._weights.get(ctx.group)
        self._weights[ctx.group] = (ctx.updates, not zero_lr, current)
        if previous is None or ctx.updates <= previous[0] or not previous[1]:
            return []
        earlier = previous[2]
        judged = [
            i
            for i, (weight, grad) in earlier.items()
            if i in current and math.isfinite(weight) and math.isfinite(grad) and grad > 0.0
        ]
        if not judged or any(current[i][0] != earlier[i][0] for i in judged):
            return []
        names = tuple(ctx.table.names[i] for i in by_arrival(ctx, judged))
        steps = float(ctx.updates - previous[0])
        return [Finding(Kind.NO_UPDATE, ctx.step, names[0], steps, None, names, UNCHANGED)]

    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self._streak)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the count of consecutive zero-learning-rate checks per optimizer group.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A key is missing or unknown, or a count is negative.
        """
        fields = _state.fields(state, ("streak",))
        self._streak = {
            group: _state.integer(f"streak[{group}]", count)
            for group, count in _state.by_group("streak", fields["streak"]).items()
        }
