"""GradWatchCallback inside real ``Trainer.fit`` runs on CPU: tiny models, synthetic data, a few
steps each; both Lightning namespaces where the namespace matters."""

from __future__ import annotations

import copy
import csv as csv_module
import functools
import importlib
import json
import logging
import os
import pathlib
import pickle
import signal
import subprocess
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from gradwatch import GradientError, GradWatchError, GradWatchWarning, Kind
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME
from tests.helpers.clipping import clip_spy
from tests.helpers.contract import state_differences
from tests.helpers.lightning_fit import fit, loader
from tests.helpers.models import GAN, EncoderDecoder

lightning_callback = pytest.importorskip("gradwatch.lightning")
GradWatchCallback = lightning_callback.GradWatchCallback

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]
HELPERS = pathlib.Path(__file__).resolve().parent / "helpers"


@pytest.fixture(params=NAMESPACES)
def pl(request: pytest.FixtureRequest) -> ModuleType:
    """Each Lightning namespace in turn."""
    return pytest.importorskip(request.param)


@pytest.fixture
def lpl() -> ModuleType:
    """``lightning.pytorch``, for the tests where the namespace does not matter."""
    return pytest.importorskip("lightning.pytorch")


@functools.cache
def modules(pl: ModuleType) -> SimpleNamespace:
    """The LightningModules of the tests, built on ``pl``'s LightningModule."""

    class Regressor(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Automatic optimization of an encoder-decoder; bugs planted by the arguments."""

        def __init__(
            self,
            *,
            lr: float = 0.05,
            nan_at: int | None = None,
            nan_once: bool = False,
            lr_factor_at: tuple[int, float] | None = None,
            detach: bool = False,
            optimizer: str = "sgd",
        ) -> None:
            super().__init__()
            self.model = EncoderDecoder(detach=detach)
            self.lr = lr
            self.nan_at = nan_at
            self.nan_once = nan_once
            self.lr_factor_at = lr_factor_at
            self.optimizer = optimizer

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.model(x).float(), y)
            if self.nan_at is not None and (
                self.global_step == self.nan_at
                if self.nan_once
                else self.global_step >= self.nan_at
            ):
                loss = loss * torch.log(torch.zeros(()))  # -inf * 0 somewhere: NaN
            self.log("train_loss", loss)
            return loss

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.lr_factor_at is not None and self.global_step == self.lr_factor_at[0]:
                for group in self.trainer.optimizers[0].param_groups:
                    group["lr"] *= self.lr_factor_at[1]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-2)
            if self.optimizer == "sgd-momentum":
                return torch.optim.SGD(
                    self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-2
                )
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    class Manual(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Manual optimization; ``forget_zero_grad_from`` stops calling ``opt.zero_grad()``;
        ``nan_at`` makes the loss of that one step NaN."""

        def __init__(
            self,
            forget_zero_grad_from: int | None = None,
            nan_at: int | None = None,
            momentum: float = 0.0,
        ) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = EncoderDecoder()
            self.forget_from = forget_zero_grad_from
            self.nan_at = nan_at
            self.momentum = momentum

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            if self.forget_from is None or self.global_step < self.forget_from:
                opt.zero_grad()
            loss = nn.functional.mse_loss(self.model(x), y)
            if self.global_step == self.nan_at:
                loss = loss * torch.tensor(float("nan"))
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)

    class TinyGAN(pl.LightningModule):  # type: ignore[misc,name-defined]
        """Two optimizers, manual optimization, toggled as Lightning's GAN example does."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gan = GAN()

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt_g, opt_d = self.optimizers()
            real = batch[0][:, :2]
            bce = nn.functional.binary_cross_entropy_with_logits
            ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)

            self.toggle_optimizer(opt_d)
            fake = self.gan.generator(torch.randn(len(real), 4)).detach()
            d = self.gan.discriminator
            loss_d = bce(d(real), ones) + bce(d(fake), zeros)
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.untoggle_optimizer(opt_d)

            self.toggle_optimizer(opt_g)
            loss_g = bce(d(self.gan.generator(torch.randn(len(real), 4))), ones)
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
            self.untoggle_optimizer(opt_g)

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [
                torch.optim.Adam(self.gan.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.gan.discriminator.parameters(), lr=1e-3),
            ]

    class Frozen(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(8, 1).requires_grad_(False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)

    class Snapshots(pl.Callback):  # type: ignore[misc,name-defined]
        """Model and optimizer state before each step (keyed by that step) and at the end."""

        def __init__(self) -> None:
            self.states: dict[int, dict[str, Any]] = {}

        def _take(self, trainer: Any, module: Any) -> None:
            self.states[trainer.global_step] = copy.deepcopy(
                {
                    "model": module.state_dict(),
                    "optimizers": [o.state_dict() for o in trainer.optimizers],
                }
            )

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
            self._take(trainer, module)

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self._take(trainer, module)

    return SimpleNamespace(
        Regressor=Regressor, Manual=Manual, TinyGAN=TinyGAN, Frozen=Frozen, Snapshots=Snapshots
    )


def kinds(callback: Any) -> list[str]:
    return [f.kind.value for f in callback.findings]


def record(**options: Any) -> Any:
    return GradWatchCallback(on_finding="record", log_dir=False, **options)


def read_events(log_dir: pathlib.Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def hooks_left(module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    count = sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())
    return count + sum(len(o._optimizer_step_post_hooks) for o in optimizers)


# ---------------------------------------------------------------------- healthy runs: silent


def test_healthy_automatic(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    module = modules(pl).Regressor()
    trainer = fit(pl, module, [callback], tmp_path)
    assert callback.findings == []
    assert callback.step == trainer.global_step == 12
    assert hooks_left(module, trainer.optimizers) == 0
    assert "no gradient problems found in 12 optimizer steps" in callback.summary()


def test_declared_accumulation_is_read_from_the_trainer(
    lpl: ModuleType, tmp_path: pathlib.Path
) -> None:
    callback = record()
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, accumulate_grad_batches=4, steps=4)
    assert callback.findings == []
    assert callback.step == 4
    # The same run declaring one pass per step: the four passes are reported.
    strict = record(accumulation_steps=1)
    fit(lpl, modules(lpl).Regressor(), [strict], tmp_path, accumulate_grad_batches=4, steps=4)
    assert kinds(strict) == ["unexpected_accumulation"]
    assert strict.findings[0].step == 0


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_clipping_is_not_a_finding(
    lpl: ModuleType, tmp_path: pathlib.Path, algorithm: str, accumulate: int
) -> None:
    callback = record()
    with clip_spy() as spy:
        fit(
            lpl, modules(lpl).Regressor(lr=0.1), [callback], tmp_path, steps=6,
            gradient_clip_val=0.05, gradient_clip_algorithm=algorithm,
            accumulate_grad_batches=accumulate,
        )  # fmt: skip
    assert callback.findings == []
    assert spy.clips == [0.05] * 6  # Lightning's clipping went through the wrappers, judged


def test_checked_gradient_is_unclipped(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    # max_grad_norm below the healthy gradient norm but above the clip value: had the check
    # looked at the clipped gradient, nothing would be reported.
    callback = record(max_grad_norm=0.01)
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, gradient_clip_val=1e-3, steps=3)
    assert set(kinds(callback)) == {"exploding"}
    assert callback.findings[0].step == 0


def test_bf16_mixed(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, precision="bf16-mixed")
    assert callback.findings == []
    assert callback.step == 12


def _fp16_plugin(lpl: ModuleType, init_scale: float) -> Any:
    # Trainer(precision="16-mixed") falls back to bf16 on CPU; the plugin with a CPU GradScaler
    # runs the same code path as 16-mixed on a GPU: scale, unscale_, maybe skip the step.
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def test_16_mixed_overflows_that_the_scaler_skips_are_not_findings(
    lpl: ModuleType, tmp_path: pathlib.Path
) -> None:
    callback = record()
    plugin = _fp16_plugin(lpl, init_scale=2.0**24)  # overflows until the scale has backed off
    trainer = fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, plugins=[plugin], steps=16)
    assert callback.findings == []
    # Skipped steps are not optimizer steps, and some steps were skipped and some not.
    assert 0 < callback.step < trainer.global_step


def test_16_mixed_nan_loss_is_reported_although_every_step_is_skipped(
    lpl: ModuleType, tmp_path: pathlib.Path
) -> None:
    callback = record()
    plugin = _fp16_plugin(lpl, init_scale=4.0)
    module = modules(lpl).Regressor(nan_at=0)
    fit(lpl, module, [callback], tmp_path, plugins=[plugin], steps=6)
    assert callback.step == 0  # GradScaler skipped every step
    # Tolerated while the scale (4, 2) is above 1; at scale 1 the loss itself is broken.
    assert kinds(callback) == ["nan"]
    assert callback.findings[0].step == 2


def test_manual_optimization(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    trainer = fit(pl, modules(pl).Manual(), [callback], tmp_path)
    assert callback.findings == []
    assert callback.step == trainer.global_step == 12


def test_two_optimizers(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    module = modules(lpl).TinyGAN()
    trainer = fit(lpl, module, [callback], tmp_path, steps=24)
    assert callback.findings == []
    assert callback.step == 12  # each optimizer stepped 12 times
    assert hooks_left(module, trainer.optimizers) == 0


# ---------------------------------------------------------------------- planted bugs


def test_nan_loss(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    fit(pl, modules(pl).Regressor(nan_at=5), [callback], tmp_path)
    assert kinds(callback)[0] == "nan"
    nan = callback.findings[0]
    assert nan.step == 5
    assert nan.param == "model.decoder.2.bias"  # nearest to the loss


def test_learning_rate_raised_a_thousandfold(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    module = modules(lpl).Regressor(lr=0.01, lr_factor_at=(8, 1000.0))
    fit(lpl, module, [callback], tmp_path, steps=20)
    assert "exploding" in kinds(callback)
    assert callback.findings[0].step > 8


def test_manual_forgotten_zero_grad(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    fit(pl, modules(pl).Manual(forget_zero_grad_from=3), [callback], tmp_path, steps=6)
    assert kinds(callback)[0] == "missing_zero_grad"
    assert callback.findings[0].step == 3


def test_detached_submodule(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    fit(lpl, modules(lpl).Regressor(detach=True), [callback], tmp_path, steps=8)
    assert kinds(callback) == ["no_grad"]
    assert set(callback.findings[0].params) == {"model.encoder.0.weight", "model.encoder.0.bias"}


# ---------------------------------------------------------------------- on_nonfinite="skip"

SKIP_AT = 4


def _changed_every_step_but(states: dict[int, dict[str, Any]], skipped: set[int]) -> list[int]:
    """The steps (other than ``skipped``) after which the model's weights were unchanged."""
    last = max(states)
    return [
        step
        for step in range(last)
        if step not in skipped
        and not state_differences(states[step]["model"], states[step + 1]["model"])
    ]


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_skip_leaves_weights_and_optimizer_state_as_before(
    pl: ModuleType, tmp_path: pathlib.Path, optimizer: str
) -> None:
    callback = record(on_nonfinite="skip")
    snapshots = modules(pl).Snapshots()
    module = modules(pl).Regressor(nan_at=SKIP_AT, nan_once=True, optimizer=optimizer)
    # Clipping runs after the check, on the cleared gradients of the skipped step.
    trainer = fit(pl, module, [callback, snapshots], tmp_path, gradient_clip_val=1.0)
    states = snapshots.states
    assert sorted(states) == list(range(13))
    # Step SKIP_AT changed nothing: weights, momentum buffers, Adam moments and step counts.
    assert state_differences(states[SKIP_AT], states[SKIP_AT + 1]) == []
    assert _changed_every_step_but(states, {SKIP_AT}) == []  # training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert [(f.kind, f.step) for f in callback.findings] == [
        (Kind.NAN, SKIP_AT),
        (Kind.SKIPPED_STEP, SKIP_AT),
    ]
    skipped = callback.findings[1]
    assert skipped.param is None
    assert skipped.params[0] == "model.decoder.2.bias"  # nearest to the loss
    assert set(skipped.params) == {name for name, _ in module.named_parameters()}
    assert callback.occurrences[(Kind.SKIPPED_STEP, None)] == 1
    assert callback.step == trainer.global_step == 12


def test_report_default_lets_the_nan_step_through(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    assert callback.on_nonfinite == "report"
    snapshots = modules(lpl).Snapshots()
    module = modules(lpl).Regressor(nan_at=SKIP_AT, nan_once=True, optimizer="sgd-momentum")
    fit(lpl, module, [callback, snapshots], tmp_path, steps=SKIP_AT + 1)
    assert not torch.isnan(snapshots.states[SKIP_AT]["model"]["model.decoder.2.bias"]).any()
    assert torch.isnan(snapshots.states[SKIP_AT + 1]["model"]["model.decoder.2.bias"]).all()
    assert kinds(callback) == ["nan"]


def test_skip_with_manual_optimization(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    # Lightning runs on_before_optimizer_step inside opt.step() of manual optimization too.
    callback = record(on_nonfinite="skip")
    snapshots = modules(pl).Snapshots()
    fit(pl, modules(pl).Manual(nan_at=SKIP_AT, momentum=0.9), [callback, snapshots], tmp_path)
    states = snapshots.states
    assert state_differences(states[SKIP_AT], states[SKIP_AT + 1]) == []
    assert _changed_every_step_but(states, {SKIP_AT}) == []
    assert [(f.kind, f.step) for f in callback.findings] == [
        (Kind.NAN, SKIP_AT),
        (Kind.SKIPPED_STEP, SKIP_AT),
    ]


@pytest.mark.parametrize(
    ("init_scale", "expected"),
    [
        # Above 1 the overflow is what dynamic loss scaling expects: left to the scaler alone.
        (2.0**8, []),
        # At scale 1 the loss itself is broken: reported, and gradwatch clears the gradients too.
        (1.0, [(Kind.NAN, SKIP_AT), (Kind.SKIPPED_STEP, SKIP_AT)]),
    ],
    ids=["scale-above-1", "scale-1"],
)
def test_16_mixed_skip_does_not_fight_the_grad_scaler(
    lpl: ModuleType, tmp_path: pathlib.Path, init_scale: float, expected: list[Any]
) -> None:
    callback = record(on_nonfinite="skip")
    snapshots = modules(lpl).Snapshots()
    plugin = _fp16_plugin(lpl, init_scale=init_scale)
    module = modules(lpl).Regressor(nan_at=SKIP_AT, nan_once=True, optimizer="adam")
    trainer = fit(lpl, module, [callback, snapshots], tmp_path, plugins=[plugin])
    states = snapshots.states
    assert state_differences(states[SKIP_AT], states[SKIP_AT + 1]) == []
    assert _changed_every_step_but(states, {SKIP_AT}) == []
    assert [(f.kind, f.step) for f in callback.findings] == expected
    # The scaler saw the overflow either way: it skipped the step and halved its scale.
    assert plugin.scaler.get_scale() == init_scale / 2
    assert callback.step == trainer.global_step - 1 == 11


# ---------------------------------------------------------------------- policies and outputs


def test_raise_stops_fit_naming_parameter_and_step(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = GradWatchCallback(on_finding="raise", log_dir=False)
    module = modules(pl).Regressor(nan_at=3)
    trainer = pl.Trainer(
        max_steps=12,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    weights = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(GradientError, match=r"\[nan\] step 3: .*'model\.decoder\.2\.bias'"):
        trainer.fit(module, loader())
    assert trainer.global_step == 3
    # Raised before the optimizer step: the weights never saw the NaN.
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(p, w) for p, w in zip(module.parameters(), weights, strict=True))
    assert hooks_left(module, trainer.optimizers) == 0  # removed by on_exception


def test_warn_is_a_warning(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = GradWatchCallback(log_dir=False)
    with pytest.warns(GradWatchWarning, match=r"\[missing_zero_grad\] step 2"):
        fit(lpl, modules(lpl).Manual(forget_zero_grad_from=2), [callback], tmp_path, steps=4)
    assert kinds(callback) == ["missing_zero_grad"]


def test_callable_policy_and_lightning_log(
    lpl: ModuleType, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []
    callback = GradWatchCallback(on_finding=seen.append, log_dir=False)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(lpl, modules(lpl).Regressor(nan_at=2), [callback], tmp_path, steps=4)
    assert seen == callback.findings
    assert [f.kind for f in seen] == [Kind.NAN]
    assert any("gradwatch: [nan] step 2" in r.getMessage() for r in caplog.records)


def test_tensorboard_logger_run_is_shared(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    tb_logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    callback = GradWatchCallback(on_finding="record")
    fit(pl, modules(pl).Regressor(nan_at=6), [callback], tmp_path, logger=tb_logger, steps=8)
    run = pathlib.Path(tb_logger.log_dir)
    assert callback.output_dir == str(run)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer: the logger's
    tags = read_events(run).Tags()
    assert "train_loss" in tags["scalars"]  # Lightning's own metric, same file
    assert "gradwatch/grad_norm/total" in tags["scalars"]
    assert "gradwatch/findings/nan" in tags["scalars"]
    records = [json.loads(line) for line in (run / FINDINGS_LOG_NAME).read_text().splitlines()]
    assert [(r["kind"], r["step"], r["rank"]) for r in records] == [("nan", 6, 0)]
    # The logger's writer was flushed, not closed: Lightning can still write through it.
    tb_logger.experiment.add_scalar("after", 1.0, 0)
    tb_logger.experiment.flush()
    assert "after" in read_events(run).Tags()["scalars"]


def test_without_tensorboard_logger_writes_its_own_directory(
    lpl: ModuleType, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = lpl.loggers.CSVLogger(str(tmp_path), name="csv")
    callback = GradWatchCallback(on_finding="record")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, logger=csv, steps=4)
    expected = pathlib.Path(csv.log_dir) / "gradwatch_logs"
    assert callback.output_dir == str(expected)
    assert "gradwatch/grad_norm/total" in read_events(expected).Tags()["scalars"]
    said = [r.getMessage() for r in caplog.records if str(expected) in r.getMessage()]
    assert len(said) == 1


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_other_loggers_get_the_scalars_and_findings(namespace: str, tmp_path: pathlib.Path) -> None:
    """A CSVLogger beside a TensorBoardLogger: gradwatch's scalars reach both, through
    Lightning's logger API for the CSV one, at the steps the TensorBoard run has them."""
    pl = pytest.importorskip(namespace)
    csv = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    tensorboard = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    callback = GradWatchCallback(on_finding="record")
    module = modules(pl).Regressor(nan_at=3)
    fit(pl, module, [callback], tmp_path, logger=[csv, tensorboard], steps=6)
    assert kinds(callback)[:1] == ["nan"]
    with open(pathlib.Path(csv.log_dir) / "metrics.csv") as file:
        rows = list(csv_module.DictReader(file))
    totals = {int(r["step"]) for r in rows if r.get("gradwatch/grad_norm/total")}
    events = read_events(pathlib.Path(tensorboard.log_dir))
    assert totals == {e.step for e in events.Scalars("gradwatch/grad_norm/total")}
    assert {0, 1, 2} <= totals
    nan_rows = [r for r in rows if r.get("gradwatch/findings/nan")]
    assert [(int(r["step"]), float(r["gradwatch/findings/nan"])) for r in nan_rows] == [(3, 1.0)]
    assert any(k.startswith("gradwatch/grad_norm/model.") for k in rows[0])


def test_log_dir_false_leaves_the_loggers_alone(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    csv = lpl.loggers.CSVLogger(str(tmp_path), name="csv")
    callback = record()
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, logger=csv, steps=3)
    metrics = pathlib.Path(csv.log_dir) / "metrics.csv"
    assert not metrics.exists() or "gradwatch/" not in metrics.read_text()


def test_no_logger_writes_under_default_root_dir(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = GradWatchCallback(on_finding="record")
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, steps=4)
    assert callback.output_dir == str(tmp_path / "gradwatch_logs")
    events = read_events(tmp_path / "gradwatch_logs")
    assert "gradwatch/grad_norm/total" in events.Tags()["scalars"]


def test_no_logger_in_a_project_directory_leaves_the_package_importable(
    lpl: ModuleType, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``logger=False`` and no ``default_root_dir``, Lightning's log directory is the
    working directory; a ``gradwatch/`` folder written there would shadow the package."""
    monkeypatch.chdir(tmp_path)
    callback = GradWatchCallback(on_finding="record")
    trainer = lpl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(modules(lpl).Regressor(), loader())
    assert not (tmp_path / "gradwatch").exists()
    assert callback.output_dir == str(tmp_path / "gradwatch_logs")
    found = subprocess.run(
        [sys.executable, "-c", "import gradwatch; print(gradwatch.watch.__module__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert found.stdout.strip() == "gradwatch.watcher", found.stderr


def test_a_healthy_run_leaves_an_empty_findings_log_that_report_passes(
    lpl: ModuleType, tmp_path: pathlib.Path
) -> None:
    from gradwatch.cli import EXIT_OK, main

    callback = GradWatchCallback(on_finding="record")
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, steps=4)
    assert callback.findings == []
    log = tmp_path / "gradwatch_logs" / FINDINGS_LOG_NAME
    assert log.read_text() == ""
    assert main(["report", str(tmp_path), "--fail-on", "nan"]) == EXIT_OK


def test_explicit_log_dir(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = GradWatchCallback(on_finding="record", log_dir=tmp_path / "mine")
    tb_logger = lpl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    fit(lpl, modules(lpl).Regressor(nan_at=1), [callback], tmp_path, logger=tb_logger, steps=3)
    assert callback.output_dir == str(tmp_path / "mine")
    assert (tmp_path / "mine" / FINDINGS_LOG_NAME).exists()
    assert not (pathlib.Path(tb_logger.log_dir) / FINDINGS_LOG_NAME).exists()


def test_summary_writer_of_yours(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "yours"))
    callback = GradWatchCallback(on_finding="record", log_dir=writer, histogram_every=2)
    fit(lpl, modules(lpl).Regressor(), [callback], tmp_path, steps=4)
    writer.add_scalar("still_open", 1.0, 0)  # flushed, not closed
    writer.close()
    events = read_events(tmp_path / "yours").Tags()
    assert {"gradwatch/grad_norm/total", "still_open"} <= set(events["scalars"])
    assert "gradwatch/grad/model.encoder.0.weight" in events["histograms"]


# ---------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_keeps_steps_and_history(pl: ModuleType, tmp_path: pathlib.Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=str(ckpt_dir), every_n_train_steps=6, save_top_k=-1
    )
    first = record()
    fit(pl, modules(pl).Regressor(detach=True), [first, saver], tmp_path, steps=6,
        enable_checkpointing=True)  # fmt: skip
    assert kinds(first) == ["no_grad"]
    (path,) = ckpt_dir.glob("*.ckpt")
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert saved[first.state_key]["monitor"]["steps"] == {0: 6}

    resumed = record()
    fit(pl, modules(pl).Regressor(detach=True), [resumed], tmp_path, steps=12,
        ckpt_path=str(path))  # fmt: skip
    assert resumed.step == 12  # 6 before the checkpoint, 6 after
    # The finding made before the checkpoint is kept, with its step, and not made again.
    assert resumed.findings == first.findings
    assert resumed.occurrences[(Kind.NO_GRAD, first.findings[0].param)] == 1


def test_two_callbacks_with_different_settings_share_a_checkpoint(
    lpl: ModuleType, tmp_path: pathlib.Path
) -> None:
    loose, tight = record(), record(max_grad_norm=0.01)
    assert loose.state_key != tight.state_key
    assert record(on_nonfinite="skip").state_key != loose.state_key
    assert record().state_key == loose.state_key
    trainer = fit(lpl, modules(lpl).Regressor(), [loose, tight], tmp_path, steps=4)
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    saved = torch.load(tmp_path / "both.ckpt", weights_only=False)["callbacks"]
    assert {loose.state_key, tight.state_key} <= set(saved)
    assert kinds(loose) == [] and set(kinds(tight)) == {"exploding"}

    again = [record(), record(max_grad_norm=0.01)]
    fit(lpl, modules(lpl).Regressor(), again, tmp_path, steps=6,
        ckpt_path=str(tmp_path / "both.ckpt"))  # fmt: skip
    assert [c.step for c in again] == [6, 6]
    assert kinds(again[0]) == [] and set(kinds(again[1])) == {"exploding"}
    assert again[1].findings[: len(tight.findings)] == tight.findings


def test_state_from_another_model_is_refused(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    first = record()
    fit(lpl, modules(lpl).Regressor(), [first], tmp_path, steps=2)
    other = record()
    other.load_state_dict(first.state_dict())
    with pytest.raises(GradWatchError, match="different parameters"):
        fit(lpl, modules(lpl).TinyGAN(), [other], tmp_path, steps=2)
    with pytest.raises(GradWatchError, match="version 1"):
        other.load_state_dict({"version": 7})


def test_pickle_and_deepcopy_between_fits(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    callback = record()
    assert pickle.loads(pickle.dumps(callback)).state_key == callback.state_key
    fit(lpl, modules(lpl).Regressor(nan_at=2), [callback], tmp_path, steps=4)
    copied = copy.deepcopy(callback)
    assert copied.findings == callback.findings
    assert copied.state_dict()["monitor"]["steps"] == {0: 4}
    # Each fit starts afresh unless resumed from a checkpoint.
    fit(lpl, modules(lpl).Regressor(nan_at=3), [copied], tmp_path, steps=6)
    assert copied.step == 6
    assert [(f.kind.value, f.step) for f in copied.findings] == [("nan", 3)]


# ---------------------------------------------------------------------- configuration


# Bad constructor arguments: the table of tests/test_entry_points.py.


def test_module_without_trainable_parameters(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    with pytest.raises(GradWatchError, match="Frozen has no trainable parameters"):
        fit(lpl, modules(lpl).Frozen(), [record()], tmp_path, steps=1)


def test_no_optimizer_over_the_parameters(lpl: ModuleType, tmp_path: pathlib.Path) -> None:
    module = modules(lpl).Frozen()
    module.net.requires_grad_(True)  # trainable now, but its optimizer holds another tensor
    with pytest.raises(GradWatchError, match=r"no optimizer from Frozen\.configure_optimizers"):
        fit(lpl, module, [record()], tmp_path, steps=1)


# ---------------------------------------------------------------------- imports


def test_importing_gradwatch_does_not_import_lightning() -> None:
    code = (
        "import sys, gradwatch, gradwatch.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_clear_error_without_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs Lightning.*pip install"):
        lightning_callback._callback_bases()


def test_one_class_for_both_namespaces() -> None:
    for name in NAMESPACES:
        namespace = importlib.import_module(name)
        assert isinstance(GradWatchCallback(), namespace.Callback)


# ---------------------------------------------------------------------- distributed


def _run_ddp(
    out: pathlib.Path, policy: str, scenario: str = "forgetful"
) -> tuple[int, str, dict[int, dict[str, Any]]]:
    """Runs the 2-process DDP script; kills its whole process group if it hangs."""
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(HELPERS.parent.parent)}
    process = subprocess.Popen(
        [sys.executable, str(HELPERS / "lightning_ddp.py"), str(out), policy, scenario],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"DDP run with on_finding={policy!r} hung:\n{output[-4000:]}")
    reports = {}
    for rank in (0, 1):
        path = out / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report:\n{output[-4000:]}"
        reports[rank] = json.loads(path.read_text())
    return process.returncode, output, reports


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_finding_on_one_rank(tmp_path: pathlib.Path) -> None:
    # Only rank 1 forgets zero_grad, from step 2 (see tests/helpers/lightning_ddp.py).
    returncode, output, reports = _run_ddp(tmp_path / "record", "record")
    assert returncode == 0, output[-4000:]
    expected = [["missing_zero_grad", "net.2.bias", 2]]
    for rank in (0, 1):
        assert reports[rank]["world_size"] == 2
        assert reports[rank]["global_step"] == 8
        assert reports[rank]["findings"] == expected  # every rank knows, rank 0 reports
    assert output.count("gradwatch (on rank 1): [missing_zero_grad]") == 1
    run = pathlib.Path(reports[0]["output_dir"])
    assert reports[1]["output_dir"] is None  # rank 1 writes nothing
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    lines = (run / FINDINGS_LOG_NAME).read_text().splitlines()
    assert [(r["kind"], r["step"], r["rank"]) for r in map(json.loads, lines)] == [
        ("missing_zero_grad", 2, 1)
    ]
    scalars = read_events(run).Tags()["scalars"]
    assert "gradwatch/findings/missing_zero_grad" in scalars


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_raise_stops_every_rank(tmp_path: pathlib.Path) -> None:
    returncode, output, reports = _run_ddp(tmp_path / "raise", "raise")
    assert returncode != 0, output[-4000:]
    for rank in (0, 1):
        error = reports[rank]["error"]
        assert error is not None and error.startswith("GradientError: [missing_zero_grad] step 2")
        assert "'net.2.bias'" in error
        assert reports[rank]["global_step"] == 3  # both stopped after the same batch


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_skip_on_every_rank_when_one_rank_has_nan(tmp_path: pathlib.Path) -> None:
    # Only rank 1's loss is NaN, at step 2; DDP's all-reduce carries it to rank 0's gradients.
    returncode, output, reports = _run_ddp(tmp_path / "skip", "record", "nan")
    assert returncode == 0, output[-4000:]
    for rank in (0, 1):
        assert reports[rank]["global_step"] == 8
        assert reports[rank]["findings"][-1] == ["skipped_step", None, 2]
        assert reports[rank]["unchanged_steps"] == [2]  # every rank skipped step 2, only it
    assert reports[0]["final_weights"] == reports[1]["final_weights"]  # still in step


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_replicas_whose_gradients_differ(tmp_path: pathlib.Path) -> None:
    # Rank 1 alone halves its all-reduced gradients after backward (lightning_ddp.py).
    returncode, output, reports = _run_ddp(tmp_path / "halved", "record", "halved")
    assert returncode == 0, output[-4000:]
    assert reports[0]["final_weights"] != reports[1]["final_weights"]  # the replicas drifted
    for rank in (0, 1):
        kinds_steps = [(kind, step) for kind, _, step in reports[rank]["findings"]]
        assert kinds_steps == [("replica_divergence", 0)]
        assert reports[rank]["findings"][0][1].startswith("net.")
