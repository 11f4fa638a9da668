"""Helpers for the API-contract tests: hook counts, a fixed training loop, test sinks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn

from gradwatch import Finding
from tests.helpers.models import regression_batch


@dataclasses.dataclass(frozen=True)
class HookCounts:
    """How many hooks torch holds for a model, its parameters, its optimizers and globally."""

    param_backward: tuple[int, ...]
    param_post_accumulate: tuple[int, ...]
    module: tuple[int, ...]
    optimizer_pre: tuple[int, ...]
    optimizer_post: tuple[int, ...]
    global_pre: int
    global_post: int


def _count(hooks: object) -> int:
    return 0 if hooks is None else len(hooks)  # type: ignore[arg-type]


def hook_counts(model: nn.Module, *optimizers: torch.optim.Optimizer) -> HookCounts:
    params = list(model.parameters())
    return HookCounts(
        param_backward=tuple(_count(p._backward_hooks) for p in params),
        param_post_accumulate=tuple(
            _count(getattr(p, "_post_accumulate_grad_hooks", None)) for p in params
        ),
        module=tuple(
            _count(m._forward_hooks)
            + _count(m._forward_pre_hooks)
            + _count(m._backward_hooks)
            + _count(m._backward_pre_hooks)
            + _count(m._state_dict_hooks)
            + _count(m._load_state_dict_pre_hooks)
            for m in model.modules()
        ),
        optimizer_pre=tuple(_count(o._optimizer_step_pre_hooks) for o in optimizers),
        optimizer_post=tuple(_count(o._optimizer_step_post_hooks) for o in optimizers),
        global_pre=_count(torch_optimizer._global_optimizer_pre_hooks),
        global_post=_count(torch_optimizer._global_optimizer_post_hooks),
    )


def attribute_names(model: nn.Module, *optimizers: torch.optim.Optimizer) -> list[set[str]]:
    """The instance attribute names of every module, parameter and optimizer."""
    objects: list[object] = [*model.modules(), *model.parameters(), *optimizers]
    return [set(vars(o)) for o in objects]


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    seed: int = 0,
    zero_grad: bool = True,
) -> None:
    """A deterministic regression loop; without ``zero_grad`` it plants a missing zero_grad."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = regression_batch(generator=generator)
        if zero_grad:
            optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bit_identical(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


class RecordingSink:
    """Keeps every call it receives."""

    def __init__(self) -> None:
        self.checks: list[tuple[int, list[str], list[float], float]] = []
        self.findings: list[Finding] = []
        self.calls: list[str] = []

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        self.calls.append("write_check")
        self.checks.append((step, list(names), norms.tolist(), total_norm))

    def write_finding(self, finding: Finding) -> None:
        self.calls.append("write_finding")
        self.findings.append(finding)

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


class BrokenSink(RecordingSink):
    """Fails on every write."""

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        super().write_check(step, names, norms, total_norm)
        raise OSError("disk full")

    def write_finding(self, finding: Finding) -> None:
        super().write_finding(finding)
        raise OSError("disk full")


def state_differences(before: object, after: object, path: str = "") -> list[str]:
    """Where two nested state dicts (tensors, dicts, lists, numbers) differ; empty when equal.

    Tensors are compared with ``torch.equal`` (exact values, shapes and NaN positions differ).
    """
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        same = (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype
            and before.shape == after.shape
            and torch.equal(before, after)
        )
        return [] if same else [path or "(root)"]
    if isinstance(before, dict) and isinstance(after, dict):
        if before.keys() != after.keys():
            return [f"{path}: keys {sorted(map(str, before))} != {sorted(map(str, after))}"]
        return [
            difference
            for key in before
            for difference in state_differences(before[key], after[key], f"{path}/{key}")
        ]
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        if len(before) != len(after):
            return [f"{path}: length {len(before)} != {len(after)}"]
        return [
            difference
            for i, (a, b) in enumerate(zip(before, after, strict=True))
            for difference in state_differences(a, b, f"{path}/{i}")
        ]
    return [] if before == after else [f"{path}: {before!r} != {after!r}"]
