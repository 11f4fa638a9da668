"""``on_nonfinite="skip"`` with ``watch()``: a step whose gradients hold NaN/Inf leaves weights and
optimizer state exactly as they were, a ``skipped_step`` finding records it, and training goes on.

NaN/Inf is planted at step ``k`` by writing into one parameter's ``.grad`` between ``backward()``
and ``optimizer.step()``, so every other gradient of that step is finite (and would have moved
its weight). Model and optimizer state are deep-copied right before each ``optimizer.step()``:
snapshot ``k`` is the state before step ``k``, snapshot ``k + 1`` the state after it.
"""

from __future__ import annotations

import copy
import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch import Finding, GradientError, Kind
from gradwatch.cli import EXIT_FINDINGS, main
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME
from tests.helpers.contract import state_differences
from tests.helpers.models import GAN, mlp, regression_batch

MakeOptimizer = Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, MakeOptimizer] = {
    "sgd-momentum-decay": lambda p: torch.optim.SGD(
        p, lr=0.02, momentum=0.9, weight_decay=1e-2, foreach=False
    ),
    "sgd-nesterov-foreach": lambda p: torch.optim.SGD(
        p, lr=0.02, momentum=0.9, nesterov=True, foreach=True
    ),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adam-default": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "adamw-amsgrad-foreach": lambda p: torch.optim.AdamW(
        p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True
    ),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(
        p, lr=1e-3, momentum=0.9, centered=True
    ),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}

SKIP_AT = 5
STEPS = 30


def _optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    try:
        return OPTIMIZERS[name](params)
    except RuntimeError as error:  # fused kernels for CPU came with torch 2.4
        pytest.skip(f"{name} is not available here: {error}")


def _plant(model: nn.Module, value: float) -> None:
    """Write ``value`` into one element of the first layer's weight gradient."""
    grad = model[0].weight.grad
    assert grad is not None
    grad[0, 0] = value


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    poison: dict[int, float],
    steps: int = STEPS,
    set_to_none: bool = True,
    **watch_options: Any,
) -> tuple[gradwatch.Watcher, list[dict[str, Any]], list[float]]:
    """Fit one fixed batch; returns the watcher, a snapshot before each step (and one at the end),
    and the loss of each step."""
    x, y = regression_batch(generator=torch.Generator().manual_seed(0))
    snapshots: list[dict[str, Any]] = []
    losses: list[float] = []
    options: dict[str, Any] = {"on_finding": "record", "on_nonfinite": "skip", **watch_options}
    with gradwatch.watch(model, optimizer, **options) as watcher:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=set_to_none)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step in poison:
                _plant(model, poison[step])
            snapshots.append(_snapshot(model, optimizer))
            optimizer.step()
            losses.append(loss.item())
        snapshots.append(_snapshot(model, optimizer))
    return watcher, snapshots, losses


def _by_kind(findings: list[Finding]) -> dict[Kind, Finding]:
    return {f.kind: f for f in findings}


# ---------------------------------------------------------------------- the skipped step


@pytest.mark.parametrize(("value", "k"), [(float("nan"), SKIP_AT), (float("inf"), 0)])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skipped_step_leaves_weights_and_optimizer_state_exactly_as_before(
    name: str, value: float, k: int
) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = _optimizer(name, model.parameters())
    watcher, snapshots, losses = _train(model, optimizer, poison={k: value})

    # Step k changed nothing: weights, momentum buffers, moments, step counts, param groups.
    assert state_differences(snapshots[k], snapshots[k + 1]) == []
    # The steps before and after it trained as usual: every one of them moved the weights.
    for step in [*range(k), *range(k + 1, STEPS)]:
        assert state_differences(snapshots[step]["model"], snapshots[step + 1]["model"]), step
    assert losses[-1] < 0.7 * losses[k + 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    kind = Kind.NAN if value != value else Kind.INF
    assert [(f.kind, f.step) for f in watcher.findings] == [(kind, k), (Kind.SKIPPED_STEP, k)]
    skipped = watcher.findings[-1]
    assert skipped.param is None  # the whole optimizer step
    assert skipped.params == ("0.weight",)
    assert skipped.value == 1.0
    assert "optimizer step skipped (on_nonfinite='skip')" in skipped.message
    assert "'0.weight'" in skipped.message
    assert watcher.occurrences[(Kind.SKIPPED_STEP, None)] == 1
    assert watcher.step == STEPS  # optimizer.step() was called; it updated nothing


@pytest.mark.parametrize("name", ["adam", "adam-foreach", "adamw-fused"])
def test_adam_step_count_and_moments_do_not_advance(name: str) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = _optimizer(name, model.parameters())
    _, snapshots, _ = _train(model, optimizer, poison={SKIP_AT: float("nan")}, steps=SKIP_AT + 2)

    def state(step: int) -> dict[str, Any]:
        first_param: dict[str, Any] = snapshots[step]["optimizer"]["state"][0]
        return first_param

    # Adam's bias correction reads the per-parameter step count: it must not count the skip.
    assert float(state(SKIP_AT)["step"]) == float(state(SKIP_AT + 1)["step"]) == SKIP_AT
    assert float(state(SKIP_AT + 2)["step"]) == SKIP_AT + 1
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state(SKIP_AT)[moment], state(SKIP_AT + 1)[moment])
        assert not torch.equal(state(SKIP_AT + 1)[moment], state(SKIP_AT + 2)[moment])


def test_report_default_lets_the_nonfinite_step_through() -> None:
    # The same run without skip: the NaN reaches the weights, so the tests above can tell.
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        assert watcher.on_nonfinite == "report"
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    watcher, snapshots, _ = _train(
        model, optimizer, poison={SKIP_AT: float("nan")}, steps=SKIP_AT + 1, on_nonfinite="report"
    )
    assert torch.isnan(snapshots[SKIP_AT + 1]["model"]["0.weight"]).any()
    assert not torch.isnan(snapshots[SKIP_AT]["model"]["0.weight"]).any()
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.NAN, SKIP_AT)]


def test_nan_and_inf_at_one_step_name_every_parameter_in_backward_order() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    x, y = regression_batch()
    with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip") as watcher:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        model[0].weight.grad[0, 0] = float("nan")
        model[4].bias.grad[0] = float("-inf")
        before = _snapshot(model, optimizer)
        optimizer.step()
        assert state_differences(before, _snapshot(model, optimizer)) == []
    found = _by_kind(watcher.findings)
    assert set(found) == {Kind.NAN, Kind.INF, Kind.SKIPPED_STEP}
    # The output layer's gradient arrives first in the backward pass.
    assert found[Kind.SKIPPED_STEP].params == ("4.bias", "0.weight")
    assert found[Kind.SKIPPED_STEP].value == 2.0


# ---------------------------------------------------------------------- training goes on


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_cleared_gradients_trip_no_detector_in_the_steps_after(
    set_to_none: bool, accumulation_steps: int
) -> None:
    # Skips early (inside the warm-up of the magnitude detector and before no_grad_after passes),
    # twice in a row, and late; then many healthy steps: nothing but the skips is reported.
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    skipped_steps = [1, 10, 11, 40]
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(
        model,
        optimizer,
        on_finding="record",
        on_nonfinite="skip",
        accumulation_steps=accumulation_steps,
    ) as watcher:
        for step in range(80):
            optimizer.zero_grad(set_to_none=set_to_none)
            for _ in range(accumulation_steps):
                x, y = regression_batch(generator=generator)
                nn.functional.mse_loss(model(x), y).backward()
            if step in skipped_steps:
                _plant(model, float("nan"))
            optimizer.step()
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.NAN, 1), (Kind.SKIPPED_STEP, 1)]
    assert watcher.occurrences == {
        (Kind.NAN, "0.weight"): len(skipped_steps),
        (Kind.SKIPPED_STEP, None): len(skipped_steps),
    }
    assert "[skipped_step] (model) (seen at 4 checks)" in watcher.summary()


def test_every_parameter_of_the_optimizer_is_cleared_watched_or_not() -> None:
    torch.manual_seed(0)
    model = mlp()
    extra = nn.Parameter(torch.ones(3))  # optimized, but not part of the watched model
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=0.1, momentum=0.9)
    x, y = regression_batch()
    with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip") as watcher:
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) + extra.sum()).backward()
        _plant(model, float("nan"))
        optimizer.step()
        assert all(p.grad is None for p in [*model.parameters(), extra])
    assert torch.equal(extra.detach(), torch.ones(3))
    assert [f.kind for f in watcher.findings] == [Kind.NAN, Kind.SKIPPED_STEP]


def test_only_the_optimizer_with_nonfinite_gradients_skips() -> None:
    torch.manual_seed(0)
    gan = GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-3)
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record", on_nonfinite="skip") as watcher:
        for step in range(3):
            for opt in (opt_g, opt_d):
                opt_g.zero_grad()
                opt_d.zero_grad()
                gan.discriminator(gan.generator(torch.randn(8, 4))).mean().backward()
                if step == 1 and opt is opt_d:
                    gan.discriminator[0].weight.grad[0, 0] = float("nan")
                before_g = copy.deepcopy(gan.generator.state_dict())
                before_d = copy.deepcopy(gan.discriminator.state_dict())
                opt.step()
                changed_g = state_differences(before_g, gan.generator.state_dict())
                changed_d = state_differences(before_d, gan.discriminator.state_dict())
                assert bool(changed_g) == (opt is opt_g)
                assert bool(changed_d) == (opt is opt_d and step != 1)
    skipped = _by_kind(watcher.findings)[Kind.SKIPPED_STEP]
    assert skipped.step == 1
    assert skipped.params == ("discriminator.0.weight",)
    assert watcher.occurrences[(Kind.SKIPPED_STEP, None)] == 1


def test_skipped_step_in_the_findings_log_the_report_and_tensorboard(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    _train(model, optimizer, poison={3: float("nan"), 6: float("nan")}, steps=8, log_dir=tmp_path)

    lines = (tmp_path / FINDINGS_LOG_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["kind"], r["step"]) for r in records] == [("nan", 3), ("skipped_step", 3)]
    skipped = records[1]
    assert skipped["schema"] == 4
    assert skipped["param"] is None
    assert skipped["params"] == ["0.weight"]
    assert skipped["value"] == 1.0

    assert main(["report", str(tmp_path), "--fail-on", "skipped_step"]) == EXIT_FINDINGS
    out = capsys.readouterr().out
    assert "skipped_step" in out and "first at step 3" in out
    assert "--fail-on matched: skipped_step" in out

    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("gradwatch/findings/skipped_step")] == [3]
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("gradwatch/findings")]
    assert texts[1].startswith("**skipped_step** (model): step 3: optimizer step skipped")


# ---------------------------------------------------------------------- policies and options


def test_raise_clears_the_gradients_before_raising() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    x, y = regression_batch()
    with gradwatch.watch(model, optimizer, on_finding="raise", on_nonfinite="skip") as watcher:
        for step in range(6):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step == 3:
                _plant(model, float("nan"))
                before = _snapshot(model, optimizer)
                with pytest.raises(GradientError, match=r"\[nan\] step 3: "):
                    optimizer.step()
                assert all(p.grad is None for p in model.parameters())
                assert state_differences(before, _snapshot(model, optimizer)) == []
                continue  # a loop that catches the error trains on
            optimizer.step()
    assert [(f.kind, f.step) for f in watcher.findings] == [
        (Kind.NAN, 3),
        (Kind.SKIPPED_STEP, 3),
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_warn_policy_warns_for_the_skip_once() -> None:
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, optimizer, poison={2: float("nan"), 4: float("nan")}, on_finding="warn")
    messages = [str(w.message) for w in caught if isinstance(w.message, gradwatch.GradWatchWarning)]
    assert [m.split("]")[0] for m in messages] == ["[nan", "[skipped_step"]
    assert messages[1].startswith("[skipped_step] step 2: optimizer step skipped")


def test_ignored_kinds_are_still_skipped() -> None:
    # ``ignore`` decides what is reported, not whether a non-finite step may change the weights.
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    watcher, snapshots, _ = _train(
        model, optimizer, poison={3: float("nan")}, steps=5, ignore=["nan"]
    )
    assert state_differences(snapshots[3], snapshots[4]) == []
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.SKIPPED_STEP, 3)]


def test_overflowing_finite_gradient_is_not_skipped() -> None:
    # Finite values whose squares overflow float32 are not NaN/Inf: the step runs
    # (``exploding`` reports them).
    model = nn.Sequential(nn.Linear(2, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-20)
    with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip") as watcher:
        optimizer.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        model[0].weight.grad.fill_(1e20)
        before = model[0].weight.detach().clone()
        optimizer.step()
        assert not torch.equal(before, model[0].weight)
    assert [f.kind for f in watcher.findings] == [Kind.EXPLODING]


def test_closure_steps_cannot_be_skipped_and_say_so_once() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    x, y = regression_batch()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) * torch.tensor(float("nan"))
        loss.backward()
        return loss

    with gradwatch.watch(model, opt, on_finding="record", on_nonfinite="skip") as watcher:
        with pytest.warns(RuntimeWarning, match=r"cannot skip a step taken with .*closure"):
            opt.step(closure)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(closure)
    assert [f.kind for f in watcher.findings] == [Kind.NAN]  # reported, not skipped


# ---------------------------------------------------------------------- with a GradScaler


def _scaler_run(plant: str) -> tuple[gradwatch.Watcher, list[dict[str, Any]], list[float]]:
    """12 steps under a CPU GradScaler with NaN planted at SKIP_AT: in the loss (``"loss"``,
    ``"loss+unscale_"``: the user unscales and clips before ``scaler.step``), or in a gradient
    after ``scaler.unscale_`` (``"after-unscale_"``), where the scaler cannot see it. Returns
    the watcher, snapshots before each step and the scale before each step."""
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    x, y = regression_batch()
    snapshots = []
    scales = []
    with gradwatch.watch(model, optimizer, on_finding="record", on_nonfinite="skip") as watcher:
        for step in range(12):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if step == SKIP_AT and plant.startswith("loss"):
                loss = loss * torch.tensor(float("nan"))
            scaler.scale(loss).backward()
            if plant != "loss":
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if step == SKIP_AT and plant == "after-unscale_":
                _plant(model, float("nan"))
            snapshots.append(_snapshot(model, optimizer))
            scales.append(scaler.get_scale())
            scaler.step(optimizer)
            scaler.update()
        snapshots.append(_snapshot(model, optimizer))
        scales.append(scaler.get_scale())
    return watcher, snapshots, scales


@pytest.mark.parametrize("plant", ["loss", "loss+unscale_"])
def test_grad_scaler_skips_the_overflow_step_itself(plant: str) -> None:
    # scaler.step() calls optimizer.step() only when unscale_ found every gradient finite, so
    # gradwatch's step hooks never see the overflow step: the scaler skips it and lowers its
    # scale as usual. Nothing is reported and the step is not counted.
    watcher, snapshots, scales = _scaler_run(plant)
    assert state_differences(snapshots[SKIP_AT], snapshots[SKIP_AT + 1]) == []
    assert state_differences(snapshots[SKIP_AT + 1]["model"], snapshots[SKIP_AT + 2]["model"])
    assert scales[SKIP_AT + 1] == scales[SKIP_AT] / 2
    assert watcher.findings == []
    assert watcher.step == 11


def test_nonfinite_after_unscale_is_skipped_by_gradwatch_not_the_scaler() -> None:
    # NaN that appears after scaler.unscale_ is invisible to the scaler, which calls
    # optimizer.step(): gradwatch's check skips it, and the scale stays where it was.
    watcher, snapshots, scales = _scaler_run("after-unscale_")
    assert state_differences(snapshots[SKIP_AT], snapshots[SKIP_AT + 1]) == []
    assert state_differences(snapshots[SKIP_AT + 1]["model"], snapshots[SKIP_AT + 2]["model"])
    assert scales == [2.0**8] * 13
    assert [(f.kind, f.step) for f in watcher.findings] == [
        (Kind.NAN, SKIP_AT),
        (Kind.SKIPPED_STEP, SKIP_AT),
    ]
    assert watcher.step == 12
