"""``no_update`` (gradwatch/detectors/updates.py): optimizer steps that cannot move the weights.

Bug programs first: each shows that the bug bites (the weights are bit-for-bit what they were)
and then pins the finding's kind, cause, step, parameter and value. The healthy look-alikes that
must stay silent are in tests/test_healthy.py (section "no_update").
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, Kind
from gradwatch._monitor import Monitor
from gradwatch._options import DetectorOptions
from gradwatch.detectors import REGISTRY, CheckContext, Detector, Phase, Setup
from gradwatch.detectors.updates import UNCHANGED, ZERO_LR, ZERO_LR_CHECKS, NoUpdateDetector
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from gradwatch.sinks import Sink
from tests.helpers.models import (
    MLP_BY_ARRIVAL,
    EncoderDecoder,
    cnn_bn,
    mlp,
    regression_batch,
    train,
    unchanged,
    weights,
)


def _data() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _regression_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Callable[[int], None]:
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
        if sched is not None:
            sched.step()

    return step


def _no_update(watcher: Any) -> list[Finding]:
    return [f for f in watcher.findings if f.kind is Kind.NO_UPDATE]


# ---------------------------------------------------------------- zero_lr


def test_lambda_lr_multiplying_by_zero_is_found_at_the_fifth_check() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = weights(model)
    watcher = train(model, opt, steps=8, step_fn=_regression_step(model, opt, sched))
    assert unchanged(before, model)  # the bug bites: eight steps, not one weight moved
    assert [(f.kind, f.cause) for f in watcher.findings] == [(Kind.NO_UPDATE, ZERO_LR)]
    (found,) = watcher.findings
    assert ZERO_LR_CHECKS == 5
    assert found.step == 4  # the fifth check in a row with lr 0; steps 0 to 3 are silent
    assert (found.value, found.threshold) == (5.0, 0.0)
    assert found.params == MLP_BY_ARRIVAL
    assert found.param == "4.bias"  # the first moving parameter by arrival
    assert watcher.occurrences[(Kind.NO_UPDATE, "4.bias")] == 4  # steps 4, 5, 6 and 7
    assert "Check the scheduler or warm-up" in found.message
    assert "at 5 checks in a row" in found.message


def test_zero_lr_for_four_checks_is_not_yet_reported() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    watcher = train(
        model, opt, steps=ZERO_LR_CHECKS - 1, step_fn=_regression_step(model, opt, sched)
    )
    assert watcher.findings == []


def test_a_check_with_lr_above_zero_restarts_the_count() -> None:
    """lr 0 at steps 0-3, 0.05 at step 4, 0 again from step 5: the fifth zero check in a row is
    step 9."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s == 4 else 0.0)
    watcher = train(model, opt, steps=10, step_fn=_regression_step(model, opt, sched))
    assert [(f.kind, f.cause, f.step, f.value) for f in watcher.findings] == [
        (Kind.NO_UPDATE, ZERO_LR, 9, 5.0)
    ]


def test_warmup_that_never_starts_for_a_cnn_with_adamw() -> None:
    """Integer division in the warm-up multiplier: ``s // 1000`` is 0 for the first 1000 steps
    (``s / 1000`` was meant). AdamW's weight decay is scaled by the lr too: nothing moves."""
    model = cnn_bn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s // 1000))
    g = _data()

    def step(_: int) -> None:
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()

    before = weights(model)
    watcher = train(model, opt, steps=6, step_fn=step)
    assert unchanged(before, model)
    found = _no_update(watcher)
    assert [(f.cause, f.step, f.param, f.value) for f in found] == [(ZERO_LR, 4, "8.bias", 5.0)]
    assert set(found[0].params) == {name for name, _ in model.named_parameters()}
    assert {f.kind for f in watcher.findings} == {Kind.NO_UPDATE}


@pytest.mark.parametrize("how", ["tensor lr 0", "scheduler on a tensor lr"])
def test_tensor_learning_rate_on_the_cpu_is_read(how: str) -> None:
    model = mlp()
    opt: torch.optim.Optimizer
    sched = None
    if how == "tensor lr 0":
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.0))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    before = weights(model)
    watcher = train(model, opt, steps=6, step_fn=_regression_step(model, opt, sched))
    assert unchanged(before, model)
    assert [(f.kind, f.cause, f.step, f.param, f.value) for f in watcher.findings] == [
        (Kind.NO_UPDATE, ZERO_LR, 4, "4.bias", 5.0)
    ]


def test_a_group_without_gradients_does_not_hide_the_zero_lr() -> None:
    """The frozen layer's group (requires_grad False, lr 0.05) holds no gradient; the group that
    does has lr 0 by mistake: every group holding a gradient has lr 0."""
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(
        [
            {"params": list(model[0].parameters()), "lr": 0.05},
            {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 0.0},
        ]
    )
    before = weights(model)
    watcher = train(model, opt, steps=6, step_fn=_regression_step(model, opt))
    assert unchanged(before, model)
    found = _no_update(watcher)
    assert [(f.cause, f.step, f.param) for f in found] == [(ZERO_LR, 4, "4.bias")]
    assert found[0].params == MLP_BY_ARRIVAL[:4]  # not the frozen 0.weight, 0.bias


def test_scheduler_stepped_once_per_epoch_in_lightning(tmp_path: pathlib.Path) -> None:
    """A warm-up written per step (``epoch / 5``) that Lightning steps once per epoch (the
    default ``interval``): the lr stays 0 for the whole first epoch."""
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class Regressor(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = EncoderDecoder()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05)
            warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: epoch / 5)
            return {"optimizer": opt, "lr_scheduler": warmup}

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32 * 16, 8, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    module = Regressor()
    before = weights(module)
    callback = GradWatchCallback(on_finding="record", log_dir=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert trainer.global_step == callback.step == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # still in the first epoch
    assert unchanged(before, module)
    assert [(f.kind, f.cause, f.step, f.param, f.value) for f in callback.findings] == [
        (Kind.NO_UPDATE, ZERO_LR, 4, "model.decoder.2.bias", 5.0)
    ]
    assert set(callback.findings[0].params) == {n for n, _ in module.named_parameters()}
    assert callback.occurrences[(Kind.NO_UPDATE, "model.decoder.2.bias")] == 4


def test_zero_lr_with_an_output_open_is_not_reported_as_unchanged_too(
    tmp_path: pathlib.Path,
) -> None:
    """The weight norms taken at a check with lr 0 everywhere are not compared later: the run
    reports zero_lr at each check from step 4 on, and nothing more at steps 10 and 20."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    watcher = train(
        model, opt, steps=25, step_fn=_regression_step(model, opt, sched), log_dir=tmp_path
    )
    assert [(f.cause, f.step) for f in watcher.findings] == [(ZERO_LR, 4)]
    # One occurrence per check from step 4 to 24 (each (kind, parameter) is reported once and
    # counted after): an 'unchanged' at steps 10 and 20 would make it 23.
    assert watcher.occurrences == {(Kind.NO_UPDATE, "4.bias"): 21}


# ---------------------------------------------------------------- unchanged


class _Quiet(Sink):
    """A user's sink that keeps nothing: an output is open, so the weight norms are taken."""


@pytest.mark.parametrize("output", ["log_dir", "sink"])
def test_bf16_weights_with_an_update_too_small_to_record(
    tmp_path: pathlib.Path, output: str
) -> None:
    """SGD at lr 1e-6 on bfloat16 weights: each update is far below half a bf16 ulp of the
    weight, so it rounds away. The weight norms are taken at steps 0, 10, 20, 30 (RATIO_EVERY);
    step 0's are the first, taken before any update, so the first comparison is at step 10,
    ten updates later, and it is reported there."""
    model = mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    before = weights(model)
    options: dict[str, Any] = (
        {"log_dir": tmp_path} if output == "log_dir" else {"sinks": [_Quiet()]}
    )
    watcher = train(
        model, opt, steps=35, step_fn=_regression_step(model, opt, dtype=torch.bfloat16), **options
    )
    assert unchanged(before, model)
    assert [(f.kind, f.cause) for f in watcher.findings] == [(Kind.NO_UPDATE, UNCHANGED)]
    (found,) = watcher.findings
    assert found.step == 10
    assert found.value == 10.0  # optimizer steps with gradients since the step-0 weight norms
    assert found.threshold is None
    assert found.params == MLP_BY_ARRIVAL
    assert found.param == "4.bias"
    assert watcher.occurrences[(Kind.NO_UPDATE, "4.bias")] == 3  # steps 10, 20 and 30
    assert "bit-for-bit what they were 10 optimizer steps ago" in found.message
    assert "keep float32 master weights" in found.message


def test_unchanged_weights_need_an_open_output() -> None:
    """The weight norms are taken only for the update ratios of an output: without one the same
    run is not judged (the limit of the rule, pinned)."""
    model = mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    watcher = train(
        model, opt, steps=25, step_fn=_regression_step(model, opt, dtype=torch.bfloat16)
    )
    assert watcher.findings == []


def test_weights_restored_after_every_step(tmp_path: pathlib.Path) -> None:
    """Something puts the weights back after each step (here a reload of a snapshot): float32,
    a healthy lr, and the weights are bit-for-bit what they were at step 0."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    inner = _regression_step(model, opt)

    def step(i: int) -> None:
        inner(i)
        model.load_state_dict(snapshot)

    watcher = train(model, opt, steps=12, step_fn=step, log_dir=tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert [(f.kind, f.cause, f.step, f.value) for f in watcher.findings] == [
        (Kind.NO_UPDATE, UNCHANGED, 10, 10.0)
    ]


# ---------------------------------------------------------------- what the detector reads


class _Reads(Detector):
    """A plug-in keeping, per check, what ``no_update`` reads from the context."""

    name = "reads"
    kinds = MappingProxyType({})
    phase = Phase.STATISTICS
    seen: list[tuple[int, tuple[float, ...], int, list[float] | None]]

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        type(self).seen = []

    def check(self, ctx: CheckContext) -> list[Finding]:
        read = None if ctx.weight_norms is None else ctx.weight_norms.tolist()
        type(self).seen.append((ctx.step, ctx.learning_rates, ctx.updates, read))
        return []


def _monitored_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    before: Callable[[int], None] = lambda i: None,
    nan_at: frozenset[int] = frozenset(),
    **kwargs: Any,
) -> list[list[float]]:
    """``steps`` steps under a Monitor running the registered detectors, then :class:`_Reads`;
    ``before(i)`` runs before step ``i``. Returns the norms of the watched weights before each
    step, as torch takes them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    monitor = Monitor(
        named,
        [opt],
        accumulation_steps=1,
        options=DetectorOptions(),
        on_finding="record",
        detectors=(*REGISTRY, _Reads),
        **kwargs,
    )
    g = _data()
    norms = []
    for i in range(steps):
        before(i)
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (loss * math.nan if i in nan_at else loss).backward()
        norms.append([float(torch.linalg.vector_norm(p.detach())) for _, p in named])
        monitor.before_step(opt, (), {})
        opt.step()
        monitor.after_step(opt, (), {})
    monitor.close()
    return norms


def test_learning_rates_of_the_groups_holding_gradients() -> None:
    """Every group's lr while none is 0; once one is, only those of the groups holding a checked
    gradient (the frozen layer's group, with no gradient, is left out)."""
    model = mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(
        [
            {"params": list(model[0].parameters()), "lr": 0.05},
            {"params": list(model[2].parameters()), "lr": 0.1},
            {"params": list(model[4].parameters()), "lr": 0.2},
        ]
    )
    lrs = [(0.05, 0.1, 0.2), (0.05, 0.1, 0.0), (0.05, 0.0, 0.0), (0.0, 0.3, 0.0)]

    def before(i: int) -> None:
        for group, lr in zip(opt.param_groups, lrs[i], strict=True):
            group["lr"] = lr

    _monitored_steps(model, opt, len(lrs), before=before)
    assert [read[1] for read in _Reads.seen] == [
        (0.05, 0.1, 0.2),  # none is 0: every group's
        (0.1, 0.0),
        (0.0, 0.0),  # no_update's zero_lr: every group holding a gradient has lr 0
        (0.3, 0.0),
    ]


def test_updates_count_the_steps_taken_with_gradients() -> None:
    """``updates``: the steps before the check, less those ``on_nonfinite="skip"`` emptied; the
    weight norms come at every ``ratio_every``-th step while a sink is open, NaN steps too."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = _monitored_steps(
        model,
        opt,
        7,
        nan_at=frozenset({2, 3}),
        on_nonfinite="skip",
        sinks=[_Quiet()],
        ratio_every=3,
    )
    assert [(step, updates) for step, _, updates, _ in _Reads.seen] == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 2),  # step 2 was skipped: its NaN gradients were cleared
        (4, 2),
        (5, 3),
        (6, 4),
    ]
    taken = {step: read for step, _, _, read in _Reads.seen if read is not None}
    assert list(taken) == [0, 3, 6]
    for step, read in taken.items():
        assert read == pytest.approx(norms[step], rel=1e-6)
    assert taken[3] != taken[0]  # steps 0 and 1 moved them
    assert norms[4] == norms[3] == norms[2]  # the skipped steps 2 and 3 did not


# ---------------------------------------------------------------- state


def _setup() -> Setup:
    return Setup(DetectorOptions(), num_params=6, accumulation_steps=1)


def test_state_round_trips() -> None:
    detector = NoUpdateDetector(_setup())
    assert detector.state_dict() == {"streak": {}}
    detector.load_state_dict({"streak": {0: 3, 2: 0}})
    assert detector.state_dict() == {"streak": {0: 3, 2: 0}}
    again = NoUpdateDetector(_setup())
    again.load_state_dict(detector.state_dict())
    assert again.state_dict() == detector.state_dict()


def test_zero_lr_streak_survives_a_checkpoint() -> None:
    """Three zero-lr checks, a checkpoint, a resumed run: its second check is the fifth in a
    row, reported at step 4 as in one unbroken run."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    step = _regression_step(model, opt, sched)
    first = train(model, opt, steps=3, step_fn=step)
    state = first.state_dict()
    assert first.findings == []
    assert state["detectors"]["no_update"] == {"streak": {0: 3}}

    def resumed(state: dict[str, Any] | None) -> gradwatch.Watcher:
        with gradwatch.watch(model, opt, on_finding="record") as watcher:
            if state is not None:
                watcher.load_state_dict(state)
            for i in range(2):
                step(i)
        return watcher

    loaded = resumed(state)
    assert [(f.kind, f.cause, f.step, f.value) for f in loaded.findings] == [
        (Kind.NO_UPDATE, ZERO_LR, 4, 5.0)
    ]
    assert resumed(None).findings == []  # without the streak: two checks, silent


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({}, GradWatchValueError, r"^the state has no key 'streak'$"),
        (
            {"streak": {}, "weights": {}},
            GradWatchValueError,
            r"^the state has the unknown key 'weights'; it holds exactly the keys \['streak'\]$",
        ),
        (
            [3],
            GradWatchTypeError,
            r"^the state must be a dict with the keys \['streak'\], got list",
        ),
        (
            {"streak": [3]},
            GradWatchTypeError,
            r"^streak must be a dict keyed by optimizer group, got list",
        ),
        (
            {"streak": {"0": 3}},
            GradWatchTypeError,
            r"^streak key '0' must be an int in \[0, 2\*\*62\], got str",
        ),
        (
            {"streak": {-1: 3}},
            GradWatchValueError,
            r"^streak key -1 must be an int in \[0, 2\*\*62\], got -1$",
        ),
        (
            {"streak": {0: -2}},
            GradWatchValueError,
            r"^streak\[0\] must be an int in \[0, 2\*\*62\], got -2$",
        ),
        (
            {"streak": {0: 2.0}},
            GradWatchTypeError,
            r"^streak\[0\] must be an int in \[0, 2\*\*62\], got float 2\.0",
        ),
        (
            {"streak": {0: True}},
            GradWatchTypeError,
            r"^streak\[0\] must be an int in \[0, 2\*\*62\], got bool True",
        ),
        (
            {"streak": {1: 2**62 + 1}},
            GradWatchValueError,
            r"^streak\[1\] must be an int in \[0, 2\*\*62\], got 4611686018427387905$",
        ),
    ],
    ids=[
        "no-streak",
        "unknown-key",
        "a-list",
        "streak-a-list",
        "group-a-string",
        "group-negative",
        "count-negative",
        "count-a-float",
        "count-a-bool",
        "count-huge",
    ],
)
def test_a_bad_state_is_refused_naming_the_field(
    state: Any, error: type[Exception], match: str
) -> None:
    detector = NoUpdateDetector(_setup())
    detector.load_state_dict({"streak": {0: 4}})
    with pytest.raises(error, match=match):
        detector.load_state_dict(state)
    assert detector.state_dict() == {"streak": {0: 4}}  # left as it was
