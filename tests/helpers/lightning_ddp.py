"""A 2-process CPU DDP fit (gloo) where only rank 1 has a bug.

Run by tests/test_lightning.py as a script (Lightning's DDP launcher starts rank 1 by running
this file again): ``python lightning_ddp.py OUT_DIR POLICY [SCENARIO]``. SCENARIO ``forgetful``
(default): rank 1 forgets ``opt.zero_grad()``; ``nan``: rank 1's loss is NaN at one step, with
``on_nonfinite="skip"``; ``halved``: rank 1 halves its all-reduced gradients. Every rank writes
what its callback reported to ``OUT_DIR/rank<N>.json`` once ``fit`` returns or raises.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from gradwatch.lightning import GradWatchCallback

BUGGY_RANK = 1
BUG_FROM_STEP = 2


class ForgetfulOnOneRank(pl.LightningModule):
    """Manual optimization; rank 1 stops calling ``opt.zero_grad()`` from BUG_FROM_STEP on."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        if not (self.global_rank == BUGGY_RANK and self.global_step >= BUG_FROM_STEP):
            opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))
        opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class NanOnOneRank(pl.LightningModule):
    """Automatic optimization; rank 1's loss is NaN at step BUG_FROM_STEP only. Keeps the
    weights (flattened) at the start of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self.weights[self.global_step] = self._flat()

    def on_train_end(self) -> None:
        self.weights[self.global_step] = self._flat()

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.parameters()]).clone()

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_rank == BUGGY_RANK and self.global_step == BUG_FROM_STEP:
            loss = loss * torch.tensor(float("nan"))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class HalvedOnOneRank(pl.LightningModule):
    """Automatic optimization; after each backward pass rank 1 alone rescales its (already
    all-reduced) gradients, as a loss normalised by a rank-local count would."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_after_backward(self) -> None:
        if self.global_rank == BUGGY_RANK:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)

    def on_train_end(self) -> None:
        self.final = torch.cat([p.detach().flatten() for p in self.parameters()]).tolist()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out_dir: str, policy: str, scenario: str = "forgetful") -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    nan = scenario == "nan"
    callback = GradWatchCallback(on_finding=policy, on_nonfinite="skip" if nan else "report")
    module: pl.LightningModule
    if scenario == "halved":
        module = HalvedOnOneRank()
    else:
        module = NanOnOneRank() if nan else ForgetfulOnOneRank()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        callbacks=[callback],
        logger=TensorBoardLogger(out_dir, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    error = None
    try:
        trainer.fit(module, loader)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "error": error,
        "findings": [[f.kind.value, f.param, f.step] for f in callback.findings],
        "output_dir": callback.output_dir,
    }
    if isinstance(module, NanOnOneRank):
        weights = module.weights
        report["unchanged_steps"] = [
            step for step in range(max(weights)) if torch.equal(weights[step], weights[step + 1])
        ]
        report["final_weights"] = weights[max(weights)].tolist()
    if isinstance(module, HalvedOnOneRank):
        report["final_weights"] = module.final
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as file:
        json.dump(report, file)
    if error is not None:
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:4])
