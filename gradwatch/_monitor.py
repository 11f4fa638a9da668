"""The core both front ends drive: checks of one optimizer's gradients, detectors, findings.

One check: the gradients an optimizer is about to use -> one foreach pass of norms, copied to the
host -> detectors -> findings -> (with ``on_nonfinite="skip"``: the step skipped when a gradient is
not finite) -> policy and sinks. The front end decides when a check happens
(``watch()``: optimizer step hooks; the Lightning callback: Lightning's hooks) and feeds the
tracker from one post-accumulate-grad hook per parameter.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradwatch import _options
from gradwatch._histograms import (
    COLUMNS,
    DEFAULT_BINS,
    GradientHistograms,
    histogram_rows,
    statistics_dtype,
)
from gradwatch._stats import HostCopy, NormPlan, gradient_norms, max_abs
from gradwatch._tracker import GradientTracker
from gradwatch.detectors import (
    AccumulationDetector,
    CheckContext,
    CoverageDetector,
    Detector,
    MagnitudeDetector,
    NumericsDetector,
    ParamTable,
)
from gradwatch.detectors.base import by_arrival
from gradwatch.findings import (
    Finding,
    GradientError,
    GradWatchTypeError,
    GradWatchValueError,
    GradWatchWarning,
    Kind,
)
from gradwatch.sinks import GuardedSinks, Sink

_NON_FINITE = frozenset((Kind.NAN, Kind.INF))


@dataclasses.dataclass(eq=False)
class _Stepper:
    """What the watcher knows about one optimizer."""

    group: int
    optimizer: weakref.ref[torch.optim.Optimizer]
    signature: tuple[tuple[int, int], ...] = ()
    positions: list[int] = dataclasses.field(default_factory=list)
    position_set: frozenset[int] = frozenset()
    steps: int = 0
    window_start_pass: int = 0
    reached_passes: int = 0
    """Backward passes that gave gradients to at least one of this optimizer's parameters."""
    counted_passes: int = 0
    deferred: bool = False
    plan: tuple[tuple[int, ...], NormPlan] | None = None
    """The norm plan of the last check, for the positions that had gradients then."""


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


class Monitor:
    """Gradient checks of one model's parameters, for any number of optimizers.

    Args:
        named: The watched parameters with their qualified names.
        optimizers: The optimizers to check; empty to adopt every optimizer that steps any of
            these parameters (``follow_all``).
        accumulation_steps, options, on_finding, on_nonfinite: As validated by ``watch()``.
        sinks: Outputs; the monitor closes them.
        histogram_every: Optimizer steps between gradient histograms sent to the sinks (at steps
            that are multiples of it; 0 for none).
        ratio_every: Optimizer steps between ``lr * |grad| / |weight|`` ratios sent to the
            sinks (0 for none).
        histogram_bins: Buckets per histogram.
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
        sinks: Sequence[Sink] = (),
        histogram_every: int = 0,
        ratio_every: int = 0,
        histogram_bins: int = DEFAULT_BINS,
    ) -> None:
        self.accumulation_steps = accumulation_steps
        self.histogram_every = histogram_every
        self.ratio_every = ratio_every
        self.histogram_bins = histogram_bins
        self.options = options
        self._on_finding = on_finding
        check_parameters(named)
        self._skip_nonfinite = on_nonfinite == "skip"
        self._warned_closure = False
        self._table = ParamTable.from_named(named)
        self.tracker = GradientTracker(len(self._table))
        self._tracker = self.tracker
        self._lock = threading.RLock()
        self._findings: list[Finding] = []
        self._occurrences: collections.Counter[tuple[Kind, str | None]] = collections.Counter()
        self._pending: collections.deque[_PendingCheck] = collections.deque()
        self._position = {id(p): i for i, p in enumerate(self._table.params)}
        self._name_position = {name: i for i, name in enumerate(self._table.names)}
        self._steppers: dict[int, _Stepper] = {}
        self._follow_all = not optimizers
        self._optimized_cache: frozenset[int] | None = None
        self._saved_steps: dict[int, int] = {}
        self._detectors: list[Detector] = [
            AccumulationDetector(accumulation_steps),
            CoverageDetector(
                options.no_grad_after, self._optimized_positions, self._passes_reaching
            ),
            NumericsDetector(),
            MagnitudeDetector(
                len(self._table),
                explode_factor=options.explode_factor,
                max_grad_norm=options.max_grad_norm,
                warmup_steps=options.warmup_steps,
                history=options.history,
                vanish_ratio=options.vanish_ratio,
                vanish_steps=options.vanish_steps,
            ),
        ]
        self._sinks = GuardedSinks(list(sinks))
        for optimizer in optimizers:
            self._steppers[id(optimizer)] = self._new_stepper(optimizer)

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter), in the order found."""
        with self._lock:
            return list(self._findings)

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many checks showed each (kind, parameter) so far."""
        with self._lock:
            return dict(self._occurrences)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the most any watched optimizer has taken)."""
        saved = self._saved_steps.values()
        return max((*saved, *(s.steps for s in self._steppers.values())), default=0)

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
            self._drain(block=True, raising=False)
        finally:
            self._sinks.flush()
            self._sinks.close()
            self._table.params.clear()

    def state_dict(self) -> dict[str, Any]:
        """Step counts, detector history and findings, for resuming a run."""
        with self._lock:
            return {
                "version": 1,
                "param_names": list(self._table.names),
                "steps": {s.group: s.steps for s in self._steppers.values()},
                "tracker": self._tracker.state_dict(),
                "detectors": [d.state_dict() for d in self._detectors],
                "findings": [_finding_to_dict(f) for f in self._findings],
                "occurrences": [
                    [kind.value, param, count] for (kind, param), count in self._occurrences.items()
                ],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, for the same model.

        Raises:
            GradWatchTypeError: ``state`` is not a dict.
            GradWatchValueError: ``state`` was saved by another version, for another model or
                with other detector options; the watcher is then left as it was.
        """
        if not isinstance(state, dict):
            raise GradWatchTypeError(
                f"state must be a dict from state_dict(), got {type(state).__name__}"
            )
        if state.get("version") != 1:
            raise GradWatchValueError(
                f"state must come from state_dict() (version 1), got version "
                f"{state.get('version')!r}"
            )
        if state.get("param_names") != self._table.names:
            raise GradWatchValueError(
                "state was saved for a model with different parameters; expected "
                f"{len(self._table.names)} parameters named as this model's"
            )
        with self._lock:
            previous = self.state_dict()
            previous_saved = dict(self._saved_steps)
            try:
                self._load(state)
            except (AttributeError, KeyError, TypeError, ValueError) as error:
                self._load(previous)
                self._saved_steps = previous_saved
                raise GradWatchValueError(
                    f"state could not be loaded into this watcher (saved with other detector "
                    f"options?): {error}"
                ) from error

    def _load(self, state: dict[str, Any]) -> None:
        self._saved_steps = {int(g): int(n) for g, n in state["steps"].items()}
        for stepper in self._steppers.values():
            stepper.steps = self._saved_steps.get(stepper.group, stepper.steps)
        self._tracker.load_state_dict(state["tracker"])
        for detector, detector_state in zip(self._detectors, state["detectors"], strict=True):
            detector.load_state_dict(detector_state)
        self._findings = [_finding_from_dict(d) for d in state["findings"]]
        self._occurrences = collections.Counter(
            {(Kind(kind), param): int(count) for kind, param, count in state["occurrences"]}
        )

    # ------------------------------------------------------------------ hooks

    def before_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        stepper = self._stepper_for(optimizer)
        if stepper is None:
            return
        # torch passes step()'s positional arguments with the optimizer itself first.
        positional = args[1:] if args and args[0] is optimizer else args
        if kwargs.get("closure") is not None or any(a is not None for a in positional):
            # The closure computes the gradients inside step(): check them after it.
            stepper.deferred = True
            if self._skip_nonfinite and not self._warned_closure:
                self._warned_closure = True
                warnings.warn(
                    "gradwatch: on_nonfinite='skip' cannot skip a step taken with "
                    "optimizer.step(closure): the closure computes the gradients inside step(), "
                    "so gradwatch checks them after the update (NaN/Inf is still reported). Call "
                    "backward() before optimizer.step() to have such steps skipped.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self._check(stepper, before_update=True)

    def after_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        stepper = self._stepper_for(optimizer)
        if stepper is None:
            return
        if stepper.deferred:
            stepper.deferred = False
            self._check(stepper, before_update=False)
        params = self._table.params
        self._tracker.on_stepped(stepper.positions, [params[i].grad for i in stepper.positions])
        stepper.steps += 1
        stepper.window_start_pass = self._tracker.backward_passes

    # ------------------------------------------------------------------ checks

    def _check(self, stepper: _Stepper, *, before_update: bool) -> None:
        params = self._table.params
        positions: list[int] = []
        grads: list[torch.Tensor] = []
        for i in stepper.positions:
            grad = params[i].grad
            if grad is not None:
                positions.append(i)
                grads.append(grad)
        self._count_reaching_passes(stepper, positions)
        context = CheckContext(
            step=stepper.steps,
            group=stepper.group,
            indices=positions,
            table=self._table,
            tracker=self._tracker,
            window_start_pass=stepper.window_start_pass,
        )
        findings = self._run(context, statistics=False)
        norms = self._plan(stepper, positions, grads).norms(grads)
        extras = self._extras_due(stepper, positions)
        if extras is not None:
            norms = self._pack(norms, extras, positions, grads)
        copy = HostCopy(norms)  # the one device-to-host copy of this check
        # To skip a step with non-finite gradients, the answer must be on the host before the
        # optimizer runs: with on_nonfinite="skip" the check waits for its copy (on CUDA one
        # synchronisation per check). Otherwise a copy still in flight is read at a later check,
        # so that a quiet step never waits for the device.
        skipping = self._skip_nonfinite and before_update
        self._drain(block=skipping, raising=True)  # earlier checks still in flight come first
        if skipping or (copy.ready() and not self._pending):
            context.max_abs = lambda where: max_abs([grads[j] for j in where])
            checked = self._process(context, copy, extras)
            if skipping:
                checked += self._skip_if_nonfinite(stepper, context, checked)
            findings += checked
        else:
            self._pending.append(_PendingCheck(context, copy, extras))
        self._report(findings)

    def _skip_if_nonfinite(
        self, stepper: _Stepper, context: CheckContext, findings: list[Finding]
    ) -> list[Finding]:
        """Clear the optimizer's gradients when this check found NaN/Inf; the finding saying so.

        Runs before the policy, so the gradients are gone even when ``on_finding="raise"``.
        Gradients a ``GradScaler`` is about to skip (tolerated kinds) are left to it. Every
        ``torch.optim`` optimizer passes over a parameter whose ``.grad`` is ``None``: its weight,
        its state (momentum, moments, step count) and its weight decay are left untouched.
        """
        nonfinite = [f for f in findings if f.kind in _NON_FINITE and not self._is_tolerated(f)]
        optimizer = stepper.optimizer()
        if not nonfinite or optimizer is None:
            return []
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        positions = {self._name_position[name] for f in nonfinite for name in f.params}
        names = tuple(self._table.names[i] for i in by_arrival(context, sorted(positions)))
        return [
            Finding(Kind.SKIPPED_STEP, context.step, None, value=float(len(names)), params=names)
        ]

    @staticmethod
    def _plan(stepper: _Stepper, positions: list[int], grads: list[torch.Tensor]) -> NormPlan:
        key = tuple(positions)
        if stepper.plan is not None and stepper.plan[0] == key:
            return stepper.plan[1]
        plan = NormPlan(grads)
        stepper.plan = (key, plan)
        return plan

    def _drain(self, *, block: bool, raising: bool) -> None:
        while self._pending and (block or self._pending[0].copy.ready()):
            pending = self._pending.popleft()
            self._report(
                self._process(pending.context, pending.copy, pending.extras), raising=raising
            )

    def _extras_due(self, stepper: _Stepper, positions: list[int]) -> _Extras | None:
        if not self._sinks or not positions:
            return None
        step = stepper.steps
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
        extras: _Extras,
        positions: list[int],
        grads: list[torch.Tensor],
    ) -> torch.Tensor:
        """The norms, then the histogram rows, then the weight norms, in one device tensor."""
        rows = histogram_rows(grads, extras.bins, norms.device) if extras.histograms else None
        dtype = rows.dtype if rows is not None else statistics_dtype(norms.device)
        parts = [norms.to(dtype)]
        if rows is not None:
            parts.append(rows.reshape(-1))
        if extras.learning_rates is not None:
            weights = [self._table.params[i].detach() for i in positions]
            parts.append(gradient_norms(weights).to(norms.device, dtype, non_blocking=True))
        return torch.cat(parts)

    def _process(
        self, context: CheckContext, copy: HostCopy, extras: _Extras | None = None
    ) -> list[Finding]:
        host = copy.wait()
        count = len(context.indices)
        # A fresh tensor, which detectors may adjust in place.
        context.norms = host if extras is None else host[:count].float()
        findings = self._run(context, statistics=True)
        if self._sinks:
            norms = context.norms
            finite = norms[torch.isfinite(norms)]
            total = float(finite.double().square().sum().sqrt()) if len(finite) else math.nan
            names = [self._table.names[i] for i in context.indices]
            self._sinks.write_check(context.step, names, norms, total)
            if extras is not None:
                self._write_extras(context.step, names, host, extras)
        return findings

    def _write_extras(
        self, step: int, names: list[str], host: torch.Tensor, extras: _Extras
    ) -> None:
        count = len(names)
        offset = count
        if extras.histograms:
            size = count * (extras.bins + COLUMNS)
            rows = host[offset : offset + size].reshape(count, extras.bins + COLUMNS)
            offset += size
            self._sinks.write_histograms(step, names, GradientHistograms(rows))
        if extras.learning_rates is not None:
            grad_norms = host[:count].double()
            weight_norms = host[offset : offset + count].double()
            lrs = torch.tensor(extras.learning_rates, dtype=torch.float64)
            self._sinks.write_update_ratios(step, names, lrs * grad_norms / weight_norms)

    def _run(self, context: CheckContext, *, statistics: bool) -> list[Finding]:
        findings: list[Finding] = []
        for detector in self._detectors:
            if detector.needs_statistics == statistics:
                findings.extend(detector.check(context))
        return findings

    def _report(self, findings: list[Finding], *, raising: bool = True) -> None:
        new: list[Finding] = []
        with self._lock:
            for finding in findings:
                if finding.kind in self.options.ignore or self._is_tolerated(finding):
                    continue
                key = (finding.kind, finding.param)
                self._occurrences[key] += 1
                if self._occurrences[key] == 1:
                    self._findings.append(finding)
                    new.append(finding)
        for finding in new:
            self._sinks.write_finding(finding)
        for finding in new:
            self._apply_policy(finding, raising=raising)

    def _apply_policy(self, finding: Finding, *, raising: bool) -> None:
        policy = self._on_finding
        if policy == "warn":
            warnings.warn(GradWatchWarning(finding), stacklevel=4)
        elif policy == "raise":
            if raising:
                raise GradientError(finding)
        elif callable(policy):
            policy(finding)

    # ------------------------------------------------------------------ optimizers

    def _new_stepper(self, optimizer: torch.optim.Optimizer) -> _Stepper:
        stepper = _Stepper(group=len(self._steppers), optimizer=weakref.ref(optimizer))
        self._refresh(stepper, optimizer)
        stepper.window_start_pass = self._tracker.backward_passes
        stepper.steps = self._saved_steps.get(stepper.group, 0)
        return stepper

    def _stepper_for(self, optimizer: torch.optim.Optimizer) -> _Stepper | None:
        stepper = self._steppers.get(id(optimizer))
        if stepper is not None and stepper.optimizer() is not optimizer:
            stepper = None  # a new optimizer reusing a dead one's id
            del self._steppers[id(optimizer)]
        if stepper is None:
            if not self._follow_all:
                return None
            stepper = self._new_stepper(optimizer)
            self._steppers[id(optimizer)] = stepper
            self._optimized_cache = None
        else:
            self._refresh(stepper, optimizer)
        return stepper if stepper.positions else None

    def _refresh(self, stepper: _Stepper, optimizer: torch.optim.Optimizer) -> None:
        signature = tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)
        if signature == stepper.signature:
            return
        stepper.signature = signature
        position = self._position
        ids = (id(p) for group in optimizer.param_groups for p in group["params"])
        stepper.position_set = frozenset(position[i] for i in ids if i in position)
        stepper.positions = sorted(stepper.position_set)
        self._optimized_cache = None

    def _count_reaching_passes(self, stepper: _Stepper, positions: list[int]) -> None:
        passes = self.tracker.backward_passes
        start = max(stepper.window_start_pass, stepper.counted_passes)
        last_pass = self.tracker.last_pass
        if any(last_pass[i] >= start for i in positions):
            # Passes of other optimizers may fall in the same window: count at most the passes
            # one step is declared to accumulate.
            stepper.reached_passes += min(passes - start, self.accumulation_steps)
        stepper.counted_passes = passes

    def _passes_reaching(self, positions: list[int]) -> list[int]:
        steppers = list(self._steppers.values())
        unowned = self.tracker.backward_passes
        if self._follow_all and self._optimized_positions() is None:
            unowned = 0  # whose parameter it is may not be known yet
        return [
            max((s.reached_passes for s in steppers if i in s.position_set), default=unowned)
            for i in positions
        ]

    def _optimized_positions(self) -> frozenset[int] | None:
        if self._follow_all and (
            not any(s.positions for s in self._steppers.values())
            or self._tracker.backward_passes < self.options.no_grad_after
        ):
            return None
        if self._optimized_cache is None:
            self._optimized_cache = frozenset(
                i for s in self._steppers.values() for i in s.positions
            )
        return self._optimized_cache

    # ------------------------------------------------------------------ front ends driving checks
    # For a front end that decides itself when a check happens (the Lightning callback checks
    # from Lightning's hooks instead of optimizer step pre-hooks). Additive: ``watch()`` does not
    # use these.

    _tolerated: tuple[tuple[int, frozenset[Kind]], ...] = ()
    """(step, kinds) of recent checks at which those kinds are expected, not findings."""

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int | None = None,
        tolerate: Sequence[Kind] = (),
    ) -> None:
        """Check ``optimizer``'s gradients now, as :meth:`before_step` does before a step.

        Args:
            optimizer: A watched optimizer (or any, when following all); others are ignored.
            step: The step that labels this check's findings and statistics (default: the
                optimizer's own count of steps).
            tolerate: Kinds expected at this check, not reported (and not counted) for it: the
                non-finite gradients of a step that a ``GradScaler`` is about to skip. With
                ``on_nonfinite="skip"`` such gradients are left to the scaler, not cleared.

        With ``on_nonfinite="skip"``, call it before the optimizer reads the gradients: when they
        are not finite it clears them (``.grad = None``) before returning or raising.
        Pair each check with :meth:`stepped` once the optimizer has really stepped.
        """
        stepper = self._stepper_for(optimizer)
        if stepper is None:
            return
        label = stepper.steps if step is None else step
        kept = tuple((s, kinds) for s, kinds in self._tolerated if s != label)
        if tolerate:
            kept = (*kept, (label, frozenset(tolerate)))
        self._tolerated = kept[-64:]  # checks still in flight are at most a few steps old
        own_steps = stepper.steps
        stepper.steps = label
        try:
            self._check(stepper, before_update=True)
        finally:
            stepper.steps = own_steps

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        """Record that ``optimizer`` stepped with the gradients it holds now (after a check)."""
        self.after_step(optimizer, (), {})

    def drain(self) -> None:
        """Report every check still in flight now; ``on_finding="raise"`` does not raise here."""
        self._drain(block=True, raising=False)

    def _is_tolerated(self, finding: Finding) -> bool:
        return any(
            step == finding.step and finding.kind in kinds for step, kinds in self._tolerated
        )


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


def format_summary(
    findings: Sequence[Finding], occurrences: dict[tuple[Kind, str | None], int], steps: int
) -> str:
    """The readable report both front ends print: each finding, how often it was seen, advice."""
    if not findings:
        return f"gradwatch: no gradient problems found in {steps} optimizer steps."
    lines = [f"gradwatch: {len(findings)} finding(s) in {steps} optimizer steps:"]
    for f in findings:
        seen = occurrences.get((f.kind, f.param), 1)
        again = f" (seen at {seen} checks)" if seen > 1 else ""
        lines.append(f"  [{f.kind.value}] {f.param or '(model)'}{again}")
        lines.append(f"      {f.message}")
    return "\n".join(lines)


def _finding_to_dict(finding: Finding) -> dict[str, Any]:
    data = dataclasses.asdict(finding)
    data["kind"] = finding.kind.value
    data["params"] = list(finding.params)
    return data


def _finding_from_dict(data: dict[str, Any]) -> Finding:
    return Finding(
        kind=Kind(data["kind"]),
        step=int(data["step"]),
        param=data["param"],
        value=data["value"],
        threshold=data["threshold"],
        params=tuple(data["params"]),
    )
