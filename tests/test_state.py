"""Loading saved state: every field is checked before anything changes.

A state from ``state_dict()`` that was damaged (a field of another type, a tensor of another shape
or dtype, a negative count, NaN, a huge number, a key deleted or added, a list cut short, a string
for a number) is either refused with a :class:`gradwatch.GradWatchValueError` that names the
field, the watcher's state left exactly as it was, or taken, and training goes on. The states come
from short real runs: a healthy one, one with findings of every detector that keeps state, one
with two optimizers stepping at different rates, and the one gradwatch 0.1 wrote.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import pathlib
import statistics
import threading
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import gradwatch
from gradwatch import GradientError, GradWatchError, Kind
from gradwatch._tracker import GradientTracker
from gradwatch.detectors import REGISTRY, RELEASE_1_ORDER, CheckContext, Detector, Phase, Setup
from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError
from tests.helpers.models import mlp, regression_batch

DATA = pathlib.Path(__file__).parent / "data"

# ---------------------------------------------------------------------- comparing states


def state_differences(before: object, after: object, path: str = "") -> list[str]:
    """Where two states differ; empty when they are equal. Tensors are equal when their dtype,
    shape and values are (NaN where the other has NaN), numbers when both are NaN."""
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        same = (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.dtype == after.dtype
            and before.shape == after.shape
            and bool((before == after).logical_or(before.isnan() & after.isnan()).all())
        )
        return [] if same else [path or "(root)"]
    if isinstance(before, dict) and isinstance(after, dict):
        if before.keys() != after.keys():
            return [f"{path}: keys {sorted(map(str, before))} != {sorted(map(str, after))}"]
        return [d for k in before for d in state_differences(before[k], after[k], f"{path}/{k}")]
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        if len(before) != len(after):
            return [f"{path}: length {len(before)} != {len(after)}"]
        pairs = enumerate(zip(before, after, strict=True))
        return [d for i, (a, b) in pairs for d in state_differences(a, b, f"{path}/{i}")]
    if isinstance(before, float) and isinstance(after, float) and math.isnan(before):
        return [] if math.isnan(after) else [f"{path}: nan != {after!r}"]
    return (
        []
        if type(before) is type(after) and before == after
        else [f"{path}: {before!r} != {after!r}"]
    )


def test_state_differences_sees_every_change_and_nan_equals_nan() -> None:
    state = {"a": [1, 2.0, math.nan], "t": torch.tensor([math.nan, 1.0]), "s": "x"}
    assert state_differences(state, copy.deepcopy(state)) == []
    for changed in (
        {**state, "a": [1, 2.0, 3.0]},
        {**state, "a": [True, 2.0, math.nan]},
        {**state, "t": torch.tensor([math.nan, 2.0])},
        {**state, "t": torch.tensor([math.nan, 1.0], dtype=torch.float64)},
        {**state, "t": torch.tensor([[math.nan, 1.0]])},
        {**state, "s": None},
        {"a": state["a"], "t": state["t"]},
    ):
        assert state_differences(state, changed) != []


# ---------------------------------------------------------------------- the runs states come from


Optimizers = list[torch.optim.Optimizer]


class _WithStrays(nn.Module):
    """An MLP, a layer the forward pass never uses (``no_grad``) and an output scale that gets
    gradients but that the optimizer is not given (``not_in_optimizer``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(width=8, depth=4)
        self.unused = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A short training run; its watcher's state is what the tests load, damaged or not."""

    name: str
    build: Callable[[], tuple[nn.Module, Optimizers]]
    every: tuple[int, ...] = (1,)
    """Each optimizer steps at the steps that are multiples of its entry."""
    options: dict[str, Any] = dataclasses.field(default_factory=lambda: {"warmup_steps": 3})
    planted: dict[int, str] = dataclasses.field(default_factory=dict)
    """Bugs by step: ``"no zero_grad"``, ``"nan"``, ``"explode"``."""
    in_features: int = 8

    def train(
        self, model: nn.Module, optimizers: Optimizers, steps: int, generator: torch.Generator
    ) -> None:
        for step in range(steps):
            bug = self.planted.get(step)
            if bug != "no zero_grad":
                for optimizer in optimizers:
                    optimizer.zero_grad()
            x, y = regression_batch(8, self.in_features, generator=generator)
            loss = nn.functional.mse_loss(model(x), y)
            if bug == "nan":
                loss = loss * torch.tensor(math.nan)
            elif bug == "explode":
                loss = loss * 1e5
            loss.backward()
            for optimizer, every in zip(optimizers, self.every, strict=True):
                if step % every == 0:
                    optimizer.step()

    def watch(self, model: nn.Module, optimizers: Optimizers, **kwargs: Any) -> gradwatch.Watcher:
        options = {"on_finding": "record", **self.options, **kwargs}
        return gradwatch.watch(model, optimizers, **options)

    def saved(self) -> dict[str, Any]:
        """The run's state, as a checkpoint loaded from disk gives it (a new copy each call)."""
        return torch.load(io.BytesIO(_saved_bytes(self)), weights_only=False)  # type: ignore[no-any-return]


def _one_mlp() -> tuple[nn.Module, Optimizers]:
    model = mlp(width=8, depth=4)
    return model, [torch.optim.SGD(model.parameters(), lr=0.01)]


def _with_strays() -> tuple[nn.Module, Optimizers]:
    model = _WithStrays()
    trained = [*model.net.parameters(), *model.unused.parameters()]
    return model, [torch.optim.SGD(trained, lr=0.01)]


def _two_optimizers() -> tuple[nn.Module, Optimizers]:
    model = mlp(width=8, depth=4)
    params = list(model.parameters())
    return model, [
        torch.optim.SGD(params[:4], lr=0.01),
        torch.optim.Adam(params[4:], lr=1e-3),
    ]


def _model_0_1() -> tuple[nn.Module, Optimizers]:
    from tests.data.make_states_0_1 import model_and_data

    model, _, _ = model_and_data()
    return model, [torch.optim.SGD(model.parameters(), lr=0.01)]


HEALTHY = Run("healthy", _one_mlp)
RUNS = (
    HEALTHY,
    Run(
        "findings",
        _with_strays,
        planted={2: "no zero_grad", 4: "explode", 6: "nan"},
    ),
    Run("two-optimizers", _two_optimizers, every=(1, 2)),
    Run("gradwatch-0.1", _model_0_1, in_features=4),
)


@functools.cache
def _saved_bytes(run: Run) -> bytes:
    if run.name == "gradwatch-0.1":
        state = torch.load(DATA / "states-0.1.pt", weights_only=False)["watcher"]
    else:
        torch.manual_seed(0)
        model, optimizers = run.build()
        generator = torch.Generator().manual_seed(0)
        with run.watch(model, optimizers) as watcher:
            run.train(model, optimizers, 8, generator)
        state = watcher.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_the_runs_give_states_with_history_in_every_field() -> None:
    """The damaged states below start from states with something in each field."""
    findings = RUNS[1].saved()
    assert {f["kind"] for f in findings["findings"]} >= {
        "missing_zero_grad",
        "nan",
        "exploding",
        "no_grad",
        "not_in_optimizer",
    }
    coverage = findings["detectors"]["coverage"]
    assert coverage["reported_no_grad"] and coverage["reported_orphans"]
    two = RUNS[2].saved()
    assert two["steps"] == {0: 8, 1: 4}
    assert set(two["detectors"]["magnitude"]["totals"]) == {0, 1}
    magnitude = HEALTHY.saved()["detectors"]["magnitude"]
    assert not magnitude["reference"].isnan().any()
    assert HEALTHY.saved()["detectors"]["no_update"] == {"streak": {0: 0}}  # a group's count
    assert isinstance(RUNS[3].saved()["detectors"], list)  # by position, as 0.1 wrote it


@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_states_of_real_runs_load_and_save_again_unchanged(run: Run) -> None:
    saved = run.saved()
    model, optimizers = run.build()
    with run.watch(model, optimizers) as watcher:
        watcher.load_state_dict(saved)
        state = watcher.state_dict()
        run.train(model, optimizers, 2, torch.Generator().manual_seed(1))
    if isinstance(
        saved["detectors"], list
    ):  # 0.1's, by position; detectors added since start afresh
        saved["detectors"] = dict(zip(RELEASE_1_ORDER, saved["detectors"], strict=True))
        added = set(state["detectors"]) - set(RELEASE_1_ORDER)
        assert added == {
            "cleared", "steps", "no_update", "clip_order", "unregistered", "replicas"
        }  # fmt: skip
        assert state["detectors"]["replicas"] == {}
        assert state["detectors"]["unregistered"] == {}
        assert state["detectors"]["cleared"] == {"streak": {}}
        assert state["detectors"]["steps"] == {}
        assert state["detectors"]["no_update"] == {"streak": {}}
        assert state["detectors"]["clip_order"] == {"streak": []}
        for name in added:
            saved["detectors"][name] = state["detectors"][name]
        # 0.1 kept no peaks: the run's scale is taken from the saved medians.
        old, new = saved["detectors"]["magnitude"], state["detectors"]["magnitude"]
        assert new["peak_totals"] == {
            group: statistics.median(totals) for group, totals in old["totals"].items() if totals
        }
        assert torch.equal(new["peak_reference"].nan_to_num(-1), old["reference"].nan_to_num(-1))
        old |= {"peak_totals": new["peak_totals"], "peak_reference": new["peak_reference"]}
    assert state_differences(saved, state) == []
    assert watcher.step == max(saved["steps"].values()) + 2


# ---------------------------------------------------------------------- states that crashed before


def _at(state: dict[str, Any], *path: Any) -> Any:
    node: Any = state
    for key in path:
        node = node[key]
    return node


def _set(path: tuple[Any, ...], value: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    """A change of ``state`` at ``path`` to ``value(the value there)``."""

    def change(state: dict[str, Any]) -> None:
        parent = _at(state, *path[:-1])
        key = path[-1]
        parent[key] = value(parent[key] if isinstance(parent, list) or key in parent else None)

    return change


MAGNITUDE = ("detectors", "magnitude")
COVERAGE = ("detectors", "coverage")
NO_UPDATE = ("detectors", "no_update")
TRACKER = ("tracker",)
N = 8  # parameters of HEALTHY's model
_FINDING = {"kind": "nan", "step": 1, "param": "0.weight", "params": ["0.weight"]}
_FINDING |= {"value": 1.0, "threshold": None}

# (id, change, the error's message): each of these states used to crash inside
# load_state_dict, crash in the next optimizer.step(), or load and leave the watcher wrong.
CRASHED_BEFORE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # TypeError in the next optimizer.step()
    ("totals-a-string", _set((*MAGNITUDE, "totals", 0), lambda _: "abc"),
     r"detectors\.magnitude: totals\[0\] must be a list, got str 'abc'"),
    ("a-total-a-string", _set((*MAGNITUDE, "totals", 0, 0), lambda _: "1.0"),
     r"detectors\.magnitude: totals\[0\]\[0\] must be a finite number > 0, got str '1\.0'"),
    # IndexError from load_state_dict
    ("detector-state-a-tensor", _set(MAGNITUDE, lambda _: torch.zeros(3)),
     r"detectors\.magnitude: the state must be a dict with the keys \['depth_streak', "),
    ("tracker-a-tensor", _set(TRACKER, lambda _: torch.zeros(2)),
     r"tracker: the state must be a dict .*got a tensor of shape \(2,\)"),
    # "Boolean value of Tensor with more than one value is ambiguous" from load_state_dict
    ("version-a-tensor", _set(("version",), lambda _: torch.tensor([1, 1])),
     r"state must come from state_dict\(\) \(version 1\), got version tensor\(\[1, 1\]\)"),
    ("received-a-tensor", _set((*TRACKER, "received"), lambda _: torch.ones(N, 2).bool()),
     r"tracker: received must be a list of 8 items, got a tensor of shape \(8, 2\)"),
    # OverflowError from load_state_dict
    ("finding-value-huge", _set(("findings",), lambda _: [{**_FINDING, "value": 10**400}]),
     r"findings\[0\]: int too large to convert to float"),
    # IndexError or RuntimeError in the next optimizer.step()
    ("param_count-short", _set((*MAGNITUDE, "param_count"), lambda t: t[:2]),
     r"param_count must be an integer tensor of shape \(8,\) \(one per parameter\), got shape "
     r"\(2,\)"),
    ("param_count-floats", _set((*MAGNITUDE, "param_count"), lambda t: t.float()),
     r"param_count must be an integer tensor .*got a tensor of shape \(8,\) and dtype "
     r"torch.float32"),
    ("param_history-integers", _set((*MAGNITUDE, "param_history"), lambda t: t.long()),
     r"param_history must be a floating-point tensor of shape \(32, 8\) \(history x parameters"),
    ("reference-short", _set((*MAGNITUDE, "reference"), lambda t: t[:2]),
     r"detectors\.magnitude: reference must be a floating-point tensor of shape \(8,\)"),
    ("first_position-short", _set((*TRACKER, "first_position"), lambda _: [0]),
     r"tracker: first_position has length 1, expected 8 \(one per parameter\)"),
    # NotImplementedError from load_state_dict
    ("param_history-on-meta", _set((*MAGNITUDE, "param_history"), lambda t: t.to("meta")),
     r"param_history must be a floating-point tensor .*got a tensor of shape \(32, 8\) and "
     r"dtype torch.float32 on meta"),
    # taken silently: wrong from then on
    ("zero_streak-long", _set((*MAGNITUDE, "zero_streak"), lambda t: torch.cat([t, t[:5]])),
     r"zero_streak must be an integer tensor of shape \(8,\) .*got shape \(13,\)"),
    ("param_history-negative", _set((*MAGNITUDE, "param_history"), lambda t: t.fill_(-1.0)),
     r"param_history\[0, 0\] must be NaN \(none yet\) or a finite norm >= 0 \(as torch.float32\), "
     r"got -1\.0"),
    ("peak_totals-zero", _set((*MAGNITUDE, "peak_totals", 0), lambda _: 0.0),
     r"detectors\.magnitude: peak_totals\[0\] must be a finite number > 0, got 0\.0"),
    ("peak_reference-short", _set((*MAGNITUDE, "peak_reference"), lambda t: t[:2]),
     r"detectors\.magnitude: peak_reference must be a floating-point tensor of shape \(8,\)"),
    ("peak_reference-alone", lambda state: state["detectors"]["magnitude"].pop("peak_totals"),
     r"detectors\.magnitude: the state has no key 'peak_totals'"),
    ("totals-too-many", _set((*MAGNITUDE, "totals", 0), lambda _: [1.0] * 33),
     r"totals\[0\] must hold at most history \(32\) totals, got 33"),
    ("depth_streak-a-string", _set((*MAGNITUDE, "depth_streak", 0), lambda _: "2"),
     r"depth_streak\[0\] must be an int in \[0, 2\*\*62\], got str '2'"),
    ("first_position-strings", _set((*TRACKER, "first_position"), lambda p: [str(i) for i in p]),
     r"tracker: first_position\[0\] must be an int in \[-1, 7\], got str"),
    ("first_position-out-of-range", _set((*TRACKER, "first_position"), lambda p: [N, *p[1:]]),
     r"tracker: first_position\[0\] must be an int in \[-1, 7\], got 8$"),
    ("received-ints", _set((*TRACKER, "received"), lambda r: [int(x) for x in r]),
     r"tracker: received\[0\] must be a bool, got int 1"),
    ("backward_passes-negative", _set((*TRACKER, "backward_passes"), lambda _: -3),
     r"tracker: backward_passes must be an int in \[0, 2\*\*62\], got -3"),
    ("steps-negative", _set(("steps", 0), lambda _: -5),
     r"steps\[0\] must be an int in \[0, 2\*\*62\], got -5"),
    ("steps-huge", _set(("steps", 0), lambda _: 10**30),
     r"steps\[0\] must be an int in \[0, 2\*\*62\], got 10{30}"),
    ("steps-key-a-tensor", _set(("steps",), lambda _: {torch.tensor(0): 3}),
     r"steps key tensor\(0\) must be an int in \[0, 2\*\*62\], got a tensor of shape \(\)"),
    ("reported_no_grad-out-of-range", _set((*COVERAGE, "reported_no_grad"), lambda _: [99]),
     r"detectors\.coverage: reported_no_grad\[0\] must be an int in \[0, 7\], got 99"),
    ("numerics-unknown-key", _set(("detectors", "numerics"), lambda _: {"counts": [1]}),
     r"detectors\.numerics: the state has the unknown key 'counts'; it holds no keys"),
    ("occurrence-twice", _set(("occurrences",), lambda _: [["nan", "0.weight", 1]] * 2),
     r"occurrences\[1\] counts \('nan', '0\.weight'\) a second time"),
    ("occurrence-count-zero", _set(("occurrences",), lambda _: [["nan", "0.weight", 0]]),
     r"occurrences\[0\]\[2\] must be an int in \[1, 2\*\*62\], got 0"),
    ("occurrence-unknown-kind", _set(("occurrences",), lambda _: [["bogus", None, 1]]),
     r"occurrences\[0\]\[0\] must be one of \['missing_zero_grad', .*got str 'bogus'"),
    # no_update's zero-lr streaks, one count per optimizer group
    ("no_update-no-streak", _set(NO_UPDATE, lambda _: {}),
     r"detectors\.no_update: the state has no key 'streak'$"),
    ("no_update-unknown-key", _set((*NO_UPDATE, "weights"), lambda _: {}),
     r"detectors\.no_update: the state has the unknown key 'weights'; it holds exactly the keys "
     r"\['streak'\]"),
    ("no_update-streak-a-list", _set((*NO_UPDATE, "streak"), lambda _: [0]),
     r"detectors\.no_update: streak must be a dict keyed by optimizer group, got list"),
    ("no_update-group-a-string", _set((*NO_UPDATE, "streak"), lambda s: {"0": s[0]}),
     r"detectors\.no_update: streak key '0' must be an int in \[0, 2\*\*62\], got str"),
    ("no_update-count-negative", _set((*NO_UPDATE, "streak", 0), lambda _: -1),
     r"detectors\.no_update: streak\[0\] must be an int in \[0, 2\*\*62\], got -1$"),
    ("no_update-count-a-string", _set((*NO_UPDATE, "streak", 0), lambda _: "4"),
     r"detectors\.no_update: streak\[0\] must be an int in \[0, 2\*\*62\], got str '4'"),
    ("unknown-key", _set(("extra",), lambda _: 1),
     r"state could not be loaded into this watcher: the state has the unknown key 'extra'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "match"), [pytest.param(c, m, id=i) for i, c, m in CRASHED_BEFORE]
)
def test_a_damaged_state_is_refused_naming_the_field_and_training_goes_on(
    change: Callable[[dict[str, Any]], None], match: str
) -> None:
    state = HEALTHY.saved()
    change(state)
    model, optimizers = HEALTHY.build()
    generator = torch.Generator().manual_seed(1)
    with HEALTHY.watch(model, optimizers) as watcher:
        HEALTHY.train(model, optimizers, 2, generator)
        before = watcher.state_dict()
        with pytest.raises(GradWatchValueError, match=match):
            watcher.load_state_dict(state)
        assert state_differences(before, watcher.state_dict()) == []
        HEALTHY.train(model, optimizers, 8, generator)  # vanishing and exploding checks included
    assert watcher.step == 10
    assert watcher.findings == []


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("param_history", torch.float64),
        ("reference", torch.float16),
        ("param_count", torch.int32),
        ("zero_streak", torch.uint8),
    ],
)
def test_history_saved_in_other_dtypes_still_loads(name: str, dtype: torch.dtype) -> None:
    """As a state saved where torch's default dtype was float64 does where it is float32."""
    saved = HEALTHY.saved()["detectors"]["magnitude"][name]
    state = HEALTHY.saved()
    state["detectors"]["magnitude"][name] = saved.to(dtype)
    model, optimizers = HEALTHY.build()
    with HEALTHY.watch(model, optimizers) as watcher:
        watcher.load_state_dict(state)
        loaded = watcher.state_dict()["detectors"]["magnitude"][name]
        HEALTHY.train(model, optimizers, 2, torch.Generator().manual_seed(1))
    assert loaded.dtype == saved.dtype
    assert torch.allclose(loaded.double(), saved.double(), rtol=1e-3, equal_nan=True)


@pytest.mark.gpu
def test_history_loaded_onto_cuda_is_kept_on_the_cpu() -> None:
    state = HEALTHY.saved()
    magnitude = state["detectors"]["magnitude"]
    for name, value in magnitude.items():
        if isinstance(value, torch.Tensor):
            magnitude[name] = value.cuda()  # as torch.load(..., map_location="cuda") gives it
    model, optimizers = HEALTHY.build()
    with HEALTHY.watch(model, optimizers) as watcher:
        watcher.load_state_dict(state)
        HEALTHY.train(model, optimizers, 2, torch.Generator().manual_seed(1))
        loaded = watcher.state_dict()["detectors"]["magnitude"]
    assert {t.device.type for t in loaded.values() if isinstance(t, torch.Tensor)} == {"cpu"}
    assert watcher.step == 10


# ---------------------------------------------------------------------- checked before any change


class _Fragile(Detector):
    """A plug-in whose own ``load_state_dict`` fails with whatever its code raises."""

    name = "fragile"
    kinds = MappingProxyType({Kind.EXPLODING: lambda f: "fragile"})
    phase = Phase.STATISTICS

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.seen = 0

    def check(self, ctx: CheckContext) -> list[Finding]:
        self.seen += 1
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": [self.seen]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"][0]  # IndexError on an empty list


def test_a_plugin_detector_that_raises_anything_refuses_the_state_and_nothing_changes() -> None:
    from gradwatch import _options
    from gradwatch._monitor import Monitor

    def monitor(model: nn.Module, optimizers: Optimizers) -> Monitor:
        return Monitor(
            list(model.named_parameters()),
            optimizers,
            accumulation_steps=1,
            options=_options.DetectorOptions(warmup_steps=3),
            on_finding="record",
            detectors=(*REGISTRY, _Fragile),
        )

    def train(monitor: Monitor, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            monitor.before_step(optimizer, (), {})
            optimizer.step()
            monitor.after_step(optimizer, (), {})

    model, optimizers = HEALTHY.build()
    other = monitor(model, optimizers)
    train(other, model, optimizers[0])
    state = other.state_dict()  # every field differs from the one below's
    state["detectors"]["fragile"] = {"seen": []}
    running = monitor(model, optimizers)
    before = running.state_dict()
    with pytest.raises(GradWatchValueError, match=r"detectors\.fragile: IndexError: list index"):
        running.load_state_dict(state)
    assert state_differences(before, running.state_dict()) == []
    train(running, model, optimizers[0])
    assert running.state_dict()["detectors"]["fragile"] == {"seen": [3]}
    other.close()
    running.close()


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"received": [True] * 3, "first_position": [0, 1, 2], "backward_passes": -1},
         r"backward_passes must be an int in \[0, 2\*\*62\], got -1"),
        ({"received": [True, False, True], "first_position": [0, 1, 2], "backward_passes": 1},
         r"first_position\[1\] must be -1 exactly where received\[1\] is False"),
        ({"received": [True] * 3, "first_position": [0, 1, 2]}, r"has no key 'backward_passes'"),
        ({"received": [True] * 4, "first_position": [0, 1, 2, 3], "backward_passes": 1},
         r"received has length 4, expected 3 .*different number of parameters"),
    ],
)  # fmt: skip
def test_the_tracker_refuses_a_damaged_state_and_keeps_its_own(
    state: dict[str, Any], match: str
) -> None:
    tracker = GradientTracker(3)
    saved = {"received": [True, True, False], "first_position": [1, 0, -1], "backward_passes": 2}
    tracker.load_state_dict(saved)
    with pytest.raises((GradWatchTypeError, GradWatchValueError), match=match):
        tracker.load_state_dict(state)
    assert tracker.state_dict() == saved
    assert tracker.received_count == 2


# ---------------------------------------------------------------------- damaged at random


_REPLACEMENTS: dict[str, Callable[[], Any]] = {
    "None": lambda: None,
    "True": lambda: True,
    "0": lambda: 0,
    "-1": lambda: -1,
    "2**63": lambda: 2**63,
    "10**400": lambda: 10**400,
    "nan": lambda: math.nan,
    "-inf": lambda: -math.inf,
    "-1.0": lambda: -1.0,
    "1e308": lambda: 1e308,
    "'1'": lambda: "1",
    "'nan'": lambda: "nan",
    "'abc'": lambda: "abc",
    "[]": list,
    "[1]": lambda: [1],
    "['a']": lambda: ["a"],
    "{}": dict,
    "{'x': 1}": lambda: {"x": 1},
    "{0: 'x'}": lambda: {0: "x"},
    "tensor(0-d)": lambda: torch.tensor(1.0),
    "tensor(empty)": lambda: torch.zeros(0),
    "tensor(3)": lambda: torch.zeros(3),
    "tensor(2, 2)": lambda: torch.ones(2, 2),
    "tensor(long)": lambda: torch.tensor([1, 2]),
    "tensor(bool)": lambda: torch.tensor([True, False]),
}
# Counts are refused above 2**62; the numbers stay well away from it on either side (counting a
# few steps on from the limit itself would cross it, whatever the limit).
_NUMBERS = [math.nan, math.inf, -1, -1.0, 0.5, 1e30, 2**61, 2**63, 10**400]
_DTYPES = [
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def _tensor_change(value: torch.Tensor, data: st.DataObject) -> torch.Tensor:
    how = data.draw(st.sampled_from(["shape", "dtype", "element"]), label="tensor change")
    if how == "dtype":
        return value.to(data.draw(st.sampled_from(_DTYPES), label="dtype"))
    if how == "shape":
        shapes: list[Callable[[torch.Tensor], torch.Tensor]] = [
            lambda t: t.unsqueeze(0),
            lambda t: t.reshape(-1),
            lambda t: torch.cat([t, t]) if t.dim() else t.reshape(1),
        ]
        if value.dim() and len(value):
            shapes.append(lambda t: t[:-1])
        if value.dim() == 2:
            shapes.append(lambda t: t.t())
        return data.draw(st.sampled_from(shapes), label="shape change")(value)
    changed = value.contiguous().clone()
    if not changed.numel():
        return changed
    flat = changed.view(-1)
    index = data.draw(st.integers(0, flat.numel() - 1), label="element")
    number = data.draw(st.sampled_from(_NUMBERS), label="element value")
    try:
        flat[index] = number
    except (RuntimeError, ValueError, OverflowError):  # not representable: take float64
        changed = changed.double()
        changed.view(-1)[index] = float(number) if abs(number) < 1e308 else math.inf
    return changed


def _scalar_change(value: object, data: st.DataObject) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        options: list[Callable[[Any], object]] = [
            lambda v: -v - 1,
            lambda v: v + 1,
            lambda v: v * 10**17,
            lambda v: math.nan,
            lambda v: str(v),
            lambda v: float(v) if isinstance(v, int) else int(v) if math.isfinite(v) else 0,
        ]
        return data.draw(st.sampled_from(options), label="number change")(value)
    if isinstance(value, str):
        return data.draw(st.sampled_from(["", "bogus", f"{value}x"]), label="text")
    return _REPLACEMENTS[data.draw(st.sampled_from(sorted(_REPLACEMENTS)), label="replacement")]()


def _fields(node: object, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], list[Any]]:
    """Every place in a state, by field: the path with list positions and optimizer groups
    written ``*`` (so ``totals[0][3]`` is one of the field ``totals * *``)."""
    places: dict[tuple[Any, ...], list[Any]] = {}
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        place = (*path, key)
        field = tuple("*" if isinstance(k, int) else k for k in place)
        places.setdefault(field, []).append(place)
        for deeper, found in _fields(child, place).items():
            places.setdefault(deeper, []).extend(found)
    return places


def _damage(state: dict[str, Any], data: st.DataObject) -> None:
    """One change somewhere in ``state``: a field replaced, retyped, reshaped, removed, added.
    Each field is as likely to be picked as any other, whatever its length."""
    places = _fields(state)
    field = data.draw(st.sampled_from(sorted(places, key=str)), label="field")
    path = data.draw(st.sampled_from(places[field]), label="place")
    node = _at(state, *path)
    parent = _at(state, *path[:-1])
    key = path[-1]
    moves = ["replace", "change", "delete"]
    if isinstance(node, dict):
        moves.append("add key")
    if isinstance(node, list):
        moves += ["truncate", "append"]
    move = data.draw(st.sampled_from(moves), label="move")
    if move == "replace":
        parent[key] = _REPLACEMENTS[
            data.draw(st.sampled_from(sorted(_REPLACEMENTS)), label="new")
        ]()
    elif move == "delete":
        del parent[key]
    elif move == "add key":
        extra = data.draw(st.sampled_from(["extra", 7, -1, "numerics"]), label="new key")
        node[extra] = _REPLACEMENTS[
            data.draw(st.sampled_from(sorted(_REPLACEMENTS)), label="new")
        ]()
    elif move == "truncate":
        del node[data.draw(st.integers(0, len(node)), label="keep") :]
    elif move == "append":
        node.append(copy.deepcopy(node[-1]) if node else 0)
    elif isinstance(node, torch.Tensor):
        parent[key] = _tensor_change(node, data)
    else:
        parent[key] = _scalar_change(node, data)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_a_damaged_state_is_refused_unchanged_or_taken_and_training_goes_on(
    data: st.DataObject,
) -> None:
    run = data.draw(st.sampled_from(RUNS), label="run")
    state = run.saved()
    for _ in range(data.draw(st.integers(1, 2), label="changes")):
        _damage(state, data)
    policy = data.draw(st.sampled_from(["record", "raise"]), label="on_finding")
    model, optimizers = run.build()
    generator = torch.Generator().manual_seed(1)
    # With "raise" a finding may stop the training steps; nothing else may.
    policy_may_raise = (
        contextlib.suppress(GradientError) if policy == "raise" else contextlib.nullcontext()
    )
    with run.watch(model, optimizers, on_finding=policy) as watcher:
        with policy_may_raise:
            run.train(model, optimizers, 2, generator)
        before = copy.deepcopy(watcher.state_dict())
        try:
            watcher.load_state_dict(state)
        except (GradWatchTypeError, GradWatchValueError) as error:
            event(f"refused: {str(error).split(' must ')[0].split(' has ')[0][:70]}")
            assert state_differences(before, watcher.state_dict()) == []
        else:
            event("taken")
        with policy_may_raise:
            run.train(model, optimizers, 3, generator)
        watcher.summary()
        resaved = watcher.state_dict()
    # Whatever was taken is saved again as a state that loads.
    with run.watch(model, optimizers) as again:
        again.load_state_dict(resaved)
        run.train(model, optimizers, 1, generator)


# ---------------------------------------------------------------------- the Lightning callback


def _writer_threads() -> int:
    """TensorBoard writer threads alive: one per open SummaryWriter."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


@functools.cache
def _lightning_module() -> type[nn.Module]:
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width=8, depth=3, in_features=4)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Module  # type: ignore[no-any-return]


def _fit(module: nn.Module, callback: Any, tmp_path: pathlib.Path, steps: int) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))


@pytest.fixture(scope="module")
def callback_state(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A GradWatchCallback's state after a 4-step fit."""
    lightning = pytest.importorskip("gradwatch.lightning")
    callback = lightning.GradWatchCallback(on_finding="record", log_dir=False)
    _fit(_lightning_module()(), callback, tmp_path_factory.mktemp("first-fit"), steps=4)
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        pytest.param((*MAGNITUDE, "totals", 0), "abc", r"totals\[0\] must be a list", id="totals"),
        pytest.param(MAGNITUDE, torch.zeros(3), r"detectors\.magnitude: the state", id="tensor"),
        pytest.param(("version",), torch.tensor([1, 1]), r"got version tensor", id="version"),
    ],
)
def test_callback_with_a_damaged_monitor_state_fails_at_the_start_of_fit_leaving_nothing_open(
    tmp_path: pathlib.Path, callback_state: bytes, path: tuple[Any, ...], value: Any, match: str
) -> None:
    from gradwatch.lightning import GradWatchCallback

    state = torch.load(io.BytesIO(callback_state), weights_only=False)
    _set(path, lambda _: value)(state["monitor"])
    callback = GradWatchCallback(on_finding="record", log_dir=tmp_path / "gradwatch")
    callback.load_state_dict(state)  # the monitor's state is taken at the start of fit
    module = _lightning_module()()
    threads = _writer_threads()
    with pytest.raises(GradWatchValueError, match=match) as raised:
        _fit(module, callback, tmp_path, steps=2)
    assert isinstance(raised.value, GradWatchError)
    assert _writer_threads() == threads  # the TensorBoard writer opened for the fit is closed
    assert sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters()) == 0
    # The same callback resumes from an intact state.
    callback.load_state_dict(torch.load(io.BytesIO(callback_state), weights_only=False))
    _fit(module, callback, tmp_path, steps=6)
    assert callback.step == 4 + 6
    assert _writer_threads() == threads


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"version": torch.tensor(1)}, r"\(version 1\), got version tensor\(1\)"),
        ({"version": True}, r"\(version 1\), got version True"),
        (
            {
                "version": 1,
                "monitor": None,
                "findings": [
                    {"kind": "nan", "step": 1, "param": None, "params": [], "value": 10**400}
                    | {"threshold": None}
                ],
            },
            r"could not be read.*int too large to convert to float",
        ),
    ],
    ids=["version-a-tensor", "version-True", "finding-value-huge"],
)
def test_callback_state_with_odd_values_is_refused(state: dict[str, Any], match: str) -> None:
    callback_class = pytest.importorskip("gradwatch.lightning").GradWatchCallback
    callback = callback_class(on_finding="record", log_dir=False)
    with pytest.raises(GradWatchValueError, match=match):
        callback.load_state_dict(state)
    assert callback.state_dict() == {}
