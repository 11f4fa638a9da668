"""``gradwatch demo``: small models with well-known gradient bugs planted, and one healthy run."""

from __future__ import annotations

import os
import shlex
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple, TextIO

import torch
from torch import nn

from gradwatch.findings import Finding, GradWatchWarning
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME
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
    steps_needed: int
    """The fewest steps after which gradwatch has reported the planted bug (the demo is seeded, so
    this does not change from one run to the next)."""


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


_SCHEDULERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
_SCHEDULERS = weakref.WeakKeyDictionary()


def warm_up_that_never_starts() -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = sgd(mlp())
    # The bug: integer division, so the multiplier is 0 for the first 1000 steps.
    _SCHEDULERS[opt] = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step // 1000)
    return model, opt


def step_with_scheduler(
    step: int, model: nn.Module, opt: torch.optim.Optimizer, batch: Batch
) -> None:
    correct_step(step, model, opt, batch)
    _SCHEDULERS[opt].step()


SCENARIOS = [
    Scenario(
        "forgotten-zero-grad",
        "optimizer.zero_grad() left out of the loop",
        "missing_zero_grad",
        lambda: sgd(mlp()),
        forgotten_zero_grad,
        2,  # the second backward pass finds the first one's gradients still there
    ),
    Scenario(
        "nan-from-log0",
        "log(0) in the loss at step 10",
        "nan",
        lambda: sgd(mlp()),
        log_of_zero_at_step_10,
        11,  # steps 0 to 10
    ),
    Scenario(
        "lr-too-high",
        "learning rate 1000x too high (50 instead of 0.05)",
        "exploding",
        lambda: sgd(mlp(), lr=50.0),
        correct_step,
        3,
    ),
    Scenario(
        "sigmoid-stack",
        "20 stacked Linear+Sigmoid layers",
        "vanishing",
        lambda: sgd(mlp(depth=20, width=16, activation=nn.Sigmoid)),
        correct_step,
        5,  # vanish_steps consecutive checks
    ),
    Scenario(
        "head-not-in-optimizer",
        "output layer replaced after the optimizer was built",
        "not_in_optimizer",
        head_left_out_of_optimizer,
        correct_step,
        1,
    ),
    Scenario(
        "warm-up-at-zero",
        "a warm-up multiplier that stays 0 (step // 1000 instead of step / 1000)",
        "no_update",
        warm_up_that_never_starts,
        step_with_scheduler,
        5,  # lr 0 at 5 checks in a row
    ),
    Scenario(
        "healthy", "nothing: a correct training loop", None, lambda: sgd(mlp()), correct_step, 1
    ),
]

SLOWEST = max(SCENARIOS, key=lambda s: s.steps_needed)
MIN_STEPS = SLOWEST.steps_needed
"""The fewest ``--steps`` with which every planted bug has happened and been caught."""

HISTOGRAM_SLICES = 15
"""About how many histogram steps each demo model writes, whatever its number of steps, so that
TensorBoard's Histograms and Distributions tabs show the gradients change."""


class DemoResult(NamedTuple):
    scenario: Scenario
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        kinds = {f.kind.value for f in self.findings}
        if self.scenario.expected is None:
            return not kinds
        return self.scenario.expected in kinds


def fresh_run_dir(log_dir: str, now: float | None = None) -> str:
    """A new, empty folder under ``log_dir`` for one demo run, named after the local time
    (``20250102-150405``, then ``20250102-150405-2`` ... for runs within one second).

    ``os.mkdir`` fails rather than reuse a folder that exists, so two demo runs, even at once,
    never write into the same one, and nothing already under ``log_dir`` is touched.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path, number = os.path.join(log_dir, stamp), 1
    while True:
        try:
            os.mkdir(path)
        except FileExistsError:
            number += 1
            path = os.path.join(log_dir, f"{stamp}-{number}")
            continue
        return path


def run_demo(log_dir: str, steps: int = 30, out: TextIO | None = None) -> list[DemoResult]:
    """Train every scenario for ``steps`` steps under ``gradwatch.watch`` and print the findings
    to ``out`` (default: ``sys.stdout`` as it is at the call); each scenario writes its logs into
    ``<log_dir>/<scenario name>``."""
    out = sys.stdout if out is None else out
    print(
        f"gradwatch demo: {len(SCENARIOS)} small models, {steps} steps each; logs go to {log_dir}",
        file=out,
    )
    results = []
    histogram_every = max(1, steps // HISTOGRAM_SLICES)
    for number, scenario in enumerate(SCENARIOS, 1):
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        model, opt = scenario.build()
        run_dir = os.path.join(log_dir, scenario.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradWatchWarning)
            with watch(
                model, opt, log_dir=run_dir, histogram_every=histogram_every, on_finding="record"
            ) as watcher:
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
    where = shlex.quote(log_dir)
    print(
        f"Findings logs: {os.path.join(log_dir, '*', FINDINGS_LOG_NAME)} "
        f"(summarise them: gradwatch report {where})",
        file=out,
    )
    print(f"Look at the gradients: tensorboard --logdir {where}", file=out)
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
