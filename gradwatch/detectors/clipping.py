"""Gradient clipping that does not clip what the optimizer uses.

``clip_grad_norm_`` after ``optimizer.step()`` clips gradients the step has already used; before
``loss.backward()`` it clips the previous step's (already used, or cleared) gradients; before a
``GradScaler`` unscales them it clips ``scale x g`` against the threshold, which at the usual
scales (2^16) leaves them unclipped. Every line looks right and training runs unclipped. Reads
where the clip calls fall among the hooks' events (which backward pass last reached each
parameter, which ``.grad`` an optimizer step recorded) through :class:`ClipContext`; no tensor
value is read.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from gradwatch import _state
from gradwatch.detectors.base import ClipContext, ClipMoment, Detector, Phase, Setup
from gradwatch.findings import Finding, GradWatchValueError, Kind, _fmt, _fmt_int, _names

AFTER_STEP = "after_step"
BEFORE_BACKWARD = "before_backward"
BEFORE_UNSCALE = "before_unscale"

CALLS_IN_A_ROW = 2
"""Consecutive steps at which one clip call (the same first parameter) is misplaced before a
finding is made: a single clip outside the loop (a norm taken once after training, with a
finite threshold) is not a loop that clips in the wrong place."""

KEPT_STREAKS = 64
"""Clip call sites whose streak is kept (the latest); a loop has a handful."""


def _clip_order(f: Finding) -> str:
    limit = "" if f.threshold is None else f" to {_fmt(f.threshold)}"
    repeated = "" if f.value is None else f" (at {_fmt_int(f.value)} steps in a row)"
    if f.cause == AFTER_STEP:
        return (
            f"gradients of {_names(f)} were clipped{limit} after optimizer.step(){repeated}: the "
            f"step had already used them unclipped, so clipping changed nothing. Call "
            f"clip_grad_norm_ / clip_grad_value_ after loss.backward() and before "
            f"optimizer.step()."
        )
    if f.cause == BEFORE_UNSCALE:
        return (
            f"gradients of {_names(f)} were clipped{limit} before the GradScaler unscaled "
            f"them{repeated}: the clip compared scale x gradient against the threshold, so the "
            f"gradients were not clipped as intended. Call scaler.unscale_(optimizer) before "
            f"clipping, then scaler.step(optimizer)."
        )
    return (
        f"gradients of {_names(f)} were clipped{limit} before loss.backward() computed them"
        f"{repeated}: the clip saw the previous step's gradients (or none, after zero_grad), "
        f"and the step used this backward pass's gradients unclipped. Call clip_grad_norm_ / "
        f"clip_grad_value_ after loss.backward() and before optimizer.step()."
    )


class ClipOrderDetector(Detector):
    """Reports ``clip_order``.

    Three placements are misplaced (``cause``):

    - ``"after_step"``: at a clip call, no backward pass has reached any of the clipped
      parameters since their optimizer's last step, and one of them still holds exactly the
      gradient that step used (:attr:`ClipContext.used`). Step: the step that used them.
    - ``"before_backward"``: at an optimizer's check, the latest clip of its parameters since its
      last step ran before the gradient of the first of them arrived. Step: the step checked.
    - ``"before_unscale"``: when a ``GradScaler`` unscales an optimizer's gradients, its
      parameters were clipped after this step's gradient arrived. Step: the step to come.

    The finding is made when one clip call (identified by its first judged parameter) is
    misplaced at :data:`CALLS_IN_A_ROW` consecutive judgements of that kind; a correctly placed
    call resets its count.

    Healthy look-alikes stay silent: ``scaler.unscale_`` then the clip (the unscale sees no
    clip of this step's gradient), clipping done inside Lightning or ``transformers.Trainer``
    (after the backward pass, after the unscale), ``foreach=True``, clipping some parameters
    only (only those are judged), a clip after every micro-batch of an accumulation window
    (the latest clip follows the latest gradient), ``clip_grad_norm_(..., inf)`` to read the
    norm (never judged), an idle head's parameters in the clip (judged only with the others:
    one reached parameter makes the call well placed), the first step (no earlier step to
    compare with).
    """

    name = "clip_order"
    kinds = MappingProxyType({Kind.CLIP_ORDER: _clip_order})
    phase = Phase.CLIP

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self._streak: dict[tuple[str, int], int] = {}

    def clipped(self, ctx: ClipContext) -> list[Finding]:
        if not ctx.positions:
            return []
        cause: str | None
        if ctx.moment is ClipMoment.CLIP:
            if ctx.reached:
                cause = None
            elif ctx.used:
                cause = AFTER_STEP
            else:
                return []  # gradients cleared since the step: judged at the coming check
        elif ctx.moment is ClipMoment.CHECK:
            cause = BEFORE_BACKWARD if ctx.before_gradient else None
        else:
            cause = BEFORE_UNSCALE if ctx.before_unscale else None
        # One count per call site and moment: a call judged well placed at the clip (this
        # step's gradient) may still be misplaced with respect to the unscale.
        key = (ctx.moment.value, ctx.positions[0])
        streak = self._streak.pop(key, 0) + 1 if cause is not None else 0
        self._streak[key] = streak
        while len(self._streak) > KEPT_STREAKS:
            del self._streak[next(iter(self._streak))]
        if cause is None or streak < CALLS_IN_A_ROW:
            return []
        arrival = ctx.tracker.arrival
        ordered = sorted(ctx.positions, key=arrival.__getitem__)
        names = tuple(ctx.table.names[i] for i in ordered)
        return [
            Finding(
                Kind.CLIP_ORDER,
                ctx.step,
                names[0],
                value=float(streak),
                threshold=ctx.threshold,
                params=names,
                cause=cause,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "streak": [
                [moment, position, count] for (moment, position), count in self._streak.items()
            ]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the count of consecutive misplaced judgements per clip call site.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A key is missing or unknown, a moment is unknown, or a count
                or position is negative.
        """
        fields = _state.fields(state, ("streak",))
        rows = _state.sequence("streak", fields["streak"])
        moments = {m.value for m in ClipMoment}
        streak: dict[tuple[str, int], int] = {}
        for n, row in enumerate(rows):
            items = _state.sequence(f"streak[{n}]", row, 3)
            moment = items[0]
            if moment not in moments:
                raise GradWatchValueError(
                    f"streak[{n}][0] must be one of {sorted(moments)}, got "
                    f"{_state.describe(moment)}"
                )
            position = _state.integer(f"streak[{n}][1]", items[1], 0, self.setup.num_params - 1)
            streak[(moment, position)] = _state.integer(f"streak[{n}][2]", items[2])
        self._streak = streak
