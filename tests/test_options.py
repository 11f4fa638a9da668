"""Bad input to watch(): one error root, a TypeError/ValueError that names the argument, what is
allowed and what was received, and nothing left half-done."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Kind
from gradwatch._options import DetectorOptions
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from tests.helpers.contract import hook_counts, run_steps
from tests.helpers.models import mlp


@pytest.fixture
def model() -> nn.Module:
    return mlp()


@pytest.fixture
def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


# Bad arguments of every entry point, one table for watch() and GradWatchCallback(): see
# tests/test_entry_points.py.


def test_frozen_model_leaves_no_hooks_and_is_watchable_once_unfrozen() -> None:
    model = nn.Linear(3, 3).requires_grad_(False)
    before = hook_counts(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradwatch.watch(model)
    assert hook_counts(model) == before
    model.requires_grad_(True)
    with gradwatch.watch(model) as watcher:
        assert watcher.param_names == ["weight", "bias"]


@pytest.mark.parametrize("log_dir", ["str", "path"])
def test_log_dir_accepts_str_and_pathlike(
    model: nn.Module, tmp_path: pathlib.Path, log_dir: str
) -> None:
    target = tmp_path / "new" / "runs"
    with gradwatch.watch(model, log_dir=str(target) if log_dir == "str" else target) as watcher:
        assert watcher.log_dir == str(target)


def test_watching_the_same_model_twice_is_an_error_until_closed(
    model: nn.Module, optimizer: torch.optim.Optimizer, tmp_path: pathlib.Path
) -> None:
    first = gradwatch.watch(model, optimizer, on_finding="record")
    counts = hook_counts(model, optimizer)
    second_dir = tmp_path / "second"
    with pytest.raises(ValueError, match=r"already watched by an open Watcher; close that one"):
        gradwatch.watch(model, optimizer, log_dir=second_dir)
    with pytest.raises(gradwatch.GradWatchError, match="already watched"):
        gradwatch.watch(model)  # also when following every optimizer
    assert hook_counts(model, optimizer) == counts
    assert not second_dir.exists()
    run_steps(model, optimizer, 3)
    assert first.step == 3
    first.close()
    with gradwatch.watch(model, optimizer) as again:
        run_steps(model, optimizer, 2)
    assert again.step == 2
    assert first.step == 3


def test_a_different_model_can_be_watched_at_the_same_time() -> None:
    a, b = mlp(), mlp()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01)
    with gradwatch.watch(a, opt_a) as wa, gradwatch.watch(b, opt_b) as wb:
        run_steps(a, opt_a, 2)
        run_steps(b, opt_b, 3)
    assert (wa.step, wb.step) == (2, 3)


def test_defaults_are_documented_values() -> None:
    assert DetectorOptions() == DetectorOptions(
        no_grad_after=5,
        explode_factor=1000.0,
        max_grad_norm=1e6,
        warmup_steps=5,
        history=32,
        vanish_ratio=1e-3,
        vanish_steps=5,
        no_step_after=50,
        replica_every=10,
        ignore=frozenset(),
    )


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"max_grad_norm": None}, {"max_grad_norm": None}),
        ({"warmup_steps": 8, "history": 8}, {"warmup_steps": 8, "history": 8}),
        ({"explode_factor": 3}, {"explode_factor": 3}),
        ({"ignore": "nan"}, {"ignore": frozenset({Kind.NAN})}),
        ({"ignore": Kind.INF}, {"ignore": frozenset({Kind.INF})}),
        (
            {"ignore": ["vanishing", Kind.NO_GRAD]},
            {"ignore": frozenset({Kind.VANISHING, Kind.NO_GRAD})},
        ),
        ({"vanish_ratio": 0.5, "vanish_steps": 1}, {"vanish_ratio": 0.5, "vanish_steps": 1}),
        ({"no_step_after": 1}, {"no_step_after": 1}),
        ({"no_step_after": np.int64(7)}, {"no_step_after": 7}),
    ],
)
def test_valid_options_are_kept(
    model: nn.Module, options: dict[str, Any], expected: dict[str, Any]
) -> None:
    with gradwatch.watch(model, **options) as watcher:
        assert dataclasses.asdict(watcher.options) | expected == dataclasses.asdict(watcher.options)


def test_ignored_kind_is_not_reported(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    with gradwatch.watch(model, optimizer, on_finding="raise", ignore=["missing_zero_grad"]) as w:
        run_steps(model, optimizer, 4, zero_grad=False)
    assert w.findings == []
    with gradwatch.watch(model, optimizer, on_finding="record") as w:
        run_steps(model, optimizer, 4, zero_grad=False)
    assert [f.kind for f in w.findings] == [Kind.MISSING_ZERO_GRAD]


def test_error_classes() -> None:
    assert issubclass(GradWatchTypeError, gradwatch.GradWatchError)
    assert issubclass(GradWatchTypeError, TypeError)
    assert issubclass(GradWatchValueError, gradwatch.GradWatchError)
    assert issubclass(GradWatchValueError, ValueError)
    assert issubclass(gradwatch.GradientError, gradwatch.GradWatchError)
    assert issubclass(gradwatch.GradientError, RuntimeError)
    assert not issubclass(gradwatch.GradWatchError, (TypeError, ValueError, RuntimeError))
