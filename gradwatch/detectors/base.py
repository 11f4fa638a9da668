"""The detector plug-in seam: what a detector declares, and what it receives at each check.

A detector is one class over :class:`Detector` that declares

- ``name``: the key its state is saved under (never change it once released);
- ``kinds``: the :class:`~gradwatch.Kind` values it reports, each with the function that turns
  such a finding into its message (what happened, where, what to do);
- ``options``: its keyword arguments of ``watch()`` and the callbacks, each an :class:`Option`
  with a default and a check that rejects bad values with an error that teaches;
- ``phase``: :attr:`Phase.AT_CHECK` when it needs only the hooks' bookkeeping (it runs at the
  moment of the check, before any device statistics), :attr:`Phase.STATISTICS` when it needs
  the check's norms on the host, :attr:`Phase.NO_STEP` when it judges backward passes that no
  optimizer step follows (there is no check to run at then), :attr:`Phase.CLIP` when it judges
  where the loop clips gradients (at torch's clip functions, the checks after them, a
  ``GradScaler``'s unscale).

and is listed once in :data:`gradwatch.detectors.REGISTRY`. What it reads at a check is the
:class:`CheckContext`: explicit, read-only fields, the same for every detector, so the order of
detectors never matters.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gradwatch._tracker import GradientTracker
from gradwatch.findings import Finding, Kind

if TYPE_CHECKING:
    from gradwatch._options import DetectorOptions
    from gradwatch._probe import Unregistered


class Phase(str, enum.Enum):
    """When a detector runs within a check."""

    AT_CHECK = "at_check"
    """At the moment of the check, from the hooks' bookkeeping alone (no device statistics)."""
    STATISTICS = "statistics"
    """Once the check's statistics have reached the host (possibly a few steps later on CUDA)."""
    NO_STEP = "no_step"
    """At the end of a backward pass when more backward passes than ``no_step_after`` allows
    have reached the watched parameters with no optimizer step after them; reads a
    :class:`StallContext` in :meth:`Detector.stalled`."""
    CLIP = "clip"
    """Where the loop clips gradients: at a call of torch's clip functions, at a check that
    follows one, at a ``GradScaler``'s unscale; reads a :class:`ClipContext` in
    :meth:`Detector.clipped`."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword argument of a detector.

    Attributes:
        name: The keyword, as passed to ``watch()`` and the callbacks.
        default: Its value when not given.
        check: Called as ``check(name, value, values)`` with every option's value (``values``,
            defaults filled in), for bounds that depend on another option; raises
            :class:`~gradwatch.findings.GradWatchTypeError` or ``GradWatchValueError``.
        help: One line for the docs and error messages.
    """

    name: str
    default: Any
    check: Callable[[str, Any, Mapping[str, Any]], None]
    help: str = ""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every detector is built from."""

    options: DetectorOptions
    num_params: int
    accumulation_steps: int


@dataclasses.dataclass
class ParamTable:
    """The watched parameters, by position: the index every detector and hook uses."""

    names: list[str]
    params: list[torch.nn.Parameter]
    numels: list[int]
    ndims: list[int]

    @classmethod
    def from_named(cls, named: Sequence[tuple[str, torch.nn.Parameter]]) -> ParamTable:
        return cls(
            names=[n for n, _ in named],
            params=[p for _, p in named],
            numels=[p.numel() for _, p in named],
            ndims=[p.dim() for _, p in named],
        )

    def __len__(self) -> int:
        return len(self.names)


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Which watched parameters the optimizers own, and how many backward passes reached each.

    Built by the monitor's optimizer stage for the detectors that judge coverage.
    """

    optimized: frozenset[int] | None
    """Positions some watched optimizer updates; ``None`` while that is not known yet (when
    following every optimizer, before any has stepped)."""
    passes_reaching: Callable[[list[int]], list[int]]
    """For each given position, the backward passes that reached the optimizer owning it (0 for
    a parameter no watched optimizer owns: nothing trains it, by design)."""
    idle: Callable[[], list[tuple[int, int, tuple[int, ...]]]] = lambda: []
    """The watched optimizers none of whose parameters has ever received a gradient: for each,
    its group, the steps it has taken while watched, and its positions."""


@dataclasses.dataclass
class CheckContext:
    """One check: the gradients one optimizer is about to use, and what the hooks saw.

    Detectors read it and never write to it. ``norms[j]`` is the float32 L2 norm of
    ``params[indices[j]].grad`` (NaN or Inf when the gradient holds such values).
    """

    step: int
    group: int
    """Which optimizer's parameters these are; detectors keep per-group history under it."""
    indices: list[int]
    table: ParamTable
    tracker: GradientTracker
    window_start_pass: int
    """Backward passes before this index happened before the group's previous check."""
    coverage: Coverage | None = None
    missing: tuple[int, ...] = ()
    """Positions of the optimizer's parameters whose ``.grad`` is ``None`` at the check (so
    not in ``indices``)."""
    reached: frozenset[int] = frozenset()
    """Positions of the optimizer's parameters that a backward pass reached in this step's
    window (since ``window_start_pass``), as the hooks saw it at the check."""
    rewritten: frozenset[int] = frozenset()
    """Positions in ``reached`` and ``indices`` whose ``.grad`` is the tensor that backward pass
    accumulated into, changed in place since (``zero_()``, clipping's ``mul_()``, unscaling);
    see :meth:`GradientTracker.changed_since_accumulated`. Taken at the check, like
    ``missing`` and ``reached``: a statistics-phase detector may run a few steps later."""
    norms: torch.Tensor | None = None
    """Set once the statistics have reached the host; see :meth:`host_norms`."""
    magnitudes: torch.Tensor | None = None
    """``norms`` where an infinite norm came from finite values whose squares overflow float32
    replaced by their largest |value| (a lower bound of the norm); see :attr:`overflowed`."""
    overflowed: torch.Tensor | None = None
    """Bool per entry of ``norms``: infinite only because squaring overflowed (no real Inf)."""
    learning_rates: tuple[float, ...] = ()
    """The learning rate of each of the optimizer's parameter groups that holds a checked
    gradient, taken at the check (NaN where it is not a number on the host: a tensor on an
    accelerator is not read). When no group's rate is 0, every group's rate."""
    updates: int = 0
    """The optimizer's steps taken with gradients before this check (steps that
    ``on_nonfinite="skip"`` emptied are not counted)."""
    unregistered: tuple[Unregistered, ...] = ()
    """Trainable tensors the model uses but does not own, found in a forward pass since the
    previous check (see :mod:`gradwatch._probe`)."""
    replica_positions: tuple[int, ...] = ()
    """At a check where the data-parallel ranks' gradients were compared: the positions
    compared (every watched parameter of the optimizer), in the order of ``replica_low`` and
    ``replica_high``."""
    replica_low: torch.Tensor | None = None
    """Per position compared, the smallest of the ranks' gradient norms (-1 where a rank's is
    absent or not finite), then the smallest of their weight norms; ``None`` at the other
    checks."""
    replica_high: torch.Tensor | None = None
    """Per position compared, the largest of the ranks' gradient norms, then of their weight
    norms."""
    weight_norms: torch.Tensor | None = None
    """``weight_norms[j]``: the norm of ``params[indices[j]]`` at the check, at the checks where
    the weight norms are taken for the update ratios (every ``RATIO_EVERY`` steps while an
    output is open); ``None`` at the others."""

    def host_norms(self) -> torch.Tensor:
        if self.norms is None:
            raise RuntimeError("this detector needs statistics; run it once they are on the host")
        return self.norms


@dataclasses.dataclass(frozen=True)
class StallContext:
    """Backward passes that no optimizer step followed: what :meth:`Detector.stalled` reads.

    Built at the end of a backward pass once the passes with no step after them exceed the
    limit, at most once between two steps.
    """

    step: int
    """The watched parameters' step count (the step the passes belong to)."""
    passes: int
    """Backward passes with no step after them: the most of any optimizer in ``stalled``
    (passes into its parameters since its last step); with no optimizer known, the passes that
    reached watched parameters since watching began. At the end of a backward pass, that pass
    is not counted (a step may still follow it)."""
    limit: int
    """``no_step_after * accumulation_steps``."""
    table: ParamTable
    tracker: GradientTracker
    stalled: tuple[tuple[int, tuple[int, ...], int], ...]
    """Per watched optimizer whose parameters more than ``limit`` passes reached since its last
    step: its group, the positions of its parameters they reached, and how many passes. Empty
    when no optimizer is known to update the parameters."""
    optimizers_known: bool
    """Whether any optimizer has been watched (given, or seen stepping)."""
    nonfinite: bool | None
    """Whether the gradients of the reached parameters hold Inf or NaN at the end of this pass
    (the overflow a ``GradScaler`` skips steps for); ``None`` when not read."""


class ClipMoment(str, enum.Enum):
    """Which event a :class:`ClipContext` describes."""

    CLIP = "clip"
    """A call of ``clip_grad_norm_``, ``clip_grad_value_`` or ``clip_grads_with_norm_`` has
    just clipped gradients of watched parameters."""
    CHECK = "check"
    """A check of an optimizer (before its step) after its parameters were clipped since its
    previous step."""
    UNSCALE = "unscale"
    """A ``GradScaler`` has just unscaled the optimizer's gradients."""


@dataclasses.dataclass(frozen=True)
class ClipContext:
    """One clip-related event and what the hooks' bookkeeping says about it; what
    :meth:`Detector.clipped` reads. Host bookkeeping only: no tensor value is read.

    The parameters judged are the watched ones of the clip call that some watched optimizer
    updates and that have received a gradient before.
    """

    moment: ClipMoment
    step: int
    """The step the event belongs to: for a clip that finds the gradients the last step used,
    that step; otherwise the step to come."""
    group: int
    """The optimizer the event is about (at a clip: the one updating the first judged
    parameter)."""
    positions: tuple[int, ...]
    """The judged parameters of the clip call (of the optimizer ``group`` at a check or an
    unscale), first the one the facts below were read from. At an unscale with no clip since
    the step, the first judged parameter of that optimizer's latest clip (empty when it never
    clipped)."""
    table: ParamTable
    tracker: GradientTracker
    threshold: float | None = None
    """The clip's ``max_norm`` or ``clip_value`` when it is a host number."""
    reached: bool = False
    """At a clip: a backward pass has reached one of ``positions`` since the last step of the
    optimizer updating it (the clip sees this step's gradients)."""
    used: bool = False
    """At a clip where ``reached`` is false: one of ``positions`` still holds exactly the
    gradient its optimizer's last step used (the same tensor, not changed since)."""
    before_gradient: bool = False
    """At a check: the latest clip of the optimizer's parameters since its last step ran before
    the latest gradient of ``positions[0]`` arrived (it clipped something else)."""
    before_unscale: bool = False
    """At an unscale: the optimizer's parameters were clipped after this step's gradient of
    ``positions[0]`` arrived, before this unscale (while still multiplied by the scale)."""


class Detector:
    """Base of every detector: declarations, and do-nothing state.

    Subclasses set the class attributes, take a :class:`Setup` in ``__init__`` and implement
    :meth:`check`. State that must survive a resumed run goes through :meth:`state_dict` and
    :meth:`load_state_dict` (plain Python values and CPU tensors); ``load_state_dict`` raises
    ``KeyError``, ``TypeError`` or ``ValueError`` on a state it cannot take, and the monitor
    then restores what it had.
    """

    name: ClassVar[str]
    kinds: ClassVar[Mapping[Kind, Callable[[Finding], str]]]
    options: ClassVar[tuple[Option, ...]] = ()
    phase: ClassVar[Phase]

    def __init__(self, setup: Setup) -> None:
        self.setup = setup

    def check(self, ctx: CheckContext) -> list[Finding]:
        raise NotImplementedError

    def stalled(self, ctx: StallContext) -> list[Finding]:
        """Findings about backward passes that no step followed (:attr:`Phase.NO_STEP`)."""
        return []

    def clipped(self, ctx: ClipContext) -> list[Finding]:
        """Findings about where gradients are clipped (:attr:`Phase.CLIP`)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"the state of detector {self.name!r} is not a dict")


def by_arrival(ctx: CheckContext, indices: Sequence[int]) -> list[int]:
    """``indices`` in the order their latest gradients arrived (nearest the loss first)."""
    arrival = ctx.tracker.arrival
    return sorted(indices, key=arrival.__getitem__)
