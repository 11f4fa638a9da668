"""``gradwatch demo``: small models with well-known gradient bugs planted, and one healthy run."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple, TextIO

import torch
from torch import nn

from gradwatch.findings import Finding, GradWatchWarning
from gradwatch.watcher import watch

Batch = tuple[torch.Tensor, torch.Tensor]
TrainStep = Callable[[int, nn.Module, torch.optim.Optimizer, Batch], None]


class Scenario(NamedTuple):
    name: str
    bug: str
    expected: str | None
    """The kind gradwatch must report, or None for the healthy run."""
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    train_step: TrainStep


def mlp(depth: int = 3, width: int = 32, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(8, width), activation()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), activation()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def correct_step(step: int, model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> None:
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def forgotten_zero_grad(
    step: int, model: nn.Module, opt: torch.optim.Optimizer, batch: Batch
) -> None:
    x, y = batch
    nn.functional.mse_loss(model(x), y).backward()  # the bug: no opt.zero_grad()
    opt.step()


def log_of_zero_at_step_10(
    step: int, model: nn.Module, opt: torch.optim.Optimizer, batch: Batch
) -> None:
    x, y = batch
    opt.zero_grad()
    pred = model(x)
    if step == 10:
        pred = pred * torch.log(torch.zeros(()))  # the bug: log(0) = -inf reaches the loss
    nn.functional.mse_loss(pred, y).backward()
    opt.step()


def sgd(model: nn.Module, lr: float = 0.05) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def head_left_out_of_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model[-1] = nn.Linear(32, 1)  # the bug: a new head, created after the optimizer
    return model, opt


SCENARIOS = [
    Scenario(
        "forgotten-zero-grad",
        "optimizer.zero_grad() left out of the loop",
        "missing_zero_grad",
        lambda: sgd(mlp()),
        forgotten_zero_grad,
    ),
    Scenario(
        "nan-from-log0",
        "log(0) in the loss at step 10",
        "nan",
        lambda: sgd(mlp()),
        log_of_zero_at_step_10,
    ),
    Scenario(
        "lr-too-high",
        "learning rate 1000x too high (50 instead of 0.05)",
        "exploding",
        lambda: sgd(mlp(), lr=50.0),
        correct_step,
    ),
    Scenario(
        "sigmoid-stack",
        "20 stacked Linear+Sigmoid layers",
        "vanishing",
        lambda: sgd(mlp(depth=20, width=16, activation=nn.Sigmoid)),
        correct_step,
    ),
    Scenario(
        "head-not-in-optimizer",
        "output layer replaced after the optimizer was built",
        "not_in_optimizer",
        head_left_out_of_optimizer,
        correct_step,
    ),
    Scenario("healthy", "nothing: a correct training loop", None, lambda: sgd(mlp()), correct_step),
]


class DemoResult(NamedTuple):
    scenario: Scenario
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        kinds = {f.kind.value for f in self.findings}
        if self.scenario.expected is None:
            return not kinds
        return self.scenario.expected in kinds


def run_demo(log_dir: str, steps: int = 30, out: TextIO = sys.stdout) -> list[DemoResult]:
    """Train every scenario for ``steps`` steps under ``gradwatch.watch`` and print the findings."""
    results = []
    for number, scenario in enumerate(SCENARIOS, 1):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model, opt = scenario.build()
        run_dir = os.path.join(log_dir, scenario.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradWatchWarning)
            with watch(model, opt, log_dir=run_dir, on_finding="record") as watcher:
                for step in range(steps):
                    x = torch.randn(64, 8, generator=generator)
                    scenario.train_step(step, model, opt, (x, x.sum(dim=1, keepdim=True).sin()))
                    _progress(out, number, scenario.name, step + 1, steps)
        result = DemoResult(scenario, watcher.findings)
        results.append(result)
        _print_result(out, result)
    failed = [r.scenario.name for r in results if not r.ok]
    print("", file=out)
    if failed:
        print(f"gradwatch demo: FAILED for {', '.join(failed)}", file=out)
    else:
        caught = sum(1 for r in results if r.scenario.expected is not None)
        print(
            f"gradwatch demo: caught all {caught} planted bugs; the healthy run was silent.",
            file=out,
        )
    print(
        f"Findings logs: {log_dir}/*/gradwatch-findings.jsonl "
        f"(summarise them: gradwatch report {log_dir})",
        file=out,
    )
    print(f"Look at the gradients: tensorboard --logdir {log_dir}", file=out)
    return results


def _progress(out: TextIO, number: int, name: str, done: int, total: int) -> None:
    if not out.isatty():
        return
    width = 24
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    print(
        f"\r[{number}/{len(SCENARIOS)}] {name:<22} [{bar}] {done}/{total}",
        end="",
        file=out,
        flush=True,
    )
    if done == total:
        print("\r" + " " * 70 + "\r", end="", file=out, flush=True)


def _print_result(out: TextIO, result: DemoResult) -> None:
    scenario = result.scenario
    verdict = "ok" if result.ok else "UNEXPECTED"
    print(f"\n[{verdict}] {scenario.name}: planted bug: {scenario.bug}", file=out)
    if not result.findings:
        print("    gradwatch found nothing.", file=out)
    for f in result.findings:
        where = f.param if f.param is not None else "(model)"
        print(f"    {f.kind.value} at step {f.step}, parameter {where}", file=out)
        print(f"      {f.message}", file=out)
