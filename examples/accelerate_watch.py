"""accelerate: gradient accumulation over two batches, and a NaN that enters at batch 10.

gradwatch watches ``accelerator.unwrap_model(model)`` (the model itself in one process, without
DDP's ``module.`` prefix in several) through the optimizer ``accelerator.prepare()`` returns, which
it unwraps: the optimizer inside steps only when gradients synchronise, every second batch, as
``accumulation_steps=2`` declares. Batch 10 belongs to optimizer step 5, where ``nan`` is reported.

python examples/accelerate_watch.py
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

import gradwatch

torch.manual_seed(0)
accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model, optimizer = accelerator.prepare(model, optimizer)

watched = accelerator.unwrap_model(model)
with gradwatch.watch(watched, optimizer, accumulation_steps=2, on_finding="record") as watcher:
    for batch in range(20):
        with accelerator.accumulate(model):
            x = torch.randn(32, 8)
            target = (x.sum(dim=1, keepdim=True) > 0).float()
            prob = model(x)
            if batch == 10:
                prob = prob * 0  # log(0) = -inf below: the loss is NaN
            loss = -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob)).mean()
            accelerator.backward(loss)
            optimizer.step()  # a no-op on the batches that only accumulate
            optimizer.zero_grad()

print(watcher.summary())
