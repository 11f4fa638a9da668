"""``watch()`` and :class:`Watcher`: the plain-PyTorch front end.

Wiring of one step: autograd accumulates into ``.grad`` -> the tracker notes it (one hook per
parameter, no tensor reads) -> ``optimizer.step()`` pre-hook: one foreach pass of norms over the
gradients that optimizer is about to use, copied to the host -> detectors -> findings -> policy
and sinks -> step post-hook: the tracker remembers each ``.grad`` the optimizer used.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import warnings
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradwatch import _options
from gradwatch._stats import HostCopy, gradient_norms, max_abs
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
from gradwatch.findings import (
    Finding,
    GradientError,
    GradWatchTypeError,
    GradWatchValueError,
    GradWatchWarning,
    Kind,
)
from gradwatch.registry import HookRegistry
from gradwatch.sinks import GuardedSinks, Sink

_open_watchers: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()
_open_watchers_lock = threading.Lock()


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    log_dir: Any = None,
    histogram_every: int = 100,
    accumulation_steps: int = 1,
    on_finding: _options.OnFinding = "warn",
    **detector_options: Any,
) -> Watcher:
    """Watch the gradients of ``model`` and report gradient bugs as they happen.

    Args:
        model: The module whose trainable parameters to watch.
        optimizer: One optimizer, a list of them, or ``None`` to follow whichever optimizers step
            the model's parameters (through torch's global optimizer step hooks).
        log_dir: Directory for TensorBoard event files, or ``None`` for none.
        histogram_every: Optimizer steps between gradient histograms (0 turns them off).
        accumulation_steps: Backward passes you mean to accumulate per optimizer step.
        on_finding: ``"warn"`` (a :class:`GradWatchWarning`, once per kind and parameter),
            ``"raise"`` (a :class:`GradientError`), ``"record"`` (only kept in
            :attr:`Watcher.findings`), or a callable that receives each :class:`Finding`.
        **detector_options: Thresholds; see the README for each one's meaning and default:
            ``no_grad_after``, ``explode_factor``, ``max_grad_norm``, ``warmup_steps``,
            ``history``, ``vanish_ratio``, ``vanish_steps``, ``ignore``.

    Returns:
        An open :class:`Watcher`; use it as a context manager or call :meth:`Watcher.close`.

    Raises:
        GradWatchTypeError: An argument has the wrong type.
        GradWatchValueError: An argument has a value that is not allowed, or ``model`` is
            already watched.

    Example:
        >>> import torch, gradwatch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradwatch.watch(model, opt, on_finding="record") as watcher:
        ...     for _ in range(3):
        ...         model(torch.ones(4, 3)).sum().backward()  # no zero_grad()
        ...         opt.step()
        >>> [f.kind.value for f in watcher.findings]
        ['missing_zero_grad']
    """
    # Only detector options travel in **detector_options (not Watcher's own ``sinks``).
    _options.DetectorOptions.check_names(detector_options)
    return Watcher(
        model,
        optimizer,
        log_dir=log_dir,
        histogram_every=histogram_every,
        accumulation_steps=accumulation_steps,
        on_finding=on_finding,
        **detector_options,
    )


@dataclasses.dataclass(eq=False)
class _Stepper:
    """What the watcher knows about one optimizer."""

    group: int
    optimizer: weakref.ref[torch.optim.Optimizer]
    signature: tuple[tuple[int, int], ...] = ()
    positions: list[int] = dataclasses.field(default_factory=list)
    steps: int = 0
    window_start_pass: int = 0
    deferred: bool = False


@dataclasses.dataclass(eq=False)
class _PendingCheck:
    context: CheckContext
    copy: HostCopy


class Watcher:
    """Watches one model's gradients; created by :func:`watch`, which documents the arguments.

    Attributes are read-only views; the watcher writes nothing onto the model, its parameters or
    the optimizers, and :meth:`close` removes every hook it added.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        *,
        log_dir: Any = None,
        histogram_every: int = 100,
        accumulation_steps: int = 1,
        on_finding: _options.OnFinding = "warn",
        sinks: Sequence[Sink] = (),
        **detector_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise GradWatchTypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}"
            )
        optimizers = _check_optimizers(optimizer)
        self.accumulation_steps = _options.check_int_at_least(
            "accumulation_steps", accumulation_steps, 1
        )
        self.histogram_every = _options.check_int_at_least("histogram_every", histogram_every, 0)
        self._on_finding = _options.check_on_finding(on_finding)
        self.log_dir = _options.check_log_dir(log_dir)
        self.options = _options.DetectorOptions.from_kwargs(detector_options)
        named = _trainable_parameters(model)
        if not named:
            raise GradWatchValueError(
                f"model has no trainable parameters (none with requires_grad=True) to watch: "
                f"{type(model).__name__}"
            )

        self._table = ParamTable.from_named(named)
        self._tracker = GradientTracker(len(self._table))
        self._lock = threading.RLock()
        self._findings: list[Finding] = []
        self._occurrences: collections.Counter[tuple[Kind, str | None]] = collections.Counter()
        self._pending: collections.deque[_PendingCheck] = collections.deque()
        self._position = {id(p): i for i, p in enumerate(self._table.params)}
        self._steppers: dict[int, _Stepper] = {}
        self._follow_all = not optimizers
        self._optimized_cache: frozenset[int] | None = None
        self._saved_steps: dict[int, int] = {}
        self._closed = False

        options = self.options
        self._detectors: list[Detector] = [
            AccumulationDetector(self.accumulation_steps),
            CoverageDetector(options.no_grad_after, self._optimized_positions),
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
        self._registry = HookRegistry()
        self._model = weakref.ref(model)
        with _open_watchers_lock:
            if model in _open_watchers:
                raise GradWatchValueError(
                    f"model ({type(model).__name__}) is already watched by an open Watcher; "
                    f"close that one first (or use it instead)"
                )
            _open_watchers[model] = self
        try:
            if self.log_dir is not None:
                from gradwatch.sinks.tensorboard import TensorBoardSink

                self._sinks = GuardedSinks([*sinks, TensorBoardSink(self.log_dir)])
            self._registry.add_param_hooks(self._table.params, self._tracker.on_accumulated)
            for opt in optimizers:
                self._steppers[id(opt)] = self._new_stepper(opt)
                self._registry.add_step_hooks(opt, self._before_step, self._after_step)
            if self._follow_all:
                self._registry.add_step_hooks(None, self._before_step, self._after_step)
        except BaseException:
            self._registry.remove()
            with _open_watchers_lock:
                _open_watchers.pop(model, None)
            self._sinks.close()
            raise

    # ------------------------------------------------------------------ public API

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
    def closed(self) -> bool:
        return self._closed

    @property
    def param_names(self) -> list[str]:
        """Qualified names of the watched parameters."""
        return list(self._table.names)

    def summary(self) -> str:
        """A readable report of every finding so far."""
        findings = self.findings
        if not findings:
            return f"gradwatch: no gradient problems found in {self.step} optimizer steps."
        occurrences = self.occurrences
        lines = [f"gradwatch: {len(findings)} finding(s) in {self.step} optimizer steps:"]
        for f in findings:
            seen = occurrences.get((f.kind, f.param), 1)
            again = f" (seen at {seen} checks)" if seen > 1 else ""
            lines.append(f"  [{f.kind.value}] {f.param or '(model)'}{again}")
            lines.append(f"      {f.message}")
        return "\n".join(lines)

    def close(self) -> None:
        """Remove every hook, report what is still in flight, flush and close the outputs.

        Idempotent. Findings still in flight are recorded and written but not raised.
        """
        if self._closed:
            return
        self._closed = True
        self._registry.remove()
        try:
            self._drain(block=True, raising=False)
        finally:
            self._sinks.flush()
            self._sinks.close()
            model = self._model()
            with _open_watchers_lock:
                if model is not None and _open_watchers.get(model) is self:
                    del _open_watchers[model]
            self._table.params.clear()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The with-block is already failing: close anyway, but let its exception propagate as is.
        try:
            self.close()
        except Exception as error:
            warnings.warn(
                f"gradwatch: closing the watcher while the with-block raised "
                f"{type(exc).__name__} failed too ({error!r})",
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Watcher({state}, params={len(self._table.names)}, step={self.step}, "
            f"findings={len(self._findings)})"
        )

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
                f"state must be a dict from Watcher.state_dict(), got {type(state).__name__}"
            )
        if state.get("version") != 1:
            raise GradWatchValueError(
                f"state must come from Watcher.state_dict() (version 1), got version "
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
            except (KeyError, TypeError, ValueError) as error:
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

    def _before_step(
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
            return
        self._check(stepper)

    def _after_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        stepper = self._stepper_for(optimizer)
        if stepper is None:
            return
        if stepper.deferred:
            stepper.deferred = False
            self._check(stepper)
        params = self._table.params
        self._tracker.on_stepped(stepper.positions, [params[i].grad for i in stepper.positions])
        stepper.steps += 1
        stepper.window_start_pass = self._tracker.backward_passes

    # ------------------------------------------------------------------ checks

    def _check(self, stepper: _Stepper) -> None:
        params = self._table.params
        positions: list[int] = []
        grads: list[torch.Tensor] = []
        for i in stepper.positions:
            grad = params[i].grad
            if grad is not None:
                positions.append(i)
                grads.append(grad)
        context = CheckContext(
            step=stepper.steps,
            group=stepper.group,
            indices=positions,
            table=self._table,
            tracker=self._tracker,
            window_start_pass=stepper.window_start_pass,
        )
        findings = self._run(context, statistics=False)
        copy = HostCopy(gradient_norms(grads))
        if copy.ready() and not self._pending:
            context.max_abs = lambda where: max_abs([grads[j] for j in where])
            findings += self._process(context, copy)
        else:
            self._pending.append(_PendingCheck(context, copy))
        self._report(findings)
        self._drain(block=False, raising=True)

    def _drain(self, *, block: bool, raising: bool) -> None:
        while self._pending and (block or self._pending[0].copy.ready()):
            pending = self._pending.popleft()
            self._report(self._process(pending.context, pending.copy), raising=raising)

    def _process(self, context: CheckContext, copy: HostCopy) -> list[Finding]:
        context.norms = copy.wait().clone()
        findings = self._run(context, statistics=True)
        if self._sinks:
            norms = context.norms
            finite = norms[torch.isfinite(norms)]
            total = float(finite.double().square().sum().sqrt()) if len(finite) else math.nan
            names = [self._table.names[i] for i in context.indices]
            self._sinks.write_check(context.step, names, norms, total)
        return findings

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
                if finding.kind in self.options.ignore:
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
        stepper.positions = sorted({position[i] for i in ids if i in position})
        self._optimized_cache = None

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


def _check_optimizers(optimizer: object) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    if isinstance(optimizer, (list, tuple)) and not items:
        raise GradWatchValueError(
            f"optimizer must be a torch.optim.Optimizer, a non-empty list of them, or None; got "
            f"an empty {type(optimizer).__name__}"
        )
    checked: list[torch.optim.Optimizer] = []
    for item in items:
        if not isinstance(item, torch.optim.Optimizer):
            raise GradWatchTypeError(
                f"optimizer must be a torch.optim.Optimizer, a list of them, or None; got "
                f"{type(item).__name__} {item!r:.80}"
            )
        checked.append(item)
    return checked


def _trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


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


__all__ = ["Watcher", "watch"]
