"""watch() and Watcher: the public contract, the on_finding policies, closing, resuming."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import gradwatch
import gradwatch._monitor as monitor_module
from gradwatch import Finding, GradientError, GradWatchWarning, Kind
from gradwatch._stats import HostCopy
from tests.helpers.contract import BrokenSink, RecordingSink, hook_counts, run_steps
from tests.helpers.models import mlp, regression_batch


@pytest.fixture
def model() -> nn.Module:
    return mlp()


@pytest.fixture
def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


def _missing_zero_grad_then_nan(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Steps 0-1 healthy, 2-3 without zero_grad (missing_zero_grad at 3), NaN loss at 5."""
    generator = torch.Generator().manual_seed(0)
    for i in range(7):
        x, y = regression_batch(generator=generator)
        if i not in (3,):
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i == 5:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        opt.step()


# ---------------------------------------------------------------- the public names


def test_public_names_from_a_fresh_interpreter() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import gradwatch; print(gradwatch.__all__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = set(eval(out))
    assert {"watch", "Watcher", "Finding", "Kind", "GradientError", "GradWatchWarning"} <= names
    for name in names:
        assert hasattr(gradwatch, name)


def test_import_does_not_import_lightning() -> None:
    code = (
        "import sys, gradwatch\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_watch_returns_an_open_watcher_usable_as_context_manager(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    watcher = gradwatch.watch(model, optimizer)
    assert isinstance(watcher, gradwatch.Watcher)
    assert not watcher.closed
    with watcher as entered:
        assert entered is watcher
        run_steps(model, optimizer, 3)
        assert watcher.step == 3
    assert watcher.closed
    assert watcher.findings == []
    assert watcher.param_names == [name for name, _ in model.named_parameters()]
    assert "no gradient problems found in 3 optimizer steps" in watcher.summary()


def test_frozen_parameters_are_not_watched() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with gradwatch.watch(model, opt, on_finding="raise") as watcher:
        run_steps(model, opt, 6)
    assert watcher.param_names == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert watcher.findings == []


@pytest.mark.parametrize("optimizers", ["one", "list", "tuple", "none"])
def test_optimizer_forms_all_find_the_same_bug(model: nn.Module, optimizers: str) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    arg = {"one": opt, "list": [opt], "tuple": (opt,), "none": None}[optimizers]
    with gradwatch.watch(model, arg, on_finding="record") as watcher:
        run_steps(model, opt, 4, zero_grad=False)
    assert watcher.step == 4
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.MISSING_ZERO_GRAD, 1)]
    finding = watcher.findings[0]
    assert finding.param in watcher.param_names
    assert set(finding.params) == set(watcher.param_names)


def test_unlisted_optimizer_is_not_followed(model: nn.Module) -> None:
    watched = torch.optim.SGD(model.parameters(), lr=0.01)
    other = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, watched, on_finding="raise") as watcher:
        run_steps(model, other, 3, zero_grad=False)  # not watched: no finding, no steps
    assert watcher.step == 0
    assert watcher.occurrences == {}


# ---------------------------------------------------------------- policies


def test_record_policy_keeps_first_occurrences_and_counts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "record" neither warns nor raises
        with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
            run_steps(model, optimizer, 6, zero_grad=False)
    assert [f.kind for f in watcher.findings] == [Kind.MISSING_ZERO_GRAD]
    key = (Kind.MISSING_ZERO_GRAD, watcher.findings[0].param)
    assert watcher.occurrences[key] == 5
    assert "(seen at 5 checks)" in watcher.summary()


def test_warn_policy_warns_once_per_kind_and_parameter(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer) as watcher:
            _missing_zero_grad_then_nan(model, optimizer)
            run_steps(model, optimizer, 10, zero_grad=False)  # the same bug, many more times
    ours = [w for w in caught if issubclass(w.category, GradWatchWarning)]
    assert [w.message.finding for w in ours] == watcher.findings  # type: ignore[union-attr]
    assert [(f.kind, f.step) for f in watcher.findings] == [
        (Kind.MISSING_ZERO_GRAD, 3),
        (Kind.NAN, 5),
    ]
    assert len({(f.kind, f.param) for f in watcher.findings}) == len(ours)
    assert str(ours[0].message) == str(watcher.findings[0])
    assert sum(watcher.occurrences.values()) > len(ours)


def test_warn_policy_with_pytest_warns(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    with (
        pytest.warns(GradWatchWarning, match=r"\[missing_zero_grad\] step 1: ") as record,
        gradwatch.watch(model, optimizer, on_finding="warn"),
    ):
        run_steps(model, optimizer, 8, zero_grad=False)
    assert len(record) == 1


def test_raise_policy_stops_at_the_right_step_with_the_finding(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    before = hook_counts(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    completed: list[int] = []
    with (
        pytest.raises(GradientError, match=r"\[missing_zero_grad\] step 3: ") as raised,
        gradwatch.watch(model, optimizer, on_finding="raise") as watcher,
    ):
        for i in range(10):
            x, y = regression_batch(generator=generator)
            if i != 3:
                optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            weights_before = [p.detach().clone() for p in model.parameters()]
            try:
                optimizer.step()
            finally:
                stepped = any(
                    not torch.equal(a, b)
                    for a, b in zip(weights_before, model.parameters(), strict=True)
                )
            completed.append(i)
    assert completed == [0, 1, 2]
    assert not stepped  # the error left optimizer.step() before it changed any weight
    error = raised.value
    assert isinstance(error, RuntimeError)
    assert error.finding == watcher.findings[0]
    assert (error.finding.kind, error.finding.step) == (Kind.MISSING_ZERO_GRAD, 3)
    assert watcher.step == 3
    assert watcher.closed
    assert hook_counts(model, optimizer) == before


def test_raise_policy_when_following_every_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    before = hook_counts(model, optimizer)
    with (
        pytest.raises(GradientError) as raised,
        gradwatch.watch(model, on_finding="raise"),
    ):
        _missing_zero_grad_then_nan(model, optimizer)
    assert (raised.value.finding.kind, raised.value.finding.step) == (Kind.MISSING_ZERO_GRAD, 3)
    assert hook_counts(model, optimizer) == before


def test_callable_policy_receives_each_finding_once(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    received: list[Finding] = []
    with gradwatch.watch(model, optimizer, on_finding=received.append) as watcher:
        _missing_zero_grad_then_nan(model, optimizer)
        run_steps(model, optimizer, 5, zero_grad=False)
    assert received == watcher.findings
    assert len(received) == len(set(received)) == 2
    assert all(isinstance(f, Finding) for f in received)


def test_callable_policy_exception_propagates_from_step(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    class Stop(Exception):
        pass

    def policy(finding: Finding) -> None:
        raise Stop(finding.kind.value)

    before = hook_counts(model, optimizer)
    with (
        pytest.raises(Stop, match="missing_zero_grad"),
        gradwatch.watch(model, optimizer, on_finding=policy),
    ):
        run_steps(model, optimizer, 5, zero_grad=False)
    assert hook_counts(model, optimizer) == before


# ---------------------------------------------------------------- leaving and closing


@pytest.mark.parametrize("follow", [False, True], ids=["explicit", "follow-all"])
def test_exception_in_user_loop_propagates_unchanged_and_unhooks(follow: bool) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_counts(model, opt)
    error = KeyError("batch 7 missing")
    with pytest.raises(KeyError) as raised, gradwatch.watch(model, None if follow else opt):
        run_steps(model, opt, 2)
        raise error
    assert raised.value is error
    assert raised.value.__context__ is None
    assert hook_counts(model, opt) == before
    with gradwatch.watch(model, opt) as again:  # watchable again
        run_steps(model, opt, 1)
    assert again.step == 1


def test_close_flushes_and_closes_every_sink_once(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    first, second = RecordingSink(), RecordingSink()
    watcher = gradwatch.Watcher(model, optimizer, on_finding="record", sinks=[first, second])
    run_steps(model, optimizer, 3, zero_grad=False)
    watcher.close()
    watcher.close()
    for sink in (first, second):
        assert sink.calls[-2:] == ["flush", "close"]
        assert sink.calls.count("flush") == 1
        assert sink.calls.count("close") == 1
        assert [c[0] for c in sink.checks] == [0, 1, 2]
        assert sink.findings == watcher.findings


def test_sink_receives_the_norms_of_each_check(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    sink = RecordingSink()
    generator = torch.Generator().manual_seed(0)
    expected: list[list[float]] = []
    with gradwatch.Watcher(model, optimizer, sinks=[sink]):
        for _ in range(3):
            x, y = regression_batch(generator=generator)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            expected.append([float(p.grad.norm()) for p in model.parameters()])  # type: ignore[union-attr]
            optimizer.step()
    for (_, names, norms, total), want in zip(sink.checks, expected, strict=True):
        assert names == [n for n, _ in model.named_parameters()]
        assert norms == pytest.approx(want, rel=1e-6)
        assert total == pytest.approx(sum(v * v for v in want) ** 0.5, rel=1e-6)
    assert [c[0] for c in sink.checks] == [0, 1, 2]


def test_broken_sink_is_reported_once_and_detection_goes_on(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    broken, healthy = BrokenSink(), RecordingSink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.Watcher(
            model, optimizer, on_finding="record", sinks=[broken, healthy]
        ) as watcher:
            run_steps(model, optimizer, 6, zero_grad=False)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "BrokenSink.write_check failed" in str(runtime[0].message)
    assert "disk full" in str(runtime[0].message)
    # Switched off after its first failure; only closed at the end, to release what it holds.
    assert broken.calls == ["write_check", "close"]
    assert [f.kind for f in watcher.findings] == [Kind.MISSING_ZERO_GRAD]
    assert watcher.step == 6
    assert healthy.findings == watcher.findings
    assert len(healthy.checks) == 6


def test_exception_from_close_does_not_replace_the_loops_exception(
    model: nn.Module, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Statistics that have not reached the host yet (as on an accelerator) are processed at close.
    class SlowCopy(HostCopy):
        def ready(self) -> bool:
            return False

    monkeypatch.setattr(monitor_module, "HostCopy", SlowCopy)
    before = hook_counts(model, optimizer)

    def policy(finding: Finding) -> None:
        raise AssertionError(f"policy failed on {finding.kind.value}")

    error = ValueError("bad batch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (
            pytest.raises(ValueError) as raised,
            gradwatch.watch(model, optimizer, on_finding=policy) as watcher,
        ):
            _step_with_nan(model, optimizer)
            raise error
    assert raised.value is error
    assert [f.kind for f in watcher.findings] == [Kind.NAN]
    assert watcher.closed
    assert hook_counts(model, optimizer) == before
    closing = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(closing) == 1
    assert "policy failed on nan" in str(closing[0].message)


def test_findings_still_in_flight_are_recorded_at_close(
    model: nn.Module, optimizer: torch.optim.Optimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    class SlowCopy(HostCopy):
        def ready(self) -> bool:
            return False

    monkeypatch.setattr(monitor_module, "HostCopy", SlowCopy)
    sink = RecordingSink()
    with gradwatch.Watcher(model, optimizer, on_finding="raise", sinks=[sink]) as watcher:
        _step_with_nan(model, optimizer)
        assert watcher.findings == []  # statistics not on the host yet
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.NAN, 0)]
    assert sink.findings == watcher.findings


def _step_with_nan(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    (model(torch.randn(4, 8)).sum() * torch.tensor(float("nan"))).backward()
    optimizer.step()


# ---------------------------------------------------------------- resuming


@pytest.fixture
def saved_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[dict[str, object]]:
    with gradwatch.watch(model, optimizer, on_finding="record", warmup_steps=3) as watcher:
        run_steps(model, optimizer, 4, zero_grad=False)
    buffer = io.BytesIO()
    torch.save(watcher.state_dict(), buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("follow", [False, True], ids=["explicit", "follow-all"])
def test_state_dict_round_trip_resumes_without_re_reporting(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved_state: dict[str, object],
    follow: bool,
) -> None:
    resumed = gradwatch.watch(
        model, None if follow else optimizer, on_finding="raise", warmup_steps=3
    )
    with resumed:
        resumed.load_state_dict(saved_state)
        assert resumed.step == 4
        assert [(f.kind, f.step) for f in resumed.findings] == [(Kind.MISSING_ZERO_GRAD, 1)]
        occurrences = resumed.occurrences
        # the same bug again: already reported, so "raise" does not raise
        run_steps(model, optimizer, 3, zero_grad=False)
        assert resumed.step == 7
    assert [(f.kind, f.step) for f in resumed.findings] == [(Kind.MISSING_ZERO_GRAD, 1)]
    key = (Kind.MISSING_ZERO_GRAD, resumed.findings[0].param)
    assert resumed.occurrences[key] > occurrences[key]
    state = resumed.state_dict()
    assert state["steps"] == {0: 7}
    assert state["tracker"]["backward_passes"] == 7  # type: ignore[index]


def test_state_dict_keeps_detector_history(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved_state: dict[str, object]
) -> None:
    # With the history of 4 healthy-sized steps, a 1000x larger gradient explodes at once,
    # although a fresh watcher would still be warming up.
    options: dict[str, object] = {"warmup_steps": 3, "max_grad_norm": None}
    x, y = regression_batch()
    with gradwatch.watch(model, optimizer, on_finding="record", **options) as resumed:
        resumed.load_state_dict(saved_state)
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * 1e3).backward()
        optimizer.step()
    with gradwatch.watch(model, optimizer, on_finding="record", **options) as fresh:
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) * 1e3).backward()
        optimizer.step()
    assert [(f.kind, f.step) for f in resumed.findings][-1] == (Kind.EXPLODING, 4)
    assert fresh.findings == []


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("not a dict", TypeError, r"state must be a dict from state_dict\(\), got str"),
        (
            {"version": 2},
            ValueError,
            r"state must come from state_dict\(\) .*got version 2",
        ),
        (
            {"param_names": ["a", "b"]},
            ValueError,
            r"state was saved for a model with different parameters",
        ),
        ({"detectors": []}, ValueError, r"state could not be loaded into this watcher"),
        ({"steps": None}, ValueError, r"state could not be loaded into this watcher"),
        ({"findings": [{"kind": "bogus"}]}, ValueError, r"could not be loaded.*'bogus'"),
    ],
)
def test_load_state_dict_rejects_foreign_state_and_keeps_its_own(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved_state: dict[str, object],
    change: object,
    error: type[Exception],
    match: str,
) -> None:
    state = change if isinstance(change, str) else {**saved_state, **change}  # type: ignore[dict-item]
    with gradwatch.watch(model, optimizer, on_finding="record", warmup_steps=3) as watcher:
        run_steps(model, optimizer, 2)
        with pytest.raises(error, match=match) as raised:
            watcher.load_state_dict(state)  # type: ignore[arg-type]
        assert isinstance(raised.value, gradwatch.GradWatchError)
        assert watcher.step == 2
        assert watcher.findings == []
        run_steps(model, optimizer, 1)
    assert watcher.step == 3


def test_state_saved_with_other_history_is_rejected_without_damage(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved_state: dict[str, object]
) -> None:
    with gradwatch.watch(model, optimizer, on_finding="record", history=8) as watcher:
        run_steps(model, optimizer, 2)
        before = watcher.state_dict()
        with pytest.raises(ValueError, match="could not be loaded"):
            watcher.load_state_dict(saved_state)
        after = watcher.state_dict()
    assert after["steps"] == before["steps"] == {0: 2}
    assert after["findings"] == before["findings"] == []
    assert after["tracker"] == before["tracker"]


# ---------------------------------------------------------------- when the check runs


@pytest.mark.parametrize("call", ["step()", "step(None)", "step(closure=None)"])
def test_check_runs_before_the_update(
    model: nn.Module, optimizer: torch.optim.Optimizer, call: str
) -> None:
    before = [p.detach().clone() for p in model.parameters()]
    with gradwatch.watch(model, optimizer, on_finding="raise"):
        optimizer.zero_grad()
        (model(torch.randn(4, 8)).sum() * torch.tensor(float("nan"))).backward()
        with pytest.raises(GradientError, match=r"\[nan\] step 0: ") as raised:
            if call == "step()":
                optimizer.step()
            elif call == "step(None)":
                optimizer.step(None)
            else:
                optimizer.step(closure=None)
    assert raised.value.finding.kind is Kind.NAN
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # the NaN never reached the weights


@pytest.mark.parametrize("positional", [False, True], ids=["closure=", "positional"])
def test_closure_gradients_are_checked_after_the_step(positional: bool) -> None:
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    x, y = regression_batch()
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if calls > 6:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        return loss

    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for _ in range(4):
            if positional:
                opt.step(closure)
            else:
                opt.step(closure=closure)
    assert watcher.step == 4
    assert [f.kind for f in watcher.findings] == [Kind.NAN]
    assert watcher.findings[0].step >= 1
