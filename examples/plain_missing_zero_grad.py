"""A training loop that forgets optimizer.zero_grad(): gradients pile up across steps.

python examples/plain_missing_zero_grad.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
    for _ in range(20):
        x = torch.randn(32, 8)
        # The fix: call optimizer.zero_grad() here, before backward().
        nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
        optimizer.step()

print(watcher.summary())
