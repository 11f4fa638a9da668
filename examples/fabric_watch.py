"""Lightning Fabric: a loop that forgets optimizer.zero_grad(), watched through fabric.setup().

``watch()`` takes what ``fabric.setup()`` returns and watches the module it holds
(``model.module``), so findings name its parameters as ``named_parameters()`` did before setup,
and the optimizer Fabric wraps, whose ``step()`` runs. Reported: ``missing_zero_grad`` at step 1.

python examples/fabric_watch.py
"""

from __future__ import annotations

import torch
from lightning.fabric import Fabric
from torch import nn

import gradwatch

torch.manual_seed(0)
fabric = Fabric(accelerator="cpu", devices=1)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = fabric.setup(model, optimizer)

with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
    for _ in range(20):
        x = torch.randn(32, 8)
        # The fix: call optimizer.zero_grad() here, before fabric.backward().
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)  # gradwatch sees clipped gradients
        optimizer.step()

print(watcher.summary())
