"""Twenty stacked sigmoid layers: the first layers' gradients vanish.

python examples/plain_vanishing.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
layers: list[nn.Module] = []
for _ in range(20):
    layers += [nn.Linear(16, 16), nn.Sigmoid()]  # the fix: nn.ReLU()/nn.GELU(), or residuals
model = nn.Sequential(nn.Linear(8, 16), *layers, nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
    for _ in range(20):
        x = torch.randn(32, 8)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
        optimizer.step()

print(watcher.summary())
