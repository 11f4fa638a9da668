"""A LightningModule whose encoder never learns: its output is detached before the decoder.

GradWatchCallback reports it as ``no_grad`` within a few steps, naming the encoder's parameters.

python examples/lightning_callback.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from gradwatch.lightning import GradWatchCallback


class Autoencoder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        code = self.encoder(x).detach()  # the bug. The fix: no .detach() here.
        loss = nn.functional.mse_loss(self.decoder(code), x)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(512, 8))
loader = torch.utils.data.DataLoader(data, batch_size=32)
callback = GradWatchCallback(on_finding="record")
trainer = pl.Trainer(
    max_steps=20,
    callbacks=[callback],
    logger=TensorBoardLogger("runs", name="lightning_callback"),
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=5,
)
trainer.fit(Autoencoder(), loader)

print(callback.summary())
print(f"TensorBoard: tensorboard --logdir {callback.output_dir}")
