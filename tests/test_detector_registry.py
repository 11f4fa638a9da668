"""The detector plug-in seam: the registry, options and messages declared by detectors, state
saved by detector name, and checkpoints of gradwatch 0.1 (detector state by position)."""

from __future__ import annotations

import pathlib
from types import MappingProxyType
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import _options, findings
from gradwatch._monitor import Monitor
from gradwatch.detectors import (
    REGISTRY,
    RELEASE_1_ORDER,
    CheckContext,
    Detector,
    Option,
    Phase,
    _check_registry,
)
from gradwatch.findings import Finding, GradWatchValueError, Kind

DATA = pathlib.Path(__file__).parent / "data"


def test_every_kind_has_one_owner_and_a_message() -> None:
    owners = [kind for detector in REGISTRY for kind in detector.kinds]
    assert sorted(owners) == sorted(k for k in Kind if k is not Kind.SKIPPED_STEP)
    for kind in Kind:
        finding = Finding(kind, 3, "w", value=1.0, threshold=2.0, params=("w",))
        assert finding.message.startswith("step 3: ")
        assert findings._DESCRIBE[kind] is not findings._generic


def test_options_come_from_the_registry_in_order() -> None:
    declared = [option.name for detector in REGISTRY for option in detector.options]
    assert _options.DetectorOptions.names() == [*declared, "ignore"]
    defaults = _options.DetectorOptions()
    for detector in REGISTRY:
        for option in detector.options:
            assert getattr(defaults, option.name) == option.default


def test_state_names_are_unique_and_cover_release_one() -> None:
    names = [detector.name for detector in REGISTRY]
    assert len(set(names)) == len(names)
    assert set(RELEASE_1_ORDER) <= set(names)


class _Borrower(Detector):
    name = "numerics"  # taken
    kinds = MappingProxyType({Kind.NAN: lambda f: "again"})
    phase = Phase.STATISTICS


def test_registry_refuses_a_name_or_kind_declared_twice() -> None:
    with pytest.raises(RuntimeError, match="two detectors are named 'numerics'"):
        _check_registry((*REGISTRY, _Borrower))


class _Counting(Detector):
    """A plug-in: reports ``exploding`` once its own option ``after`` checks have passed, and
    keeps a count that must survive ``state_dict``."""

    name = "counting"
    kinds = MappingProxyType({Kind.EXPLODING: lambda f: f"counted to {f.value}"})
    options = (Option("after", 3, lambda name, value, values: None, "checks to wait"),)
    phase = Phase.STATISTICS

    def __init__(self, setup: Any) -> None:
        super().__init__(setup)
        self.seen = 0

    def check(self, ctx: CheckContext) -> list[Finding]:
        self.seen += 1
        norms = ctx.host_norms()
        if self.seen == 3 and bool(torch.isfinite(norms).all()):
            name = ctx.table.names[ctx.indices[0]]
            return [Finding(Kind.EXPLODING, ctx.step, name, value=float(self.seen))]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def _monitor(model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Monitor:
    return Monitor(
        list(model.named_parameters()),
        [optimizer],
        accumulation_steps=1,
        options=_options.DetectorOptions(),
        on_finding="record",
        **kwargs,
    )


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, monitor: Monitor) -> None:
    optimizer.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    monitor.before_step(optimizer, (), {})
    optimizer.step()
    monitor.after_step(optimizer, (), {})


def test_a_plugin_detector_runs_and_its_state_is_saved_by_name() -> None:
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = _monitor(model, optimizer, detectors=(_Counting,))
    for _ in range(2):
        _step(model, optimizer, monitor)
    state = monitor.state_dict()
    assert state["detectors"] == {"counting": {"seen": 2}}
    resumed = _monitor(model, optimizer, detectors=(_Counting,))
    resumed.load_state_dict(state)
    _step(model, optimizer, resumed)
    assert [(f.kind, f.step, f.value) for f in resumed.findings] == [(Kind.EXPLODING, 2, 3.0)]
    monitor.close()
    resumed.close()


def test_a_detector_added_later_starts_afresh_on_an_older_state() -> None:
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    old = _monitor(model, optimizer)
    _step(model, optimizer, old)
    newer = _monitor(model, optimizer, detectors=(*REGISTRY, _Counting))
    newer.load_state_dict(old.state_dict())
    assert newer.state_dict()["detectors"]["counting"] == {"seen": 0}
    old.close()
    newer.close()


def _saved_0_1() -> dict[str, Any]:
    saved: dict[str, Any] = torch.load(DATA / "states-0.1.pt", weights_only=False)
    assert saved["version"].startswith("0.1")
    assert isinstance(saved["watcher"]["detectors"], list)  # by position, as 0.1 wrote it
    return saved


def test_a_state_saved_by_gradwatch_0_1_still_loads() -> None:
    """``tests/data/states-0.1.pt`` was written by ``tests/data/make_states_0_1.py`` with
    gradwatch 0.1: six steps, a forgotten ``zero_grad`` at step 4. Loaded now, it resumes the
    same history."""
    from tests.data.make_states_0_1 import model_and_data

    saved = _saved_0_1()
    model, x, y = model_and_data()
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    # max_grad_norm=None: only the relative rule, which needs the loaded history, can fire.
    options: dict[str, Any] = {"on_finding": "record", "warmup_steps": 3, "max_grad_norm": None}
    with gradwatch.watch(model, optimizer, **options) as watcher:
        watcher.load_state_dict(saved["watcher"])
        assert [(f.kind.value, f.step, f.param) for f in watcher.findings] == saved["findings"]
        assert watcher.step == 6
        # The magnitude detector's history came back: a loss 10,000 times larger explodes at once.
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * 1e4).backward()
        optimizer.step()
    assert [(f.kind.value, f.step) for f in watcher.findings][-1] == ("exploding", 6)
    with gradwatch.watch(model, optimizer, **options) as fresh:
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * 1e4).backward()
        optimizer.step()
    assert fresh.findings == []  # without the history nothing is known to have grown


def test_a_0_1_state_with_a_missing_detector_is_refused_and_the_watcher_kept() -> None:
    from tests.data.make_states_0_1 import model_and_data

    saved = _saved_0_1()
    state = dict(saved["watcher"])
    state["detectors"] = state["detectors"][:-1]
    model, _, _ = model_and_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, on_finding="record", warmup_steps=3) as watcher:
        before = watcher.state_dict()
        with pytest.raises(GradWatchValueError, match=r"could not be loaded.*holds 3 states"):
            watcher.load_state_dict(state)
        assert watcher.state_dict()["steps"] == before["steps"]


# The keys gradwatch 0.1 gave these callbacks: checkpoints saved by it find their state only if
# the key is unchanged.
_KEYS_0_1 = {
    "defaults": (
        {},
        "GradWatchCallback{'log_dir': None, 'accumulation_steps': None, 'on_finding': 'warn', "
        "'on_nonfinite': 'report', 'no_grad_after': 5, 'explode_factor': 1000.0, "
        "'max_grad_norm': 1000000.0, 'warmup_steps': 5, 'history': 32, 'vanish_ratio': 0.001, "
        "'vanish_steps': 5, 'ignore': []}",
    ),
    "settings": (
        {
            "log_dir": False,
            "accumulation_steps": 2,
            "on_finding": "record",
            "history": 40,
            "ignore": ["nan"],
        },
        "GradWatchCallback{'log_dir': False, 'accumulation_steps': 2, 'on_finding': 'record', "
        "'on_nonfinite': 'report', 'no_grad_after': 5, 'explode_factor': 1000.0, "
        "'max_grad_norm': 1000000.0, 'warmup_steps': 5, 'history': 40, 'vanish_ratio': 0.001, "
        "'vanish_steps': 5, 'ignore': ['nan']}",
    ),
}


@pytest.mark.parametrize(("kwargs", "key"), list(_KEYS_0_1.values()), ids=list(_KEYS_0_1))
def test_the_lightning_state_key_is_the_one_of_0_1(kwargs: dict[str, Any], key: str) -> None:
    callback_class = pytest.importorskip("gradwatch.lightning").GradWatchCallback
    assert callback_class(**kwargs).state_key == key


def test_an_option_added_later_joins_the_key_only_when_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seen as if ``history`` had come after 0.1: absent from the key at its default, so a
    callback with 0.1's settings keeps 0.1's key, and present when set."""
    from gradwatch import _frontend

    later = tuple(name for name in _frontend._KEY_OPTIONS_0_1 if name != "history")
    monkeypatch.setattr(_frontend, "_KEY_OPTIONS_0_1", later)
    default = _frontend.Settings.validate("x()", framework=True).key_fields()
    assert "history" not in default
    assert "vanish_steps" in default
    changed = _frontend.Settings.validate(
        "x()", framework=True, detector_options={"history": 40}
    ).key_fields()
    assert changed == {**default, "history": 40}
