"""A NaN enters the loss through log(0) at step 5; gradwatch names the layer nearest to it first.

python examples/plain_nan.py
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
    for step in range(10):
        x = torch.randn(32, 8)
        target = (x.sum(dim=1, keepdim=True) > 0).float()
        optimizer.zero_grad()
        prob = model(x)
        if step == 5:
            prob = prob * 0  # a probability of exactly 0 ...
        # ... makes log(0) = -inf and the loss NaN. The fix: use a numerically safe loss,
        # nn.functional.binary_cross_entropy_with_logits on the logits, or clamp before log.
        loss = -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean()
        loss.backward()
        optimizer.step()

print(watcher.summary())
