"""``GradWatchCallback``: the Lightning front end, over the same core as ``gradwatch.watch``.

Example:
    >>> from gradwatch.lightning import GradWatchCallback
    >>> callback = GradWatchCallback(on_finding="record", log_dir=False)
    >>> callback.findings
    []

How it drives the core (:class:`gradwatch._monitor.Monitor`):

- ``on_fit_start`` (after ``configure_model`` and ``configure_optimizers``, on every rank) builds a
  monitor over the LightningModule's trainable named parameters and ``trainer.optimizers``, with
  ``accumulation_steps=trainer.accumulate_grad_batches`` unless given. One post-accumulate-grad
  hook per parameter feeds its tracker, and a step post-hook on each real optimizer records that
  the optimizer stepped; a step ``torch.amp.GradScaler`` skips calls no ``optimizer.step()``, so
  it is not recorded as a step. Every hook goes through one
  :class:`~gradwatch.registry.HookRegistry` and is removed at ``on_fit_end``, ``teardown`` and
  ``on_exception``.
- ``on_before_optimizer_step`` runs the check. Lightning calls it after the closure (training
  step, ``zero_grad``, backward) and after ``GradScaler.unscale_``, but *before* gradient
  clipping (``configure_gradient_clipping``). So the gradient checked is the unscaled, unclipped
  gradient that backward produced: an explosion that ``gradient_clip_val`` hides is still
  reported. Under a ``GradScaler`` (``precision="16-mixed"``) this hook also runs for steps the
  scaler then skips, so non-finite gradients are seen there too; while the loss scale is above 1
  they are the overflows dynamic loss scaling expects (the scaler skips the step and halves the
  scale), so ``nan``/``inf`` are reported once the scale has come down to 1 or below and the
  gradients are still not finite: the loss itself is broken, not its scaling.
- With ``on_nonfinite="skip"``, a check that finds NaN/Inf clears every gradient of that
  optimizer (``.grad = None``) right there, inside ``on_before_optimizer_step``: the optimizer then
  updates nothing (automatic and manual optimization alike, since Lightning calls the hook inside
  ``optimizer.step``). Under a ``GradScaler``, non-finite gradients are left to the scaler, which
  skips those steps itself: while the scale is above 1 gradwatch neither clears nor reports them;
  once it is not, it reports them and clears them (the scaler skips the step too, and it has
  recorded the overflow at ``unscale_``, so its scale is lowered as usual).
- Steps in findings (and TensorBoard's x-axis) are ``trainer.global_step`` at the check.

Lightning namespaces: Lightning checks a callback's class against its own ``Callback`` (the
``lightning.pytorch`` and ``pytorch_lightning`` packages each have one). ``GradWatchCallback``
derives from the ``Callback`` of every namespace that is installed, so one class works with
either ``Trainer``. Importing :mod:`gradwatch` never imports Lightning; importing this module
without either package installed raises an :class:`ImportError` that says what to install.

Distributed training: every rank runs its own monitor over its own gradients, with no collective
in any gradient hook or check. Findings are queued, and at ``on_train_batch_end`` (and once at
``on_train_end``) every rank takes part in the same exchange: a one-element sum of the queued
counts, then, only when that sum is non-zero (a value every rank receives, so every rank takes
the same branch), one object broadcast per rank. Every rank reaches ``on_train_batch_end`` for
every batch (Lightning runs ranks in lockstep; DDP's gradient all-reduce already requires it), and
whether a rank found anything never decides whether it joins the exchange, so a finding on one
rank alone cannot make the others wait. A finding is then reported once, by rank zero (warning,
log line, TensorBoard, findings log with the rank that found it), and every rank's ``findings``
holds the same list. With ``on_finding="raise"`` every rank raises the same
:class:`~gradwatch.GradientError` after that exchange, so all ranks stop together at the same
batch instead of one rank dying and the others waiting in the next all-reduce; the price is that
in distributed runs the step that showed the problem has already been taken. With one process
nothing is exchanged and ``"raise"`` stops ``fit`` before the optimizer step.
``on_nonfinite="skip"`` needs no exchange: the check comes after DDP's gradient all-reduce, which
carries a NaN/Inf of one rank into every rank's gradients, so every rank skips the same step (and
with ``"raise"`` too, the step every rank takes before stopping then changes nothing).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradwatch import _options
from gradwatch._monitor import (
    Monitor,
    _finding_from_dict,
    _finding_to_dict,
    check_parameters,
    format_summary,
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
from gradwatch.watcher import RATIO_EVERY, _is_summary_writer, _trainable_parameters

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _CallbackBase
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.sinks.jsonl import FindingsLog
    from gradwatch.sinks.tensorboard import TensorBoardSink

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_STATE_VERSION = 1
_NON_FINITE = (Kind.NAN, Kind.INF)


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    errors: list[str] = []
    for name in _NAMESPACES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
            continue
        bases.append(module.Callback)
    if not bases:
        raise ImportError(
            "gradwatch.lightning needs Lightning, and neither 'lightning' nor 'pytorch_lightning' "
            "could be imported; install one: pip install 'gradwatch[lightning]' (or lightning, "
            f"or pytorch-lightning). Import errors: {'; '.join(errors)}"
        )
    return tuple(bases)


if not TYPE_CHECKING:
    # One base deriving from each installed namespace's Callback, so isinstance() checks of
    # either Trainer accept the callback.
    _CallbackBase = type("_CallbackBase", _callback_bases(), {"__module__": __name__})


class GradWatchCallback(_CallbackBase):
    """Catch gradient bugs inside ``Trainer.fit``: the Lightning counterpart of ``watch()``.

    Args:
        log_dir: Where TensorBoard event files and the findings log go. ``None`` (default): into
            the Trainer's ``TensorBoardLogger`` (its experiment, same run directory) when it has
            one, else into ``<trainer.log_dir>/gradwatch`` (said once on rank zero). A path: its
            own writer there. A ``SummaryWriter`` of yours: written to and flushed, never
            closed. ``False``: no files. Only rank zero writes.
        histogram_every: Optimizer steps between gradient histograms in TensorBoard, at steps
            (``trainer.global_step``) that are multiples of it (0 turns them off).
        accumulation_steps: Backward passes meant to be accumulated per optimizer step; ``None``
            (default) reads ``trainer.accumulate_grad_batches``. Give it with manual
            optimization when ``training_step`` calls ``manual_backward`` several times per step
            on purpose.
        on_finding: ``"warn"`` (a :class:`~gradwatch.GradWatchWarning` on rank zero),
            ``"raise"`` (a :class:`~gradwatch.GradientError` that stops ``fit``), ``"record"``
            (only kept in :attr:`findings`), or a callable receiving each
            :class:`~gradwatch.Finding` (on rank zero).
        on_nonfinite: ``"report"`` (default) or ``"skip"``: as for ``gradwatch.watch``, a step
            whose gradients hold NaN/Inf is skipped (gradwatch clears the optimizer's gradients
            in ``on_before_optimizer_step``, so weights and optimizer state stay as they were)
            and a ``skipped_step`` finding records it. On CUDA it costs one host-device
            synchronisation per step. Under a ``GradScaler`` (``16-mixed``) the scaler already
            skips those steps; see the module documentation.
        **detector_options: As for ``gradwatch.watch``: ``no_grad_after``, ``explode_factor``,
            ``max_grad_norm``, ``warmup_steps``, ``history``, ``vanish_ratio``,
            ``vanish_steps``, ``ignore``.

    Raises:
        GradWatchTypeError, GradWatchValueError: A bad argument (at construction); or at the
            start of ``fit`` a module with no trainable parameters, with complex or meta-device
            ones, with no optimizer over any of them, or a log directory that cannot be created.
    """

    def __init__(
        self,
        *,
        log_dir: Any = None,
        histogram_every: int = 100,
        accumulation_steps: int | None = None,
        on_finding: _options.OnFinding = "warn",
        on_nonfinite: _options.OnNonFinite = "report",
        **detector_options: Any,
    ) -> None:
        super().__init__()
        self._writer: SummaryWriter | None = log_dir if _is_summary_writer(log_dir) else None
        self.log_dir: str | bool | None
        if self._writer is not None:
            self.log_dir = self._writer.get_logdir()
        else:
            self.log_dir = False if log_dir is False else _options.check_log_dir(log_dir)
        self.histogram_every = _options.check_int_at_least("histogram_every", histogram_every, 0)
        self.accumulation_steps = (
            None
            if accumulation_steps is None
            else _options.check_int_at_least("accumulation_steps", accumulation_steps, 1)
        )
        self._on_finding = _options.check_on_finding(on_finding)
        self.on_nonfinite = _options.check_on_nonfinite(on_nonfinite)
        try:
            self.options = _options.DetectorOptions.from_kwargs(detector_options)
        except GradWatchTypeError as error:
            raise GradWatchTypeError(str(error).replace("watch()", "GradWatchCallback()")) from None
        self._registry = HookRegistry()
        self._monitor: Monitor | None = None
        self._findings: list[Finding] = []
        self._published: set[tuple[Kind, str | None]] = set()
        self._outbox: list[Finding] = []
        self._saved: dict[str, Any] | None = None
        """The monitor's state when no fit is running: the last fit's, or a checkpoint's."""
        self._resume = False
        """Whether the next fit goes on from :attr:`_saved` (set by :meth:`load_state_dict`)."""
        self._steps = 0
        self._occurrences: dict[tuple[Kind, str | None], int] = {}
        self._rank = 0
        self._world_size = 1
        self._logger = logging.getLogger(_NAMESPACES[0])
        self._tensorboard: TensorBoardSink | None = None
        self._logs: dict[int, FindingsLog] = {}
        self._output_dir: str | None = None
        self._scaler: Any = None
        self._scale_above_one: bool | None = None
        self._awaiting_step: dict[int, bool] = {}
        self._last_checked: dict[int, int] = {}

    # ------------------------------------------------------------------ public API

    @property
    def findings(self) -> list[Finding]:
        """The first occurrence of each (kind, parameter) on any rank, in the order reported."""
        return list(self._findings)

    @property
    def occurrences(self) -> dict[tuple[Kind, str | None], int]:
        """How many of this rank's checks showed each (kind, parameter)."""
        return self._monitor.occurrences if self._monitor is not None else dict(self._occurrences)

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (steps a ``GradScaler`` skipped are not counted)."""
        return self._monitor.step if self._monitor is not None else self._steps

    @property
    def output_dir(self) -> str | None:
        """The directory TensorBoard events and the findings log go to (rank zero), if any."""
        return self._output_dir

    @property
    def state_key(self) -> str:
        """Unique per settings, so callbacks with different settings share one checkpoint."""
        options = self.options
        policy = self._on_finding
        return self._generate_state_key(
            log_dir=self.log_dir,
            accumulation_steps=self.accumulation_steps,
            on_finding=policy if isinstance(policy, str) else getattr(policy, "__qualname__", "?"),
            on_nonfinite=self.on_nonfinite,
            no_grad_after=options.no_grad_after,
            explode_factor=options.explode_factor,
            max_grad_norm=options.max_grad_norm,
            warmup_steps=options.warmup_steps,
            history=options.history,
            vanish_ratio=options.vanish_ratio,
            vanish_steps=options.vanish_steps,
            ignore=sorted(kind.value for kind in options.ignore),
        )

    def summary(self) -> str:
        """A readable report of every finding so far."""
        return format_summary(self.findings, self.occurrences, self.step)

    def state_dict(self) -> dict[str, Any]:
        """Step counts, detector history and findings, saved in Lightning checkpoints."""
        monitor = self._monitor.state_dict() if self._monitor is not None else self._saved
        if monitor is None and not self._findings:
            return {}
        return {
            "version": _STATE_VERSION,
            "monitor": monitor,
            "findings": [_finding_to_dict(f) for f in self._findings],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; applied when ``fit`` (re)starts.

        Raises:
            GradWatchTypeError: ``state_dict`` is not a dict.
            GradWatchValueError: ``state_dict`` was not saved by this callback's version; or
                (at the start of ``fit``) it was saved for another model or other options.
        """
        if not isinstance(state_dict, dict):
            raise GradWatchTypeError(
                f"state_dict must be a dict from GradWatchCallback.state_dict(), got "
                f"{type(state_dict).__name__}"
            )
        if state_dict.get("version") != _STATE_VERSION:
            raise GradWatchValueError(
                f"state_dict must come from GradWatchCallback.state_dict() (version "
                f"{_STATE_VERSION}), got version {state_dict.get('version')!r}"
            )
        try:
            findings = [_finding_from_dict(d) for d in state_dict["findings"]]
            monitor = state_dict["monitor"]
            if monitor is not None and not isinstance(monitor, dict):
                raise TypeError(f"'monitor' is {type(monitor).__name__}, not a dict")
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise GradWatchValueError(
                f"state_dict could not be read; it must come from GradWatchCallback.state_dict(): "
                f"{error!r}"
            ) from error
        if self._monitor is not None and monitor is not None:
            self._monitor.load_state_dict(monitor)
        else:
            self._saved = monitor
            self._resume = True
        self._findings = findings
        self._published = {(f.kind, f.param) for f in findings}

    def __getstate__(self) -> dict[str, Any]:
        """Picklable and deep-copyable between fits (hooks and open outputs stay behind)."""
        if self._monitor is not None:
            raise GradWatchValueError(
                "GradWatchCallback cannot be pickled or copied during fit; do it before or after"
            )
        state = dict(self.__dict__)
        for transient in ("_registry", "_tensorboard", "_logs", "_scaler"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._registry = HookRegistry()
        self._tensorboard = None
        self._logs = {}
        self._scaler = None

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer)
        named = _trainable_parameters(pl_module)
        if not named:
            raise GradWatchValueError(
                f"GradWatchCallback: {type(pl_module).__name__} has no trainable parameters "
                f"(none with requires_grad=True) to watch"
            )
        check_parameters(named)
        optimizers = list(trainer.optimizers)
        optimized = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
        if not any(id(p) in optimized for _, p in named):
            raise GradWatchValueError(
                f"GradWatchCallback: no optimizer from {type(pl_module).__name__}."
                f"configure_optimizers() updates any of its {len(named)} trainable parameters; "
                f"there are no optimizer steps to check"
            )
        resume, self._resume = self._resume, False
        if not resume:  # a fit starts afresh unless resumed from a checkpoint
            self._saved, self._steps, self._occurrences = None, 0, {}
            self._findings, self._published = [], set()
        self._rank = trainer.global_rank
        self._world_size = trainer.world_size
        self._logger = logging.getLogger(_namespace(trainer))
        accumulation = self.accumulation_steps or int(trainer.accumulate_grad_batches)
        sinks = self._open_outputs(trainer)  # on every rank: trainer.log_dir is a collective
        monitor: Monitor | None = None
        try:
            monitor = Monitor(
                named,
                optimizers,
                accumulation_steps=accumulation,
                options=self.options,
                on_finding=self._queue,
                on_nonfinite=self.on_nonfinite,
                sinks=sinks,
                histogram_every=self.histogram_every,
                ratio_every=RATIO_EVERY,
            )
            if resume and self._saved is not None:
                monitor.load_state_dict(self._saved)
            self._registry.add_param_hooks([p for _, p in named], monitor.tracker.on_accumulated)
            for optimizer in optimizers:
                self._registry.add_step_post_hook(optimizer, self._on_step)
        except BaseException:
            self._registry.remove()
            if monitor is not None:
                monitor.close()
            self._close_outputs()
            raise
        self._monitor = monitor
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scale_above_one = None
        self._awaiting_step = {}
        self._last_checked = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        step = trainer.global_step
        key = id(optimizer)
        if self._last_checked.get(key) == step:
            return  # a closure evaluated again within one step (LBFGS)
        self._last_checked[key] = step
        tolerate = self._tolerated(key)
        self._awaiting_step[key] = True
        monitor.check(optimizer, step=step, tolerate=tolerate)
        if self._world_size == 1:
            self._publish([(0, f) for f in self._take()], raising=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._monitor is not None:
            self._publish(self._exchange(trainer), raising=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._monitor is not None:
            self._monitor.drain()
            self._publish(self._exchange(trainer), raising=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close(trainer)

    # ------------------------------------------------------------------ internals

    def _tolerated(self, key: int) -> Sequence[Kind]:
        """``nan``/``inf`` while a GradScaler's scale is above 1: overflows it will skip."""
        scaler = self._scaler
        if scaler is None or not scaler.is_enabled():
            return ()
        # The scale only comes down on a skipped step, so it is read (a device sync on CUDA)
        # only after one, or while it is at or below 1.
        skipped = self._awaiting_step.get(key, False)
        if self._scale_above_one is None or skipped or not self._scale_above_one:
            self._scale_above_one = float(scaler.get_scale()) > 1.0
        return _NON_FINITE if self._scale_above_one else ()

    def _on_step(
        self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._awaiting_step[id(optimizer)] = False
        if self._monitor is not None:
            self._monitor.stepped(optimizer)

    def _queue(self, finding: Finding) -> None:
        self._outbox.append(finding)

    def _take(self) -> list[Finding]:
        queued, self._outbox = self._outbox, []
        return queued

    def _exchange(self, trainer: pl.Trainer) -> list[tuple[int, Finding]]:
        """Every rank's queued findings, on every rank; called at the same point on all ranks."""
        local = self._take()
        if self._world_size == 1:
            return [(0, f) for f in local]
        strategy = trainer.strategy
        count = torch.tensor([float(len(local))], device=strategy.root_device)
        total = strategy.reduce(count, reduce_op="sum")
        if float(total.item()) == 0.0:  # the same value on every rank: all branch alike
            return []
        gathered: list[tuple[int, Finding]] = []
        for source in range(self._world_size):
            sent = strategy.broadcast(local if source == self._rank else None, src=source)
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
                self._write(rank, finding)
        for rank, finding in new:
            where = f" (on rank {rank})" if self._world_size > 1 else ""
            policy = self._on_finding
            if policy == "warn":
                if zero:
                    warnings.warn(GradWatchWarning(finding), stacklevel=2)
                continue
            if zero:
                self._logger.info("gradwatch%s: %s", where, finding)
            if policy == "raise":
                if raising:
                    raise GradientError(finding)
            elif callable(policy) and zero:
                policy(finding)

    def _write(self, rank: int, finding: Finding) -> None:
        if self._tensorboard is not None:
            try:
                self._tensorboard.write_finding(finding)
            except Exception as error:  # a broken output must never stop training
                self._tensorboard = None
                _output_failed("TensorBoard", error)
        if self._output_dir is not None:
            from gradwatch.sinks.jsonl import FindingsLog

            try:
                log = self._logs.get(rank)
                if log is None:
                    log = self._logs[rank] = FindingsLog(self._output_dir, rank=rank)
                log.write_finding(finding)
            except Exception as error:
                self._output_dir = None
                _output_failed("the findings log", error)

    def _open_outputs(self, trainer: pl.Trainer) -> list[Any]:
        """Rank zero's TensorBoard sink for the monitor's statistics; findings go through _write."""
        self._output_dir = None
        if self.log_dir is False:
            return []
        tensorboard = _tensorboard_logger(trainer) if self.log_dir is None else None
        directory: str | None = self.log_dir if isinstance(self.log_dir, str) else None
        if self.log_dir is None and tensorboard is None:
            # Every rank asks: Trainer.log_dir broadcasts rank zero's answer.
            directory = os.path.join(str(trainer.log_dir or trainer.default_root_dir), "gradwatch")
        if self._rank != 0:
            return []
        from gradwatch.sinks.tensorboard import TensorBoardSink

        writer = self._writer if tensorboard is None else tensorboard.experiment
        if writer is not None:
            sink = TensorBoardSink(writer=writer, param_every=RATIO_EVERY)
            self._logger.info(
                "gradwatch: gradient statistics and findings go to the run at %s", sink.log_dir
            )
        else:
            assert directory is not None
            try:
                sink = TensorBoardSink(directory, param_every=RATIO_EVERY)
            except OSError as error:
                raise GradWatchValueError(
                    f"GradWatchCallback: log_dir {directory!r} could not be created or written: "
                    f"{error.strerror or error}; pass a writable directory, or log_dir=False for "
                    f"no files"
                ) from error
            self._logger.info(
                "gradwatch: writing gradient statistics and findings to %s "
                "(tensorboard --logdir %s)",
                directory,
                directory,
            )
        self._tensorboard = sink
        self._output_dir = sink.log_dir
        return [_StatisticsOnly(sink)]

    def _close(self, trainer: pl.Trainer | None = None) -> None:
        """Remove every hook, report what this rank still holds, close the outputs. Idempotent."""
        self._registry.remove()
        monitor = self._monitor
        if monitor is None:
            return
        self._monitor = None
        try:
            monitor.drain()
            # No collective here: this also runs when a rank fails; others' queues are lost then.
            self._publish([(self._rank, f) for f in self._take()], raising=False)
            self._saved = monitor.state_dict()
            self._steps = monitor.step
            self._occurrences = monitor.occurrences
        finally:
            monitor.close()
            self._close_outputs()

    def _close_outputs(self) -> None:
        tensorboard, self._tensorboard = self._tensorboard, None
        logs, self._logs = self._logs, {}
        outputs: list[FindingsLog | TensorBoardSink] = list(logs.values())
        if tensorboard is not None:
            outputs.append(tensorboard)
        for output in outputs:
            try:
                output.close()
            except Exception as error:
                _output_failed(type(output).__name__, error)


class _StatisticsOnly:
    """The monitor's view of rank zero's TensorBoard sink: statistics, not findings.

    Findings reach the sink through the callback, once, after ranks have exchanged them.
    Closing it only flushes; the callback closes the sink.
    """

    def __init__(self, sink: TensorBoardSink) -> None:
        self._sink = sink

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        self._sink.write_check(step, names, norms, total_norm)

    def write_histograms(self, step: int, names: Sequence[str], histograms: object) -> None:
        write = getattr(self._sink, "write_histograms", None)
        if write is not None:
            write(step, names, histograms)

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        write = getattr(self._sink, "write_update_ratios", None)
        if write is not None:
            write(step, names, ratios)

    def write_finding(self, finding: Finding) -> None:
        pass

    def flush(self) -> None:
        self._sink.flush()

    def close(self) -> None:
        self._sink.flush()


def _namespace(trainer: object) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package ``trainer`` comes from."""
    for cls in type(trainer).__mro__:
        for name in _NAMESPACES:
            if cls.__module__ == name or cls.__module__.startswith(name + "."):
                return name
    return _NAMESPACES[0]


def _tensorboard_logger(trainer: pl.Trainer) -> Any:
    """The Trainer's first TensorBoardLogger, of whichever namespace, or ``None``."""
    classes = tuple(
        sys.modules[name].loggers.TensorBoardLogger
        for name in _NAMESPACES
        if name in sys.modules and hasattr(sys.modules[name], "loggers")
    )
    for logger in trainer.loggers:
        if isinstance(logger, classes):
            return logger
    return None


def _output_failed(what: str, error: Exception) -> None:
    warnings.warn(
        f"gradwatch: writing to {what} failed ({error!r}); that output is switched off for the "
        f"rest of the run, detection goes on",
        RuntimeWarning,
        stacklevel=3,
    )


__all__ = ["GradWatchCallback"]
