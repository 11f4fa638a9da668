"""Bad input to watch(): one error root, a TypeError/ValueError that names the argument, what is
allowed and what was received, and nothing left half-done."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Kind
from gradwatch._options import DetectorOptions
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from tests.helpers.contract import attribute_names, hook_counts, run_steps
from tests.helpers.models import mlp


@pytest.fixture
def model() -> nn.Module:
    return mlp()


@pytest.fixture
def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


# (keyword arguments of watch(), error type, pattern naming argument, allowed values, received)
BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"accumulation_steps": 0}, ValueError, r"accumulation_steps must be an int >= 1, got 0"),
    ({"accumulation_steps": -1}, ValueError, r"accumulation_steps must be an int >= 1, got -1"),
    (
        {"accumulation_steps": 1.5},
        TypeError,
        r"accumulation_steps must be an int >= 1, got float 1\.5",
    ),
    (
        {"accumulation_steps": True},
        TypeError,
        r"accumulation_steps must be an int >= 1, got bool True",
    ),
    (
        {"on_finding": "explode"},
        ValueError,
        r"on_finding must be one of 'warn', 'raise', 'record' or a callable taking a Finding, "
        r"got 'explode'",
    ),
    (
        {"on_finding": 3},
        TypeError,
        r"on_finding must be one of 'warn', 'raise', 'record' or a callable .*got int 3",
    ),
    ({"on_finding": None}, TypeError, r"on_finding must be one of .*got NoneType None"),
    (
        {"on_nonfinite": "drop"},
        ValueError,
        r"on_nonfinite must be 'report' or 'skip': 'report' reports NaN/Inf gradients and lets "
        r"the optimizer step with them, 'skip' also skips that step; got 'drop'",
    ),
    ({"on_nonfinite": "Skip"}, ValueError, r"on_nonfinite must be 'report' or 'skip'.*got 'Skip'"),
    (
        {"on_nonfinite": True},
        TypeError,
        r"on_nonfinite must be 'report' or 'skip' \(a str\), got bool True",
    ),
    ({"on_nonfinite": None}, TypeError, r"on_nonfinite must be .*got NoneType None"),
    ({"histogram_every": -1}, ValueError, r"histogram_every must be an int >= 0, got -1"),
    ({"histogram_every": 2.0}, TypeError, r"histogram_every must be an int >= 0, got float 2\.0"),
    (
        {"log_dir": 3},
        TypeError,
        r"log_dir must be None, a str or an os\.PathLike, got int 3",
    ),
    (
        {"log_dir": b"runs"},
        TypeError,
        r"log_dir must be None, a str or an os\.PathLike, got bytes b'runs'",
    ),
    (
        {"no_grad_afterr": 3},
        TypeError,
        r"unknown option\(s\) 'no_grad_afterr'; detector options are: no_grad_after, "
        r"explode_factor, max_grad_norm, warmup_steps, history, vanish_ratio, vanish_steps, ignore",
    ),
    ({"sinks": []}, TypeError, r"unknown option\(s\) 'sinks'"),
    ({"no_grad_after": 0}, ValueError, r"no_grad_after must be an int >= 1, got 0"),
    ({"no_grad_after": 2.5}, TypeError, r"no_grad_after must be an int >= 1, got float 2\.5"),
    ({"explode_factor": 1.0}, ValueError, r"explode_factor must be a finite number > 1, got 1\.0"),
    ({"explode_factor": 0.5}, ValueError, r"explode_factor must be a finite number > 1, got 0\.5"),
    (
        {"explode_factor": float("inf")},
        ValueError,
        r"explode_factor must be a finite number > 1, got inf",
    ),
    (
        {"explode_factor": float("nan")},
        ValueError,
        r"explode_factor must be a finite number > 1, got nan",
    ),
    (
        {"explode_factor": "10"},
        TypeError,
        r"explode_factor must be a number > 1, got str '10'",
    ),
    ({"max_grad_norm": 0.0}, ValueError, r"max_grad_norm must be a finite number > 0, got 0\.0"),
    ({"max_grad_norm": -1}, ValueError, r"max_grad_norm must be a finite number > 0, got -1"),
    ({"warmup_steps": 0}, ValueError, r"warmup_steps must be an int >= 1, got 0"),
    ({"warmup_steps": 1.5}, TypeError, r"warmup_steps must be an int >= 1, got float 1\.5"),
    (
        {"history": 3},
        ValueError,
        r"history must be an int >= warmup_steps \(5\), got 3",
    ),
    (
        {"warmup_steps": 10, "history": 9},
        ValueError,
        r"history must be an int >= warmup_steps \(10\), got 9",
    ),
    ({"vanish_ratio": 0.0}, ValueError, r"vanish_ratio must be a finite number > 0, got 0\.0"),
    ({"vanish_ratio": -0.5}, ValueError, r"vanish_ratio must be a finite number > 0, got -0\.5"),
    ({"vanish_ratio": 1.0}, ValueError, r"vanish_ratio must be a number in \(0, 1\), got 1\.0"),
    ({"vanish_ratio": 2}, ValueError, r"vanish_ratio must be a number in \(0, 1\), got 2"),
    ({"vanish_steps": 0}, ValueError, r"vanish_steps must be an int >= 1, got 0"),
    ({"vanish_steps": True}, TypeError, r"vanish_steps must be an int >= 1, got bool True"),
    (
        {"ignore": ["nan", "nonsense"]},
        ValueError,
        r"ignore must be kinds \(or their names\) among missing_zero_grad, "
        r"unexpected_accumulation, nan, inf, exploding, vanishing, no_grad, not_in_optimizer, "
        r"skipped_step, got \['nan', 'nonsense'\]",
    ),
    ({"ignore": "NaN"}, ValueError, r"ignore must be kinds .*got 'NaN'"),
    ({"ignore": 5}, ValueError, r"ignore must be kinds .*got 5"),
]


def _ids(case: tuple[dict[str, Any], type[Exception], str]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS, ids=map(_ids, BAD_OPTIONS))
def test_bad_option_is_rejected_and_leaves_nothing_behind(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tmp_path: pathlib.Path,
    options: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    before = hook_counts(model, optimizer)
    attributes = attribute_names(model, optimizer)
    log_dir = tmp_path / "runs"
    if "log_dir" not in options:
        options = {**options, "log_dir": log_dir}

    with pytest.raises(error, match=match) as raised:
        gradwatch.watch(model, optimizer, **options)

    assert isinstance(raised.value, gradwatch.GradWatchError)
    assert hook_counts(model, optimizer) == before
    assert attribute_names(model, optimizer) == attributes
    assert not log_dir.exists()  # no event file for a watcher that never started
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        run_steps(model, optimizer, 2)
    assert watcher.step == 2


# (model, error type, pattern)
BAD_MODELS: list[tuple[object, type[Exception], str]] = [
    ("a string", TypeError, r"model must be a torch\.nn\.Module, got str 'a string'"),
    (None, TypeError, r"model must be a torch\.nn\.Module, got NoneType None"),
    (
        torch.nn.Parameter(torch.ones(3)),
        TypeError,
        r"model must be a torch\.nn\.Module, got Parameter",
    ),
    (
        nn.ReLU(),
        ValueError,
        r"model has no trainable parameters \(none with requires_grad=True\) to watch: ReLU",
    ),
    (
        nn.Linear(3, 3).requires_grad_(False),
        ValueError,
        r"model has no trainable parameters \(none with requires_grad=True\) to watch: Linear",
    ),
]


@pytest.mark.parametrize(
    ("bad_model", "error", "match"), BAD_MODELS, ids=["str", "None", "tensor", "relu", "frozen"]
)
def test_bad_model_is_rejected(bad_model: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as raised:
        gradwatch.watch(bad_model)  # type: ignore[arg-type]
    assert isinstance(raised.value, gradwatch.GradWatchError)


def test_frozen_model_leaves_no_hooks_and_is_watchable_once_unfrozen() -> None:
    model = nn.Linear(3, 3).requires_grad_(False)
    before = hook_counts(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gradwatch.watch(model)
    assert hook_counts(model) == before
    model.requires_grad_(True)
    with gradwatch.watch(model) as watcher:
        assert watcher.param_names == ["weight", "bias"]


# (optimizer argument, error type, pattern)
BAD_OPTIMIZERS: list[tuple[object, type[Exception], str]] = [
    (
        [],
        ValueError,
        r"optimizer must be a torch\.optim\.Optimizer, a non-empty list of them, or None; got an "
        r"empty list",
    ),
    ((), ValueError, r"optimizer must be .*non-empty list.*got an empty tuple"),
    ("sgd", TypeError, r"optimizer must be a torch\.optim\.Optimizer, a list of them, or None; "),
    (0.01, TypeError, r"optimizer must be a torch\.optim\.Optimizer.*got float 0\.01"),
    ({"lr": 0.1}, TypeError, r"optimizer must be a torch\.optim\.Optimizer.*got dict"),
]


@pytest.mark.parametrize(
    ("bad", "error", "match"), BAD_OPTIMIZERS, ids=["[]", "()", "str", "float", "dict"]
)
def test_bad_optimizer_is_rejected(
    model: nn.Module, bad: object, error: type[Exception], match: str
) -> None:
    before = hook_counts(model)
    with pytest.raises(error, match=match) as raised:
        gradwatch.watch(model, bad)  # type: ignore[arg-type]
    assert isinstance(raised.value, gradwatch.GradWatchError)
    assert hook_counts(model) == before


def test_bad_optimizer_in_a_list_is_rejected_without_hooking_the_good_one(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    before = hook_counts(model, optimizer)
    with pytest.raises(TypeError, match=r"optimizer must be .*got str 'adam'"):
        gradwatch.watch(model, [optimizer, "adam"])  # type: ignore[list-item]
    assert hook_counts(model, optimizer) == before


def test_log_dir_that_is_a_file_is_rejected(model: nn.Module, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.txt"
    path.write_text("not a directory")
    with pytest.raises(ValueError, match=r"log_dir must be a directory .*events\.txt") as raised:
        gradwatch.watch(model, log_dir=path)
    assert isinstance(raised.value, gradwatch.GradWatchError)
    assert path.read_text() == "not a directory"


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
