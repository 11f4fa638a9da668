"""``step_not_taken`` (gradwatch/detectors/steps.py) and ``Watcher.mark_step()``.

Bug programs first: gradients keep arriving and no optimizer step uses them. Each shows that the
bug bites (the weights are bit-for-bit what they were, or nothing is checked) and then pins the
finding's kind, cause, step, parameter, value and threshold. The healthy look-alikes that must
stay silent are in tests/test_healthy.py (section "step_not_taken look-alikes").

When it is judged: the hook counts backward passes since the last step; a pass that begins while
more than the limit (``no_step_after * accumulation_steps``) of earlier passes had no step after
them is judged at its end, that pass not counted (a step may still follow it). So with a limit
of 3 the finding comes at the end of the fifth pass, with value 4 (the four passes before it
that no step followed): four passes then a step is silent.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, GradientError, GradWatchWarning, Kind
from gradwatch.detectors.steps import NO_OPTIMIZER, NO_STEP, OVERFLOW
from tests.helpers.lightning_fit import fit, loader
from tests.helpers.models import (
    GAN,
    MLP_BY_ARRIVAL,
    EncoderDecoder,
    cnn_bn,
    mlp,
    regression_batch,
    unchanged,
    weights,
)

LIMIT = 3
"""``no_step_after`` of these tests: small, so a run is a few passes."""
FIRST = LIMIT + 2
"""The pass (1-based) at whose end the finding is made: the first to begin while more than
``LIMIT`` earlier passes had no step after them."""
PASSES = LIMIT + 1
"""The finding's value: the passes before that one, which no step followed."""

MLP_FP16_BY_ARRIVAL = ("4.weight", "4.bias", "2.weight", "2.bias", "0.weight", "0.bias")
"""``MLP_BY_ARRIVAL`` under float16 autocast, where each weight's gradient comes through its
cast."""


def _data() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _fields(findings: list[Finding]) -> list[tuple[Any, ...]]:
    return [(f.kind, f.cause, f.step, f.param, f.value, f.threshold) for f in findings]


def _regression_pass(
    model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator
) -> Callable[[], None]:
    """One zero_grad + forward + backward, with no step."""

    def run() -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()

    return run


# ---------------------------------------------------------------- optimizer.step() forgotten


def test_forgotten_step_is_found_once_the_passes_exceed_the_limit() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    before = weights(model)
    seen: list[int] = []
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(30):
            backward()
            seen.append(len(watcher.findings))
    assert unchanged(before, model)  # the bug bites: thirty passes, not one weight moved
    assert watcher.step == 0
    # Made at the end of the fifth pass (the first that began with more than 3 before it).
    assert seen == [0] * (FIRST - 1) + [1] * (30 - FIRST + 1)
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 0, "4.bias", float(PASSES), float(LIMIT))
    ]
    (found,) = watcher.findings
    assert found.params == MLP_BY_ARRIVAL  # every parameter of the optimizer the passes reached
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "4.bias"): 1}  # once between two steps
    assert "4 backward passes reached '4.bias'" in found.message
    assert "(more than 3, that is no_step_after x accumulation_steps)" in found.message
    assert "Call optimizer.step()" in found.message


def test_a_step_restarts_the_count_and_it_can_be_reported_again() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    occurrences: list[int] = []
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(10):
            backward()
        before = weights(model)
        opt.step()  # the one step of the run: it uses the gradients of the tenth pass
        assert not unchanged(before, model)
        for _ in range(10):
            backward()
            occurrences.append(watcher.occurrences[(Kind.STEP_NOT_TAKEN, "4.bias")])
    assert watcher.step == 1
    assert occurrences == [1] * (FIRST - 1) + [2] * (10 - FIRST + 1)
    # Each (kind, parameter) is kept once: the second report is counted, not listed again.
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 0, "4.bias", float(PASSES), float(LIMIT))
    ]


@pytest.mark.parametrize(("passes", "found"), [(LIMIT + 1, False), (LIMIT + 2, True)])
def test_passes_per_step_at_the_limit(passes: int, found: bool) -> None:
    """``passes`` backward passes (each after a zero_grad) then a step, four times: the fourth
    of four passes has a step after it, so only three had none (silent); of five, four had none
    (reported in each window)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(4):
            for _ in range(passes):
                backward()
            opt.step()
    assert watcher.step == 4
    if not found:
        assert watcher.findings == []
        return
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 0, "4.bias", float(PASSES), float(LIMIT))
    ]
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "4.bias"): 4}


def test_cnn_with_adam_and_declared_accumulation() -> None:
    """Two passes are declared per step: the limit is ``no_step_after * 2``, and the finding
    comes at the end of the eighth pass."""
    model = cnn_bn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = _data()
    before = weights(model)
    seen: list[int] = []
    with gradwatch.watch(
        model, opt, on_finding="record", no_step_after=LIMIT, accumulation_steps=2
    ) as watcher:
        for _ in range(12):
            x = torch.randn(16, 1, 8, 8, generator=g)
            y = (x.mean(dim=(1, 2, 3)) > 0).long()
            nn.functional.cross_entropy(model(x), y).backward()  # accumulate ... and never step
            seen.append(len(watcher.findings))
    assert unchanged(before, model)
    assert seen == [0] * 7 + [1] * 5
    assert not opt.state  # Adam never took a step: no moments
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 0, "8.bias", 7.0, float(LIMIT * 2))
    ]
    assert set(watcher.findings[0].params) == {n for n, _ in model.named_parameters()}
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "8.bias"): 1}


def test_the_step_forgotten_after_a_few_steps_when_following_every_optimizer() -> None:
    """``watch(model)`` with no optimizer: the loop steps twice (gradwatch adopts the
    optimizer), then stops stepping. Labelled with the steps taken so far."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    backward = _regression_pass(model, opt, _data())
    with gradwatch.watch(model, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(2):
            backward()
            opt.step()
        before = weights(model)
        for _ in range(10):
            backward()
    assert unchanged(before, model)
    assert watcher.step == 2
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 2, "4.bias", float(PASSES), float(LIMIT))
    ]


def test_raise_stops_the_backward_pass_that_exceeds_the_limit() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    with gradwatch.watch(model, opt, on_finding="raise", no_step_after=LIMIT) as watcher:
        for _ in range(FIRST - 1):
            backward()
        with pytest.raises(GradientError, match=r"\[step_not_taken\] step 0: 4 backward") as info:
            backward()
        assert info.value.finding.kind is Kind.STEP_NOT_TAKEN
        # The pass itself has completed: its gradients are there.
        assert all(p.grad is not None for p in model.parameters())
        for _ in range(5):
            backward()  # judged once between steps: no second error
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "4.bias"): 1}


def test_warn_points_at_the_backward_line() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    with (
        pytest.warns(GradWatchWarning, match=r"\[step_not_taken\]") as warned,
        gradwatch.watch(model, opt, no_step_after=LIMIT),
    ):
        for _ in range(8):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()  # the line the warning names
    (warning,) = [w for w in warned if issubclass(w.category, GradWatchWarning)]
    assert warning.filename == __file__
    with open(__file__) as source:
        line = source.read().splitlines()[warning.lineno - 1]
    assert "the line the warning names" in line


# ---------------------------------------------------------------- GradScaler skipping every step


def test_grad_scaler_skipping_every_step_is_an_overflow() -> None:
    """float16 autocast on inputs of 1e6: the forward overflows float16, every gradient holds
    Inf/NaN, so ``scaler.step`` never calls ``optimizer.step()`` and halves the scale each time.
    No check runs (it runs at ``optimizer.step()``): ``nan``/``inf`` are not reported, only
    ``step_not_taken`` with cause ``"overflow"``."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    g = _data()
    before = weights(model)
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(10):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x * 1e6)
            assert not out.isfinite().all()
            scaler.scale(nn.functional.mse_loss(out.float(), y)).backward()
            scaler.step(opt)
            scaler.update()
    assert unchanged(before, model)
    assert scaler.get_scale() == 2.0**16 / 2**10  # halved at each of the ten skipped steps
    assert watcher.step == 0
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, OVERFLOW, 0, "4.weight", float(PASSES), float(LIMIT))
    ]
    (found,) = watcher.findings
    assert found.params == MLP_FP16_BY_ARRIVAL
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "4.weight"): 1}
    assert "their gradients hold Inf or NaN" in found.message
    assert "GradScaler skips every step" in found.message


# ---------------------------------------------------------------- weights updated by hand


def _hand_loop(
    watcher: gradwatch.Watcher,
    model: nn.Module,
    passes: int,
    *,
    mark: bool,
    zero_grad: bool = True,
    nan_at: int | None = None,
) -> list[bool]:
    """``p.add_(p.grad, alpha=-lr)`` with no optimizer; ``mark_step()`` before each update when
    ``mark``; what it returned (an update is skipped when it returned ``False``)."""
    g = _data()
    answers: list[bool] = []
    for i in range(passes):
        x, y = regression_batch(generator=g)
        if zero_grad:
            model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i == nan_at:
            loss = loss * float("nan")
        loss.backward()
        go = watcher.mark_step() if mark else True
        answers.append(go)
        if go:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-0.05)
    return answers


@pytest.mark.parametrize("zero_grad", [True, False], ids=["zero_grad", "zero_grad-forgotten"])
def test_hand_updates_without_mark_step_say_nothing_is_checked(zero_grad: bool) -> None:
    """No torch.optim optimizer ever steps: gradwatch checks nothing, and says so once. With
    ``zero_grad`` forgotten too, that bug goes unreported: nothing is checked."""
    model = mlp()
    before = weights(model)
    with gradwatch.watch(model, on_finding="record", no_step_after=LIMIT) as watcher:
        _hand_loop(watcher, model, 30, mark=False, zero_grad=zero_grad)
    assert not unchanged(before, model)  # the weights do train, by hand
    assert watcher.step == 0
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_OPTIMIZER, 0, None, float(PASSES), float(LIMIT))
    ]
    assert watcher.findings[0].params == ()
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, None): 1}
    assert "no torch.optim optimizer stepped" in watcher.findings[0].message
    assert "call watcher.mark_step()" in watcher.findings[0].message


def test_an_optimizer_never_stepped_with_watch_following_every_optimizer() -> None:
    """``watch(model)`` learns of an optimizer at its first step: one that never steps is not
    known, so the finding is the no-optimizer one."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    before = weights(model)
    with gradwatch.watch(model, on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(10):
            backward()
    assert unchanged(before, model)
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_OPTIMIZER, 0, None, float(PASSES), float(LIMIT))
    ]


def test_mark_step_checks_hand_updates() -> None:
    model = mlp()
    with gradwatch.watch(model, on_finding="record", no_step_after=LIMIT) as watcher:
        answers = _hand_loop(watcher, model, 12, mark=True)
    assert answers == [True] * 12
    assert watcher.step == 12
    assert watcher.findings == []


def test_mark_step_finds_a_forgotten_zero_grad_in_a_hand_loop() -> None:
    """The same hand loop without ``model.zero_grad()``: with ``mark_step()`` the stale gradient
    is found at the second step (without it, the test above shows nothing is)."""
    model = mlp()
    with gradwatch.watch(model, on_finding="record", no_step_after=LIMIT) as watcher:
        _hand_loop(watcher, model, 12, mark=True, zero_grad=False)
    assert watcher.step == 12
    assert [(f.kind, f.step, f.param) for f in watcher.findings] == [
        (Kind.MISSING_ZERO_GRAD, 1, "4.bias")
    ]
    assert watcher.findings[0].params == MLP_BY_ARRIVAL
    assert watcher.occurrences == {(Kind.MISSING_ZERO_GRAD, "4.bias"): 11}  # steps 1 to 11


def test_mark_step_returns_false_when_skip_cleared_the_gradients() -> None:
    model = mlp()
    with gradwatch.watch(
        model, on_finding="record", on_nonfinite="skip", no_step_after=LIMIT
    ) as watcher:
        answers = _hand_loop(watcher, model, 2, mark=True)
        before = weights(model)
        answers += _hand_loop(watcher, model, 1, mark=True, nan_at=0)
        assert all(p.grad is None for p in model.parameters())
    assert answers == [True, True, False]
    assert unchanged(before, model)  # the loop skipped the update, as told
    assert model[0].weight.isfinite().all()
    assert watcher.step == 3
    assert [(f.kind, f.step, f.param) for f in watcher.findings] == [
        (Kind.NAN, 2, "4.bias"),
        (Kind.SKIPPED_STEP, 2, None),
    ]


# ---------------------------------------------------------------- two optimizers


def test_gan_whose_generator_step_is_forgotten_names_only_the_generator() -> None:
    """The discriminator steps every iteration; the generator's ``opt_g.step()`` is missing. The
    generator is judged at the discriminator's steps: at its fifth (watcher step 5), four
    passes have reached the generator with no step of it after them, one per iteration;
    ``value`` counts those, not the discriminator's own passes."""
    gan = GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999))
    g = _data()
    bce = nn.functional.binary_cross_entropy_with_logits
    generator, discriminator = weights(gan.generator), weights(gan.discriminator)
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record", no_step_after=LIMIT) as watcher:
        for _ in range(8):
            real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
            fake = gan.generator(torch.randn(16, 4, generator=g))

            opt_d.zero_grad()
            d_real = gan.discriminator(real)
            d_fake = gan.discriminator(fake.detach())
            loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            loss_d.backward()
            opt_d.step()

            opt_g.zero_grad()
            d_fake = gan.discriminator(fake)
            bce(d_fake, torch.ones_like(d_fake)).backward()  # no opt_g.step()
    assert unchanged(generator, gan.generator)
    assert not unchanged(discriminator, gan.discriminator)
    assert watcher.step == 8
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 5, "generator.2.bias", float(PASSES), float(LIMIT))
    ]
    assert watcher.findings[0].params == (
        "generator.2.bias",
        "generator.2.weight",
        "generator.0.bias",
        "generator.0.weight",
    )
    assert watcher.occurrences == {(Kind.STEP_NOT_TAKEN, "generator.2.bias"): 1}


def _wgan(
    *, iterations: int, critic_steps: int, step_g: bool, step_d: bool, **options: Any
) -> tuple[gradwatch.Watcher, GAN, list[torch.Tensor]]:
    """A WGAN loop: ``critic_steps`` critic passes (the generator's output detached), then one
    generator pass, which also reaches the critic's parameters."""
    gan = GAN()
    opt_g = torch.optim.RMSprop(gan.generator.parameters(), lr=5e-4)
    opt_d = torch.optim.RMSprop(gan.discriminator.parameters(), lr=5e-4)
    g = _data()
    generator = weights(gan.generator)
    with gradwatch.watch(gan, [opt_g, opt_d], on_finding="record", **options) as watcher:
        for _ in range(iterations):
            for _ in range(critic_steps):
                real = torch.randn(16, 2, generator=g) * 0.5 + 2.0
                fake = gan.generator(torch.randn(16, 4, generator=g)).detach()
                opt_d.zero_grad()
                (gan.discriminator(fake).mean() - gan.discriminator(real).mean()).backward()
                if step_d:
                    opt_d.step()
            opt_g.zero_grad()
            (-gan.discriminator(gan.generator(torch.randn(16, 4, generator=g))).mean()).backward()
            if step_g:
                opt_g.step()
    return watcher, gan, generator


GENERATOR_BY_ARRIVAL = (
    "generator.2.bias",
    "generator.2.weight",
    "generator.0.bias",
    "generator.0.weight",
)


def test_wgan_whose_generator_step_is_forgotten() -> None:
    """Five critic steps per iteration, ``opt_g.step()`` missing: only the generator's own
    passes count, one per iteration, so the fourth (iteration 3) is the one over the limit,
    found at the critic's next step (its 21st: watcher step 21)."""
    watcher, gan, generator = _wgan(
        iterations=10, critic_steps=5, step_g=False, step_d=True, no_step_after=LIMIT
    )
    assert unchanged(generator, gan.generator)
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 21, "generator.2.bias", float(PASSES), float(LIMIT))
    ]
    assert watcher.findings[0].params == GENERATOR_BY_ARRIVAL


def test_wgan_generator_stepped_once_per_five_critic_steps_with_a_tight_limit() -> None:
    """The healthy loop of the test above, at a limit below the passes per iteration (6): the
    generator's passes, one per step of it, never pile up."""
    watcher, _, _ = _wgan(iterations=10, critic_steps=5, step_g=True, step_d=True, no_step_after=1)
    assert watcher.findings == []


def test_the_count_at_the_default_limit_is_of_the_optimizers_own_passes() -> None:
    """Default ``no_step_after`` (50), the generator never stepped, one generator pass per
    critic step: reported with 51 passes into the generator (102 passes in all)."""
    watcher, _, _ = _wgan(iterations=53, critic_steps=1, step_g=False, step_d=True)
    assert _fields(watcher.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 52, "generator.2.bias", 51.0, 50.0)
    ]


def test_two_optimizers_neither_stepped_are_both_reported() -> None:
    """Neither optimizer steps: the critic's passes exceed the limit first; the generator's, one
    in six, later, and it is judged again every ``LIMIT`` passes until then."""
    watcher, _, _ = _wgan(
        iterations=6, critic_steps=5, step_g=False, step_d=False, no_step_after=LIMIT
    )
    assert [(f.cause, f.step, f.param, f.value) for f in watcher.findings] == [
        (NO_STEP, 0, "discriminator.2.bias", float(PASSES)),
        (NO_STEP, 0, "generator.2.bias", float(PASSES)),
    ]


# ---------------------------------------------------------------- Lightning


def test_lightning_manual_optimization_without_opt_step(tmp_path: pathlib.Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class Forgetful(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = EncoderDecoder()

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.model(x), y))  # no opt.step()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    module = Forgetful()
    before = weights(module)
    callback = GradWatchCallback(on_finding="record", log_dir=False, no_step_after=LIMIT)
    # global_step counts steps: max_steps would never be reached, one epoch is the run
    trainer = fit(pl, module, [callback], tmp_path, steps=-1, data=loader(batches=8), max_epochs=1)
    assert unchanged(before, module)
    assert trainer.global_step == callback.step == 0
    assert _fields(callback.findings) == [
        (Kind.STEP_NOT_TAKEN, NO_STEP, 0, "model.decoder.2.bias", float(PASSES), float(LIMIT))
    ]
    assert set(callback.findings[0].params) == {n for n, _ in module.named_parameters()}
    assert callback.occurrences == {(Kind.STEP_NOT_TAKEN, "model.decoder.2.bias"): 1}


# ---------------------------------------------------------------- state


def test_a_step_not_taken_finding_survives_a_state_round_trip() -> None:
    """The detector keeps no state of its own; the finding (with its cause) is saved with the
    others and comes back as it was. The resumed run steps: nothing more is found."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    backward = _regression_pass(model, opt, _data())
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as first:
        for _ in range(8):
            backward()
        state = first.state_dict()
    assert state["detectors"]["steps"] == {}
    with gradwatch.watch(model, opt, on_finding="record", no_step_after=LIMIT) as resumed:
        resumed.load_state_dict(state)
        assert resumed.findings == first.findings
        assert resumed.findings[0].cause == NO_STEP
        for _ in range(10):
            backward()
            opt.step()
    assert resumed.step == 10
    assert resumed.findings == first.findings
    assert resumed.occurrences == {(Kind.STEP_NOT_TAKEN, "4.bias"): 1}


@pytest.mark.parametrize("generator_first", [True, False])
def test_a_resumed_gan_counts_passes_from_the_checkpoint(generator_first: bool) -> None:
    """A checkpoint carries the count of backward passes; every optimizer's count of passes
    with no step starts again from it, so the healthy run resumed is silent, and a step
    forgotten after resuming is still found at the limit."""
    gan = GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3)
    g = _data()
    bce = nn.functional.binary_cross_entropy_with_logits

    def iteration(step_g: bool = True) -> None:
        fake = gan.generator(torch.randn(16, 4, generator=g))

        def generator() -> None:
            opt_g.zero_grad()
            out = gan.discriminator(fake)
            bce(out, torch.ones_like(out)).backward()
            if step_g:
                opt_g.step()

        def discriminator() -> None:
            opt_d.zero_grad()
            real = gan.discriminator(torch.randn(16, 2, generator=g) + 2.0)
            out = gan.discriminator(fake.detach())
            (bce(real, torch.ones_like(real)) + bce(out, torch.zeros_like(out))).backward()
            opt_d.step()

        for part in (generator, discriminator) if generator_first else (discriminator, generator):
            part()

    options: dict[str, Any] = {"on_finding": "record", "no_step_after": LIMIT}
    with gradwatch.watch(gan, [opt_g, opt_d], **options) as first:
        for _ in range(10):
            iteration()
        state = first.state_dict()
    assert state["tracker"]["backward_passes"] == 20
    with gradwatch.watch(gan, [opt_g, opt_d], **options) as resumed:
        resumed.load_state_dict(state)
        for _ in range(10):
            iteration()
        assert resumed.findings == []
        for _ in range(6):
            iteration(step_g=False)
    assert [(f.param, f.value) for f in resumed.findings] == [("generator.2.bias", PASSES)]
