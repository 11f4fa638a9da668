"""The learning rate is raised 1000x at step 15; the gradients explode within a few steps.

python examples/plain_exploding.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
    for step in range(30):
        if step == 15:
            for group in optimizer.param_groups:
                group["lr"] *= 1000  # the bug. The fix: keep lr, or warm up / clip gradients.
        x = torch.randn(64, 8)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
        optimizer.step()

print(watcher.summary())
