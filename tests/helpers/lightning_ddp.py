"""A 2-process CPU DDP fit (gloo) where only rank 1 forgets ``opt.zero_grad()``.

Run by tests/test_lightning.py as a script (Lightning's DDP launcher starts rank 1 by running
this file again): ``python lightning_ddp.py OUT_DIR POLICY``. Every rank writes what its callback
reported to ``OUT_DIR/rank<N>.json`` once ``fit`` returns or raises.
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


def main(out_dir: str, policy: str) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    callback = GradWatchCallback(on_finding=policy)
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
        trainer.fit(ForgetfulOnOneRank(), loader)
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
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as file:
        json.dump(report, file)
    if error is not None:
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
