"""``GradWatchCallback``: the Hugging Face ``transformers.Trainer`` front end.

Example:
    >>> from gradwatch.transformers import GradWatchCallback
    >>> callback = GradWatchCallback(on_finding="record", log_dir=False)
    >>> callback.findings
    []

Which gradient it sees. For each optimizer step the Trainer runs the backward pass of every
micro-batch (``gradient_accumulation_steps``; DDP all-reduces in the last one only), then
``accelerator.clip_grad_norm_`` (which first unscales fp16's ``GradScaler`` gradients, then clips
to ``args.max_grad_norm``, or only measures when that is 0), ``on_pre_optimizer_step``,
``optimizer.step()`` (through the scaler with fp16, skipped on overflow), ``on_optimizer_step``,
the scheduler, ``zero_grad`` and ``on_step_end``. No event lies between the last backward pass
and clipping, so the check, in ``on_pre_optimizer_step``, sees the accumulated, all-reduced,
unscaled and *clipped* gradient the optimizer will use:

- ``exploding`` compares clipped norms; train with ``max_grad_norm=0`` to judge raw ones.
- Clipping multiplies every gradient by one coefficient of the total norm. A NaN anywhere makes
  it NaN, so *every* gradient is NaN at the check: ``nan`` then names all parameters, in the
  order their gradients arrived, not where the NaN entered. An Inf makes it 0: the infinite
  values become NaN (``nan``, not ``inf``), the finite ones 0.
- Under fp16's ``GradScaler``, NaN/Inf while the loss scale is above 1 are overflows the scaler
  skips, not findings (as in :mod:`gradwatch.lightning`).

Steps in findings are ``state.global_step`` at the check (0 for the first optimizer step). With
``torchrun`` (DDP, gloo or NCCL) every rank checks its own gradients and the ranks exchange
findings at ``on_step_end``, which every rank reaches every step: each finding is reported once,
by rank zero, with the rank that found it (:class:`gradwatch._frontend.FrameworkWatch`). Hooks
are removed at ``on_train_end``, and before an exception of gradwatch's (``"raise"``) leaves;
the Trainer has no event for other exceptions, so the next ``train()`` removes those.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradwatch import _frontend, _options
from gradwatch._frontend import CallbackSurface, TorchCollective
from gradwatch._wrapped import unwrap_optimizer
from gradwatch.sinks.base import Sink

try:
    from transformers.trainer_callback import TrainerCallback, TrainerControl, TrainerState
    from transformers.training_args import TrainingArguments
except ImportError as _error:
    raise ImportError(
        "gradwatch.transformers needs transformers (and accelerate), which could not be "
        f"imported: pip install 'gradwatch[transformers]'. Import error: {_error}"
    ) from _error

_ENTRY = "gradwatch.transformers.GradWatchCallback()"
_LOGGER = logging.getLogger("transformers")


class GradWatchCallback(CallbackSurface, TrainerCallback):
    """Catch gradient bugs inside ``transformers.Trainer.train``.

    Args:
        log_dir: Where TensorBoard event files and the findings log go (rank zero only).
            ``None`` (default): with ``"tensorboard"`` in ``args.report_to``, the run of the
            Trainer's ``TensorBoardCallback`` (``$TENSORBOARD_LOGGING_DIR``, else
            ``args.logging_dir`` in transformers 4, else the ``<output_dir>/runs/<date>_<host>``
            it has just opened), in an event file of gradwatch's own; otherwise
            ``<output_dir>/gradwatch_logs``. A path, or a ``SummaryWriter`` of yours (flushed,
            never closed). ``False``: no files.
        histogram_every: Optimizer steps between gradient histograms (0 turns them off).
        accumulation_steps: Backward passes meant per optimizer step; ``None`` (default) reads
            ``args.gradient_accumulation_steps``.
        on_finding: ``"warn"``, ``"raise"`` (a :class:`~gradwatch.GradientError` out of
            ``train()``; with one process before the optimizer step), ``"record"``, or a
            callable receiving each :class:`~gradwatch.Finding` (on rank zero).
        on_nonfinite: ``"report"`` or ``"skip"``: NaN/Inf gradients are cleared at the check, so
            that optimizer step changes nothing.
        sinks: More outputs (:class:`gradwatch.sinks.Sink`), on rank zero.
        **detector_options: As for ``gradwatch.watch``. Its ``max_grad_norm`` is gradwatch's
            ceiling on the (clipped) total norm, not ``TrainingArguments.max_grad_norm``.

    Raises:
        GradWatchTypeError, GradWatchValueError: A bad argument (at construction); at the start
            of training a model without trainable parameters, an optimizer over none of them, or
            a log directory that cannot be created.
    """

    _ENTRY = _ENTRY
    _NAME = "gradwatch.transformers.GradWatchCallback"

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
        self._set_up(
            log_dir=log_dir,
            histogram_every=histogram_every,
            accumulation_steps=accumulation_steps,
            on_finding=on_finding,
            on_nonfinite=on_nonfinite,
            sinks=sinks,
            detector_options=detector_options,
        )
        self._optimizer: torch.optim.Optimizer | None = None

    # findings, occurrences, step, output_dir, summary() and the settings' properties come from
    # CallbackSurface.

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._core.close()
        model, wrapped = kwargs["model"], kwargs["optimizer"]
        subject = f"the Trainer's model ({type(model).__name__})"
        named = _frontend.eligible_parameters(model, _ENTRY, subject)  # before outputs open
        optimizer = unwrap_optimizer(wrapped, argument="the Trainer's optimizer", entry=_ENTRY)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = int(args.world_size) if distributed else 1
        self._core.start(
            named,
            [optimizer],
            accumulation_steps=self.settings.accumulation_steps
            or int(args.gradient_accumulation_steps),
            rank=int(args.process_index),
            world_size=world_size,
            outputs=self._open_outputs(args, [n for n, _ in named])
            if state.is_world_process_zero
            else [],
            collective=TorchCollective() if world_size > 1 else None,
            scaler=getattr(wrapped, "scaler", None),  # accelerate's GradScaler under fp16
            logger=_LOGGER,
            no_optimizer=f"{_ENTRY}: the Trainer's optimizer updates none of the {len(named)} "
            f"trainable parameters of {subject}; there are no optimizer steps to check",
            model=model,
        )
        self._optimizer = optimizer

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._optimizer is not None:
            self._closing(self._core.before_optimizer_step, self._optimizer, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._closing(self._core.exchange)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        try:
            self._core.finish()
        finally:
            self._core.close()
            self._optimizer = None

    # ------------------------------------------------------------------ internals

    def _closing(self, call: Callable[..., None], *arguments: Any) -> None:
        """``call(*arguments)``; an exception out of it (``"raise"``) removes the hooks first."""
        try:
            call(*arguments)
        except BaseException:
            self._core.close()
            self._optimizer = None
            raise

    def _open_outputs(self, args: TrainingArguments, names: list[str]) -> list[Sink]:
        """Rank zero's TensorBoard sink and findings log, where the settings and arguments say."""
        log_dir, writer = self.settings.log_dir, self.settings.writer
        if log_dir is False:
            return []
        directory = log_dir
        if log_dir is None:
            report_to = args.report_to
            reports = [report_to] if isinstance(report_to, str) else list(report_to or ())
            if "tensorboard" in reports or "all" in reports:
                directory = _tensorboard_dir(args)
            else:
                directory = os.path.join(str(args.output_dir), _frontend.OWN_DIRECTORY)
        outputs = _frontend.open_outputs(
            None if writer is not None else directory,
            writer,
            _ENTRY,
            none_hint="log_dir=False",
            param_names=names,
        )
        where = outputs[0].log_dir  # type: ignore[attr-defined]
        _LOGGER.info("gradwatch: writing gradient statistics and findings to %s", where)
        return outputs


def _tensorboard_dir(args: TrainingArguments) -> str:
    """The directory the Trainer's ``TensorBoardCallback`` writes to, chosen as it chooses it."""
    output_dir = str(args.output_dir)
    environment = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if environment:
        return os.path.expanduser(environment)
    legacy = getattr(args, "logging_dir", None)  # transformers 4
    if legacy:
        return str(legacy)
    # transformers 5: <output_dir>/runs/<date>_<host>, chosen and opened by that callback's
    # on_train_begin, which runs before this one's (the Trainer puts its own callbacks first).
    # Event file names end in ".<pid>.<n>", n counting this process's writers: the highest n of
    # this process is the writer it has just opened.
    pid, newest = str(os.getpid()), (-1, "")
    for root, _, files in os.walk(os.path.join(output_dir, "runs")):
        for name in files:
            if name.startswith("events.out.tfevents."):
                *_, owner, number = name.split(".")
                if owner == pid and number.isdigit():
                    newest = max(newest, (int(number), root))
    if newest[1]:
        return newest[1]
    from transformers.integrations.integration_utils import default_logdir

    return os.path.join(output_dir, default_logdir())


__all__ = ["GradWatchCallback"]
