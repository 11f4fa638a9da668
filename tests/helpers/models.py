"""Tiny models and a training-loop runner shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradwatch


def mlp(width: int = 32, depth: int = 3, in_features: int = 8, out_features: int = 1) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def regression_batch(
    batch: int = 32, in_features: int = 8, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, in_features, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    return x, y


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 30,
    *,
    step_fn: Callable[[int], None] | None = None,
    **watch_options: object,
) -> gradwatch.Watcher:
    """Run a plain loop under ``gradwatch.watch(..., on_finding="record")`` and return the watcher.

    ``step_fn(i)`` does one whole training step (zero_grad, forward, backward, step); by default
    an MSE regression step on synthetic data.
    """
    generator = torch.Generator().manual_seed(0)

    def default_step(_: int) -> None:
        x, y = regression_batch(generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    options: dict[str, object] = {"on_finding": "record", **watch_options}
    with gradwatch.watch(model, optimizer, **options) as watcher:  # type: ignore[arg-type]
        for i in range(steps):
            (step_fn or default_step)(i)
    return watcher


def kinds(watcher: gradwatch.Watcher) -> list[str]:
    return [f.kind.value for f in watcher.findings]
