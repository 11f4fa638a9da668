"""Hardening: findings that do not depend on the outputs, the skip promise for parameters outside
the watched model, numpy numbers, optimizers rebuilt every step, a log directory deleted during
the run, one-line reprs in errors, and warnings that name the user's line."""

from __future__ import annotations

import copy
import fractions
import json
import pathlib
import shutil
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, GradWatchWarning, Kind, _checks
from gradwatch import _reporting as reporting
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, FindingsLog
from tests.helpers.contract import state_differences
from tests.helpers.models import GAN, mlp, regression_batch

GRADWATCH_DIR = str(pathlib.Path(gradwatch.__file__).parent)


def _triples(findings: list[Finding]) -> list[tuple[str, int, str | None]]:
    return [(f.kind.value, f.step, f.param) for f in findings]


# ---------------------------------------------------------------------- 5. outputs on or off


class _Float64Head(nn.Module):
    """A float32 body and a float64 head (``mixed``), or float64 throughout."""

    def __init__(self, mixed: bool) -> None:
        super().__init__()
        self.mixed = mixed
        self.body = nn.Linear(8, 8) if mixed else nn.Linear(8, 8).double()
        self.head = nn.Linear(8, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x if self.mixed else x.double()))
        return self.head(h.double())


PLANT_AT = 10  # a histogram step (histogram_every=1) and a ratio step (every 10)


def _float64_run(
    mixed: bool, value: float, on_nonfinite: str, **outputs: Any
) -> tuple[list[Finding], dict[Any, int], bool]:
    torch.manual_seed(0)
    model = _Float64Head(mixed)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    stepped = True
    with gradwatch.watch(
        model, optimizer, on_finding="record", on_nonfinite=on_nonfinite, **outputs
    ) as watcher:
        for step in range(PLANT_AT + 1):
            x, y = regression_batch(generator=generator)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x).float(), y).backward()
            if step == PLANT_AT:
                assert model.head.weight.grad is not None
                model.head.weight.grad.fill_(value)
            optimizer.step()
            if step == PLANT_AT:
                stepped = model.head.weight.grad is not None
    return watcher.findings, watcher.occurrences, stepped


@pytest.mark.parametrize("on_nonfinite", ["report", "skip"])
@pytest.mark.parametrize("mixed", [False, True], ids=["float64", "float32+float64"])
@pytest.mark.parametrize("value", [1e300, 1e200, 1e100, 1e50, 1e-3])
def test_float64_findings_do_not_depend_on_the_outputs(
    tmp_path: pathlib.Path, value: float, mixed: bool, on_nonfinite: str
) -> None:
    # Finite float64 gradients beyond float32's range (and beyond what float64 can square) are
    # finite: exploding, never inf, never skipped; the same with every output on or none.
    quiet = _float64_run(mixed, value, on_nonfinite)
    loud = _float64_run(mixed, value, on_nonfinite, log_dir=tmp_path, histogram_every=1)
    assert loud == quiet
    findings, _, stepped = quiet
    assert stepped
    expected = [] if value < 1 else [("exploding", PLANT_AT, "head.weight")]
    assert _triples(findings) == expected
    if value >= 1:
        assert findings[0].value is not None and findings[0].value >= value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_float64_nonfinite_is_still_found_with_the_outputs_on(
    tmp_path: pathlib.Path, value: float
) -> None:
    loud = _float64_run(False, value, "skip", log_dir=tmp_path, histogram_every=1)
    assert loud == _float64_run(False, value, "skip")
    kind = "nan" if value != value else "inf"
    assert _triples(loud[0]) == [(kind, PLANT_AT, "head.weight"), ("skipped_step", PLANT_AT, None)]
    assert not loud[2]


# ---------------------------------------------------------------------- 6. outside the model

OUTSIDE = "<optimizer 0, group 0, param 6>"


def _with_temperature(
    plant: dict[str, float], on_nonfinite: str = "skip", **options: Any
) -> tuple[gradwatch.Watcher, dict[str, Any], dict[str, Any], nn.Parameter]:
    """One step of an mlp whose output is divided by a temperature the optimizer also holds (its
    7th parameter, outside the watched model); ``plant`` fills gradients after backward()."""
    torch.manual_seed(0)
    model = mlp()
    temperature = nn.Parameter(torch.tensor(2.0))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1, momentum=0.9)
    x, y = regression_batch()
    with gradwatch.watch(
        model, optimizer, on_finding="record", on_nonfinite=on_nonfinite, **options
    ) as watcher:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x) / temperature, y).backward()
        for where, value in plant.items():
            grad = temperature.grad if where == "temperature" else model[0].weight.grad
            assert grad is not None
            grad.fill_(value)
        before = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
        before["temperature"] = temperature.detach().clone()
        optimizer.step()
        after = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
        after["temperature"] = temperature.detach().clone()
    return watcher, before, after, temperature


@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "nan"), (float("-inf"), "inf")])
def test_skip_covers_a_parameter_outside_the_watched_model(value: float, kind: str) -> None:
    watcher, before, after, _ = _with_temperature({"temperature": value})
    assert state_differences(before, after) == []  # weights and the temperature unchanged
    assert _triples(watcher.findings) == [(kind, 0, OUTSIDE), ("skipped_step", 0, None)]
    skipped = watcher.findings[-1]
    assert skipped.params == (OUTSIDE,)
    assert skipped.value == 1.0
    assert OUTSIDE in skipped.message and OUTSIDE in watcher.findings[0].message


def test_skip_names_watched_parameters_first_then_outside_ones() -> None:
    watcher, before, after, _ = _with_temperature(
        {"temperature": float("nan"), "weight": float("nan")}
    )
    assert state_differences(before, after) == []
    assert _triples(watcher.findings) == [
        ("nan", 0, "0.weight"),
        ("nan", 0, OUTSIDE),
        ("skipped_step", 0, None),
    ]
    assert watcher.findings[-1].params == ("0.weight", OUTSIDE)


def test_huge_finite_gradient_outside_the_model_is_not_skipped() -> None:
    watcher, before, after, temperature = _with_temperature({"temperature": 1e30})
    assert not torch.equal(before["temperature"], after["temperature"])
    assert watcher.findings == []
    assert temperature.grad is not None


def test_report_mode_does_not_look_outside_the_model() -> None:
    # The outside check exists for the skip decision only: "report" reads nothing more.
    watcher, _, after, _ = _with_temperature({"temperature": float("nan")}, "report")
    assert watcher.findings == []
    assert torch.isnan(after["temperature"])


def test_quiet_skip_step_with_outside_parameters_reads_the_device_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradwatch import _monitor

    copies: list[int] = []
    original = _monitor.HostCopy.__init__

    def counting(self: Any, tensor: torch.Tensor) -> None:
        copies.append(tensor.numel())
        original(self, tensor)

    monkeypatch.setattr(_monitor.HostCopy, "__init__", counting)
    watcher, _, _, _ = _with_temperature({})
    assert watcher.findings == []
    assert copies == [6 + 1]  # the 6 watched norms and one flag for the outside parameter


# ---------------------------------------------------------------------- 7a. NUL in log_dir


@pytest.mark.parametrize("front_end", ["watch", "callback"])
def test_log_dir_with_a_nul_byte_is_refused_at_construction(
    tmp_path: pathlib.Path, front_end: str
) -> None:
    path = str(tmp_path / "runs") + "\0x"
    match = r"log_dir must be a path without NUL bytes \('\\x00'\), got '.*runs\\x00x'"
    if front_end == "callback":
        cls = pytest.importorskip("gradwatch.lightning").GradWatchCallback
        with pytest.raises(GradWatchValueError, match=r"GradWatchCallback\(\): " + match):
            cls(log_dir=path)
    else:
        model = mlp()
        with pytest.raises(GradWatchValueError, match=r"watch\(\): " + match):
            gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- 7b. numpy numbers

NUMPY_OPTIONS: dict[str, Any] = {
    "histogram_every": np.int64(5),
    "accumulation_steps": np.int32(1),
    "no_grad_after": np.int64(4),
    "warmup_steps": np.int16(3),
    "history": np.uint16(40),
    "vanish_steps": np.int64(6),
    "explode_factor": np.float32(8.0),
    "max_grad_norm": fractions.Fraction(1, 2) * 2000,
    "vanish_ratio": np.float32(0.25),
}


def test_numpy_numbers_are_taken_as_plain_python_numbers() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, on_finding="record", **NUMPY_OPTIONS) as watcher:
        pass
    kept = {
        "histogram_every": watcher.histogram_every,
        "accumulation_steps": watcher.accumulation_steps,
        **{name: getattr(watcher.options, name) for name in list(NUMPY_OPTIONS)[2:]},
    }
    assert kept == NUMPY_OPTIONS
    for name, value in kept.items():
        assert type(value) is (int if isinstance(NUMPY_OPTIONS[name], np.integer) else float)


def test_callback_state_key_is_the_same_for_numpy_and_python_numbers() -> None:
    cls = pytest.importorskip("gradwatch.lightning").GradWatchCallback
    numpy_key = cls(log_dir=False, explode_factor=np.float32(8.0), history=np.int64(40)).state_key
    assert numpy_key == cls(log_dir=False, explode_factor=8.0, history=40).state_key


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"histogram_every": np.True_}, GradWatchTypeError, r"an int >= 0, got bool "),
        ({"history": np.float64(40.0)}, GradWatchTypeError, r"int .*got float 40\.0$"),
        ({"accumulation_steps": np.int64(0)}, GradWatchValueError, r">= 1, got 0$"),
        ({"explode_factor": np.float32("nan")}, GradWatchValueError, r"> 1, got nan$"),
    ],
    ids=["np.True_", "float64-for-an-int", "np.int64(0)", "np.float32(nan)"],
)
def test_numpy_numbers_are_refused_as_python_numbers_are(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = mlp()
    with pytest.raises(error, match=match):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.01), **kwargs)


# ---------------------------------------------------------------------- 7c. optimizer rebuilt


def _steppers(watcher: gradwatch.Watcher) -> int:
    return len(list(watcher._monitor._steppers))


def test_an_optimizer_built_every_step_is_one_optimizer_of_the_model() -> None:
    torch.manual_seed(0)
    model = mlp()
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, None, on_finding="record") as watcher:
        for step in range(40):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            x, y = regression_batch(generator=generator)
            if step != 30:  # a forgotten zero_grad, found at step 30
                model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            assert _steppers(watcher) == 1, step
            assert watcher.step == step + 1
    assert _triples(watcher.findings) == [("missing_zero_grad", 30, "4.bias")]
    assert watcher.state_dict()["steps"] == {0: 40}


def test_optimizers_kept_alive_still_count_the_models_steps() -> None:
    # Every step a new optimizer, the old ones kept (a list of schedulers would): each is its
    # own optimizer, and the model's parameters still took one step per iteration.
    model = mlp()
    kept: list[torch.optim.Optimizer] = []
    with gradwatch.watch(model, None, on_finding="record") as watcher:
        for step in range(6):
            kept.append(torch.optim.SGD(model.parameters(), lr=0.01))
            model.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            kept[-1].step()
            assert watcher.step == step + 1
    assert watcher.findings == []


def test_dead_optimizers_of_other_parameters_are_forgotten() -> None:
    gan = GAN()
    with gradwatch.watch(gan, None, on_finding="record") as watcher:
        for step in range(5):
            for part in (gan.generator, gan.discriminator):
                optimizer = torch.optim.Adam(part.parameters(), lr=1e-3)
                gan.zero_grad()
                gan.discriminator(gan.generator(torch.randn(8, 4))).mean().backward()
                optimizer.step()
                del optimizer
                assert _steppers(watcher) <= 2
            assert watcher.step == step + 1
    assert watcher.findings == []


def test_step_counts_the_models_steps_whichever_optimizer_took_them() -> None:
    # The generator steps every iteration, the discriminator every other one: step counts
    # iterations, and each optimizer's own count still labels its findings.
    gan = GAN()
    opt_g = torch.optim.SGD(gan.generator.parameters(), lr=1e-3)
    opt_d = torch.optim.SGD(gan.discriminator.parameters(), lr=1e-3)
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record") as watcher:
        for step in range(6):
            gan.zero_grad()
            gan.discriminator(gan.generator(torch.randn(8, 4))).mean().backward()
            opt_g.step()
            if step % 2:
                opt_d.step()
    assert watcher.step == 6
    assert watcher.state_dict()["steps"] == {0: 6, 1: 3}


# ---------------------------------------------------------------------- 7d. log_dir deleted


def test_findings_log_whose_directory_was_deleted_is_recreated_with_one_warning(
    tmp_path: pathlib.Path,
) -> None:
    run = tmp_path / "run"
    log = FindingsLog(run)
    log.write_finding(Finding(Kind.NAN, 0, "w"))
    shutil.rmtree(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.write_finding(Finding(Kind.INF, 1, "w"))
        log.write_finding(Finding(Kind.EXPLODING, 2, "w"))
    log.close()
    lost = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(lost) == 1
    assert f"{run / FINDINGS_LOG_NAME}" in str(lost[0].message)
    assert "was deleted" in str(lost[0].message)
    records = [json.loads(line) for line in (run / FINDINGS_LOG_NAME).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["inf", "exploding"]


def test_findings_log_that_cannot_be_recreated_warns_once(tmp_path: pathlib.Path) -> None:
    run = tmp_path / "run"
    log = FindingsLog(run)
    shutil.rmtree(run)
    run.write_text("a file where the directory was")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.write_finding(Finding(Kind.INF, 1, "w"))
        log.write_finding(Finding(Kind.NAN, 2, "w"))
    log.close()
    lost = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(lost) == 1 and "could not be recreated" in lost[0]


def test_watch_warns_when_its_log_directory_is_deleted(tmp_path: pathlib.Path) -> None:
    run = tmp_path / "run"
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(
            model, optimizer, on_finding="record", sinks=[FindingsLog(run)]
        ) as watcher:
            model(torch.randn(4, 8)).sum().backward()
            optimizer.step()
            shutil.rmtree(run)
            model(torch.randn(4, 8)).sum().backward()  # no zero_grad: a finding
            line = sys._getframe().f_lineno + 1
            optimizer.step()
    assert _triples(watcher.findings) == [("missing_zero_grad", 1, "4.bias")]
    lost = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [(w.filename, w.lineno) for w in lost] == [(__file__, line)]
    assert json.loads((run / FINDINGS_LOG_NAME).read_text())["kind"] == "missing_zero_grad"


# ---------------------------------------------------------------------- 7e. one-line reprs


class _Loud:
    """An object whose repr spans many lines, as an optimizer's or a module's does."""

    def __repr__(self) -> str:
        return "Loud(\n" + "".join(f"    line {i}: {'x' * 30}\n" for i in range(20)) + ")"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"log_dir": _Loud()},
        {"on_finding": _Loud()},
        {"on_nonfinite": _Loud()},
        {"ignore": _Loud()},
        {"explode_factor": _Loud()},
        {"history": _Loud()},
        {"log_dir": mlp()},
        {"on_finding": torch.optim.SGD(mlp().parameters(), lr=0.1)},
    ],
    ids=lambda kwargs: f"{next(iter(kwargs))}={type(next(iter(kwargs.values()))).__name__}",
)
def test_errors_show_a_multi_line_repr_on_one_short_line(kwargs: dict[str, Any]) -> None:
    model = mlp()
    with pytest.raises(gradwatch.GradWatchError) as raised:
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    assert len(message) < 400, message


def test_one_line_repr() -> None:
    assert _checks.one_line_repr("abc") == "'abc'"
    text = _checks.one_line_repr(_Loud())
    assert text.startswith("Loud( line 0: xxx") and text.endswith("...")
    assert len(text) == 80 and "\n" not in text

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert _checks.one_line_repr(Broken()) == "<repr failed>"


@pytest.mark.parametrize("mistake", ["optimizer-then-model", "sinks=model", "sinks=[model]"])
def test_misplaced_model_or_optimizer_gives_a_one_line_error(mistake: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradWatchTypeError) as raised:
        if mistake == "optimizer-then-model":
            gradwatch.watch(optimizer, model)  # type: ignore[arg-type]
        else:
            sinks = model if mistake == "sinks=model" else [model]
            gradwatch.watch(model, optimizer, sinks=sinks)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


def test_model_given_as_the_optimizer_gives_a_one_line_error() -> None:
    model = mlp()
    with pytest.raises(GradWatchTypeError, match=r"optimizer must be .*got Sequential") as raised:
        gradwatch.watch(model, mlp())  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------- 8. where warnings point


def _warnings_of(caught: list[warnings.WarningMessage], category: type) -> list[Any]:
    return [w for w in caught if issubclass(w.category, category)]


@pytest.mark.parametrize("optimizer_argument", ["given", "followed"])
def test_finding_warning_names_the_users_optimizer_step_line(optimizer_argument: str) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    argument = optimizer if optimizer_argument == "given" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, argument):
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()  # no zero_grad
                line = sys._getframe().f_lineno + 1
                optimizer.step()
    found = _warnings_of(caught, GradWatchWarning)
    assert [str(w.message).split("]")[0] for w in found] == ["[missing_zero_grad"]
    assert (found[0].filename, found[0].lineno) == (__file__, line)


def test_skip_warning_names_the_users_optimizer_step_line() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer, on_nonfinite="skip"):
            (model(torch.randn(4, 8)) * float("nan")).sum().backward()
            line = sys._getframe().f_lineno + 1
            optimizer.step()
    found = _warnings_of(caught, GradWatchWarning)
    assert len(found) == 2  # nan, skipped_step
    assert {(w.filename, w.lineno) for w in found} == {(__file__, line)}


def test_closure_warning_names_the_users_step_line() -> None:
    model = mlp()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=1)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip"):
            line = sys._getframe().f_lineno + 1
            optimizer.step(closure)
    found = _warnings_of(caught, RuntimeWarning)
    assert [(w.filename, w.lineno) for w in found] == [(__file__, line)]


def test_stack_level_walk_and_skip_file_prefixes_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python >= 3.12 names the frame with skip_file_prefixes; before, the walk counts the frames.
    seen: list[dict[str, Any]] = []

    def fake_warn(message: Any, category: Any = None, **kwargs: Any) -> None:
        seen.append(kwargs)

    monkeypatch.setattr(reporting.warnings, "warn", fake_warn)
    monkeypatch.setattr(reporting, "_SKIP_FILE_PREFIXES", True)
    reporting.warn_user("message", RuntimeWarning)
    monkeypatch.setattr(reporting, "_SKIP_FILE_PREFIXES", False)
    reporting.warn_user("message", RuntimeWarning)
    assert seen[0]["stacklevel"] == 2
    assert GRADWATCH_DIR + "/" in seen[0]["skip_file_prefixes"]
    assert str(pathlib.Path(torch.__file__).parent) + "/" in seen[0]["skip_file_prefixes"]
    assert seen[1] == {"stacklevel": 2}  # the caller of warn_user: this test's frame


def test_lightning_callback_warning_points_outside_gradwatch(tmp_path: pathlib.Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    callback_class = pytest.importorskip("gradwatch.lightning").GradWatchCallback

    class Module(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.net(batch[0]).square().mean()
            return loss * float("nan") if batch_idx == 1 else loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback_class(log_dir=False)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    found = _warnings_of(caught, GradWatchWarning)
    assert [str(w.message).split("]")[0] for w in found] == ["[nan"]
    assert not found[0].filename.startswith(GRADWATCH_DIR)
    assert not found[0].filename.startswith(str(pathlib.Path(torch.__file__).parent))
