"""Which optimizers a monitor checks, which watched parameters each updates, and where each is
in its step's life cycle.

Steps are counted twice. Each optimizer counts its own steps (:attr:`Stepper.steps`), which label
its checks. The monitor's :attr:`Steppers.step` counts the steps of the watched parameters,
whichever optimizer took them: the most steps any watched parameter has taken. Two optimizers
over different parts of a model (a GAN) stepping once per iteration count one step per
iteration; so does a loop that builds a new optimizer every step.

Optimizers are held weakly. When following every optimizer, one that is gone is forgotten (a
few are kept, :data:`RETIRED`, bounded): a new optimizer over exactly the parameters a forgotten
one updated takes its place, number and step count, so a loop that rebuilds its optimizer each
step watches one optimizer, not one more per step.
"""

from __future__ import annotations

import dataclasses
import enum
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gradwatch._stats import NormPlan
from gradwatch._tracker import GradientTracker
from gradwatch.detectors.base import Coverage

RETIRED = 16
"""Steppers of optimizers that are gone, kept (the latest ones) for a new optimizer over the same
parameters to take over; older ones are forgotten."""


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
    position_array: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(0, dtype=np.intp)
    )
    outside: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """(param group, index in it) of each of the optimizer's parameters that is not watched."""
    steps: int = 0
    updates: int = 0
    """Steps taken with gradients (not emptied by ``on_nonfinite="skip"``)."""
    watched_steps: int = 0
    """Steps taken while watched (not counting a checkpoint's)."""
    stall_reported: bool = False
    """Whether ``step_not_taken`` was judged since its last step."""
    group_of: dict[int, int] = dataclasses.field(default_factory=dict)
    """The index of the parameter group holding each watched position."""
    window_start_pass: int = 0
    window_start_reach: int = 0
    """The tracker's count of passes into this optimizer's parameters at its last step."""
    reached_passes: int = 0
    """Backward passes that gave gradients to at least one of this optimizer's parameters."""
    counted_passes: int = 0
    plan: tuple[tuple[int, ...], NormPlan] | None = None
    """The norm plan of the last check, for the positions that had gradients then."""
    outside_plan: tuple[tuple[str, ...], NormPlan] | None = None
    """The norm plan of the last check's gradients outside the watched model (``"skip"``)."""


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
        self._retired: dict[frozenset[int], Stepper] = {}
        """Steppers of optimizers that are gone, by the positions they updated (at most
        :data:`RETIRED`, the latest last)."""
        self._next_group = 0
        self.follow_all = not optimizers
        self._optimized_cache: frozenset[int] | None = None
        self.saved_steps: dict[int, int] = {}
        self._param_steps = np.zeros(len(params), dtype=np.int64)
        """Steps each watched parameter has taken, by whichever optimizer."""
        self._step = 0
        for optimizer in optimizers:
            self._steppers[id(optimizer)] = self._new(optimizer)
            self._next_group += 1

    def __iter__(self) -> Iterator[Stepper]:
        return iter([*self._steppers.values(), *self._retired.values()])

    @property
    def step(self) -> int:
        """The steps of the watched parameters, whichever optimizer took them: the most any
        watched parameter has taken (or a checkpoint recorded)."""
        return self._step

    def load_steps(self, steps: dict[int, int]) -> None:
        """Take each optimizer's step count from a checkpoint; the watched parameters' count
        becomes the largest of them."""
        self.saved_steps = dict(steps)
        for stepper in self:
            stepper.steps = self.saved_steps.get(stepper.group, stepper.steps)
        self._step = max((*self.saved_steps.values(), *(s.steps for s in self)), default=0)
        self._param_steps[:] = self._step
        # The checkpoint's pass count replaced the tracker's: every window starts from it.
        passes = self._tracker.backward_passes
        for stepper in self:
            stepper.window_start_pass = stepper.counted_passes = passes
            stepper.window_start_reach = self._tracker.group_passes(stepper.group)

    def get(self, optimizer: torch.optim.Optimizer) -> Stepper | None:
        """The optimizer's stepper, adopted when following all; ``None`` when it updates no
        watched parameter or is not watched."""
        stepper = self._steppers.get(id(optimizer))
        if stepper is not None and stepper.optimizer() is not optimizer:
            stepper = None  # a new optimizer reusing a dead one's id: the old one is gone
        if stepper is None:
            if not self.follow_all:
                return None
            stepper = self._adopt(optimizer)
        else:
            self._refresh(stepper, optimizer)
        return stepper if stepper.positions else None

    def add(self, optimizer: torch.optim.Optimizer) -> Stepper:
        """Watch ``optimizer`` from now on (numbered next), whether or not following all."""
        stepper = self._new(optimizer)
        self._next_group += 1
        self._steppers[id(optimizer)] = stepper
        self._optimized_cache = None
        return stepper

    def live(self) -> list[Stepper]:
        """The steppers of optimizers that still exist and update watched parameters."""
        return [s for s in self._steppers.values() if s.positions and s.optimizer() is not None]

    def stepped(self, stepper: Stepper) -> None:
        if stepper.state is not StepState.SKIPPED:
            stepper.updates += 1
        stepper.stall_reported = False
        stepper.steps += 1
        stepper.watched_steps += 1
        stepper.window_start_pass = self._tracker.backward_passes
        stepper.window_start_reach = self._tracker.group_passes(stepper.group)
        stepper.state = StepState.READY
        counts = self._param_steps
        at = stepper.position_array
        step = stepper.steps
        if len(at):
            counts[at] += 1
            step = max(step, int(counts[at].max()))
        self._step = max(self._step, step)

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
        return Coverage(self._optimized_positions(), self._passes_reaching, self._idle)

    def _passes_reaching(self, positions: list[int]) -> list[int]:
        steppers = list(self)
        return [
            max((s.reached_passes for s in steppers if i in s.position_set), default=0)
            for i in positions
        ]

    def _idle(self) -> list[tuple[int, int, tuple[int, ...]]]:
        received = self._tracker.received
        return [
            (s.group, s.watched_steps, tuple(s.positions))
            for s in self.live()
            if not any(received[i] for i in s.positions)
        ]

    def _optimized_positions(self) -> frozenset[int] | None:
        if self.follow_all and (
            not any(s.positions for s in self)
            or self._tracker.backward_passes < self._no_grad_after
        ):
            return None
        if self._optimized_cache is None:
            # Parameters of an optimizer that is gone still count as optimized: it stepped them.
            self._optimized_cache = frozenset(i for s in self for i in s.positions)
        return self._optimized_cache

    def _adopt(self, optimizer: torch.optim.Optimizer) -> Stepper:
        """A stepper for an optimizer seen for the first time (following all): the stepper of a
        forgotten optimizer over the same parameters, or a new one."""
        for key, known in list(self._steppers.items()):
            if known.optimizer() is None:
                del self._steppers[key]
                self._retired.pop(known.position_set, None)
                self._retired[known.position_set] = known
        while len(self._retired) > RETIRED:
            del self._retired[next(iter(self._retired))]
        stepper = self._new(optimizer)
        previous = self._retired.pop(stepper.position_set, None)
        if previous is not None:
            # The same parameters under a rebuilt optimizer: its number, history and count.
            previous.optimizer = weakref.ref(optimizer)
            previous.state = StepState.READY
            previous.signature = ()
            self._refresh(previous, optimizer)
            stepper = previous
        else:
            self._next_group += 1  # _new took the number
        self._steppers[id(optimizer)] = stepper
        self._optimized_cache = None
        return stepper

    def _new(self, optimizer: torch.optim.Optimizer) -> Stepper:
        """A stepper numbered next (the caller commits the number); its steps start from a
        checkpoint's count for that number, else from the count of the parameters it updates."""
        stepper = Stepper(group=self._next_group, optimizer=weakref.ref(optimizer))
        self._refresh(stepper, optimizer)
        stepper.window_start_pass = self._tracker.backward_passes
        stepper.window_start_reach = self._tracker.group_passes(stepper.group)
        at = stepper.position_array
        start = int(self._param_steps[at].max()) if len(at) else 0
        stepper.steps = self.saved_steps.get(stepper.group, start)
        return stepper

    def _refresh(self, stepper: Stepper, optimizer: torch.optim.Optimizer) -> None:
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if signature == stepper.signature:
            return
        stepper.signature = signature
        position = self._position
        groups = optimizer.param_groups
        stepper.group_of = {
            position[id(p)]: g
            for g, group in enumerate(groups)
            for p in group["params"]
            if id(p) in position
        }
        stepper.position_set = frozenset(stepper.group_of)
        stepper.positions = sorted(stepper.position_set)
        stepper.position_array = np.array(stepper.positions, dtype=np.intp)
        self._tracker.set_group(stepper.positions, stepper.group)
        stepper.outside = [
            (g, i)
            for g, group in enumerate(groups)
            for i, p in enumerate(group["params"])
            if id(p) not in position
        ]
        self._optimized_cache = None
