"""Train small models with well-known gradient bugs planted, and print what gradwatch finds.

Each scenario trains a tiny model on synthetic data under ``gradwatch.watch``; a healthy run
comes last and must stay silent. TensorBoard logs go to ``--log-dir`` (one run per scenario).

    python examples/planted_bugs.py --log-dir runs/planted_bugs
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import gradwatch


def mlp(depth: int = 3, width: int = 32, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, width), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), activation()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(64, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def forgotten_zero_grad(step: int, model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    nn.functional.mse_loss(model(x), y).backward()  # bug: no opt.zero_grad()
    opt.step()


def nan_from_log_of_zero(step: int, model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad()
    pred = model(x)
    if step == 10:
        pred = pred * torch.log(torch.zeros(()))  # bug: log(0) = -inf poisons the loss
    nn.functional.mse_loss(pred, y).backward()
    opt.step()


def healthy(step: int, model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Scenario(NamedTuple):
    expected: str
    description: str
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    train_step: Callable[..., None]


def sgd(model: nn.Module, lr: float = 0.05) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def head_after_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.body[-1] = nn.Linear(32, 1)  # bug: the new head never reaches the optimizer
    return model, opt


SCENARIOS = [
    Scenario("missing_zero_grad", "zero_grad() forgotten", lambda: sgd(mlp()), forgotten_zero_grad),
    Scenario("nan", "log(0) in the loss at step 10", lambda: sgd(mlp()), nan_from_log_of_zero),
    Scenario("exploding", "learning rate 1000x too high", lambda: sgd(mlp(), lr=50.0), healthy),
    Scenario("vanishing", "20 sigmoid layers", lambda: sgd(mlp(20, 16, nn.Sigmoid)), healthy),
    Scenario("not_in_optimizer", "head added after the optimizer", head_after_optimizer, healthy),
    Scenario("healthy", "a correct training loop", lambda: sgd(mlp()), healthy),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=Path("runs/planted_bugs"))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore", gradwatch.GradWatchWarning)

    failures = 0
    for expected, description, build, train_step in SCENARIOS:
        model, opt = build()
        generator = torch.Generator().manual_seed(0)
        with gradwatch.watch(
            model, opt, log_dir=args.log_dir / expected, on_finding="record"
        ) as watcher:
            for step in range(args.steps):
                x, y = batch(generator)
                train_step(step, model, opt, x, y)
        found = {f.kind.value for f in watcher.findings}
        ok = (not found) if expected == "healthy" else (expected in found)
        failures += not ok
        verdict = ("caught" if found else "silent") if ok else "MISSED"
        print(f"\n=== {expected}: {description} -> {verdict}")
        print(watcher.summary())
    print(f"\nTensorBoard logs: tensorboard --logdir {args.log_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
