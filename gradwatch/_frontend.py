"""The layer every front end stands on: settings, parameters, outputs, sessions, the exchange.

``watch()`` (plain PyTorch), the Lightning callback and the ``transformers`` callback keep only
what is specific to their framework: when a check happens, where the outputs go by default, how
the ranks talk. Everything else is here, once:

- :class:`Settings`: every keyword argument, validated, with errors that name the entry point
  the user called; the callbacks' ``state_key`` derives from it.
- :func:`eligible_parameters` and :func:`check_optimizers`: what can be watched, and which
  optimizers (wrapped ones unwrapped).
- :func:`open_outputs` and :class:`Session`: the TensorBoard sink and the findings log, the
  monitor and every hook, opened together and rolled back together on failure.
- :class:`FrameworkWatch`: the framework-free core of a training-framework callback: one session
  per fit, a check before each optimizer step, findings exchanged between ranks at a point
  every rank reaches, published once by rank zero, state kept across fits and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from gradwatch import _checks, _options
from gradwatch._monitor import Monitor, check_parameters, format_summary
from gradwatch._probe import ForwardProbe
from gradwatch._reporting import apply_policy
from gradwatch._steppers import StepState
from gradwatch._wrapped import unwrap_optimizer
from gradwatch.findings import (
    Finding,
    GradWatchError,
    GradWatchTypeError,
    GradWatchValueError,
    Kind,
)
from gradwatch.registry import HookRegistry
from gradwatch.sinks.base import FanOut, Sink, as_sink

RATIO_EVERY = 10
"""Optimizer steps between per-parameter norms and update ratios in TensorBoard."""

_NON_FINITE = (Kind.NAN, Kind.INF)

OWN_DIRECTORY = "gradwatch_logs"
"""The folder a callback writes to under its framework's log directory when it has no
TensorBoard run to join. Not ``gradwatch``: in a project's working directory that folder would
shadow the installed package."""

LogDir = str | None | Literal[False]

_KEY_OPTIONS_0_1 = (
    "no_grad_after",
    "explode_factor",
    "max_grad_norm",
    "warmup_steps",
    "history",
    "vanish_ratio",
    "vanish_steps",
)
"""The detector options of gradwatch 0.1, always part of a callback's ``state_key`` (so that its
checkpoints still find their state); options added since join the key only when not default."""


# ---------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every keyword argument of a front end, validated once.

    Attributes:
        entry: The entry point the user called (``"watch()"``, ``"GradWatchCallback()"``),
            named in every error.
        log_dir: A directory, ``None`` (the front end's default: none for ``watch()``, the
            framework's log directory for a callback) or ``False`` (no files; callbacks only).
        writer: A ``SummaryWriter`` of the user's (then ``log_dir`` is its directory).
        accumulation_steps: ``None`` only for a callback: the framework's own setting.
    """

    entry: str
    log_dir: LogDir
    writer: Any
    histogram_every: int
    accumulation_steps: int | None
    on_finding: _options.OnFinding
    on_nonfinite: _options.OnNonFinite
    options: _options.DetectorOptions
    sinks: tuple[Sink, ...]

    @classmethod
    def validate(
        cls,
        entry: str,
        *,
        log_dir: object = None,
        histogram_every: object = 100,
        accumulation_steps: object = 1,
        on_finding: object = "warn",
        on_nonfinite: object = "report",
        sinks: object = (),
        detector_options: dict[str, Any] | None = None,
        framework: bool = False,
    ) -> Settings:
        """Validate a front end's keyword arguments.

        Args:
            entry: The entry point, as the user wrote it.
            framework: For a callback: ``log_dir=False`` and ``accumulation_steps=None`` are
                allowed.

        Raises:
            GradWatchTypeError, GradWatchValueError: The first bad argument, named, with what is
                allowed and what was received, prefixed with ``entry``.
        """
        _options.DetectorOptions.check_names(detector_options or {}, entry)
        try:
            writer = log_dir if is_summary_writer(log_dir) else None
            checked_dir: LogDir
            if writer is not None:
                checked_dir = writer.get_logdir()  # type: ignore[attr-defined]
            elif framework and log_dir is False:
                checked_dir = False
            else:
                checked_dir = _options.check_log_dir(log_dir)
            every = _options.check_int_at_least("histogram_every", histogram_every, 0)
            accumulation = (
                None
                if framework and accumulation_steps is None
                else _options.check_int_at_least("accumulation_steps", accumulation_steps, 1)
            )
            policy = _options.check_on_finding(on_finding)
            nonfinite = _options.check_on_nonfinite(on_nonfinite)
            options = _options.DetectorOptions.from_kwargs(detector_options or {}, entry)
            checked_sinks = check_sinks(sinks)
        except GradWatchError as error:
            if str(error).startswith(entry):
                raise
            raise type(error)(f"{entry}: {error}") from None
        return cls(
            entry=entry,
            log_dir=checked_dir,
            writer=writer,
            histogram_every=every,
            accumulation_steps=accumulation,
            on_finding=policy,
            on_nonfinite=nonfinite,
            options=options,
            sinks=checked_sinks,
        )

    def key_fields(self) -> dict[str, Any]:
        """What tells two callbacks' settings apart, for their ``state_key``."""
        policy = self.on_finding
        fields: dict[str, Any] = {
            "log_dir": self.log_dir,
            "accumulation_steps": self.accumulation_steps,
            "on_finding": policy
            if isinstance(policy, str)
            else getattr(policy, "__qualname__", "?"),
            "on_nonfinite": self.on_nonfinite,
        }
        values = self.options.as_dict()
        defaults = _options.DetectorOptions().as_dict()
        for name, value in values.items():
            if name in _KEY_OPTIONS_0_1 or (name != "ignore" and value != defaults[name]):
                fields[name] = value
        fields["ignore"] = sorted(kind.value for kind in self.options.ignore)
        return fields


def check_sinks(sinks: object) -> tuple[Sink, ...]:
    """``sinks`` as a tuple of :class:`Sink`; objects with the four methods are adapted."""
    if not isinstance(sinks, (list, tuple)):
        raise GradWatchTypeError(
            f"sinks must be a list or tuple of sinks, got {_checks.received(sinks)}; "
            f"each a gradwatch.sinks.Sink"
        )
    return tuple(as_sink(sink) for sink in sinks)


def is_summary_writer(value: object) -> bool:
    """Whether ``value`` is a ``torch.utils.tensorboard.SummaryWriter`` (never imports it)."""
    module = sys.modules.get("torch.utils.tensorboard.writer")
    return module is not None and isinstance(value, module.SummaryWriter)


# ---------------------------------------------------------------------------- what is watched


def eligible_parameters(
    model: nn.Module, entry: str, subject: str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable named parameters of ``model``, refused when none can be watched.

    Args:
        subject: How errors call the model (default: ``model`` and its class).

    Raises:
        GradWatchValueError: No trainable parameter, or complex or meta-device ones.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        what = subject or "model"
        where = "" if subject else f": {type(model).__name__}"
        raise GradWatchValueError(
            f"{entry}: {what} has no trainable parameters (none with requires_grad=True) to "
            f"watch{where}"
        )
    check_parameters(named)
    return named


def check_optimizers(optimizer: object, entry: str = "watch()") -> list[torch.optim.Optimizer]:
    """One optimizer, a list of them, or ``None``, as a list of distinct torch optimizers
    (wrappers of accelerate, Fabric and Lightning unwrapped)."""
    if optimizer is None:
        return []
    is_list = isinstance(optimizer, (list, tuple))
    items = list(optimizer) if is_list else [optimizer]  # type: ignore[call-overload]
    if is_list and not items:
        raise GradWatchValueError(
            f"optimizer must be a torch.optim.Optimizer, a non-empty list of them, or None; got "
            f"an empty {type(optimizer).__name__}"
        )
    checked: list[torch.optim.Optimizer] = []
    for number, item in enumerate(items):
        unwrapped = unwrap_optimizer(
            item,
            argument="optimizer",
            entry=entry,
            allowed="a torch.optim.Optimizer, a list of them, or None;",
        )
        for earlier, seen in enumerate(checked):
            if seen is unwrapped:
                # Its hooks would run twice per step: every step would count twice.
                raise GradWatchValueError(
                    f"optimizer must list each optimizer once; got the same "
                    f"{type(unwrapped).__name__} at positions {earlier} and {number}"
                )
        checked.append(unwrapped)
    return checked


# ---------------------------------------------------------------------------- outputs


def open_outputs(
    directory: str | None,
    writer: Any,
    entry: str,
    *,
    findings_log: bool = True,
    rank: int = 0,
    none_hint: str = "None",
    param_names: Sequence[str] | None = None,
) -> list[Sink]:
    """The TensorBoard sink (``writer``'s, or a new one under ``directory``) and the findings
    log in its directory; an ``OSError`` becomes an error naming the path.

    Raises:
        GradWatchValueError: The directory cannot be created or written.
    """
    from gradwatch.sinks.jsonl import FindingsLog
    from gradwatch.sinks.tensorboard import TensorBoardSink

    opened: list[Sink] = []
    path = directory
    try:
        tensorboard = TensorBoardSink(
            directory, writer=writer, param_every=RATIO_EVERY, param_names=param_names
        )
        opened.append(tensorboard)
        path = tensorboard.log_dir
        if findings_log:
            opened.append(FindingsLog(path, rank=rank))
    except BaseException as error:
        for sink in opened:
            sink.close()
        if isinstance(error, OSError):
            raise GradWatchValueError(
                f"{entry}: log_dir {path!r} could not be created or written: "
                f"{error.strerror or error}; pass a writable directory, or {none_hint} for no "
                f"files"
            ) from error
        raise
    return opened


# ---------------------------------------------------------------------------- one session


class Session:
    """A monitor, its outputs and every hook it needs, opened together.

    Args:
        settings: The validated settings.
        named: The parameters to watch (from :func:`eligible_parameters`).
        optimizers: The optimizers to check; empty to follow every optimizer (``watch()``).
        accumulation_steps: Backward passes meant per optimizer step.
        sinks: The outputs (the session closes them).
        on_finding: The policy the monitor applies (a callback queues findings instead).
        step_hooks: ``True``: a check before every optimizer step and a record after it
            (``watch()``). ``False``: only a mark before each real step (passes inside it are
            not overdue) and the record after it; the front end calls :meth:`Monitor.check`
            itself.

    If anything fails while opening, everything opened so far is closed again and the error
    propagates: nothing is left on the model, the optimizers or the file system's writers.
    """

    def __init__(
        self,
        settings: Settings,
        named: Sequence[tuple[str, nn.Parameter]],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        accumulation_steps: int,
        sinks: Sequence[Sink] | FanOut,
        on_finding: _options.OnFinding,
        step_hooks: bool,
        model: nn.Module | None = None,
        replicas: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.registry = HookRegistry()
        self.probe: ForwardProbe | None = None
        fanout = sinks if isinstance(sinks, FanOut) else FanOut(list(sinks))
        monitor: Monitor | None = None
        try:
            monitor = Monitor(
                named,
                optimizers,
                accumulation_steps=accumulation_steps,
                options=settings.options,
                on_finding=on_finding,
                on_nonfinite=settings.on_nonfinite,
                sinks=fanout,
                histogram_every=settings.histogram_every,
                ratio_every=RATIO_EVERY,
                replicas=replicas,
            )
            self.registry.add_param_hooks([p for _, p in named], monitor.tracker.on_accumulated)
            if step_hooks:
                targets: Sequence[torch.optim.Optimizer | None] = optimizers or [None]
                for optimizer in targets:
                    self.registry.add_step_hooks(optimizer, monitor.before_step, monitor.after_step)
            else:
                for optimizer in optimizers:
                    self.registry.add_step_pre_hook(optimizer, monitor.entering_step)
                    self.registry.add_step_post_hook(optimizer, monitor.after_step)
            if model is not None and monitor.probes_forward:
                self.probe = ForwardProbe(model, monitor.held, monitor.unregistered_found)
                self.registry.adopt(self.probe.handles)  # removed with every other hook
        except BaseException:
            self.registry.remove()
            if monitor is not None:
                monitor.close()
            else:
                fanout.close()
            raise
        self.monitor = monitor

    def close(self) -> None:
        """Remove every hook, report what is in flight (never raising), close the outputs."""
        self.registry.remove()
        self.monitor.close()


# ---------------------------------------------------------------------------- ranks


def replica_reduction(model: object, world_size: int) -> Callable[[torch.Tensor], None] | None:
    """How the ranks' gradient norms are compared under ``DistributedDataParallel`` (an
    in-place all-reduce to the largest, on the norms' device); ``None`` for anything else (one
    process; FSDP, whose shards are meant to differ)."""
    from torch.nn.parallel import DistributedDataParallel

    if world_size < 2 or not isinstance(model, DistributedDataParallel):
        return None
    import torch.distributed as dist

    def reduce(values: torch.Tensor) -> None:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)

    return reduce


class Collective(Protocol):
    """What the findings exchange needs from a framework's process group."""

    def sum(self, value: float) -> float:
        """The sum of ``value`` over every rank (every rank calls it)."""
        ...

    def broadcast(self, obj: Any, src: int) -> Any:
        """``obj`` of rank ``src``, on every rank (every rank calls it)."""
        ...


class TorchCollective:
    """:class:`Collective` over ``torch.distributed``'s default process group."""

    def __init__(self, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        if device is None:
            backend = dist.get_backend()
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if backend == "nccl"
                else torch.device("cpu")
            )
        self._device = device

    def sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device)
        self._dist.all_reduce(tensor)
        return float(tensor.item())  # the exchange's one read, at a point every rank reaches

    def broadcast(self, obj: Any, src: int) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src, device=self._device)
        return box[0]


class FrameworkWatch:
    """The framework-free core of a training-framework callback.

    The callback translates its framework's events: :meth:`start` when training starts (on
    every rank), :meth:`before_optimizer_step` before each optimizer step, :meth:`exchange` at a
    point every rank reaches once per step, :meth:`finish` when training ends normally, and
    :meth:`close` whenever it ends. Findings, step counts and detector history survive between
    trainings (a second ``fit``) and through :meth:`state_dict` (a checkpoint).

    Distributed training: every rank runs its own monitor over its own gradients, with no
    collective in any gradient hook, and in a check only the replica comparison's all-reduce
    under DDP (every ``replica_every`` checks, which every rank makes at the same step).
    Findings are queued, and at :meth:`exchange` every
    rank takes part in the same exchange: a one-element sum of the queued counts, then, only
    when that sum is non-zero (a value every rank receives, so every rank takes the same
    branch), one object broadcast per rank. Whether a rank found anything never decides whether
    it joins, so a finding on one rank alone cannot make the others wait. A finding is then
    published once, by rank zero (policy, sinks, findings log with the rank that found it), and
    every rank's :attr:`findings` holds the same list; with ``on_finding="raise"`` every rank
    raises the same :class:`GradientError` after the exchange.
    """

    STATE_VERSION = 1

    def __init__(self, settings: Settings, *, name: str) -> None:
        self.settings = settings
        self.name = name
        """The callback's class name, used in messages about its state."""
        self._session: Session | None = None
        self._batch: object = None
        self._findings: list[Finding] = []
        self._published: set[tuple[Kind, str | None]] = set()
        self._outbox: list[tuple[int, Finding]] = []
        self._saved: dict[str, Any] | None = None
        """The monitor's state when no training runs: the last one's, or a checkpoint's."""
        self._resume = False
        self._steps = 0
        self._occurrences: dict[tuple[Kind, str | None], int] = {}
        self._rank = 0
        self._world_size = 1
        self._collective: Collective | None = None
        self._logger = logging.getLogger("gradwatch")
        self._finding_sinks: FanOut = FanOut()
        self._output_dir: str | None = None
        self._scaler: Any = None
        self._scale_above_one: bool | None = None

    # ------------------------------------------------------------------ what callbacks expose

    @property
    def monitor(self) -> Monitor | None:
        return self._session.monitor if self._session is not None else None

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter) on any rank, in the order reported."""
        return list(self._findings)

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many of this rank's checks showed each (kind, parameter)."""
        monitor = self.monitor
        return monitor.occurrences if monitor is not None else dict(self._occurrences)

    @property
    def step(self) -> int:
        """Optimizer steps of the watched parameters so far, whichever optimizer took them (steps
        a ``GradScaler`` skipped are not counted)."""
        monitor = self.monitor
        return monitor.step if monitor is not None else self._steps

    @property
    def output_dir(self) -> str | None:
        """The directory TensorBoard events and the findings log go to (rank zero), if any."""
        return self._output_dir

    def summary(self) -> str:
        return format_summary(self.findings, self.occurrences, self.step)

    def state_dict(self) -> dict[str, Any]:
        monitor = self.monitor
        saved = monitor.state_dict() if monitor is not None else self._saved
        if saved is None and not self._findings:
            return {}
        return {
            "version": self.STATE_VERSION,
            "monitor": saved,
            "findings": [f.to_dict() for f in self._findings],
        }

    def load_state_dict(self, state_dict: object) -> None:
        source = f"{self.name}.state_dict()"
        if not isinstance(state_dict, dict):
            raise GradWatchTypeError(
                f"state_dict must be a dict from {source}, got {type(state_dict).__name__}"
            )
        version = state_dict.get("version")
        if (
            isinstance(version, bool)
            or not isinstance(version, int)
            or version != self.STATE_VERSION
        ):
            raise GradWatchValueError(
                f"state_dict must come from {source} (version {self.STATE_VERSION}), got "
                f"version {version!r:.40}"
            )
        try:
            findings = [Finding.from_dict(d) for d in state_dict["findings"]]
            monitor = state_dict["monitor"]
            if monitor is not None and not isinstance(monitor, dict):
                raise TypeError(f"'monitor' is {type(monitor).__name__}, not a dict")
        except (KeyError, TypeError, ValueError) as error:
            raise GradWatchValueError(
                f"state_dict could not be read; it must come from {source}: {error!r}"
            ) from error
        if self._session is not None and monitor is not None:
            self._session.monitor.load_state_dict(monitor)
        else:
            self._saved = monitor
            self._resume = True
        self._findings = findings
        self._published = {(f.kind, f.param) for f in findings}

    def __getstate__(self) -> dict[str, Any]:
        if self._session is not None:
            raise GradWatchValueError(
                f"{self.name} cannot be pickled or copied during training; do it before or after"
            )
        state = dict(self.__dict__)
        for transient in ("_finding_sinks", "_scaler", "_collective"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._finding_sinks = FanOut()
        self._scaler = None
        self._collective = None

    # ------------------------------------------------------------------ life cycle

    def start(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        accumulation_steps: int,
        rank: int,
        world_size: int,
        outputs: list[Sink],
        collective: Collective | None,
        scaler: Any = None,
        logger: logging.Logger | None = None,
        no_optimizer: str | None = None,
        model: nn.Module | None = None,
        replicas: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """Open a session over ``named`` and ``optimizers`` (every rank calls it).

        Args:
            named: The parameters to watch, from :func:`eligible_parameters` (which the front end
                calls before it opens any output).
            outputs: Rank zero's TensorBoard sink and findings log (from :func:`open_outputs`;
                empty on other ranks); closed here if the start fails.
            collective: How ranks exchange findings (``None`` with one process).
            scaler: The framework's ``GradScaler``, if any: non-finite gradients are tolerated
                while its scale is above 1 (overflows it will skip).
            no_optimizer: The error when no optimizer updates a watched parameter.
        """
        self.close()
        entry = self.name
        try:
            optimized = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
            if not any(id(p) in optimized for _, p in named):
                raise GradWatchValueError(
                    no_optimizer
                    or f"{entry}: no optimizer updates any of the {len(named)} trainable "
                    f"parameters; there are no optimizer steps to check"
                )
        except BaseException:
            for sink in outputs:
                sink.close()
            raise
        resume, self._resume = self._resume, False
        if not resume:  # a training starts afresh unless resumed from a checkpoint
            self._saved, self._steps, self._occurrences = None, 0, {}
            self._findings, self._published = [], set()
        self._rank, self._world_size = rank, world_size
        self._collective = collective if world_size > 1 else None
        if logger is not None:
            self._logger = logger
        # Statistics go to every sink at each check; findings reach sinks once, after the ranks
        # have exchanged them, through _publish (rank zero only).
        user_sinks = list(self.settings.sinks) if rank == 0 else []
        self._finding_sinks = FanOut([*outputs, *user_sinks])
        statistics = self._finding_sinks.without_findings()
        self._output_dir = outputs[0].log_dir if outputs else None  # type: ignore[attr-defined]
        session: Session | None = None
        try:
            session = Session(
                self.settings,
                named,
                optimizers,
                accumulation_steps=accumulation_steps,
                sinks=statistics,
                on_finding=self._queue,
                step_hooks=False,
                model=model,
                replicas=replicas,
            )
            if resume and self._saved is not None:
                session.monitor.load_state_dict(self._saved)
        except BaseException:
            if session is not None:
                session.close()
            self._finding_sinks.close()
            raise
        self._session = session
        self._scaler = scaler
        self._scale_above_one = None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Check ``optimizer``'s gradients, labelled ``step``; with one process, report now."""
        monitor = self.monitor
        if monitor is None:
            return
        tolerate = self._tolerated(monitor, optimizer)
        monitor.check(optimizer, step=step, tolerate=tolerate)
        if self._world_size == 1:
            self._publish(self._take(), raising=True)

    def batch_inputs(self, batch: object) -> None:
        """The batch a training step starts with (``None`` once it ends): tensors that
        :meth:`look_at_loss` does not take for parameters."""
        self._batch = batch

    def look_at_loss(self, loss: object) -> None:
        """A training step's loss, before its backward pass: the forward probe looks at its
        graph while it is active (the framework's step may not call the model's forward)."""
        session = self._session
        if session is not None and session.probe is not None and session.probe.active:
            session.probe.look_at(loss, self._batch)

    def exchange(self) -> None:
        """Exchange and publish queued findings; every rank calls it at the same point."""
        if self._session is not None:
            self._publish(self._exchange(), raising=True)

    def finish(self) -> None:
        """Report every check still in flight and exchange once more; never raises a finding."""
        if self._session is not None:
            self._session.monitor.drain()
            self._publish(self._exchange(), raising=False)

    def close(self) -> None:
        """Remove every hook, publish what this rank still holds, close the outputs.

        Idempotent, and no collective: it also runs when a rank fails (others' queues are lost
        then).
        """
        session, self._session = self._session, None
        if session is None:
            return
        try:
            session.registry.remove()
            session.monitor.drain()
            self._publish(self._take(), raising=False)
            self._saved = session.monitor.state_dict()
            self._steps = session.monitor.step
            self._occurrences = session.monitor.occurrences
        finally:
            session.monitor.close()
            sinks, self._finding_sinks = self._finding_sinks, FanOut()
            sinks.close()

    # ------------------------------------------------------------------ internals

    def _tolerated(self, monitor: Monitor, optimizer: torch.optim.Optimizer) -> Sequence[Kind]:
        """``nan``/``inf`` while a GradScaler's scale is above 1: overflows it will skip."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return ()
        # The scale only comes down on a skipped step (a check whose step never ran), so it is
        # read (a device sync on CUDA) only after one, or while it is at or below 1.
        skipped = monitor.state_of(optimizer) is StepState.CHECKED
        if self._scale_above_one is None or skipped or not self._scale_above_one:
            self._scale_above_one = float(scaler.get_scale()) > 1.0
        return _NON_FINITE if self._scale_above_one else ()

    def _queue(self, finding: Finding) -> None:
        self._outbox.append((self._rank, finding))

    def _take(self) -> list[tuple[int, Finding]]:
        queued, self._outbox = self._outbox, []
        return queued

    def _exchange(self) -> list[tuple[int, Finding]]:
        """Every rank's queued findings, on every rank; called at the same point on all ranks."""
        local = self._take()
        collective = self._collective
        if collective is None:
            return local
        if collective.sum(float(len(local))) == 0.0:  # the same on every rank: all branch alike
            return []
        gathered: list[tuple[int, Finding]] = []
        for source in range(self._world_size):
            sent = collective.broadcast(
                [f for _, f in local] if source == self._rank else None, source
            )
            gathered += [(source, f) for f in sent or ()]
        return gathered

    def _publish(self, found: list[tuple[int, Finding]], *, raising: bool) -> None:
        new: list[tuple[int, Finding]] = []
        for rank, finding in found:
            key = (finding.kind, finding.param)
            if key not in self._published:
                self._published.add(key)
                self._findings.append(finding)
                new.append((rank, finding))
        if not new:
            return
        zero = self._rank == 0
        if zero:
            for rank, finding in new:
                self._finding_sinks.write_finding(finding, rank=rank)
        for rank, finding in new:
            apply_policy(
                self.settings.on_finding,
                finding,
                raising=raising,
                announce=zero,
                logger=self._logger,
                where=f" (on rank {rank})" if self._world_size > 1 else "",
            )


class CallbackSurface:
    """What every framework callback exposes, over one :class:`FrameworkWatch`.

    A callback class sets ``_ENTRY`` (its constructor as errors name it) and ``_NAME`` (how
    errors during training and its state name it), calls :meth:`_set_up` from ``__init__`` with
    its keyword arguments, and translates its framework's events into ``self._core``'s.
    """

    _ENTRY: ClassVar[str]
    _NAME: ClassVar[str]
    settings: Settings
    _core: FrameworkWatch

    def _set_up(
        self,
        *,
        log_dir: Any,
        histogram_every: int,
        accumulation_steps: int | None,
        on_finding: _options.OnFinding,
        on_nonfinite: _options.OnNonFinite,
        sinks: Sequence[Sink],
        detector_options: dict[str, Any],
    ) -> None:
        self.settings = Settings.validate(
            self._ENTRY,
            log_dir=log_dir,
            histogram_every=histogram_every,
            accumulation_steps=accumulation_steps,
            on_finding=on_finding,
            on_nonfinite=on_nonfinite,
            sinks=sinks,
            detector_options=detector_options,
            framework=True,
        )
        self._core = FrameworkWatch(self.settings, name=self._NAME)

    @property
    def log_dir(self) -> LogDir:
        return self.settings.log_dir

    @property
    def histogram_every(self) -> int:
        return self.settings.histogram_every

    @property
    def accumulation_steps(self) -> int | None:
        return self.settings.accumulation_steps

    @property
    def on_nonfinite(self) -> str:
        return self.settings.on_nonfinite

    @property
    def options(self) -> _options.DetectorOptions:
        return self.settings.options

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter) on any rank, in the order reported."""
        return self._core.findings

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many of this rank's checks showed each (kind, parameter)."""
        return self._core.occurrences

    @property
    def step(self) -> int:
        """Optimizer steps of the watched parameters so far, whichever optimizer took them (steps
        a ``GradScaler`` skipped are not counted)."""
        return self._core.step

    @property
    def output_dir(self) -> str | None:
        """The directory TensorBoard events and the findings log go to (rank zero), if any."""
        return self._core.output_dir

    def summary(self) -> str:
        """A readable report of every finding so far."""
        return self._core.summary()
