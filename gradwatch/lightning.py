"""``GradWatchCallback``: the Lightning front end, over the same core as ``gradwatch.watch``.

Example:
    >>> from gradwatch.lightning import GradWatchCallback
    >>> callback = GradWatchCallback(on_finding="record", log_dir=False)
    >>> callback.findings
    []

How it drives the core: it only translates Lightning's hooks into the framework-free core that
the ``transformers`` callback shares (:class:`gradwatch._frontend.FrameworkWatch`, over
:class:`gradwatch._monitor.Monitor`):

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
in any gradient hook, and in a check only the replica comparison's all-reduce under DDP (every
``replica_every`` checks, which every rank makes at the same step). Findings are queued, and at
``on_train_batch_end`` (and once at
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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from gradwatch import _frontend, _options
from gradwatch._frontend import CallbackSurface
from gradwatch.sinks.base import Sink

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _CallbackBase

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_ENTRY = "GradWatchCallback()"
_DURING_FIT = "GradWatchCallback"
"""How errors found during ``fit`` (not in the call the user made) name the callback."""


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


class GradWatchCallback(CallbackSurface, _CallbackBase):
    """Catch gradient bugs inside ``Trainer.fit``: the Lightning counterpart of ``watch()``.

    Args:
        log_dir: Where TensorBoard event files and the findings log go. ``None`` (default): into
            the Trainer's ``TensorBoardLogger`` (its experiment, same run directory) when it has
            one, else into ``<trainer.log_dir>/gradwatch_logs`` (said once on rank zero). A path:
            its own writer there. A ``SummaryWriter`` of yours: written to and flushed, never
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
        sinks: Outputs of your own (:class:`gradwatch.sinks.Sink`), on rank zero: every
            check's statistics and every finding (of any rank, with its ``rank``), closed when
            ``fit`` ends.
        **detector_options: As for ``gradwatch.watch``: ``no_grad_after``, ``explode_factor``,
            ``max_grad_norm``, ``warmup_steps``, ``history``, ``vanish_ratio``,
            ``vanish_steps``, ``no_step_after``, ``ignore``.

    Raises:
        GradWatchTypeError, GradWatchValueError: A bad argument (at construction); or at the
            start of ``fit`` a module with no trainable parameters, with complex or meta-device
            ones, with no optimizer over any of them, or a log directory that cannot be created.
    """

    _ENTRY = _ENTRY
    _NAME = _DURING_FIT

    def __init__(
        self,
        *,
        log_dir: Any = None,
        histogram_every: int = 100,
        accumulation_steps: int | None = None,
        on_finding: _options.OnFinding = "warn",
        on_nonfinite: _options.OnNonFinite = "report",
        sinks: Sequence[Sink] = (),
        **detector_options: Any,
    ) -> None:
        super().__init__()
        self._set_up(
            log_dir=log_dir,
            histogram_every=histogram_every,
            accumulation_steps=accumulation_steps,
            on_finding=on_finding,
            on_nonfinite=on_nonfinite,
            sinks=sinks,
            detector_options=detector_options,
        )

    # ------------------------------------------------------------------ public API
    # findings, occurrences, step, output_dir, summary() and the settings' properties come from
    # CallbackSurface.

    @property
    def state_key(self) -> str:
        """Unique per settings, so callbacks with different settings share one checkpoint."""
        return self._generate_state_key(**self.settings.key_fields())

    def state_dict(self) -> dict[str, Any]:
        """Step counts, detector history and findings, saved in Lightning checkpoints."""
        return self._core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; applied when ``fit`` (re)starts.

        Raises:
            GradWatchTypeError: ``state_dict`` is not a dict.
            GradWatchValueError: ``state_dict`` was not saved by this callback's version; or
                (at the start of ``fit``) it was saved for another model or other options.
        """
        self._core.load_state_dict(state_dict)

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.close()
        name = type(pl_module).__name__
        named = _frontend.eligible_parameters(pl_module, _DURING_FIT, name)  # before any output
        rank = trainer.global_rank
        # On every rank: trainer.log_dir is a collective.
        outputs = self._open_outputs(trainer, rank, [n for n, _ in named])
        self._core.start(
            named,
            list(trainer.optimizers),
            accumulation_steps=self.accumulation_steps or int(trainer.accumulate_grad_batches),
            rank=rank,
            world_size=trainer.world_size,
            outputs=outputs,
            collective=_StrategyCollective(trainer.strategy),
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            logger=logging.getLogger(_namespace(trainer)),
            no_optimizer=(
                f"{_DURING_FIT}: no optimizer from {name}.configure_optimizers() updates any of "
                f"its {len(named)} trainable parameters; there are no optimizer steps to check"
            ),
            model=pl_module,
            replicas=_frontend.replica_reduction(trainer.strategy.model, trainer.world_size),
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._core.batch_inputs(batch)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._core.look_at_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._core.before_optimizer_step(optimizer, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._core.batch_inputs(None)
        self._core.exchange()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.finish()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._core.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._core.close()

    # ------------------------------------------------------------------ internals

    def _open_outputs(self, trainer: pl.Trainer, rank: int, names: list[str]) -> list[Sink]:
        """Rank zero's TensorBoard sink and findings log, where the settings say."""
        log_dir = self.settings.log_dir
        if log_dir is False:
            return []
        writer = self.settings.writer
        tensorboard = _tensorboard_logger(trainer) if log_dir is None else None
        directory: str | None = log_dir if isinstance(log_dir, str) else None
        if log_dir is None and tensorboard is None:
            # Every rank asks: Trainer.log_dir broadcasts rank zero's answer.
            root = str(trainer.log_dir or trainer.default_root_dir)
            directory = os.path.join(root, _frontend.OWN_DIRECTORY)
        if rank != 0:
            return []
        if tensorboard is not None:
            writer = tensorboard.experiment
        logger = logging.getLogger(_namespace(trainer))
        outputs = _frontend.open_outputs(
            None if writer is not None else directory,
            writer,
            _DURING_FIT,
            none_hint="log_dir=False",
            param_names=names,
        )
        where = outputs[0].log_dir  # type: ignore[attr-defined]
        outputs += _logger_sinks(trainer)
        if writer is not None:
            logger.info("gradwatch: gradient statistics and findings go to the run at %s", where)
        else:
            logger.info(
                "gradwatch: writing gradient statistics and findings to %s "
                "(tensorboard --logdir %s)",
                where,
                where,
            )
        return outputs


class _StrategyCollective:
    """The findings exchange over a Lightning strategy's collectives."""

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy

    def sum(self, value: float) -> float:
        count = torch.tensor([value], device=self._strategy.root_device)
        return float(self._strategy.reduce(count, reduce_op="sum").item())

    def broadcast(self, obj: Any, src: int) -> Any:
        return self._strategy.broadcast(obj, src=src)


def _namespace(trainer: object) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package ``trainer`` comes from."""
    for cls in type(trainer).__mro__:
        for name in _NAMESPACES:
            if cls.__module__ == name or cls.__module__.startswith(name + "."):
                return name
    return _NAMESPACES[0]


def _logger_sinks(trainer: pl.Trainer) -> list[Sink]:
    """A :class:`~gradwatch.sinks.LoggerSink` for each of the Trainer's loggers other than a
    ``TensorBoardLogger`` (whose experiment the TensorBoard sink writes to)."""
    from gradwatch.sinks.loggers import LoggerSink

    tensorboard = _tensorboard_logger(trainer)
    return [
        LoggerSink(logger, param_every=_frontend.RATIO_EVERY)
        for logger in trainer.loggers
        if logger is not tensorboard and not _is_tensorboard_logger(logger)
    ]


def _is_tensorboard_logger(logger: object) -> bool:
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


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


__all__ = ["GradWatchCallback"]
