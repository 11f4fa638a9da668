"""Gradients that keep arriving while no optimizer step uses them.

``optimizer.step()`` forgotten, a ``GradScaler`` that skips every step because every step
overflows, or a loop that updates the weights by hand and never steps a ``torch.optim``
optimizer: backward passes come one after another and nothing is updated (or, by hand, nothing
is checked). Reads the hooks' count of backward passes since the last optimizer step, at the
end of a pass (:attr:`~gradwatch.detectors.base.Phase.NO_STEP`); a plain loop that never calls
``optimizer.step()`` reaches no other point gradwatch could look from.
"""

from __future__ import annotations

from types import MappingProxyType

from gradwatch import _checks
from gradwatch.detectors.base import Detector, Option, Phase, StallContext
from gradwatch.findings import Finding, Kind, _fmt_int, _names

NO_STEP = "no_step"
OVERFLOW = "overflow"
NO_OPTIMIZER = "no_optimizer"


def _step_not_taken(f: Finding) -> str:
    passes = f"{_fmt_int(f.value)} backward passes"
    if f.cause == NO_OPTIMIZER:
        return (
            f"{passes} gave the model gradients and no torch.optim optimizer stepped, so "
            f"gradwatch has checked nothing. If you update the weights by hand (p.data.add_(-lr * "
            f"p.grad)), call watcher.mark_step() where optimizer.step() would be (after "
            f"backward(), before the update) to have every step checked; otherwise call "
            f"optimizer.step() after backward()."
        )
    if f.cause == OVERFLOW:
        return (
            f"{passes} reached {_names(f)} with no optimizer step (more than "
            f"{_fmt_int(f.threshold)}), and their gradients hold Inf or NaN: a GradScaler skips "
            f"every step whose gradients overflow and halves its scale, so the model is not "
            f"training. Find where the forward pass overflows float16 (or use bfloat16), lower "
            f"the learning rate, or check the loss for Inf/NaN."
        )
    return (
        f"{passes} reached {_names(f)} with no optimizer step (more than "
        f"{_fmt_int(f.threshold)}, that is no_step_after x accumulation_steps): the gradients "
        f"are computed and never used. Call optimizer.step() (or scaler.step(optimizer)) after "
        f"backward(), or pass the accumulation_steps you intend."
    )


class StepsDetector(Detector):
    """Reports ``step_not_taken``, at most once between two steps.

    ``no_step_after``: the finding is made once more than ``no_step_after *
    accumulation_steps`` backward passes have reached the parameters of a watched optimizer with
    no step of that optimizer after them: at the end of the next backward pass (that pass not
    counted), or at another optimizer's step. Passes inside ``optimizer.step()`` (the closure of
    LBFGS or of Lightning) belong to that step. ``value`` is the count, and the finding names the
    optimizer's parameters those passes reached; it says the gradients overflow when they hold
    Inf or NaN then; and, when no optimizer is known at all, that gradwatch checks nothing (a
    loop that updates the weights by hand, which :meth:`Watcher.mark_step` serves).

    Healthy look-alikes stay silent: declared accumulation resets the count at every step;
    evaluation under ``no_grad`` runs no backward pass; the few steps a ``GradScaler`` skips at
    the start of a run, and a generator stepped once per k critic steps (the critic's steps
    count), stay far below the default limit of 50.
    """

    name = "steps"
    kinds = MappingProxyType({Kind.STEP_NOT_TAKEN: _step_not_taken})
    options = (
        Option(
            "no_step_after",
            50,
            lambda name, value, _: _checks.int_at_least(name, value, 1),
            "backward passes per accumulation window with no optimizer step before "
            "step_not_taken is reported",
        ),
    )
    phase = Phase.NO_STEP

    def stalled(self, ctx: StallContext) -> list[Finding]:
        limit = float(ctx.limit)
        if not ctx.stalled:
            if ctx.optimizers_known:
                return []  # the passes reached no watched optimizer's parameters
            passes = float(ctx.passes)
            return [Finding(Kind.STEP_NOT_TAKEN, ctx.step, None, passes, limit, cause=NO_OPTIMIZER)]
        arrival = ctx.tracker.arrival
        findings = []
        for _, positions, passes in ctx.stalled:
            ordered = sorted(positions, key=arrival.__getitem__)
            names = tuple(ctx.table.names[i] for i in ordered)
            cause = OVERFLOW if ctx.nonfinite else NO_STEP
            findings.append(
                Finding(Kind.STEP_NOT_TAKEN, ctx.step, names[0], float(passes), limit, names, cause)
            )
        return findings
