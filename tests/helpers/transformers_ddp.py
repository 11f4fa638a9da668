"""Two-process CPU DDP runs of ``transformers.Trainer`` (gloo) with ``GradWatchCallback``.

Run by tests/test_transformers.py the way torchrun launches a training script::

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT \
        transformers_ddp.py OUT_DIR SCENARIO [SCENARIO ...]

Each scenario trains a tiny BERT classifier for ``STEPS`` steps in ``OUT_DIR/<scenario>``, in
the same two processes one after the other:

- ``healthy``: nothing wrong.
- ``nan``: rank 1's loss is NaN at step ``BUG_AT`` (DDP's all-reduce carries it into rank 0's
  gradients too), with ``on_nonfinite="skip"``.
- ``corrupt``: after the all-reduce, rank 1 alone gets a NaN in ``classifier.weight``'s gradient
  at step ``BUG_AT``, the last step (as a faulty device would produce); rank 0's gradients stay
  finite.
- ``raise``: as ``corrupt`` with ``on_finding="raise"``, ``STEPS`` steps planned.

Every rank writes what its callback saw to ``OUT_DIR/<scenario>/rank<N>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from gradwatch.transformers import GradWatchCallback
from tests.helpers.transformers_models import (
    NanLossTrainer,
    RandomTokens,
    tiny_bert,
    training_args,
)

BUGGY_RANK = 1
BUG_AT = 2
STEPS = 4


class CorruptGradient(TrainerCallback):
    """Puts a NaN into one gradient on one rank, after clipping, before gradwatch's check."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank = rank
        self.step = step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.process_index == self.rank and state.global_step == self.step:
            grad = kwargs["model"].classifier.weight.grad
            grad[0, 0] = float("nan")


def run(out_dir: str, scenario: str) -> None:
    directory = os.path.join(out_dir, scenario)
    callback = GradWatchCallback(
        on_finding="raise" if scenario == "raise" else "record",
        on_nonfinite="skip" if scenario == "nan" else "report",
    )
    model = tiny_bert()
    steps = BUG_AT + 1 if scenario == "corrupt" else STEPS
    args = training_args(directory, max_steps=steps, ddp_backend="gloo")
    options: dict[str, Any] = {"model": model, "args": args, "train_dataset": RandomTokens(128)}
    if scenario in ("corrupt", "raise"):
        callbacks: list[Any] = [CorruptGradient(BUGGY_RANK, BUG_AT), callback]
        trainer: Trainer = Trainer(callbacks=callbacks, **options)
    elif scenario == "nan":
        trainer = NanLossTrainer(
            callbacks=[callback], nan_at=BUG_AT, nan_rank=BUGGY_RANK, **options
        )
    else:
        trainer = Trainer(callbacks=[callback], **options)
    error = None
    try:
        trainer.train()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    report = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "distributed": torch.distributed.is_initialized(),
        "global_step": trainer.state.global_step,
        "error": error,
        "findings": [[f.kind.value, f.param, f.step] for f in callback.findings],
        "output_dir": callback.output_dir,
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "hooks": sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
        + len(trainer.optimizer.optimizer._optimizer_step_post_hooks),
    }
    with open(os.path.join(directory, f"rank{args.process_index}.json"), "w") as file:
        json.dump(report, file)


def main(out_dir: str, scenarios: list[str]) -> None:
    for scenario in scenarios:
        run(out_dir, scenario)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
