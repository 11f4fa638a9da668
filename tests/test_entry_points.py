"""Every public entry point against bad and unusual input, as tables.

``watch()`` and ``GradWatchCallback()`` share one table of keyword arguments; ``watch()``'s model
and optimizer have their own; then unusual models and parameters, every public member of a closed
``Watcher``, the callback's ``load_state_dict`` and a few ``Trainer.fit`` cases, and the
``gradwatch`` command. Each case ends in one of two ways: a :class:`gradwatch.GradWatchError` that
names the argument, what is allowed and what was received, with nothing left behind (the command:
exit code 2 and one line on stderr); or a behaviour the README documents, checked for the right
answer. Never a traceback from inside torch, never a silent wrong answer.
"""

from __future__ import annotations

import dataclasses
import errno
import fractions
import json
import pathlib
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, GradWatchError, Kind
from gradwatch.cli import EXIT_BAD_INPUT, EXIT_OK, main
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, FindingsLog
from tests.helpers.contract import attribute_names, hook_counts, run_steps
from tests.helpers.models import TiedLM, mlp, regression_batch

WATCH = "watch"
CALLBACK = "callback"
TE = GradWatchTypeError
VE = GradWatchValueError
TOO_LONG = "x" * 300  # a path component no common file system accepts (ENAMETOOLONG)


def _triples(findings: list[Finding]) -> list[tuple[str, int, str | None]]:
    return [(f.kind.value, f.step, f.param) for f in findings]


def _writer_threads() -> int:
    """TensorBoard writer threads alive: one per open SummaryWriter."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


def _callback_class() -> Any:
    return pytest.importorskip("gradwatch.lightning").GradWatchCallback


# ======================================================================= 1. keyword arguments
# watch(model, optimizer, **kwargs) and GradWatchCallback(**kwargs): one table, both front ends.


@dataclasses.dataclass(frozen=True)
class InTmp:
    """A path under the test's tmp_path; ``file`` is created as a file before the call."""

    relative: str


EXISTING_FILE = InTmp("file")
UNDER_A_FILE = InTmp("file/sub")


@dataclasses.dataclass(frozen=True)
class Bad:
    id: str
    kwargs: dict[str, Any]
    error: type[GradWatchError]
    match: str
    """Pattern for the message; ``ENTRY`` stands for ``watch()`` or ``GradWatchCallback()``."""
    front_ends: tuple[str, ...] = (WATCH, CALLBACK)


_ALL_KINDS = (
    "missing_zero_grad, unexpected_accumulation, nan, inf, exploding, vanishing, no_grad, "
    "not_in_optimizer, cleared_before_step, step_not_taken, no_update, clip_order, "
    "unregistered_parameter, replica_divergence, skipped_step"
)
_ON_FINDING = r"on_finding must be one of 'warn', 'raise', 'record' or a callable taking a Finding"
_DIRECTORY = r"log_dir must be a directory \(or a path where one can be created\), got "

BAD_KEYWORDS: list[Bad] = [
    # accumulation_steps: int >= 1 (the callback also takes None: read it from the Trainer)
    Bad("accumulation_steps=0", {"accumulation_steps": 0}, VE,
        r"accumulation_steps must be an int >= 1, got 0"),
    Bad("accumulation_steps=-1", {"accumulation_steps": -1}, VE,
        r"accumulation_steps must be an int >= 1, got -1"),
    Bad("accumulation_steps=1.5", {"accumulation_steps": 1.5}, TE,
        r"accumulation_steps must be an int >= 1, got float 1\.5"),
    Bad("accumulation_steps=2.0", {"accumulation_steps": 2.0}, TE,
        r"accumulation_steps must be an int >= 1, got float 2\.0"),
    Bad("accumulation_steps=True", {"accumulation_steps": True}, TE,
        r"accumulation_steps must be an int >= 1, got bool True"),
    Bad("accumulation_steps='2'", {"accumulation_steps": "2"}, TE,
        r"accumulation_steps must be an int >= 1, got str '2'"),
    Bad("accumulation_steps=inf", {"accumulation_steps": float("inf")}, TE,
        r"accumulation_steps must be an int >= 1, got float inf"),
    Bad("accumulation_steps=None", {"accumulation_steps": None}, TE,
        r"accumulation_steps must be an int >= 1, got NoneType None", (WATCH,)),
    # histogram_every: int >= 0
    Bad("histogram_every=-1", {"histogram_every": -1}, VE,
        r"histogram_every must be an int >= 0, got -1"),
    Bad("histogram_every=2.0", {"histogram_every": 2.0}, TE,
        r"histogram_every must be an int >= 0, got float 2\.0"),
    Bad("histogram_every=nan", {"histogram_every": float("nan")}, TE,
        r"histogram_every must be an int >= 0, got float nan"),
    Bad("histogram_every=True", {"histogram_every": True}, TE,
        r"histogram_every must be an int >= 0, got bool True"),
    Bad("histogram_every=False", {"histogram_every": False}, TE,
        r"histogram_every must be an int >= 0, got bool False"),
    Bad("histogram_every=None", {"histogram_every": None}, TE,
        r"histogram_every must be an int >= 0, got NoneType None"),
    Bad("histogram_every='10'", {"histogram_every": "10"}, TE,
        r"histogram_every must be an int >= 0, got str '10'"),
    # numpy numbers count as the Python numbers they are: np.bool_ is no int, np.float64 no int
    Bad("histogram_every=np.True_", {"histogram_every": np.True_}, TE,
        r"histogram_every must be an int >= 0, got bool "),
    Bad("histogram_every=np.float64(2.0)", {"histogram_every": np.float64(2.0)}, TE,
        r"histogram_every must be an int >= 0, got float 2\.0"),
    Bad("accumulation_steps=np.int64(0)", {"accumulation_steps": np.int64(0)}, VE,
        r"accumulation_steps must be an int >= 1, got 0"),
    Bad("history=np.int64(3)", {"history": np.int64(3)}, VE,
        r"history must be an int >= warmup_steps \(5\) and <= 10000, got 3"),
    Bad("explode_factor=np.float32(nan)", {"explode_factor": np.float32("nan")}, VE,
        r"explode_factor must be a finite number > 1, got nan"),
    # on_nonfinite: "report" or "skip"
    Bad("on_nonfinite='drop'", {"on_nonfinite": "drop"}, VE,
        r"on_nonfinite must be 'report' or 'skip': 'report' reports NaN/Inf gradients and lets "
        r"the optimizer step with them, 'skip' also skips that step; got 'drop'"),
    Bad("on_nonfinite='Skip'", {"on_nonfinite": "Skip"}, VE,
        r"on_nonfinite must be 'report' or 'skip'.*got 'Skip'"),
    Bad("on_nonfinite=True", {"on_nonfinite": True}, TE,
        r"on_nonfinite must be 'report' or 'skip' \(a str\), got bool True"),
    Bad("on_nonfinite=None", {"on_nonfinite": None}, TE,
        r"on_nonfinite must be .*got NoneType None"),
    # on_finding: a policy name or a callable taking one Finding
    Bad("on_finding='explode'", {"on_finding": "explode"}, VE, _ON_FINDING + r", got 'explode'"),
    Bad("on_finding='ignore'", {"on_finding": "ignore"}, VE, _ON_FINDING + r", got 'ignore'"),
    Bad("on_finding='WARN'", {"on_finding": "WARN"}, VE, _ON_FINDING + r", got 'WARN'"),
    Bad("on_finding=''", {"on_finding": ""}, VE, _ON_FINDING + r", got ''"),
    Bad("on_finding=3", {"on_finding": 3}, TE, _ON_FINDING + r", got int 3"),
    Bad("on_finding=None", {"on_finding": None}, TE, _ON_FINDING + r", got NoneType None"),
    Bad("on_finding=b'warn'", {"on_finding": b"warn"}, TE, _ON_FINDING + r", got bytes b'warn'"),
    Bad("on_finding=no-argument-callable", {"on_finding": lambda: None}, TE,
        _ON_FINDING + r", got <lambda>\(\), which cannot be called with one argument"),
    Bad("on_finding=two-argument-callable", {"on_finding": lambda finding, extra: None}, TE,
        _ON_FINDING + r", got <lambda>\(finding, extra\), which cannot be called with one"),
    Bad("on_finding=unbound-method", {"on_finding": list.append}, TE,
        _ON_FINDING + r", got list\.append\(self, object, /\), which cannot be called"),
    # log_dir: None, a path (str or os.PathLike) to a directory that can be created, a
    # SummaryWriter; the callback also takes False
    Bad("log_dir=3", {"log_dir": 3}, TE,
        r"log_dir must be None, a str or an os\.PathLike, got int 3"),
    Bad("log_dir=bytes", {"log_dir": b"runs"}, TE,
        r"log_dir must be None, a str or an os\.PathLike, got bytes b'runs'"),
    Bad("log_dir=True", {"log_dir": True}, TE,
        r"log_dir must be None, a str or an os\.PathLike, got bool True"),
    Bad("log_dir=False", {"log_dir": False}, TE,
        r"log_dir must be None, a str or an os\.PathLike, got bool False", (WATCH,)),
    Bad("log_dir=''", {"log_dir": ""}, VE, _DIRECTORY + r"'' \(an empty path\)"),
    Bad("log_dir=existing-file", {"log_dir": EXISTING_FILE}, VE,
        _DIRECTORY + r"'[^']*file', which is an existing file"),
    Bad("log_dir=under-a-file", {"log_dir": UNDER_A_FILE}, VE,
        _DIRECTORY + r"'[^']*file/sub', which lies under the existing file '[^']*file'"),
    Bad("log_dir=NUL", {"log_dir": "runs\0"}, VE,
        r"log_dir must be a path without NUL bytes \('\\x00'\), got 'runs\\x00'"),
    Bad("log_dir=NUL-in-a-Path", {"log_dir": InTmp("runs\0sub")}, VE,
        r"log_dir must be a path without NUL bytes \('\\x00'\), got '[^']*runs\\x00sub'"),
    # unknown keywords
    Bad("unknown=no_grad_afterr", {"no_grad_afterr": 3}, TE,
        r"ENTRY got unknown option\(s\) 'no_grad_afterr'; detector options are: "
        r"no_grad_after, explode_factor, max_grad_norm, warmup_steps, history, vanish_ratio, "
        r"vanish_steps, no_step_after, replica_every, ignore"),
    Bad("unknown=explode_factr", {"explode_factr": 10.0}, TE,
        r"ENTRY got unknown option\(s\) 'explode_factr'; detector options are: "),
    # sinks: a list or tuple of gradwatch.sinks.Sink (or objects with their four methods)
    Bad("sinks=3", {"sinks": 3}, TE, r"sinks must be a list or tuple of sinks, got int 3"),
    Bad("sinks=[3]", {"sinks": [3]}, TE,
        r"sinks must hold objects with the methods write_check, write_finding, flush, close; "
        r"got int 3, which lacks write_check, write_finding, flush, close"),
    Bad("sinks=[class]", {"sinks": [gradwatch.sinks.Sink]}, TE,
        r"sinks must hold objects with the methods .*; got type <class "
        r"'gradwatch\.sinks\.base\.Sink'>, a class \(subclass gradwatch\.sinks\.Sink"),
    # no_grad_after: int >= 1
    Bad("no_grad_after=0", {"no_grad_after": 0}, VE, r"no_grad_after must be an int >= 1, got 0"),
    Bad("no_grad_after=2.5", {"no_grad_after": 2.5}, TE,
        r"no_grad_after must be an int >= 1, got float 2\.5"),
    Bad("no_grad_after=True", {"no_grad_after": True}, TE,
        r"no_grad_after must be an int >= 1, got bool True"),
    Bad("no_grad_after=None", {"no_grad_after": None}, TE,
        r"no_grad_after must be an int >= 1, got NoneType None"),
    # explode_factor: finite number > 1
    Bad("explode_factor=1.0", {"explode_factor": 1.0}, VE,
        r"explode_factor must be a finite number > 1, got 1\.0"),
    Bad("explode_factor=0.5", {"explode_factor": 0.5}, VE,
        r"explode_factor must be a finite number > 1, got 0\.5"),
    Bad("explode_factor=inf", {"explode_factor": float("inf")}, VE,
        r"explode_factor must be a finite number > 1, got inf"),
    Bad("explode_factor=-inf", {"explode_factor": float("-inf")}, VE,
        r"explode_factor must be a finite number > 1, got -inf"),
    Bad("explode_factor=nan", {"explode_factor": float("nan")}, VE,
        r"explode_factor must be a finite number > 1, got nan"),
    Bad("explode_factor='10'", {"explode_factor": "10"}, TE,
        r"explode_factor must be a number > 1, got str '10'"),
    Bad("explode_factor=True", {"explode_factor": True}, TE,
        r"explode_factor must be a number > 1, got bool True"),
    Bad("explode_factor=None", {"explode_factor": None}, TE,
        r"explode_factor must be a number > 1, got NoneType None"),
    Bad("explode_factor=tensor", {"explode_factor": torch.tensor(10.0)}, TE,
        r"explode_factor must be a number > 1, got Tensor tensor\(10\.\)"),
    # max_grad_norm: finite number > 0, or None
    Bad("max_grad_norm=0.0", {"max_grad_norm": 0.0}, VE,
        r"max_grad_norm must be a finite number > 0, got 0\.0"),
    Bad("max_grad_norm=-1", {"max_grad_norm": -1}, VE,
        r"max_grad_norm must be a finite number > 0, got -1"),
    Bad("max_grad_norm=nan", {"max_grad_norm": float("nan")}, VE,
        r"max_grad_norm must be a finite number > 0, got nan"),
    Bad("max_grad_norm=inf", {"max_grad_norm": float("inf")}, VE,
        r"max_grad_norm must be a finite number > 0, got inf"),
    Bad("max_grad_norm=True", {"max_grad_norm": True}, TE,
        r"max_grad_norm must be a number > 0, got bool True"),
    Bad("max_grad_norm='1e6'", {"max_grad_norm": "1e6"}, TE,
        r"max_grad_norm must be a number > 0, got str '1e6'"),
    # warmup_steps: int in [1, 10000]
    Bad("warmup_steps=0", {"warmup_steps": 0}, VE,
        r"warmup_steps must be an int >= 1 and <= 10000, got 0"),
    Bad("warmup_steps=1.5", {"warmup_steps": 1.5}, TE,
        r"warmup_steps must be an int >= 1 and <= 10000, got float 1\.5"),
    Bad("warmup_steps=True", {"warmup_steps": True}, TE,
        r"warmup_steps must be an int >= 1 and <= 10000, got bool True"),
    Bad("warmup_steps=1e9", {"warmup_steps": 10**9}, VE,
        r"warmup_steps must be an int >= 1 and <= 10000, got 1000000000"),
    # history: int in [warmup_steps, 10000]
    Bad("history=3", {"history": 3}, VE,
        r"history must be an int >= warmup_steps \(5\) and <= 10000, got 3"),
    Bad("history<warmup_steps", {"warmup_steps": 10, "history": 9}, VE,
        r"history must be an int >= warmup_steps \(10\) and <= 10000, got 9"),
    Bad("history=10001", {"history": 10_001}, VE,
        r"history must be an int >= warmup_steps \(5\) and <= 10000, got 10001"),
    Bad("history=1e12", {"history": 10**12}, VE,
        r"history must be an int >= warmup_steps \(5\) and <= 10000, got 1000000000000"),
    Bad("history=True", {"history": True}, TE,
        r"history must be an int >= warmup_steps \(5\) and <= 10000, got bool True"),
    # vanish_ratio: number in (0, 1)
    Bad("vanish_ratio=0.0", {"vanish_ratio": 0.0}, VE,
        r"vanish_ratio must be a finite number > 0, got 0\.0"),
    Bad("vanish_ratio=-0.5", {"vanish_ratio": -0.5}, VE,
        r"vanish_ratio must be a finite number > 0, got -0\.5"),
    Bad("vanish_ratio=1.0", {"vanish_ratio": 1.0}, VE,
        r"vanish_ratio must be a number in \(0, 1\), got 1\.0"),
    Bad("vanish_ratio=2", {"vanish_ratio": 2}, VE,
        r"vanish_ratio must be a number in \(0, 1\), got 2"),
    Bad("vanish_ratio=nan", {"vanish_ratio": float("nan")}, VE,
        r"vanish_ratio must be a finite number > 0, got nan"),
    Bad("vanish_ratio=True", {"vanish_ratio": True}, TE,
        r"vanish_ratio must be a number > 0, got bool True"),
    Bad("vanish_ratio=None", {"vanish_ratio": None}, TE,
        r"vanish_ratio must be a number > 0, got NoneType None"),
    # vanish_steps: int >= 1
    Bad("vanish_steps=0", {"vanish_steps": 0}, VE, r"vanish_steps must be an int >= 1, got 0"),
    Bad("vanish_steps=True", {"vanish_steps": True}, TE,
        r"vanish_steps must be an int >= 1, got bool True"),
    Bad("vanish_steps=2.0", {"vanish_steps": 2.0}, TE,
        r"vanish_steps must be an int >= 1, got float 2\.0"),
    # no_step_after: int >= 1
    Bad("no_step_after=0", {"no_step_after": 0}, VE, r"no_step_after must be an int >= 1, got 0"),
    Bad("no_step_after=-1", {"no_step_after": -1}, VE,
        r"no_step_after must be an int >= 1, got -1"),
    Bad("no_step_after=1.5", {"no_step_after": 1.5}, TE,
        r"no_step_after must be an int >= 1, got float 1\.5"),
    Bad("no_step_after=True", {"no_step_after": True}, TE,
        r"no_step_after must be an int >= 1, got bool True"),
    Bad("no_step_after='3'", {"no_step_after": "3"}, TE,
        r"no_step_after must be an int >= 1, got str '3'"),
    Bad("no_step_after=None", {"no_step_after": None}, TE,
        r"no_step_after must be an int >= 1, got NoneType None"),
    # replica_every: int >= 1
    Bad("replica_every=0", {"replica_every": 0}, VE, r"replica_every must be an int >= 1, got 0"),
    Bad("replica_every=2.0", {"replica_every": 2.0}, TE,
        r"replica_every must be an int >= 1, got float 2\.0"),
    # ignore: kinds or their names
    Bad("ignore=unknown-kind", {"ignore": ["nan", "nonsense"]}, VE,
        rf"ignore must be kinds \(or their names\) among {_ALL_KINDS}, got \['nan', 'nonsense'\]"),
    Bad("ignore='NaN'", {"ignore": "NaN"}, VE, r"ignore must be kinds .*got 'NaN'"),
    Bad("ignore=5", {"ignore": 5}, VE, r"ignore must be kinds .*got 5"),
    Bad("ignore=[5]", {"ignore": [5]}, VE, r"ignore must be kinds .*got \[5\]"),
    Bad("ignore=None", {"ignore": None}, VE, r"ignore must be kinds .*got None"),
]  # fmt: skip


def _resolve(kwargs: dict[str, Any], tmp_path: pathlib.Path) -> dict[str, Any]:
    (tmp_path / EXISTING_FILE.relative).write_text("not a directory")
    return {k: tmp_path / v.relative if isinstance(v, InTmp) else v for k, v in kwargs.items()}


def _pattern(bad: Bad, front_end: str) -> str:
    entry = r"watch\(\)" if front_end == WATCH else r"GradWatchCallback\(\)"
    return bad.match.replace("ENTRY", entry)


@pytest.mark.parametrize(
    ("front_end", "bad"),
    [
        pytest.param(front_end, bad, id=f"{front_end}-{bad.id}")
        for bad in BAD_KEYWORDS
        for front_end in bad.front_ends
    ],
)
def test_bad_keyword_argument_is_refused_and_leaves_nothing_behind(
    tmp_path: pathlib.Path, front_end: str, bad: Bad
) -> None:
    log_dir = tmp_path / "runs"
    kwargs = {"log_dir": log_dir, **_resolve(bad.kwargs, tmp_path)}
    file_text = (tmp_path / EXISTING_FILE.relative).read_text()
    if front_end == CALLBACK:
        with pytest.raises(bad.error, match=_pattern(bad, front_end)) as raised:
            _callback_class()(**kwargs)
    else:
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        before = hook_counts(model, optimizer)
        attributes = attribute_names(model, optimizer)
        with pytest.raises(bad.error, match=_pattern(bad, front_end)) as raised:
            gradwatch.watch(model, optimizer, **kwargs)
        assert hook_counts(model, optimizer) == before
        assert attribute_names(model, optimizer) == attributes
        with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
            run_steps(model, optimizer, 2)
        assert watcher.step == 2
    assert isinstance(raised.value, GradWatchError)
    assert not log_dir.exists()  # no event file for a watcher that never started
    assert (tmp_path / EXISTING_FILE.relative).read_text() == file_text


def _print_finding(finding: Finding) -> None:
    print(finding)


# Values at the edge of what is allowed: accepted, and kept as given.
ACCEPTED_KEYWORDS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("histogram_every=0", {"histogram_every": 0}, (WATCH, CALLBACK)),
    ("history=10000", {"history": 10_000}, (WATCH, CALLBACK)),
    ("warmup_steps=history=10000", {"warmup_steps": 10_000, "history": 10_000}, (WATCH, CALLBACK)),
    ("explode_factor=1.0000001", {"explode_factor": 1.0000001}, (WATCH, CALLBACK)),
    ("vanish_ratio=0.999", {"vanish_ratio": 0.999}, (WATCH, CALLBACK)),
    ("max_grad_norm=None", {"max_grad_norm": None}, (WATCH, CALLBACK)),
    ("ignore=[]", {"ignore": []}, (WATCH, CALLBACK)),
    ("on_finding=function", {"on_finding": _print_finding}, (WATCH, CALLBACK)),
    ("on_finding=builtin", {"on_finding": print}, (WATCH, CALLBACK)),
    ("on_finding=bound-method", {"on_finding": [].append}, (WATCH, CALLBACK)),
    ("accumulation_steps=None", {"accumulation_steps": None}, (CALLBACK,)),
    ("log_dir=False", {"log_dir": False}, (CALLBACK,)),
    # numpy numbers and fractions, kept as the int or float they equal
    ("histogram_every=np.int64(5)", {"histogram_every": np.int64(5)}, (WATCH, CALLBACK)),
    ("accumulation_steps=np.int32(2)", {"accumulation_steps": np.int32(2)}, (WATCH, CALLBACK)),
    ("history=np.int64(10000)", {"history": np.int64(10_000)}, (WATCH, CALLBACK)),
    ("no_grad_after=np.uint8(3)", {"no_grad_after": np.uint8(3)}, (WATCH, CALLBACK)),
    ("explode_factor=np.float32(4)", {"explode_factor": np.float32(4.0)}, (WATCH, CALLBACK)),
    ("explode_factor=np.int64(10)", {"explode_factor": np.int64(10)}, (WATCH, CALLBACK)),
    ("max_grad_norm=np.float64(1e6)", {"max_grad_norm": np.float64(1e6)}, (WATCH, CALLBACK)),
    ("vanish_ratio=np.float32(0.5)", {"vanish_ratio": np.float32(0.5)}, (WATCH, CALLBACK)),
    ("vanish_ratio=Fraction(1,4)", {"vanish_ratio": fractions.Fraction(1, 4)}, (WATCH, CALLBACK)),
]


@pytest.mark.parametrize(
    ("front_end", "kwargs"),
    [
        pytest.param(front_end, kwargs, id=f"{front_end}-{name}")
        for name, kwargs, front_ends in ACCEPTED_KEYWORDS
        for front_end in front_ends
    ],
)
def test_edge_values_are_accepted_as_given(front_end: str, kwargs: dict[str, Any]) -> None:
    if front_end == CALLBACK:
        made = _callback_class()(**kwargs)
    else:
        model = mlp()
        made = gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.01), **kwargs)
        made.close()
    for name, value in kwargs.items():
        if hasattr(made.options, name):
            kept = getattr(made.options, name)
            assert kept == (frozenset(value) if name == "ignore" else value)
        elif name != "on_finding":
            assert getattr(made, name) == value


def test_positional_arguments_after_the_optimizer_are_python_errors() -> None:
    # Everything after ``optimizer`` is keyword-only: Python itself says so, naming the function.
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_counts(model, optimizer)
    with pytest.raises(TypeError, match=r"watch\(\) takes from 1 to 2 positional arguments"):
        gradwatch.watch(model, optimizer, "runs")  # type: ignore[misc]
    assert hook_counts(model, optimizer) == before
    with pytest.raises(TypeError, match=r"__init__\(\) takes 1 positional argument"):
        _callback_class()("runs")


# ======================================================================= 2. model and optimizer


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


@dataclasses.dataclass(frozen=True)
class BadCall:
    id: str
    arguments: Callable[[nn.Module, torch.optim.Optimizer, torch.optim.Optimizer], tuple[Any, Any]]
    """(model argument, optimizer argument) from a fresh model, its SGD optimizer and the SGD
    optimizer of another model."""
    error: type[GradWatchError]
    match: str


_OPTIMIZER = r"optimizer must be a torch\.optim\.Optimizer, a list of them, or None; got "

# The lambdas take (model, optimizer, other model's optimizer).
BAD_CALLS: list[BadCall] = [
    BadCall("model=str", lambda m, o, other: ("a string", o), TE,
            r"model must be a torch\.nn\.Module, got str 'a string'"),
    BadCall("model=None", lambda m, o, other: (None, o), TE,
            r"model must be a torch\.nn\.Module, got NoneType None"),
    BadCall("model=tensor", lambda m, o, other: (nn.Parameter(torch.ones(3)), o), TE,
            r"model must be a torch\.nn\.Module, got Parameter"),
    BadCall("model=class", lambda m, o, other: (nn.Linear, o), TE,
            r"model must be a torch\.nn\.Module, got type <class 'torch\.nn\.modules\.linear"),
    BadCall("model=state_dict", lambda m, o, other: (m.state_dict(), o), TE,
            r"model must be a torch\.nn\.Module, got OrderedDict"),
    BadCall("optimizer=[]", lambda m, o, other: (m, []), VE,
            r"optimizer must be a torch\.optim\.Optimizer, a non-empty list of them, or None; "
            r"got an empty list"),
    BadCall("optimizer=()", lambda m, o, other: (m, ()), VE,
            r"optimizer must be .*non-empty list.*got an empty tuple"),
    BadCall("optimizer=str", lambda m, o, other: (m, "sgd"), TE, _OPTIMIZER + r"str 'sgd'"),
    BadCall("optimizer=float", lambda m, o, other: (m, 0.01), TE, _OPTIMIZER + r"float 0\.01"),
    BadCall("optimizer=dict", lambda m, o, other: (m, {"lr": 0.1}), TE, _OPTIMIZER + r"dict"),
    BadCall("optimizer=class", lambda m, o, other: (m, torch.optim.SGD), TE,
            _OPTIMIZER + r"type <class 'torch\.optim\.sgd\.SGD'>"),
    BadCall("optimizer=parameters", lambda m, o, other: (m, m.parameters()), TE,
            _OPTIMIZER + r"generator"),
    BadCall("optimizer=set", lambda m, o, other: (m, {o}), TE, _OPTIMIZER + r"set"),
    BadCall("optimizer=[opt,str]", lambda m, o, other: (m, [o, "adam"]), TE,
            _OPTIMIZER + r"str 'adam'"),
    BadCall("optimizer=[opt,None]", lambda m, o, other: (m, [o, None]), TE,
            _OPTIMIZER + r"NoneType None"),
    BadCall("optimizer=[opt,opt]", lambda m, o, other: (m, [o, o]), VE,
            r"optimizer must list each optimizer once; got the same SGD at positions 0 and 1"),
    BadCall("optimizer=of-another-model", lambda m, o, other: (m, other), VE,
            r"optimizer 0 \(SGD\) updates none of the model's trainable parameters; pass the "
            r"optimizers of this model, or none"),
    BadCall("optimizer=[opt,of-another-model]", lambda m, o, other: (m, [o, other]), VE,
            r"optimizer 1 \(SGD\) updates none of the model's trainable parameters"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_CALLS, ids=[b.id for b in BAD_CALLS])
def test_bad_model_or_optimizer_is_refused_and_leaves_nothing_behind(bad: BadCall) -> None:
    model, optimizer = _model_and_optimizer()
    _, other = _model_and_optimizer()
    before = hook_counts(model, optimizer, other)
    model_argument, optimizer_argument = bad.arguments(model, optimizer, other)
    with pytest.raises(bad.error, match=bad.match) as raised:
        gradwatch.watch(model_argument, optimizer_argument)
    assert isinstance(raised.value, GradWatchError)
    assert hook_counts(model, optimizer, other) == before
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        run_steps(model, optimizer, 2)
    assert watcher.step == 2


def test_watcher_sinks_must_be_sinks() -> None:
    model, optimizer = _model_and_optimizer()
    before = hook_counts(model, optimizer)
    with pytest.raises(TE, match=r"sinks must be a list or tuple of sinks, got NoneType None"):
        gradwatch.Watcher(model, optimizer, sinks=None)  # type: ignore[arg-type]
    with pytest.raises(
        TE, match=r"sinks must hold objects with the methods write_check, write_finding, flush, "
        r"close; got int 3, which lacks write_check, write_finding, flush, close"
    ):  # fmt: skip
        gradwatch.Watcher(model, optimizer, sinks=[3])  # type: ignore[list-item]
    assert hook_counts(model, optimizer) == before


def test_log_dir_that_cannot_be_created_names_the_path(tmp_path: pathlib.Path) -> None:
    model, optimizer = _model_and_optimizer()
    before = hook_counts(model, optimizer)
    threads = _writer_threads()
    match = rf"log_dir '[^']*{TOO_LONG}' could not be created or written: "
    with pytest.raises(VE, match=match) as raised:
        gradwatch.watch(model, optimizer, log_dir=tmp_path / TOO_LONG)
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.ENAMETOOLONG
    assert hook_counts(model, optimizer) == before
    assert _writer_threads() == threads


def test_findings_log_that_cannot_be_opened_closes_the_tensorboard_writer(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: FindingsLog, log_dir: str, *, rank: int = 0) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FindingsLog, "__init__", full)
    model, optimizer = _model_and_optimizer()
    threads = _writer_threads()
    with pytest.raises(VE, match=r"could not be created or written: No space left on device"):
        gradwatch.watch(model, optimizer, log_dir=tmp_path / "runs")
    assert _writer_threads() == threads  # the SummaryWriter opened first is closed again


# ======================================================================= 3. unusual models


class _Complex(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.weight * x).abs())


class _BuffersOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running", torch.zeros(3))


class _SparseAndDense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens))


class _MixedDtypes(nn.Module):
    """float32, then ``dtype``, then float64 layers, each fed its own dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.first = nn.Linear(8, 8)
        self.middle = nn.Linear(8, 8).to(dtype)
        self.last = nn.Linear(8, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = torch.relu(self.middle(h.to(self.dtype))).float()
        return self.last(h.double()).float()


Step = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Unusual:
    id: str
    build: Callable[[], tuple[nn.Module, list[torch.optim.Optimizer], Step]]
    """The model, its optimizers, and one training step ``step(i)``."""
    steps: int = 8
    expected: list[tuple[str, int, str | None]] | None = None
    """Findings when watched, as (kind, step, param); ``None`` when ``watch()`` refuses."""
    error: type[GradWatchError] | None = None
    match: str = ""


def _loop(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batch: Callable[[torch.Generator], tuple[Any, torch.Tensor | None]],
    *,
    skip_zero_grad: int | None = None,
    nan_at: int | None = None,
    inf_at: int | None = None,
) -> Step:
    """One step: zero_grad (except at ``skip_zero_grad``), backward, step; the loss is multiplied
    by NaN at ``nan_at`` and by Inf at ``inf_at``."""
    generator = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        x, y = batch(generator)
        if i != skip_zero_grad:
            for optimizer in optimizers:
                optimizer.zero_grad()
        out = model(x)
        loss = out.square().mean() if y is None else nn.functional.mse_loss(out, y)
        if i == nan_at:
            loss = loss * torch.tensor(float("nan"))
        if i == inf_at:
            loss = loss * torch.tensor(float("inf"))
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step


def _tokens(generator: torch.Generator) -> tuple[torch.Tensor, None]:
    return torch.randint(0, 50, (8,), generator=generator), None


def _regression(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return regression_batch(generator=generator)


def _sparse(optimizer: str, **plants: int) -> Callable[[], Any]:
    def build() -> Any:
        model = nn.Embedding(50, 4, sparse=True)
        opt: torch.optim.Optimizer = (
            torch.optim.SparseAdam(model.parameters(), lr=1e-2)
            if optimizer == "SparseAdam"
            else torch.optim.SGD(model.parameters(), lr=1e-2)
        )
        step = _loop(model, [opt], _tokens, **plants)

        def sparse_step(i: int) -> None:
            step(i)
            assert model.weight.grad is not None and model.weight.grad.is_sparse

        return model, [opt], sparse_step

    return build


def _sparse_and_dense(**plants: int) -> Any:
    model = _SparseAndDense()
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam(model.embedding.parameters(), lr=1e-2),
        torch.optim.Adam(model.head.parameters(), lr=1e-2),
    ]
    return model, optimizers, _loop(model, optimizers, _tokens, **plants)


def _tied(**plants: int) -> Any:
    model = TiedLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def batch(generator: torch.Generator) -> tuple[torch.Tensor, None]:
        return torch.randint(0, 20, (4, 5), generator=generator), None

    return model, [optimizer], _loop(model, [optimizer], batch, **plants)


def _mixed(dtype: torch.dtype, **plants: int) -> Callable[[], Any]:
    def build() -> Any:
        model = _MixedDtypes(dtype)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        return model, [optimizer], _loop(model, [optimizer], _regression, **plants)

    return build


def _refused(model: nn.Module) -> Callable[[], Any]:
    def build() -> Any:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers = [torch.optim.SGD(trainable, lr=0.01)] if trainable else []
        return model, optimizers, lambda i: None

    return build


def _meta() -> nn.Module:
    with torch.device("meta"):
        return mlp()


_NO_PARAMETERS = r"model has no trainable parameters \(none with requires_grad=True\) to watch: "

UNUSUAL: list[Unusual] = [
    # refused at watch(), naming what is wrong
    Unusual("no-parameters", _refused(nn.ReLU()), error=VE, match=_NO_PARAMETERS + "ReLU"),
    Unusual("empty-sequential", _refused(nn.Sequential()), error=VE,
            match=_NO_PARAMETERS + "Sequential"),
    Unusual("buffers-only", _refused(_BuffersOnly()), error=VE,
            match=_NO_PARAMETERS + "_BuffersOnly"),
    Unusual("all-frozen", _refused(nn.Linear(3, 3).requires_grad_(False)), error=VE,
            match=_NO_PARAMETERS + "Linear"),
    Unusual("complex", _refused(_Complex()), error=VE,
            match=r"complex parameters are not supported: weight; freeze them or keep them as real "
            r"tensors \(torch\.view_as_real\)"),
    Unusual("meta-device", _refused(_meta()), error=VE,
            match=r"parameters on the meta device hold no values to check: 0\.weight, 0\.bias, "
            r"2\.weight, 2\.bias, 4\.weight \.\.\.; materialise the model first"),
    # watched, with the right findings
    Unusual("sparse-SparseAdam-healthy", _sparse("SparseAdam"), expected=[]),
    Unusual("sparse-SparseAdam-zero_grad", _sparse("SparseAdam", skip_zero_grad=3),
            expected=[("missing_zero_grad", 3, "weight")]),
    Unusual("sparse-SparseAdam-nan", _sparse("SparseAdam", nan_at=5), steps=6,
            expected=[("nan", 5, "weight")]),
    Unusual("sparse-SGD-inf", _sparse("SGD", inf_at=5), steps=6, expected=[("inf", 5, "weight")]),
    Unusual("sparse-and-dense-healthy", _sparse_and_dense, expected=[]),
    Unusual("sparse-and-dense-zero_grad", lambda: _sparse_and_dense(skip_zero_grad=4),
            expected=[("missing_zero_grad", 4, "embedding.weight"),  # by each optimizer's check
                      ("missing_zero_grad", 4, "head.bias")]),
    Unusual("tied-healthy", _tied, expected=[]),
    Unusual("tied-zero_grad", lambda: _tied(skip_zero_grad=3),
            expected=[("missing_zero_grad", 3, "mix.bias")]),
    Unusual("mixed-float16-healthy", _mixed(torch.float16), expected=[]),
    Unusual("mixed-float16-nan", _mixed(torch.float16, nan_at=5), steps=6,
            expected=[("nan", 5, "last.bias")]),
    Unusual("mixed-bfloat16-healthy", _mixed(torch.bfloat16), expected=[]),
    Unusual("mixed-bfloat16-nan", _mixed(torch.bfloat16, nan_at=5), steps=6,
            expected=[("nan", 5, "last.bias")]),
    Unusual("mixed-bfloat16-zero_grad", _mixed(torch.bfloat16, skip_zero_grad=3),
            expected=[("missing_zero_grad", 3, "last.bias")]),
]  # fmt: skip


@pytest.mark.parametrize("case", UNUSUAL, ids=[c.id for c in UNUSUAL])
def test_unusual_model(tmp_path: pathlib.Path, case: Unusual) -> None:
    model, optimizers, step = case.build()
    before = hook_counts(model, *optimizers)
    if case.error is not None:
        assert case.match
        with pytest.raises(case.error, match=case.match) as raised:
            gradwatch.watch(model, optimizers or None, log_dir=tmp_path / "runs")
        assert isinstance(raised.value, GradWatchError)
        assert hook_counts(model, *optimizers) == before
        assert not (tmp_path / "runs").exists()
        return
    # With every output on, histograms at every step: sparse and mixed-dtype gradients go
    # through the TensorBoard path too.
    with gradwatch.watch(
        model, optimizers, on_finding="record", log_dir=tmp_path, histogram_every=1
    ) as watcher:
        for i in range(case.steps):
            step(i)
    assert _triples(watcher.findings) == case.expected
    assert watcher.step == case.steps
    assert hook_counts(model, *optimizers) == before
    written = (tmp_path / FINDINGS_LOG_NAME).read_text().splitlines()
    assert [(r["kind"], r["step"], r["param"]) for r in map(json.loads, written)] == case.expected


def test_frozen_complex_parameter_is_left_out_and_the_rest_is_watched() -> None:
    model = _Complex()
    model.weight.requires_grad_(False)
    with gradwatch.watch(model, on_finding="record") as watcher:
        assert watcher.param_names == ["head.weight", "head.bias"]


def test_tied_weight_is_watched_once_under_its_first_name() -> None:
    model, optimizers, step = _tied()
    with gradwatch.watch(model, optimizers, on_finding="record") as watcher:
        for i in range(8):
            step(i)  # two uses per backward pass: one pass, not unexpected_accumulation
    assert watcher.param_names == ["embedding.weight", "mix.weight", "mix.bias"]
    assert watcher.findings == []


@pytest.mark.parametrize("plant", ["healthy", "zero_grad"])
def test_parameter_shared_by_two_watched_models(plant: str) -> None:
    # Two modules holding the same nn.Parameter, each watched: each watcher reports what it
    # sees of that parameter under its own name, and neither disturbs the other.
    shared = nn.Parameter(torch.randn(8, 8) * 0.1)
    a, b = nn.Module(), nn.Module()
    a.weight = shared
    a.head = nn.Linear(8, 1)
    b.weight = shared
    opt = torch.optim.SGD([shared, *a.head.parameters()], lr=0.01)
    with (
        gradwatch.watch(a, opt, on_finding="record") as watch_a,
        gradwatch.watch(b, opt, on_finding="record") as watch_b,
    ):
        generator = torch.Generator().manual_seed(0)
        for i in range(8):
            x, y = regression_batch(generator=generator)
            if not (plant == "zero_grad" and i == 3):
                opt.zero_grad()
            nn.functional.mse_loss(a.head(torch.tanh(x @ shared)), y).backward()
            opt.step()
    assert watch_a.param_names == ["weight", "head.weight", "head.bias"]
    assert watch_b.param_names == ["weight"]
    if plant == "healthy":
        assert watch_a.findings == watch_b.findings == []
    else:
        assert [(f.kind, f.step) for f in watch_a.findings] == [(Kind.MISSING_ZERO_GRAD, 3)]
        assert _triples(watch_b.findings) == [("missing_zero_grad", 3, "weight")]
    assert watch_a.step == watch_b.step == 8


# ======================================================================= 4. a closed Watcher


@dataclasses.dataclass
class Closed:
    watcher: gradwatch.Watcher
    model: nn.Module
    optimizer: torch.optim.Optimizer
    before: dict[str, Any]
    """Every public attribute's value just before ``close()``."""


_ATTRIBUTES = (
    "accumulation_steps",
    "findings",
    "histogram_every",
    "log_dir",
    "occurrences",
    "on_nonfinite",
    "options",
    "param_names",
    "step",
)


@pytest.fixture
def closed(tmp_path: pathlib.Path) -> Closed:
    model, optimizer = _model_and_optimizer()
    watcher = gradwatch.watch(model, optimizer, on_finding="record", log_dir=tmp_path)
    run_steps(model, optimizer, 3, zero_grad=False)  # missing_zero_grad at step 1
    before = {name: getattr(watcher, name) for name in _ATTRIBUTES}
    watcher.close()
    return Closed(watcher, model, optimizer, before)


def _attribute_unchanged(name: str) -> Callable[[Closed], None]:
    def check(c: Closed) -> None:
        assert getattr(c.watcher, name) == c.before[name]

    return check


def _findings_answer(c: Closed) -> None:
    assert _triples(c.watcher.findings) == [("missing_zero_grad", 1, "4.bias")]
    assert c.watcher.findings == c.before["findings"]


def _summary_answers(c: Closed) -> None:
    assert "1 finding(s) in 3 optimizer steps" in c.watcher.summary()


def _state_dict_answers(c: Closed) -> None:
    state = c.watcher.state_dict()
    assert state["steps"] == {0: 3}
    assert [f["kind"] for f in state["findings"]] == ["missing_zero_grad"]


def _load_state_dict_keeps_history(c: Closed) -> None:
    state = c.watcher.state_dict()
    assert c.watcher.load_state_dict(state) is None  # accepted: only history is kept
    assert c.watcher.findings == c.before["findings"]
    with pytest.raises(TE, match=r"state must be a dict from state_dict\(\), got str"):
        c.watcher.load_state_dict("junk")  # type: ignore[arg-type]


def _close_is_a_no_op(c: Closed) -> None:
    before = hook_counts(c.model, c.optimizer)
    assert c.watcher.close() is None
    assert c.watcher.close() is None
    assert c.watcher.closed
    assert hook_counts(c.model, c.optimizer) == before


def _closed_is_true(c: Closed) -> None:
    assert c.watcher.closed is True


def _with_block_is_refused(c: Closed) -> None:
    match = (
        r"this Watcher is closed \(its hooks are removed\), so a with-block over it would watch "
        r"nothing; call gradwatch\.watch\(\) again"
    )
    with pytest.raises(VE, match=match) as raised, c.watcher:
        pytest.fail("the with-block of a closed watcher ran")
    assert isinstance(raised.value, GradWatchError)


def _repr_says_closed(c: Closed) -> None:
    assert repr(c.watcher) == "Watcher(closed, params=6, step=3, findings=1)"


def _training_on_is_not_watched(c: Closed) -> None:
    run_steps(c.model, c.optimizer, 2, zero_grad=False)
    assert c.watcher.step == 3
    assert c.watcher.findings == c.before["findings"]
    assert c.watcher.occurrences == c.before["occurrences"]
    assert hook_counts(c.model) == hook_counts(mlp())


def _mark_step_is_refused(c: Closed) -> None:
    with pytest.raises(GradWatchValueError, match=r"this Watcher is closed .* mark_step\(\)"):
        c.watcher.mark_step()
    assert c.watcher.step == 3


def _watching_again_works(c: Closed) -> None:
    with gradwatch.watch(c.model, c.optimizer, on_finding="record") as again:
        run_steps(c.model, c.optimizer, 2)
    assert again.step == 2
    assert c.watcher.step == 3


CLOSED_MEMBERS: dict[str, Callable[[Closed], None]] = {
    **{name: _attribute_unchanged(name) for name in _ATTRIBUTES},
    "findings": _findings_answer,
    "closed": _closed_is_true,
    "summary": _summary_answers,
    "state_dict": _state_dict_answers,
    "load_state_dict": _load_state_dict_keeps_history,
    "close": _close_is_a_no_op,
    "mark_step": _mark_step_is_refused,
    "__enter__": _with_block_is_refused,
    "__repr__": _repr_says_closed,
    # not members, but what users do next
    "training-on": _training_on_is_not_watched,
    "watch-again": _watching_again_works,
}


@pytest.mark.parametrize("member", CLOSED_MEMBERS)
def test_closed_watcher(closed: Closed, member: str) -> None:
    CLOSED_MEMBERS[member](closed)


def test_closed_watcher_table_covers_the_public_surface(closed: Closed) -> None:
    public = {name for name in dir(closed.watcher) if not name.startswith("_")}
    assert public <= set(CLOSED_MEMBERS)


def test_a_watcher_is_one_with_block() -> None:
    model, optimizer = _model_and_optimizer()
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        run_steps(model, optimizer, 2)
    with pytest.raises(VE, match="this Watcher is closed"), watcher:
        pass
    assert watcher.step == 2


# ======================================================================= 5. the Lightning callback
# Its keyword arguments are in table 1; here its other entry points.

_FROM = r"GradWatchCallback\.state_dict\(\)"

BAD_CALLBACK_STATES: list[tuple[str, object, type[GradWatchError], str]] = [
    ("None", None, TE, rf"state_dict must be a dict from {_FROM}, got NoneType"),
    ("list", [], TE, r"state_dict must be a dict .*got list"),
    ("no-version", {}, VE, rf"state_dict must come from {_FROM} \(version 1\), got version None"),
    ("version-2", {"version": 2}, VE, r"\(version 1\), got version 2"),
    ("no-findings", {"version": 1, "monitor": None}, VE,
     rf"state_dict could not be read; it must come from {_FROM}: KeyError\('findings'\)"),
    ("findings=None", {"version": 1, "monitor": None, "findings": None}, VE,
     r"could not be read.*TypeError"),
    ("unknown-kind", {"version": 1, "monitor": None, "findings": [{"kind": "bogus"}]}, VE,
     r"could not be read.*'bogus' is not a valid Kind"),
    ("monitor=str", {"version": 1, "monitor": "x", "findings": []}, VE,
     r"could not be read.*'monitor' is str, not a dict"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [pytest.param(s, e, m, id=i) for i, s, e, m in BAD_CALLBACK_STATES],
)
def test_callback_load_state_dict_refuses_foreign_state(
    state: object, error: type[GradWatchError], match: str
) -> None:
    callback = _callback_class()(on_finding="record", log_dir=False)
    with pytest.raises(error, match=match) as raised:
        callback.load_state_dict(state)
    assert isinstance(raised.value, GradWatchError)
    assert callback.findings == []
    assert callback.state_dict() == {}


def _trainer_case(pl: Any, module: nn.Module, callback: Any, tmp_path: pathlib.Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))


@pytest.mark.parametrize("case", ["complex-parameter", "log_dir-cannot-be-created"])
def test_callback_refuses_at_the_start_of_fit_and_leaves_nothing_open(
    tmp_path: pathlib.Path, case: str
) -> None:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = _Complex() if case == "complex-parameter" else nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, _ = batch
            return self.net(x).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = Module()
    log_dir = tmp_path / ("gradwatch" if case == "complex-parameter" else TOO_LONG)
    callback = _callback_class()(on_finding="record", log_dir=log_dir)
    threads = _writer_threads()
    match = {
        "complex-parameter": r"complex parameters are not supported: net\.weight",
        "log_dir-cannot-be-created": rf"GradWatchCallback: log_dir '[^']*{TOO_LONG}' could not be "
        r"created or written: .*; pass a writable directory, or log_dir=False for no files",
    }[case]
    with pytest.raises(VE, match=match):
        _trainer_case(pl, module, callback, tmp_path)
    assert _writer_threads() == threads  # the TensorBoard writer opened for the fit is closed
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters()) == 0


# ======================================================================= 6. the command line


@dataclasses.dataclass(frozen=True)
class Command:
    id: str
    argv: list[str]
    """``{d}`` stands for a directory prepared by :func:`_prepare`."""
    code: int
    stderr: str
    """Pattern for stderr's last line (the whole of it unless argparse prints its usage first)."""


def _record(**changes: Any) -> str:
    record = {
        "schema": 1,
        "kind": "nan",
        "step": 3,
        "param": "fc.weight",
        "params": ["fc.weight"],
        "value": None,
        "threshold": None,
        "message": "step 3: the gradient holds NaN",
        "wall_time": 0.0,
        "rank": 0,
        **changes,
    }
    return json.dumps(record)


def _prepare(root: pathlib.Path) -> None:
    (root / "file").write_text("not a directory")
    (root / "empty").mkdir()
    logs = {
        "corrupt": "not json {\n",
        "wrong-types": _record(params=5) + "\n" + _record(step=1.5) + "\n",
        "no-schema": json.dumps({"kind": "nan", "step": 3}) + "\n",
        "future": _record() + "\n" + _record(schema=5, kind="exploding") + "\n",
        "good": _record() + "\n",
        "nested-list": "[" * 100_000 + "]" * 100_000 + "\n",
        "nested-object": '{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n",
        "line-too-long": _record(message="x" * (1 << 20)) + "\n",
    }
    for name, text in logs.items():
        (root / name).mkdir()
        (root / name / FINDINGS_LOG_NAME).write_text(text)
    (root / "log-is-a-directory" / FINDINGS_LOG_NAME).mkdir(parents=True)


_USAGE = (
    r"unknown kind\(s\) {}; known kinds: cleared_before_step, clip_order, exploding, inf, "
    r"missing_zero_grad, "
    r"nan, no_grad, "
)

COMMANDS: list[Command] = [
    Command("report-missing-dir", ["report", "{d}/nope"], EXIT_BAD_INPUT,
            r"gradwatch report: .*/nope: no such directory"),
    Command("report-file", ["report", "{d}/file"], EXIT_BAD_INPUT,
            r"gradwatch report: .*/file: not a directory"),
    Command("report-empty-dir", ["report", "{d}/empty"], EXIT_BAD_INPUT,
            r"gradwatch report: .*/empty: no gradwatch-findings\.jsonl found \(was gradwatch "
            r"given a log_dir\?\)"),
    Command("report-empty-argument", ["report", ""], EXIT_BAD_INPUT,
            r"gradwatch report: LOG_DIR is empty"),
    Command("report-log-is-a-directory", ["report", "{d}/log-is-a-directory"], EXIT_BAD_INPUT,
            r"gradwatch report: .*/log-is-a-directory/gradwatch-findings\.jsonl: could not be "
            r"read: "),
    Command("report-future-schema", ["report", "{d}/future"], EXIT_BAD_INPUT,
            r"gradwatch report: .*/future/gradwatch-findings\.jsonl:2: written with findings-log "
            r"schema 5, newer than the schema 4 this gradwatch \(.*\) reads; upgrade gradwatch"),
    Command("report-future-schema-fail-on", ["report", "{d}/future", "--fail-on", "inf"],
            EXIT_BAD_INPUT, r"schema 5, newer than the schema 4"),
    Command("report-corrupt-line", ["report", "{d}/corrupt"], EXIT_OK,
            r"gradwatch report: skipped .*/corrupt/gradwatch-findings\.jsonl:1: unreadable "
            r"finding"),
    Command("report-wrong-field-types", ["report", "{d}/wrong-types"], EXIT_OK,
            r"skipped .*/wrong-types/gradwatch-findings\.jsonl:2: unreadable finding \(step must "
            r"be an integer >= 0, got 1\.5\)"),
    Command("report-no-schema", ["report", "{d}/no-schema"], EXIT_OK,
            r"skipped .*:1: unreadable finding \(schema must be an integer >= 1, got None\)"),
    Command("report-fail-on-unknown", ["report", "{d}/good", "--fail-on", "nan,bogus"],
            EXIT_BAD_INPUT,
            r"gradwatch report: error: argument --fail-on: " + _USAGE.format("bogus")),
    Command("report-nested-list", ["report", "{d}/nested-list"], EXIT_OK,
            r"gradwatch report: skipped .*/nested-list/gradwatch-findings\.jsonl:1: unreadable "
            r"finding \(nested too deeply\)"),
    Command("report-nested-object", ["report", "{d}/nested-object"], EXIT_OK,
            r"skipped .*/nested-object/gradwatch-findings\.jsonl:1: unreadable finding \(nested "
            r"too deeply\)"),
    Command("report-line-too-long", ["report", "{d}/line-too-long"], EXIT_OK,
            r"gradwatch report: skipped .*/line-too-long/gradwatch-findings\.jsonl:1: line "
            r"longer than 1 MiB"),
    Command("report-fail-on-unknown-keeps-its-case",
            ["report", "{d}/good", "--fail-on", "NaN,Bogus"], EXIT_BAD_INPUT,
            _USAGE.format("Bogus")),
    Command("report-fail-on-empty", ["report", "{d}/good", "--fail-on", ","], EXIT_BAD_INPUT,
            _USAGE.format("','")),
    Command("report-unknown-flag", ["report", "{d}/good", "--bogus"], EXIT_BAD_INPUT,
            r"gradwatch: error: unrecognized arguments: --bogus"),
    Command("report-no-argument", ["report"], EXIT_BAD_INPUT,
            r"gradwatch report: error: the following arguments are required: LOG_DIR"),
    Command("no-command", [], EXIT_BAD_INPUT,
            r"gradwatch: error: the following arguments are required: COMMAND"),
    Command("unknown-command", ["bogus"], EXIT_BAD_INPUT,
            r"gradwatch: error: argument COMMAND: invalid choice: 'bogus'"),
    Command("demo-steps-0", ["demo", "--steps", "0"], EXIT_BAD_INPUT,
            r"gradwatch demo: error: argument --steps: expected a positive integer, got '0'"),
    Command("demo-steps-negative", ["demo", "--steps", "-1"], EXIT_BAD_INPUT,
            r"expected a positive integer, got '-1'"),
    Command("demo-steps-float", ["demo", "--steps", "1.5"], EXIT_BAD_INPUT,
            r"expected a positive integer, got '1\.5'"),
    Command("demo-steps-word", ["demo", "--steps", "ten"], EXIT_BAD_INPUT,
            r"expected a positive integer, got 'ten'"),
    Command("demo-steps-too-few", ["demo", "--steps", "10", "--log-dir", "{d}/demo"],
            EXIT_BAD_INPUT,
            r"gradwatch demo: error: argument --steps: the demo needs at least 11 steps so that "
            r"every planted bug has happened \(nan-from-log0: log\(0\) in the loss at step 10\), "
            r"got '10'"),
    Command("demo-log-dir-file", ["demo", "--log-dir", "{d}/file"], EXIT_BAD_INPUT,
            r"gradwatch demo: --log-dir must be a directory \(or a path where one can be "
            r"created\), got '.*/file', which is an existing file"),
    Command("demo-log-dir-under-a-file", ["demo", "--log-dir", "{d}/file/runs"], EXIT_BAD_INPUT,
            r"gradwatch demo: --log-dir must be .*, which lies under the existing file '.*/file'"),
    Command("demo-log-dir-nul", ["demo", "--log-dir", "{d}/runs\0"], EXIT_BAD_INPUT,
            r"gradwatch demo: --log-dir must be a path without NUL bytes \('\\x00'\), got "
            r"'.*/runs\\x00'"),
    Command("demo-log-dir-empty", ["demo", "--log-dir", ""], EXIT_BAD_INPUT,
            r"gradwatch demo: --log-dir must be a directory .*got '' \(an empty path\)"),
    Command("demo-log-dir-cannot-be-created", ["demo", "--log-dir", "{d}/" + TOO_LONG],
            EXIT_BAD_INPUT, rf"gradwatch demo: --log-dir '.*/{TOO_LONG}' could not be created: "),
    Command("demo-extra-argument", ["demo", "extra"], EXIT_BAD_INPUT,
            r"gradwatch: error: unrecognized arguments: extra"),
]  # fmt: skip


def _check_output(command: Command, code: int, out: str, err: str) -> None:
    assert code == command.code, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert lines, "nothing on stderr"
    assert re.search(command.stderr, lines[-1]), lines
    if command.code == EXIT_BAD_INPUT:
        # One line naming the problem; argparse's usage errors print the usage line first.
        assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage: ")), lines
        assert out == ""


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_line(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: Command
) -> None:
    _prepare(tmp_path)
    try:
        code = main([a.format(d=tmp_path) for a in command.argv])
    except SystemExit as exit_info:  # argparse's usage errors
        assert isinstance(exit_info.code, int)
        code = exit_info.code
    captured = capsys.readouterr()
    _check_output(command, code, captured.out, captured.err)
    if command.code == EXIT_OK:
        # A run is named after its folder; the bad lines are not counted.
        run = pathlib.Path(command.argv[1]).name
        assert f"run {run}: 0 finding(s)" in captured.out
    assert not (tmp_path / "file" / "runs").exists()
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if c.id in ("report-log-is-a-directory", "demo-log-dir-file")],
    ids=lambda c: c.id,
)
def test_command_line_as_a_process(tmp_path: pathlib.Path, command: Command) -> None:
    _prepare(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", *(a.format(d=tmp_path) for a in command.argv)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _check_output(command, result.returncode, result.stdout, result.stderr)
