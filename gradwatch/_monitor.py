"""The core both front ends drive: checks of one optimizer's gradients, detectors, findings.

One check: the gradients an optimizer is about to use -> one foreach pass of norms, copied to the
host -> detectors -> findings -> (with ``on_nonfinite="skip"``: the step skipped when a gradient is
not finite) -> policy and sinks. The front end decides when a check happens
(``watch()``: optimizer step hooks; the Lightning callback: Lightning's hooks) and feeds the
tracker from one post-accumulate-grad hook per parameter.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch import _clipping, _options
from gradwatch._compat import at_backward_end
from gradwatch._histograms import (
    COLUMNS,
    DEFAULT_BINS,
    GradientHistograms,
    histogram_rows,
    statistics_dtype,
)
from gradwatch._probe import Unregistered
from gradwatch._reporting import Reporter, warn_user
from gradwatch._stats import (
    HostCopy,
    NormPlan,
    _dense_values,
    _foreach_max_abs,
    gradient_norms,
)
from gradwatch._steppers import Stepper, Steppers, StepState
from gradwatch._tracker import GradientTracker
from gradwatch.detectors import (
    REGISTRY,
    RELEASE_1_ORDER,
    CheckContext,
    ClipContext,
    ClipMoment,
    Detector,
    ParamTable,
    Phase,
    Setup,
    StallContext,
)
from gradwatch.detectors.base import by_arrival
from gradwatch.detectors.replicas import ReplicaDetector
from gradwatch.detectors.unregistered import UnregisteredDetector
from gradwatch.findings import (
    Finding,
    GradWatchTypeError,
    GradWatchValueError,
    Kind,
)
from gradwatch.sinks.base import FanOut, Sink

_NON_FINITE = frozenset((Kind.NAN, Kind.INF))

STATE_VERSION = 1
"""The monitor's state format. Detector states are saved by detector name (a dict); the list
by position that gradwatch 0.1 wrote is still read."""


@dataclasses.dataclass(eq=False)
class _Extras:
    """What a check adds to the host copy after the norms: histogram rows, weight norms."""

    histograms: bool
    learning_rates: list[float] | None
    """Per checked parameter, when the weight norms are taken (NaN where the lr is unknown)."""
    bins: int


@dataclasses.dataclass(eq=False)
class _PendingCheck:
    context: CheckContext
    copy: HostCopy
    extras: _Extras | None = None
    grads: list[torch.Tensor] | None = None
    """The checked gradients, kept only while the check is processed at once (to tell a real
    Inf from an overflowing square)."""
    norms_dtype: torch.dtype | None = None
    """The norms' own dtype when they were packed with more (the host copy's dtype holds them
    exactly): a check reads the same norms whatever outputs are on."""
    flags: int = 0
    """Values after the norms in the host copy: 1 when the gradients of parameters outside the
    watched model were checked too (``on_nonfinite="skip"``), else 0."""
    replica_positions: tuple[int, ...] = ()
    """The positions whose ranks' norms were reduced: their gradient and weight norms' largest,
    then minus their smallest, end the host copy."""


@dataclasses.dataclass(eq=False)
class _Clip:
    """One call of a clip function on watched parameters, since the last optimizer step."""

    tensors: list[torch.Tensor]
    first: int
    """The first judged parameter of the call (watched, updated by a watched optimizer, with a
    gradient received before)."""
    group: int
    """The optimizer updating ``first``."""
    sequence: int
    """The tracker's gradient count when the clip ran: a gradient whose arrival is larger came
    after it."""
    threshold: float | None


CLIPS_KEPT = 8
"""Clip calls remembered between two optimizer steps (the latest); a loop makes one or two."""


class Monitor:
    """Gradient checks of one model's parameters, for any number of optimizers.

    Three stages, each its own object: the optimizers (:class:`~gradwatch._steppers.Steppers`:
    which optimizers, which parameters each updates, each one's :class:`StepState`), the
    statistics pass of a check (here: one foreach pass of norms, histogram rows and weight norms
    packed into one device tensor, one host copy, detectors by phase), and the reporting
    (:class:`~gradwatch._reporting.Reporter`: ignore, tolerate, de-duplicate, sinks, policy).

    Args:
        named: The watched parameters with their qualified names.
        optimizers: The optimizers to check; empty to adopt every optimizer that steps any of
            these parameters.
        accumulation_steps, options, on_finding, on_nonfinite: As validated by the front end.
        sinks: Outputs; the monitor closes them.
        histogram_every: Optimizer steps between gradient histograms sent to the sinks (at steps
            that are multiples of it; 0 for none).
        ratio_every: Optimizer steps between ``lr * |grad| / |weight|`` ratios sent to the
            sinks (0 for none).
        histogram_bins: Buckets per histogram.
        detectors: The detector classes to run (default: every registered one).
    """

    def __init__(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        accumulation_steps: int,
        options: _options.DetectorOptions,
        on_finding: _options.OnFinding,
        on_nonfinite: _options.OnNonFinite = "report",
        sinks: Sequence[Sink] | FanOut = (),
        histogram_every: int = 0,
        ratio_every: int = 0,
        histogram_bins: int = DEFAULT_BINS,
        detectors: Sequence[type[Detector]] = REGISTRY,
        replicas: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.accumulation_steps = accumulation_steps
        self.histogram_every = histogram_every
        self.ratio_every = ratio_every
        self.histogram_bins = histogram_bins
        self.options = options
        check_parameters(named)
        self._skip_nonfinite = on_nonfinite == "skip"
        self._warned_closure = False
        self._table = ParamTable.from_named(named)
        self.tracker = GradientTracker(len(self._table))
        self._tracker = self.tracker
        self._pending: deque[_PendingCheck] = deque()
        self._name_position = {name: i for i, name in enumerate(self._table.names)}
        self._steppers = Steppers(
            self._table.params,
            optimizers,
            self.tracker,
            accumulation_steps=accumulation_steps,
            no_grad_after=options.no_grad_after,
        )
        setup = Setup(options, len(self._table), accumulation_steps)
        self._detectors: list[Detector] = [detector(setup) for detector in detectors]
        self._sinks = sinks if isinstance(sinks, FanOut) else FanOut(list(sinks))
        self._reporter = Reporter(options.ignore, on_finding, self._sinks)
        self._stepping = False
        """Inside a watched ``optimizer.step()``: backward passes there (a closure) are used."""
        self._hand: _HandSteps | None = None
        self._no_step_limit = options.no_step_after * accumulation_steps
        self._no_optimizer_reported = False
        # Only detectors with a kind that is not ignored make gradwatch touch torch, the model
        # or the ranks (the clip wrappers, the forward probe, the replica collective).
        reporting = [d for d in self._detectors if set(d.kinds) - options.ignore]
        if any(d.phase is Phase.NO_STEP for d in reporting):
            self.tracker.set_alarm(self._no_step_limit, self._on_overdue)
        self._position_of = {id(p): i for i, p in enumerate(self._table.params)}
        self._clips: deque[_Clip] = deque(maxlen=CLIPS_KEPT)
        self._replicas = (
            replicas if any(isinstance(d, ReplicaDetector) for d in reporting) else None
        )
        """Reduces a device tensor in place to its elementwise largest over the data-parallel
        ranks (every rank checks at the same steps); ``None`` when there are none to compare."""
        self.probes_forward = any(isinstance(d, UnregisteredDetector) for d in reporting)
        """Whether a detector reads what the forward probe finds."""
        self._unregistered: list[Unregistered] = []
        """Found by the forward probe, reported at the next check."""
        self._clip_sites: dict[int, int] = {}
        """Per optimizer group, the first judged parameter of its latest clip: the call an
        unscale with no clip since the step judges well placed."""
        self._clip_listening: _clipping.ListenHandle | None = None
        if any(d.phase is Phase.CLIP for d in reporting):
            # Last: nothing below can fail and leave torch's clip functions wrapped.
            self._clip_listening = _clipping.listen(self)

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter), in the order found."""
        return self._reporter.findings

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many checks showed each (kind, parameter) so far."""
        return self._reporter.occurrences

    @property
    def step(self) -> int:
        """Optimizer steps of the watched parameters so far, whichever optimizer took them (the
        most steps any watched parameter has taken)."""
        return self._steppers.step

    @property
    def param_names(self) -> list[str]:
        """Qualified names of the watched parameters."""
        return list(self._table.names)

    def summary(self) -> str:
        """A readable report of every finding so far."""
        return format_summary(self.findings, self.occurrences, self.step)

    def close(self) -> None:
        """Report what is still in flight (without raising), flush and close the outputs."""
        try:
            if self._clip_listening is not None:
                self._clip_listening.remove()  # torch's functions as they were
                self._clip_listening = None
            self._drain(block=True, raising=False)
        finally:
            self._sinks.flush()
            self._sinks.close()
            self._table.params.clear()
            self._position_of.clear()
            self._clips.clear()
            self._hand = None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Step counts, detector history (by detector name) and findings, for resuming a run."""
        findings, occurrences = self._reporter.state()
        return {
            "version": STATE_VERSION,
            "param_names": list(self._table.names),
            "steps": {s.group: s.steps for s in self._steppers},
            "tracker": self._tracker.state_dict(),
            "detectors": {d.name: d.state_dict() for d in self._detectors},
            "findings": [f.to_dict() for f in findings],
            "occurrences": occurrences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, for the same model.

        Every field is checked (its type, shape and range) before anything changes, so a state
        that is refused leaves the watcher exactly as it was.

        Raises:
            GradWatchTypeError: ``state`` is not a dict.
            GradWatchValueError: ``state`` was saved by another version, for another model or
                with other detector options, or a field has the wrong type, shape or value (the
                message names it); the watcher is then left as it was.
        """
        if not isinstance(state, dict):
            raise GradWatchTypeError(
                f"state must be a dict from state_dict(), got {type(state).__name__}"
            )
        version = state.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version != STATE_VERSION:
            raise GradWatchValueError(
                f"state must come from state_dict() (version {STATE_VERSION}), got version "
                f"{version!r:.60}"
            )
        names = state.get("param_names")
        if not (
            isinstance(names, list)
            and all(isinstance(name, str) for name in names)
            and names == self._table.names
        ):
            raise GradWatchValueError(
                "state was saved for a model with different parameters; expected "
                f"{len(self._table.names)} parameters named as this model's"
            )
        try:
            self._load(state)
        except (TypeError, ValueError) as error:
            raise GradWatchValueError(
                f"state could not be loaded into this watcher: {error}"
            ) from error

    def _load(self, state: dict[str, Any]) -> None:
        """Checks every field of ``state``, then takes it.

        Raises ``GradWatchTypeError`` or ``GradWatchValueError`` naming the field before anything
        has changed. The tracker is the last to check its fields and the first to change; after
        it, nothing can fail.
        """
        from gradwatch import _state

        fields = _state.fields(
            state,
            (
                "version",
                "param_names",
                "steps",
                "tracker",
                "detectors",
                "findings",
                "occurrences",
            ),
        )
        steps = {
            group: _state.integer(f"steps[{group}]", count)
            for group, count in _state.by_group("steps", fields["steps"]).items()
        }
        findings = _state.findings("findings", fields["findings"])
        occurrences = _state.occurrences("occurrences", fields["occurrences"])
        detectors = self._loaded_detectors(fields["detectors"])
        try:
            self._tracker.load_state_dict(fields["tracker"])
        except (TypeError, ValueError) as error:
            raise GradWatchValueError(f"tracker: {error}") from error
        self._steppers.load_steps(steps)
        self._detectors = [detectors.get(i, detector) for i, detector in enumerate(self._detectors)]
        self._reporter.load(findings, occurrences)

    def _loaded_detectors(self, saved: object) -> dict[int, Detector]:
        """New detectors holding the saved states, by position in the running ones, which they
        replace only once every field of the state has been checked."""
        if isinstance(saved, list):  # written by gradwatch 0.1: by position
            if len(saved) != len(RELEASE_1_ORDER):
                raise GradWatchValueError(
                    f"detectors holds {len(saved)} states, gradwatch 0.1 saved "
                    f"{len(RELEASE_1_ORDER)}"
                )
            saved = dict(zip(RELEASE_1_ORDER, saved, strict=True))
        if not isinstance(saved, dict):
            raise GradWatchTypeError(
                f"detectors must be a dict of states by detector name, got {type(saved).__name__}"
            )
        setup = Setup(self.options, len(self._table), self.accumulation_steps)
        loaded: dict[int, Detector] = {}
        for i, detector in enumerate(self._detectors):
            # A detector added since the state was saved keeps what it has.
            if detector.name not in saved:
                continue
            fresh = type(detector)(setup)
            try:
                fresh.load_state_dict(saved[detector.name])
            except Exception as error:  # a plug-in detector's own checks may raise anything
                known = isinstance(error, (GradWatchTypeError, GradWatchValueError))
                detail = str(error) if known else f"{type(error).__name__}: {error}"
                raise GradWatchValueError(f"detectors.{detector.name}: {detail}") from error
            loaded[i] = fresh
        return loaded

    # ------------------------------------------------------------------ optimizer step hooks
    # What ``watch()`` registers around every watched ``optimizer.step()``.

    def before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        stepper = self._steppers.get(optimizer)
        if stepper is None:
            return
        self._stepping = True
        # torch passes step()'s positional arguments with the optimizer itself first.
        positional = args[1:] if args and args[0] is optimizer else args
        if kwargs.get("closure") is not None or any(a is not None for a in positional):
            # The closure computes the gradients inside step(): check them after it.
            stepper.state = StepState.DEFERRED
            if self._skip_nonfinite and not self._warned_closure:
                self._warned_closure = True
                warn_user(
                    "gradwatch: on_nonfinite='skip' cannot skip a step taken with "
                    "optimizer.step(closure): the closure computes the gradients inside step(), "
                    "so gradwatch checks them after the update (NaN/Inf is still reported). Call "
                    "backward() before optimizer.step() to have such steps skipped.",
                    RuntimeWarning,
                )
            return
        self._check(stepper, stepper.steps, before_update=True)

    def after_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        stepper = self._steppers.get(optimizer)
        if stepper is None:
            return
        if stepper.state is StepState.DEFERRED:
            self._check(stepper, stepper.steps, before_update=False)
        params = self._table.params
        self._tracker.on_stepped(stepper.positions, [params[i].grad for i in stepper.positions])
        self._steppers.stepped(stepper)
        self._stepping = False
        self._tracker.reset_unstepped()
        self._clips.clear()
        if self._no_step_limit and len(self._steppers.live()) > 1:
            self._reporter.report(self._stalled_findings(by_hook=False))

    def entering_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Before a step the front end checks itself: backward passes inside it are used."""
        if self._steppers.get(optimizer) is not None:
            self._stepping = True

    def mark_step(self) -> bool:
        """A step taken without a ``torch.optim`` optimizer (weights updated by hand): check
        every watched parameter's gradient now, as before ``optimizer.step()``, and record the
        step.

        Returns:
            ``False`` when ``on_nonfinite="skip"`` cleared the gradients (``.grad = None``):
            skip this update; ``True`` otherwise.
        """
        if self._hand is None:
            self._hand = _HandSteps(self._table.params)
            self._steppers.add(self._hand)
        stepper = self._steppers.get(self._hand)
        if stepper is None:
            return True
        self.check(self._hand)
        go_ahead = stepper.state is not StepState.SKIPPED
        self.after_step(self._hand, (), {})
        return go_ahead

    # ------------------------------------------------------------------ the forward probe

    def held(self) -> set[int]:
        """Ids of the watched parameters and of every parameter a watched optimizer holds."""
        held = {id(p) for p in self._table.params}
        for stepper in self._steppers.live():
            optimizer = stepper.optimizer()
            if optimizer is not None:
                held.update(id(p) for g in optimizer.param_groups for p in g["params"])
        return held

    def unregistered_found(self, found: list[Unregistered]) -> None:
        """From the forward probe: reported at the next check."""
        self._unregistered.extend(found)

    # ------------------------------------------------------------------ steps not taken

    def _on_overdue(self) -> None:
        """From the gradient hook: a backward pass begins while more than the limit of earlier
        ones had no step after them. Judged once this pass ends (its gradients complete)."""
        if self._stepping:
            return
        if not at_backward_end(self._report_overdue):
            self._report_overdue()

    def _report_overdue(self) -> None:
        if self._stepping or self._tracker.unstepped <= self._no_step_limit:
            return
        self._reporter.report(self._stalled_findings(by_hook=True))

    def _stalled_findings(self, *, by_hook: bool) -> list[Finding]:
        """The ``step_not_taken`` findings of every optimizer whose parameters more than the
        limit of backward passes reached since its last step (each reported once until it
        steps); from the hook, also when no optimizer is known at all (once).

        From the hook, at the end of a backward pass, that pass is not counted: a step may
        still follow it. After another optimizer's step, every pass before it counts.
        """
        tracker = self._tracker
        limit = self._no_step_limit
        last_pass = tracker.last_pass
        stalled: list[tuple[int, tuple[int, ...], int]] = []
        steppers = self._steppers.live()
        for stepper in steppers:
            if stepper.stall_reported:
                continue
            own = tracker.group_passes(stepper.group) - stepper.window_start_reach
            if by_hook and tracker.in_latest_pass(stepper.group):
                own -= 1
            if own <= limit:
                continue
            stepper.stall_reported = True
            start = stepper.window_start_pass
            reached = tuple(i for i in stepper.positions if last_pass[i] >= start)
            stalled.append((stepper.group, reached, own))
        if not stalled:
            if steppers or not by_hook or self._no_optimizer_reported:
                return []
            self._no_optimizer_reported = True
        context = StallContext(
            step=self.step,
            passes=max((n for _, _, n in stalled), default=tracker.unstepped - 1),
            limit=limit,
            table=self._table,
            tracker=tracker,
            stalled=tuple(stalled),
            optimizers_known=bool(steppers),
            nonfinite=self._nonfinite([i for _, reached, _ in stalled for i in reached]),
        )
        findings: list[Finding] = []
        for detector in self._detectors:
            if detector.phase is Phase.NO_STEP:
                findings.extend(detector.stalled(context))
        return findings

    def _nonfinite(self, positions: list[int]) -> bool | None:
        """Whether a gradient of ``positions`` holds Inf or NaN: one read per device, made only
        when steps are overdue."""
        grads = [g for g in (self._table.params[i].grad for i in positions) if g is not None]
        if not grads:
            return None
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in grads:
            by_device.setdefault(grad.device, []).append(grad)
        return not all(
            bool(torch.stack([_dense_values(g.detach()).isfinite().all() for g in group]).all())
            for group in by_device.values()
        )

    # ------------------------------------------------------------------ where gradients are clipped
    # Called by the wrappers of :mod:`gradwatch._clipping` around torch's clip functions and
    # ``GradScaler.unscale_``; host bookkeeping only.

    def clipping(
        self, tensors: list[torch.Tensor], threshold: float | None
    ) -> Callable[[], None] | None:
        """Before a clip of ``tensors``: what it will clip, judged once it has run."""
        params, position_of = self._table.params, self._position_of
        if not params:
            return None
        tracker = self._tracker
        received, last_pass = tracker.received, tracker.last_pass
        steppers = self._steppers.live()
        judged: list[int] = []
        reached = used = False
        owner: Stepper | None = None
        for tensor in tensors:
            i = position_of.get(id(tensor))
            if i is None or params[i] is not tensor or not received[i]:
                continue
            mine = next((s for s in steppers if i in s.position_set), None)
            if mine is None:
                continue
            if owner is None:
                owner = mine
            judged.append(i)
            if last_pass[i] >= mine.window_start_pass:
                reached = True
                break  # one of this step's gradients: the call is placed after a backward pass
            used = used or tracker.used_by_step(i, tensor.grad)
        if owner is None:
            return None
        first = judged[0]
        context = ClipContext(
            ClipMoment.CLIP,
            owner.steps - 1 if used and not reached else owner.steps,
            owner.group,
            tuple(judged),
            self._table,
            tracker,
            threshold,
            reached=reached,
            used=used,
        )
        clip = _Clip(tensors, first, owner.group, tracker.sequence, threshold)

        def clipped() -> None:
            if reached or not used:
                # A clip after the step would be judged again, as before the next backward.
                self._clips.append(clip)
                self._clip_sites[clip.group] = clip.first
            self._reporter.report(self._run_clip(context))

        return clipped

    def unscaled(self, optimizer: torch.optim.Optimizer) -> None:
        """After a ``GradScaler`` unscaled ``optimizer``'s gradients."""
        if not self._table.params:
            return
        stepper = self._steppers.get(optimizer)
        if stepper is None:
            return
        clip = self._latest_clip(stepper)
        tracker = self._tracker
        before = clip is not None and (
            clip.sequence >= tracker.arrival[clip.first]
            and tracker.last_pass[clip.first] >= stepper.window_start_pass
        )
        if clip is not None:
            positions = self._clipped_positions(stepper, clip) if before else (clip.first,)
        else:
            site = self._clip_sites.get(stepper.group)
            positions = () if site is None else (site,)
        context = ClipContext(
            ClipMoment.UNSCALE,
            stepper.steps,
            stepper.group,
            positions,
            self._table,
            tracker,
            None if clip is None else clip.threshold,
            before_unscale=before,
        )
        self._reporter.report(self._run_clip(context))

    def _clips_at_check(self, stepper: Stepper, label: int) -> list[Finding]:
        """At a check: whether the latest clip of the optimizer's parameters since its last
        step came before their gradient."""
        clip = self._latest_clip(stepper)
        self._clips.clear()  # judged once: a step the scaler skips keeps no stale clip
        tracker = self._tracker
        if clip is None or tracker.last_pass[clip.first] < stepper.window_start_pass:
            return []  # no clip, or its first parameter got no gradient in this step
        before = clip.sequence < tracker.arrival[clip.first]
        context = ClipContext(
            ClipMoment.CHECK,
            label,
            stepper.group,
            self._clipped_positions(stepper, clip) if before else (clip.first,),
            self._table,
            tracker,
            clip.threshold,
            before_gradient=before,
        )
        return self._run_clip(context)

    def _latest_clip(self, stepper: Stepper) -> _Clip | None:
        for clip in reversed(self._clips):
            if clip.group == stepper.group:
                return clip
        return None

    def _clipped_positions(self, stepper: Stepper, clip: _Clip) -> tuple[int, ...]:
        """The watched parameters of ``clip`` that ``stepper``'s optimizer updates, its first
        judged one first (read only when the clip is misplaced)."""
        params, position_of = self._table.params, self._position_of
        found = [clip.first]
        for tensor in clip.tensors:
            i = position_of.get(id(tensor))
            if (
                i is not None
                and i != clip.first
                and params[i] is tensor
                and i in stepper.position_set
            ):
                found.append(i)
        return tuple(found)

    def _run_clip(self, context: ClipContext) -> list[Finding]:
        findings: list[Finding] = []
        for detector in self._detectors:
            if detector.phase is Phase.CLIP:
                findings.extend(detector.clipped(context))
        return findings

    # ------------------------------------------------------------------ front ends driving checks
    # For a front end that decides itself when a check happens (the framework callbacks check
    # from their framework's hooks instead of optimizer step pre-hooks).

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int | None = None,
        tolerate: Sequence[Kind] = (),
    ) -> bool:
        """Check ``optimizer``'s gradients now, as :meth:`before_step` does before a step.

        Args:
            optimizer: A watched optimizer (or any, when following all); others are ignored.
            step: The step that labels this check's findings and statistics (default: the
                optimizer's own count of steps).
            tolerate: Kinds expected at this check, not reported (and not counted) for it: the
                non-finite gradients of a step that a ``GradScaler`` is about to skip. With
                ``on_nonfinite="skip"`` such gradients are left to the scaler, not cleared.

        Returns:
            Whether a check ran: not for an optimizer that updates no watched parameter, nor
            for one checked already at this ``step`` without having stepped since (a closure
            evaluated again within one step, as LBFGS does).

        With ``on_nonfinite="skip"``, call it before the optimizer reads the gradients: when they
        are not finite it clears them (``.grad = None``) before returning or raising.
        Pair each check with :meth:`after_step` once the optimizer has really stepped (the
        front end registers it as a step post-hook).
        """
        stepper = self._steppers.get(optimizer)
        if stepper is None:
            return False
        label = stepper.steps if step is None else step
        if stepper.state in (StepState.CHECKED, StepState.SKIPPED) and stepper.label == label:
            return False
        self._reporter.tolerate(label, tolerate)
        self._check(stepper, label, before_update=True)
        return True

    def state_of(self, optimizer: torch.optim.Optimizer) -> StepState | None:
        """Where ``optimizer`` is in its step's life cycle; ``None`` if it is not checked.

        ``CHECKED`` before a new check means the step after the last check never ran (a
        ``GradScaler`` skipped it).
        """
        stepper = self._steppers.get(optimizer)
        return None if stepper is None else stepper.state

    def drain(self) -> None:
        """Report every check still in flight now; ``on_finding="raise"`` does not raise here."""
        self._drain(block=True, raising=False)

    # ------------------------------------------------------------------ the statistics pass

    @torch.no_grad()  # after backward(create_graph=True) the gradients are part of a graph
    def _check(self, stepper: Stepper, label: int, *, before_update: bool) -> None:
        params = self._table.params
        positions: list[int] = []
        grads: list[torch.Tensor] = []
        missing: list[int] = []
        for i in stepper.positions:
            grad = params[i].grad
            if grad is not None:
                positions.append(i)
                grads.append(grad)
            else:
                missing.append(i)
        reached, rewritten = self._rewritten(stepper, positions, grads)
        optimizer = stepper.optimizer()
        learning_rates = () if optimizer is None else _group_lrs(optimizer, stepper, positions)
        stepper.label = label
        stepper.state = StepState.CHECKED
        self._steppers.count_reaching_passes(stepper, positions)
        context = CheckContext(
            step=label,
            group=stepper.group,
            indices=positions,
            table=self._table,
            tracker=self._tracker,
            window_start_pass=stepper.window_start_pass,
            coverage=self._steppers.coverage(),
            missing=tuple(missing),
            reached=reached,
            rewritten=rewritten,
            learning_rates=learning_rates,
            updates=stepper.updates,
            unregistered=tuple(self._unregistered),
        )
        self._unregistered.clear()
        findings = self._clips_at_check(stepper, label) if self._clips else []
        findings += self._run(context, Phase.AT_CHECK)
        norms = self._plan(stepper, positions, grads).norms(grads)
        skipping = self._skip_nonfinite and before_update
        # "skip" promises a step with any non-finite gradient the optimizer is about to use:
        # those of its parameters outside the watched model are checked too, as one flag in the
        # same host copy.
        outside = self._outside_grads(stepper) if skipping else []
        extras = self._extras_due(stepper, label, positions)
        flag = self._outside_flag(stepper, outside) if outside else None
        spread = self._replica_spread(stepper, label, positions, norms)
        packed = norms
        if extras is not None or flag is not None or spread is not None:
            packed = self._pack(norms, extras, positions, grads, flag, spread)
        copy = HostCopy(packed)  # the one device-to-host copy of this check
        pending = _PendingCheck(
            context,
            copy,
            extras,
            grads,
            norms.dtype,
            flags=1 if outside else 0,
            replica_positions=tuple(stepper.positions) if spread is not None else (),
        )
        # To skip a step with non-finite gradients, the answer must be on the host before the
        # optimizer runs: with on_nonfinite="skip" the check waits for its copy (on CUDA one
        # synchronisation per check). Otherwise a copy still in flight is read at a later check,
        # so that a quiet step never waits for the device.
        self._drain(block=skipping, raising=True)  # earlier checks still in flight come first
        if skipping or (copy.ready() and not self._pending):
            checked = self._process(pending)
            if skipping:
                checked += self._outside_findings(stepper, context, copy.wait(), outside)
                checked += self._skip_if_nonfinite(stepper, context, checked)
            findings += checked
        else:
            pending.grads = None  # not kept alive until a later check
            self._pending.append(pending)
        self._reporter.report(findings)

    def _rewritten(
        self, stepper: Stepper, positions: list[int], grads: list[torch.Tensor]
    ) -> tuple[frozenset[int], frozenset[int]]:
        """The positions a backward pass reached since the optimizer's last step, and those of
        them whose ``.grad`` was changed in place since it was accumulated; both empty as soon as
        one reached gradient is there as it was accumulated (a healthy step: the first one).

        For the ``cleared_before_step`` detector, from host bookkeeping only (``_version``
        counters, no tensor values), taken now: on CUDA its statistics phase may run a few steps
        later.
        """
        last_pass, changed = self._tracker.last_pass, self._tracker.changed_since_accumulated
        start = stepper.window_start_pass
        if any(
            last_pass[i] >= start and not changed(i, grad)
            for i, grad in zip(positions, grads, strict=True)
        ):
            return frozenset(), frozenset()
        reached = frozenset(i for i in stepper.positions if last_pass[i] >= start)
        rewritten = frozenset(
            i for i, grad in zip(positions, grads, strict=True) if i in reached and changed(i, grad)
        )
        return reached, rewritten

    @staticmethod
    def _outside_grads(stepper: Stepper) -> list[tuple[str, torch.Tensor]]:
        """The gradients of the optimizer's parameters outside the watched model, named
        ``<optimizer N, group G, param P>`` (the optimizer's number in this monitor, the index
        of its parameter group, the parameter's index in that group)."""
        optimizer = stepper.optimizer()
        if optimizer is None or not stepper.outside:
            return []
        groups = optimizer.param_groups
        found = []
        for g, i in stepper.outside:
            grad = groups[g]["params"][i].grad
            if grad is not None:
                found.append((f"<optimizer {stepper.group}, group {g}, param {i}>", grad))
        return found

    @staticmethod
    def _outside_flag(stepper: Stepper, outside: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """One device value: NaN when an outside gradient holds NaN, else Inf when one's norm is
        infinite (a real Inf, or squares that overflow), else finite."""
        grads = [grad for _, grad in outside]
        key = tuple(name for name, _ in outside)
        if stepper.outside_plan is None or stepper.outside_plan[0] != key:
            stepper.outside_plan = (key, NormPlan(grads))
        return stepper.outside_plan[1].norms(grads).max().reshape(1)

    def _outside_findings(
        self,
        stepper: Stepper,
        context: CheckContext,
        host: torch.Tensor,
        outside: list[tuple[str, torch.Tensor]],
    ) -> list[Finding]:
        """``nan``/``inf`` findings of the gradients outside the watched model, read from the
        flag after the norms; each non-finite one names its tensor."""
        if not outside:
            return []
        flag = float(host[len(context.indices)])
        if math.isfinite(flag):  # the quiet step: nothing more is read
            return []
        # The flag is the largest norm: also infinite for finite values whose squares overflow.
        # Look at the values themselves (a device read, only at a step that is likely skipped).
        findings = []
        for name, grad in outside:
            values = _dense_values(grad.detach())
            state = torch.stack((values.isnan().any(), values.isinf().any())).cpu().tolist()
            if state[0] or state[1]:
                kind = Kind.NAN if state[0] else Kind.INF
                findings.append(Finding(kind, context.step, name, value=1.0, params=(name,)))
        return findings

    def _skip_if_nonfinite(
        self, stepper: Stepper, context: CheckContext, findings: list[Finding]
    ) -> list[Finding]:
        """Clear the optimizer's gradients when this check found NaN/Inf; the finding saying so.

        Runs before the policy, so the gradients are gone even when ``on_finding="raise"``.
        Gradients a ``GradScaler`` is about to skip (tolerated kinds) are left to it. The finding
        names the watched parameters in backward order, then those outside the model. Every
        ``torch.optim`` optimizer passes over a parameter whose ``.grad`` is ``None``: its weight,
        its state (momentum, moments, step count) and its weight decay are left untouched.
        """
        nonfinite = [
            f for f in findings if f.kind in _NON_FINITE and not self._reporter.is_tolerated(f)
        ]
        optimizer = stepper.optimizer()
        if not nonfinite or optimizer is None:
            return []
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        stepper.state = StepState.SKIPPED
        named = [name for f in nonfinite for name in f.params]
        positions = {self._name_position[name] for name in named if name in self._name_position}
        watched = [self._table.names[i] for i in by_arrival(context, sorted(positions))]
        outside = [name for name in dict.fromkeys(named) if name not in self._name_position]
        names = (*watched, *outside)
        return [
            Finding(Kind.SKIPPED_STEP, context.step, None, value=float(len(names)), params=names)
        ]

    @staticmethod
    def _plan(stepper: Stepper, positions: list[int], grads: list[torch.Tensor]) -> NormPlan:
        key = tuple(positions)
        if stepper.plan is not None and stepper.plan[0] == key:
            return stepper.plan[1]
        plan = NormPlan(grads)
        stepper.plan = (key, plan)
        return plan

    def _drain(self, *, block: bool, raising: bool) -> None:
        while self._pending and (block or self._pending[0].copy.ready()):
            self._reporter.report(self._process(self._pending.popleft()), raising=raising)

    def _extras_due(self, stepper: Stepper, step: int, positions: list[int]) -> _Extras | None:
        if not self._sinks or not positions:
            return None
        histograms = bool(self.histogram_every) and step % self.histogram_every == 0
        ratios = bool(self.ratio_every) and step % self.ratio_every == 0
        if not (histograms or ratios):
            return None
        optimizer = stepper.optimizer()
        learning_rates = None
        if ratios and optimizer is not None:
            learning_rates = _learning_rates(optimizer, [self._table.params[i] for i in positions])
        return _Extras(histograms, learning_rates, self.histogram_bins)

    def _pack(
        self,
        norms: torch.Tensor,
        extras: _Extras | None,
        positions: list[int],
        grads: list[torch.Tensor],
        flag: torch.Tensor | None,
        spread: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The norms, the outside flag, the histogram rows, then the weight norms, in one device
        tensor whose dtype holds the norms exactly (float64 norms are never rounded to float32:
        what a check finds must not depend on whether outputs are on)."""
        histograms = extras is not None and extras.histograms
        rows = histogram_rows(grads, extras.bins, norms.device) if extras and histograms else None
        dtype = rows.dtype if rows is not None else statistics_dtype(norms.device)
        dtype = torch.promote_types(dtype, norms.dtype)
        parts = [norms.to(dtype)]
        if flag is not None:
            parts.append(flag.to(norms.device, dtype, non_blocking=True))
        if rows is not None:
            parts.append(rows.reshape(-1).to(dtype))
        if extras is not None and extras.learning_rates is not None:
            weights = [self._table.params[i].detach() for i in positions]
            parts.append(gradient_norms(weights).to(norms.device, dtype, non_blocking=True))
        if spread is not None:
            parts.append(spread.to(norms.device, dtype))
        return torch.cat(parts)

    def _replica_spread(
        self, stepper: Stepper, label: int, positions: list[int], norms: torch.Tensor
    ) -> torch.Tensor | None:
        """Every ``replica_every`` checks under data parallelism: each of the optimizer's
        watched parameters' gradient norm (-1 where absent or not finite), then its weight norm,
        reduced on the device to their largest over the ranks, followed by minus the same values
        reduced the same way (minus their smallest). One collective of four values per
        parameter, no host read."""
        replicas = self._replicas
        if replicas is None or label % self.options.replica_every:
            return None
        layout = {p: j for j, p in enumerate(stepper.positions)}
        values = torch.full((len(layout),), -1.0, dtype=norms.dtype, device=norms.device)
        if positions:
            at = torch.tensor([layout[p] for p in positions], device=norms.device)
            values[at] = torch.where(torch.isfinite(norms), norms, -1.0)
        weights = gradient_norms([self._table.params[i].detach() for i in stepper.positions])
        weights = weights.to(norms.device, norms.dtype)
        weights = torch.where(torch.isfinite(weights), weights, -1.0)
        spread = torch.cat([values, weights, -values, -weights])
        try:
            replicas(spread)
        except Exception as error:  # the same on every rank: all step aside together
            self._replicas = None
            warn_user(
                f"gradwatch: the replica_divergence check stopped: reducing the gradient norms "
                f"over the ranks failed ({type(error).__name__}: {error}); training goes on "
                f"unchanged.",
                RuntimeWarning,
            )
            return None
        return spread

    def _process(self, pending: _PendingCheck) -> list[Finding]:
        context, extras = pending.context, pending.extras
        host = pending.copy.wait()
        count = len(context.indices)
        packed = extras is not None or pending.flags or pending.replica_positions
        context.norms = host[:count].to(pending.norms_dtype) if packed else host
        compared = len(pending.replica_positions)
        if compared:
            spread = host[len(host) - 4 * compared :]
            context.replica_positions = pending.replica_positions
            context.replica_high = spread[: 2 * compared]
            context.replica_low = -spread[2 * compared :]
        context.magnitudes, context.overflowed = _magnitudes(context.norms, pending.grads)
        if extras is not None and extras.learning_rates is not None:
            start = count + pending.flags
            if extras.histograms:
                start += count * (extras.bins + COLUMNS)
            context.weight_norms = host[start : start + count]
        with np.errstate(over="ignore"):  # float64 gradients may lie beyond float32's range
            findings = self._run(context, Phase.STATISTICS)
        if self._sinks:
            norms = context.norms
            finite = norms[torch.isfinite(norms)]
            total = float(finite.double().square().sum().sqrt()) if len(finite) else math.nan
            names = [self._table.names[i] for i in context.indices]
            self._sinks.write_check(context.step, names, norms, total)
            if extras is not None:
                self._write_extras(
                    context.step, names, norms, host[count + pending.flags :], extras
                )
        return findings

    def _write_extras(
        self, step: int, names: list[str], norms: torch.Tensor, rest: torch.Tensor, extras: _Extras
    ) -> None:
        """``rest``: what the host copy holds after the norms and flags."""
        count = len(names)
        host = rest
        offset = 0
        if extras.histograms:
            size = count * (extras.bins + COLUMNS)
            rows = host[offset : offset + size].reshape(count, extras.bins + COLUMNS)
            offset += size
            self._sinks.write_histograms(step, names, GradientHistograms(rows))
        if extras.learning_rates is not None:
            grad_norms = norms.double()
            weight_norms = host[offset : offset + count].double()
            lrs = torch.tensor(extras.learning_rates, dtype=torch.float64)
            self._sinks.write_update_ratios(step, names, lrs * grad_norms / weight_norms)

    def _run(self, context: CheckContext, phase: Phase) -> list[Finding]:
        findings: list[Finding] = []
        for detector in self._detectors:
            if detector.phase is phase:
                findings.extend(detector.check(context))
        return findings


def _magnitudes(
    norms: torch.Tensor, grads: list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``norms`` with each infinite norm of finite values (squares overflowing float32, or
    float64 beyond ~1.3e154) replaced by the largest |value|, and where that was so; only while
    the gradients are at hand. The magnitudes are float64 then: a float64 gradient's largest
    |value| may lie beyond float32's range."""
    if grads is None:
        return norms, None
    values = norms.numpy()
    if np.isfinite(values).all():  # the common case, at a numpy call's cost
        return norms, None
    positions = np.flatnonzero(np.isinf(values)).tolist()
    if not positions:
        return norms, None
    # The check's answer is on the host already; read in the gradients' own precision.
    largest = [float(n.cpu()) for n in _foreach_max_abs([grads[j] for j in positions])]
    magnitudes = norms.to(torch.float64, copy=True)
    overflowed = torch.zeros(len(norms), dtype=torch.bool)
    for position, value in zip(positions, largest, strict=True):
        if math.isfinite(value):
            overflowed[position] = True
            magnitudes[position] = value  # a lower bound of the norm, for the exploding check
    return magnitudes, overflowed


def check_parameters(named: Sequence[tuple[str, nn.Parameter]]) -> None:
    """Refuses parameters the statistics cannot be taken of; front ends call it before they open
    any output, and :class:`Monitor` again."""
    complex_names = [name for name, p in named if p.is_complex()]
    if complex_names:
        raise GradWatchValueError(
            f"complex parameters are not supported: {', '.join(complex_names[:5])}"
            f"{' ...' if len(complex_names) > 5 else ''}; freeze them or keep them as real "
            f"tensors (torch.view_as_real) to watch this model"
        )
    meta_names = [name for name, p in named if p.is_meta]
    if meta_names:
        raise GradWatchValueError(
            f"parameters on the meta device hold no values to check: "
            f"{', '.join(meta_names[:5])}{' ...' if len(meta_names) > 5 else ''}; "
            f"materialise the model first (model.to_empty(device=...), then initialise it)"
        )


class _HandSteps(torch.optim.Optimizer):
    """Stands for the steps a loop takes by hand (:meth:`Monitor.mark_step`): one parameter
    group holding every watched parameter, never stepped, with no learning rate."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(list(params), {})


def _host_lr(lr: object) -> float:
    if isinstance(lr, torch.Tensor):
        # A tensor lr on an accelerator would need a device read: leave it unknown.
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else math.nan
    return float(lr) if isinstance(lr, (int, float)) else math.nan


def _group_lrs(
    optimizer: torch.optim.Optimizer, stepper: Stepper, positions: list[int]
) -> tuple[float, ...]:
    """The learning rate of each parameter group holding one of ``positions``; every group's
    when none is 0 (the common case, one look per group)."""
    groups = optimizer.param_groups
    lrs = tuple(_host_lr(group.get("lr")) for group in groups)
    if 0.0 not in lrs:
        return lrs
    group_of = stepper.group_of
    holding = sorted({group_of[i] for i in positions if i in group_of})
    return tuple(lrs[g] for g in holding if g < len(lrs))


def _learning_rates(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[float]:
    """The learning rate of each parameter's group; NaN where it is not a host number."""
    by_param: dict[int, float] = {}
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            # A tensor lr on an accelerator would need a device read: leave the ratio unknown.
            lr = float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else None
        value = float(lr) if isinstance(lr, (int, float)) else math.nan
        for p in group["params"]:
            by_param[id(p)] = value
    return [by_param.get(id(p), math.nan) for p in params]


FOLLOW_STEPS = 10
"""How many optimizer steps after a finding a later one may be marked as following from it."""

_NUMERIC = frozenset((Kind.EXPLODING, Kind.NAN, Kind.INF))
_FOLLOWS: dict[Kind, frozenset[Kind]] = {
    Kind.EXPLODING: frozenset((Kind.EXPLODING,)),
    Kind.NAN: _NUMERIC,
    Kind.INF: _NUMERIC,
    Kind.SKIPPED_STEP: _NUMERIC,
}
"""The kinds a finding of each kind can follow from: growing gradients overflow into Inf and
NaN, which spread to other parameters and get steps skipped."""

_AT_ONE_CHECK = {Kind.EXPLODING: 0, Kind.NAN: 1, Kind.INF: 1, Kind.SKIPPED_STEP: 2}
"""Cause before consequence among findings of one step (a check reports nan before exploding)."""


def follows(findings: Sequence[Finding]) -> list[Finding | None]:
    """For each finding, the earlier one it follows from, at the root of the chain, or ``None``.

    A ``nan``, ``inf`` or ``skipped_step`` finding follows an ``exploding``, ``nan`` or ``inf``
    one, and an ``exploding`` finding an earlier ``exploding`` one, when that one came first (at
    an earlier step, or at the same step with exploding before nan/inf before skipped_step), at
    most ``FOLLOW_STEPS`` steps before, and the two name a parameter in common (``params``, or
    ``param`` where ``params`` is empty). Of several such, the first counts; a chain is followed
    to its start, so every NaN of a blow-up points at the exploding finding it began with.
    """
    order = sorted(
        range(len(findings)),
        key=lambda i: (findings[i].step, _AT_ONE_CHECK.get(findings[i].kind, 0), i),
    )
    names = [set(f.params) or ({f.param} - {None}) for f in findings]
    roots: list[Finding | None] = [None] * len(findings)
    for position, i in enumerate(order):
        causes = _FOLLOWS.get(findings[i].kind)
        if causes is None:
            continue
        for j in order[:position]:
            earlier = findings[j]
            if (
                earlier.kind in causes
                and findings[i].step - earlier.step <= FOLLOW_STEPS
                and not names[i].isdisjoint(names[j])
            ):
                roots[i] = roots[j] or earlier
                break
    return roots


def format_summary(
    findings: Sequence[Finding], occurrences: dict[tuple[Kind, str | None], int], steps: int
) -> str:
    """The readable report both front ends print: each finding, how often it was seen, the
    earlier finding it follows from (see :func:`follows`), advice."""
    if not findings:
        return f"gradwatch: no gradient problems found in {steps} optimizer steps."
    lines = [f"gradwatch: {len(findings)} finding(s) in {steps} optimizer steps:"]
    for f, root in zip(findings, follows(findings), strict=True):
        seen = occurrences.get((f.kind, f.param), 1)
        again = f" (seen at {seen} checks)" if seen > 1 else ""
        after = "" if root is None else f" (follows {root.kind.value} at step {root.step})"
        lines.append(f"  [{f.kind.value}] {f.param or '(model)'}{again}{after}")
        lines.append(f"      {f.message}")
    return "\n".join(lines)
