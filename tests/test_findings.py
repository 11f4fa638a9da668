"""Finding, Kind and the exception/warning types: the typed vocabulary of gradwatch."""

from __future__ import annotations

import dataclasses
import pickle
import re
from enum import Enum

import pytest

import gradwatch
from gradwatch import Finding, GradientError, GradWatchWarning, Kind
from gradwatch.findings import GradWatchValueError

KIND_VALUES = [
    "missing_zero_grad",
    "unexpected_accumulation",
    "nan",
    "inf",
    "exploding",
    "vanishing",
    "no_grad",
    "not_in_optimizer",
    "cleared_before_step",
    "step_not_taken",
    "no_update",
    "clip_order",
    "unregistered_parameter",
    "replica_divergence",
    "skipped_step",
]

# What each kind's message must tell the user to do (one characteristic phrase each).
ADVICE = {
    Kind.MISSING_ZERO_GRAD: "optimizer.zero_grad()",
    Kind.UNEXPECTED_ACCUMULATION: "accumulation_steps",
    Kind.NAN: "torch.autograd.detect_anomaly()",
    Kind.INF: "clip gradients",
    Kind.EXPLODING: "Lower the learning rate",
    Kind.VANISHING: "residual connections",
    Kind.NO_GRAD: "requires_grad_(False)",
    Kind.NOT_IN_OPTIMIZER: "add_param_group()",
    Kind.CLEARED_BEFORE_STEP: "Move optimizer.zero_grad() before loss.backward()",
    Kind.STEP_NOT_TAKEN: "Call optimizer.step()",
    Kind.NO_UPDATE: "Check the scheduler or warm-up",
    Kind.CLIP_ORDER: "after loss.backward() and before optimizer.step()",
    Kind.UNREGISTERED_PARAMETER: "Keep layers in nn.ModuleList or nn.ModuleDict",
    Kind.REPLICA_DIVERGENCE: "Call the DistributedDataParallel wrapper, not model.module",
    Kind.SKIPPED_STEP: "fix the loss or lower the learning rate",
}


def test_kind_has_exactly_the_documented_members() -> None:
    assert issubclass(Kind, str)
    assert issubclass(Kind, Enum)
    assert [k.value for k in Kind] == KIND_VALUES
    assert [k.name.lower() for k in Kind] == KIND_VALUES


@pytest.mark.parametrize("value", KIND_VALUES)
def test_kind_round_trips_through_its_value(value: str) -> None:
    kind = Kind(value)
    assert kind == value
    assert str(kind) == value
    assert kind.value == value
    assert pickle.loads(pickle.dumps(kind)) is kind


def test_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'nan_grad' is not a valid Kind"):
        Kind("nan_grad")


def test_finding_fields_and_defaults() -> None:
    f = Finding(Kind.NAN, step=3, param="fc.weight")
    assert [field.name for field in dataclasses.fields(Finding)] == [
        "kind",
        "step",
        "param",
        "value",
        "threshold",
        "params",
        "cause",
    ]
    assert (f.kind, f.step, f.param, f.value, f.threshold, f.params, f.cause) == (
        Kind.NAN,
        3,
        "fc.weight",
        None,
        None,
        (),
        None,
    )
    assert isinstance(f.message, str)


def test_finding_is_frozen_hashable_and_comparable() -> None:
    f = Finding(Kind.EXPLODING, 7, "0.weight", value=1e4, threshold=50.0, params=("0.weight",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.step = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.message = "x"  # type: ignore[misc]
    same = Finding(Kind.EXPLODING, 7, "0.weight", value=1e4, threshold=50.0, params=("0.weight",))
    assert f == same
    assert hash(f) == hash(same)
    assert f != dataclasses.replace(f, step=8)
    assert len({f, same}) == 1
    assert pickle.loads(pickle.dumps(f)) == f


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_every_kind_message_says_when_where_and_what_to_do(kind: Kind) -> None:
    f = Finding(
        kind,
        step=12,
        param="encoder.0.weight",
        value=3.0,
        threshold=1.0,
        params=("encoder.0.weight",),
    )
    message = f.message
    assert message.startswith("step 12: ")
    assert "'encoder.0.weight'" in message
    assert ADVICE[kind] in message
    assert str(f) == f"[{kind.value}] {message}"


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_message_without_parameter_names_is_well_formed(kind: Kind) -> None:
    message = Finding(kind, step=0, param=None).message
    assert message.startswith("step 0: ")
    assert not re.search(r"(?<![\w.])\(\s*\)", message)  # no empty list of names
    assert ": )" not in message
    assert "the model" in message
    assert "''" not in message
    assert "None" not in message


def test_message_lists_at_most_five_parameters() -> None:
    names = tuple(f"layer{i}.weight" for i in range(8))
    message = Finding(Kind.NAN, 0, names[0], value=8.0, params=names).message
    assert "'layer4.weight'" in message
    assert "'layer5.weight'" not in message
    assert "and 3 more" in message


@pytest.mark.parametrize(
    ("finding", "numbers"),
    [
        (
            Finding(Kind.UNEXPECTED_ACCUMULATION, 2, "w", value=3.0, threshold=1.0),
            ["3 backward", "accumulation_steps=1"],
        ),
        (
            Finding(Kind.EXPLODING, 2, "w", value=12345.0, threshold=100.0),
            ["1.23e+04", "limit 100"],
        ),
        (Finding(Kind.NO_GRAD, 2, "w", value=5.0, threshold=5.0), ["in 5 backward passes"]),
        (Finding(Kind.VANISHING, 2, "w", value=0.0, threshold=0.0), ["exactly zero"]),
        (
            Finding(Kind.VANISHING, 2, "w", value=1e-5, threshold=1e-3),
            ["1e-05 times", "limit 0.001"],
        ),
    ],
)
def test_message_reports_value_and_threshold(finding: Finding, numbers: list[str]) -> None:
    for number in numbers:
        assert number in finding.message


def test_gradient_error_carries_the_finding() -> None:
    f = Finding(Kind.INF, 4, "head.bias", value=1.0, params=("head.bias",))
    error = GradientError(f)
    assert isinstance(error, RuntimeError)
    assert isinstance(error, gradwatch.GradWatchError)
    assert error.finding is f
    assert str(error) == str(f)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is GradientError
    assert copy.finding == f
    assert str(copy) == str(f)


def test_warning_carries_the_finding() -> None:
    f = Finding(Kind.NO_GRAD, 5, "aux.weight", value=5.0, params=("aux.weight",))
    warning = GradWatchWarning(f)
    assert isinstance(warning, UserWarning)
    assert warning.finding is f
    assert str(warning) == str(f)
    with pytest.warns(GradWatchWarning, match=r"\[no_grad\] step 5: 'aux.weight'"):
        import warnings

        warnings.warn(warning, stacklevel=1)


@pytest.mark.parametrize(
    ("cause", "advice"),
    [
        ("no_step", "Call optimizer.step()"),
        ("overflow", "GradScaler skips every step"),
        ("no_optimizer", "watcher.mark_step()"),
    ],
)
def test_step_not_taken_message_per_cause(cause: str, advice: str) -> None:
    f = Finding(Kind.STEP_NOT_TAKEN, 0, "w", 51.0, 50.0, ("w",), cause)
    assert advice in f.message


def test_no_update_message_per_cause() -> None:
    zero = Finding(Kind.NO_UPDATE, 4, "w", 5.0, 0.0, ("w",), "zero_lr")
    unchanged = Finding(Kind.NO_UPDATE, 20, "w", 10.0, None, ("w",), "unchanged")
    assert "learning rate is 0" in zero.message
    assert "bit-for-bit what they were 10 optimizer steps ago" in unchanged.message


def test_cause_round_trips_and_is_written_only_when_set() -> None:
    f = Finding(Kind.NO_UPDATE, 4, "w", 5.0, 0.0, ("w",), "zero_lr")
    assert f.to_dict()["cause"] == "zero_lr"
    assert Finding.from_dict(f.to_dict()) == f
    assert "cause" not in Finding(Kind.NAN, 1, "w").to_dict()
    with pytest.raises(GradWatchValueError, match="cause must be a string or null, got 3"):
        Finding.from_dict({**f.to_dict(), "cause": 3})


def test_no_grad_message_per_cause() -> None:
    passes = Finding(Kind.NO_GRAD, 4, "enc.weight", 5.0, 5.0, ("enc.weight",))
    idle = Finding(Kind.NO_GRAD, 4, "enc.weight", 5.0, 5.0, ("enc.weight",), "idle_optimizer")
    assert "received no gradient in 5 backward passes" in passes.message
    assert "the optimizer of 'enc.weight' has stepped 5 times" in idle.message
