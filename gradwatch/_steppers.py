"""Which optimizers a monitor checks, which watched parameters each updates, and where each is
in its step's life cycle."""

from __future__ import annotations

import dataclasses
import enum
import weakref
from collections.abc import Iterator, Sequence

import torch

from gradwatch._stats import NormPlan
from gradwatch._tracker import GradientTracker
from gradwatch.detectors.base import Coverage


class StepState(enum.Enum):
    """Where one optimizer is between two of its steps (as ``GradScaler``'s ``OptState``).

    ``READY`` -> ``check()`` -> ``CHECKED`` (or ``SKIPPED`` when ``on_nonfinite="skip"`` cleared
    its gradients) -> ``optimizer.step()`` -> ``READY``. A step taken with a closure goes
    ``READY`` -> ``DEFERRED`` (the closure computes the gradients inside ``step()``) -> checked
    after the step -> ``READY``. A ``CHECKED`` optimizer that is checked again without having
    stepped had its step skipped by someone else (a ``GradScaler`` on overflow).
    """

    READY = "ready"
    CHECKED = "checked"
    SKIPPED = "skipped"
    DEFERRED = "deferred"


@dataclasses.dataclass(eq=False)
class Stepper:
    """What the monitor knows about one optimizer."""

    group: int
    optimizer: weakref.ref[torch.optim.Optimizer]
    state: StepState = StepState.READY
    label: int | None = None
    """The step that labelled its latest check."""
    signature: tuple[tuple[int, int], ...] = ()
    positions: list[int] = dataclasses.field(default_factory=list)
    position_set: frozenset[int] = frozenset()
    steps: int = 0
    window_start_pass: int = 0
    reached_passes: int = 0
    """Backward passes that gave gradients to at least one of this optimizer's parameters."""
    counted_passes: int = 0
    plan: tuple[tuple[int, ...], NormPlan] | None = None
    """The norm plan of the last check, for the positions that had gradients then."""


class Steppers:
    """The optimizers of one monitor: given ones, or every optimizer that steps a watched
    parameter (``follow_all``, when none is given)."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        tracker: GradientTracker,
        *,
        accumulation_steps: int,
        no_grad_after: int,
    ) -> None:
        self._position = {id(p): i for i, p in enumerate(params)}
        self._tracker = tracker
        self._accumulation_steps = accumulation_steps
        self._no_grad_after = no_grad_after
        self._steppers: dict[int, Stepper] = {}
        self.follow_all = not optimizers
        self._optimized_cache: frozenset[int] | None = None
        self.saved_steps: dict[int, int] = {}
        for optimizer in optimizers:
            self._steppers[id(optimizer)] = self._new(optimizer)

    def __iter__(self) -> Iterator[Stepper]:
        return iter(list(self._steppers.values()))

    @property
    def step(self) -> int:
        """The most steps any optimizer has taken (or a checkpoint recorded)."""
        saved = self.saved_steps.values()
        return max((*saved, *(s.steps for s in self._steppers.values())), default=0)

    def load_steps(self, steps: dict[int, int]) -> None:
        self.saved_steps = dict(steps)
        for stepper in self._steppers.values():
            stepper.steps = self.saved_steps.get(stepper.group, stepper.steps)

    def get(self, optimizer: torch.optim.Optimizer) -> Stepper | None:
        """The optimizer's stepper, adopted when following all; ``None`` when it updates no
        watched parameter or is not watched."""
        stepper = self._steppers.get(id(optimizer))
        if stepper is not None and stepper.optimizer() is not optimizer:
            stepper = None  # a new optimizer reusing a dead one's id
            del self._steppers[id(optimizer)]
        if stepper is None:
            if not self.follow_all:
                return None
            stepper = self._new(optimizer)
            self._steppers[id(optimizer)] = stepper
            self._optimized_cache = None
        else:
            self._refresh(stepper, optimizer)
        return stepper if stepper.positions else None

    def stepped(self, stepper: Stepper) -> None:
        stepper.steps += 1
        stepper.window_start_pass = self._tracker.backward_passes
        stepper.state = StepState.READY

    def count_reaching_passes(self, stepper: Stepper, positions: list[int]) -> None:
        tracker = self._tracker
        passes = tracker.backward_passes
        start = max(stepper.window_start_pass, stepper.counted_passes)
        last_pass = tracker.last_pass
        if any(last_pass[i] >= start for i in positions):
            # Passes of other optimizers may fall in the same window: count at most the passes
            # one step is declared to accumulate.
            stepper.reached_passes += min(passes - start, self._accumulation_steps)
        stepper.counted_passes = passes

    def coverage(self) -> Coverage:
        return Coverage(self._optimized_positions(), self._passes_reaching)

    def _passes_reaching(self, positions: list[int]) -> list[int]:
        steppers = list(self._steppers.values())
        unowned = self._tracker.backward_passes
        if self.follow_all and self._optimized_positions() is None:
            unowned = 0  # whose parameter it is may not be known yet
        return [
            max((s.reached_passes for s in steppers if i in s.position_set), default=unowned)
            for i in positions
        ]

    def _optimized_positions(self) -> frozenset[int] | None:
        if self.follow_all and (
            not any(s.positions for s in self._steppers.values())
            or self._tracker.backward_passes < self._no_grad_after
        ):
            return None
        if self._optimized_cache is None:
            self._optimized_cache = frozenset(
                i for s in self._steppers.values() for i in s.positions
            )
        return self._optimized_cache

    def _new(self, optimizer: torch.optim.Optimizer) -> Stepper:
        stepper = Stepper(group=len(self._steppers), optimizer=weakref.ref(optimizer))
        self._refresh(stepper, optimizer)
        stepper.window_start_pass = self._tracker.backward_passes
        stepper.steps = self.saved_steps.get(stepper.group, 0)
        return stepper

    def _refresh(self, stepper: Stepper, optimizer: torch.optim.Optimizer) -> None:
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if signature == stepper.signature:
            return
        stepper.signature = signature
        position = self._position
        ids = (id(p) for group in optimizer.param_groups for p in group["params"])
        stepper.position_set = frozenset(position[i] for i in ids if i in position)
        stepper.positions = sorted(stepper.position_set)
        self._optimized_cache = None
