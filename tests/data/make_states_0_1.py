"""Writes ``states-0.1.pt``: a ``Watcher`` state and a ``GradWatchCallback`` state saved by
gradwatch 0.1, for the test that checkpoints of that release still load.

Run it with gradwatch 0.1 importable (a checkout of that release on ``PYTHONPATH``):
``PYTHONPATH=<checkout of 0.1> python tests/data/make_states_0_1.py tests/data/states-0.1.pt``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradwatch


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    return model, x, x.sum(dim=1, keepdim=True).sin()


def main(path: str) -> None:
    model, x, y = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, on_finding="record", warmup_steps=3) as watcher:
        for step in range(6):
            if step != 4:  # a forgotten zero_grad: missing_zero_grad at step 4
                optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    state = watcher.state_dict()
    torch.save(
        {
            "version": gradwatch.__version__,
            "watcher": state,
            "model": model.state_dict(),
            "findings": [(f.kind.value, f.step, f.param) for f in watcher.findings],
        },
        path,
    )


if __name__ == "__main__":
    main(sys.argv[1])
