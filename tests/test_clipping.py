"""``clip_order`` (gradwatch/detectors/clipping.py) and the clip wrappers it reads
(gradwatch/_clipping.py): clipping that does not clip what the optimizer uses.

Bug programs first: each shows that the bug bites (the step moved the weights by more than the
clip allows, or the gradients the step used are not the clipped ones) and then pins the
finding's kind, cause, step, parameter and threshold. Then the wrappers' contract: torch left
exactly as found, results and errors of the originals unchanged, never a broken step. The
healthy look-alikes are in tests/test_healthy.py (section "clip_order").
"""

from __future__ import annotations

import gc
import math
import pathlib
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, GradientError, Kind, _clipping, _compat
from gradwatch._monitor import Monitor
from gradwatch._options import DetectorOptions
from gradwatch.detectors import Setup
from gradwatch.detectors.clipping import (
    AFTER_STEP,
    BEFORE_BACKWARD,
    BEFORE_UNSCALE,
    CALLS_IN_A_ROW,
    ClipOrderDetector,
)
from gradwatch.findings import GradWatchTypeError, GradWatchValueError
from tests.helpers.lightning_fit import fit, loader
from tests.helpers.models import (
    MLP_BY_ARRIVAL,
    EncoderDecoder,
    cnn_bn,
    mlp,
    regression_batch,
    train,
)

ENCODER_DECODER_BY_ARRIVAL = (
    "decoder.2.bias",
    "decoder.2.weight",
    "decoder.0.bias",
    "decoder.0.weight",
    "encoder.0.bias",
    "encoder.0.weight",
)


def _data() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _clip_order(watcher: Any) -> list[Finding]:
    return [f for f in watcher.findings if f.kind is Kind.CLIP_ORDER]


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads))


def _change_norm(before: list[torch.Tensor], model: nn.Module) -> float:
    return float(
        torch.nn.utils.get_total_norm(
            [p.detach() - b for b, p in zip(before, model.parameters(), strict=True)]
        )
    )


def _originals() -> dict[str, Any]:
    """Every attribute the wrappers replace, as torch has it now."""
    found: dict[str, Any] = {
        f"{module.__name__}.{name}": getattr(module, name)
        for module, name in _compat.clip_functions()
    }
    scaler = _compat.grad_scaler_class()
    assert scaler is not None
    found["GradScaler.unscale_"] = vars(scaler)["unscale_"]
    return found


@pytest.fixture(autouse=True)
def _torch_left_as_found() -> Iterator[None]:
    """Every test here ends with torch's clip functions and ``unscale_`` as it found them."""
    before = _originals()
    yield
    gc.collect()
    assert _originals() == before
    assert not _clipping.installed()


# ---------------------------------------------------------------- after_step


def test_clip_grad_norm_after_the_step_is_found_at_the_second_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    max_norm = 0.01
    g = _data()
    moved: list[tuple[float, float]] = []

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        moved.append((_change_norm(before, model), _grad_norm(model)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    watcher = train(model, opt, steps=4, step_fn=step)
    # The bug bites: every SGD step moved the weights by lr x the unclipped norm, far more than
    # the lr x max_norm a clip before the step allows.
    for change, norm in moved:
        assert change == pytest.approx(0.05 * norm, rel=1e-4)
        assert change > 10 * 0.05 * max_norm
    assert [(f.kind, f.cause) for f in watcher.findings] == [(Kind.CLIP_ORDER, AFTER_STEP)]
    (found,) = watcher.findings
    assert CALLS_IN_A_ROW == 2
    assert found.step == 1  # the step that used them unclipped, the second in a row
    assert (found.param, found.params) == ("4.bias", MLP_BY_ARRIVAL)
    assert (found.value, found.threshold) == (2.0, max_norm)
    assert watcher.occurrences[(Kind.CLIP_ORDER, "4.bias")] == 3  # steps 1, 2 and 3
    assert "clipped to 0.01 after optimizer.step() (at 2 steps in a row)" in found.message
    assert "after loss.backward() and before optimizer.step()" in found.message


def test_clip_grad_value_after_the_step_with_adam_on_a_cnn() -> None:
    model = cnn_bn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = _data()
    largest: list[float] = []

    def step(_: int) -> None:
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        (100 * nn.functional.cross_entropy(model(x), y)).backward()
        opt.step()
        largest.append(max(float(p.grad.abs().max()) for p in model.parameters()))
        torch.nn.utils.clip_grad_value_(model.parameters(), clip_value=1e-3)

    watcher = train(model, opt, steps=3, step_fn=step)
    assert min(largest) > 1e-3  # the steps used gradients far outside the clip value
    found = _clip_order(watcher)
    assert [(f.cause, f.step, f.threshold) for f in found] == [(AFTER_STEP, 1, 1e-3)]
    first = next(n for n, p in model.named_parameters() if p is list(model.parameters())[-1])
    assert found[0].param == first  # the classifier's bias: nearest the loss
    assert "clipped to 0.001 after optimizer.step()" in found[0].message


def test_one_clip_after_training_is_not_a_loop_that_clips_late() -> None:
    """A single call after the last step (to read the norm, say) is one misplaced call, not a
    loop: silent; the same call at two steps in a row is reported."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = train(model, opt, steps=5)
    assert watcher.findings == []
    with gradwatch.watch(model, opt, on_finding="record") as again:
        g = _data()
        for _ in range(3):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert again.findings == []


def test_a_well_placed_clip_restarts_the_count() -> None:
    """Late at step 0, right at step 1, late at steps 2 and 3: reported at step 3."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if i == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        if i != 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)

    watcher = train(model, opt, steps=4, step_fn=step)
    assert [(f.cause, f.step, f.value) for f in _clip_order(watcher)] == [(AFTER_STEP, 3, 2.0)]


# ---------------------------------------------------------------- before_backward


def test_clip_before_backward_with_adamw() -> None:
    model = EncoderDecoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    max_norm = 0.5
    g = _data()
    used: list[float] = []

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert float(total) == 0.0  # zero_grad left nothing to clip
        (10 * nn.functional.mse_loss(model(x), y)).backward()
        used.append(_grad_norm(model))
        opt.step()

    watcher = train(model, opt, steps=4, step_fn=step)
    assert min(used) > max_norm  # every step used this pass's gradients, unclipped
    found = _clip_order(watcher)
    # Step 0's clip had no gradient at all to look at; steps 1 and 2 are the two in a row.
    assert [(f.cause, f.step, f.value, f.threshold) for f in found] == [
        (BEFORE_BACKWARD, 2, 2.0, max_norm)
    ]
    assert (found[0].param, found[0].params) == (
        "decoder.2.bias",
        ENCODER_DECODER_BY_ARRIVAL,
    )
    assert "before loss.backward() computed them" in found[0].message


def test_clip_before_backward_without_zero_grad_in_between() -> None:
    """``zero_grad(set_to_none=False)`` at the end of the step: the clip at the start of the
    next one sees zeros, and the step uses the next backward pass's gradients unclipped."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        nn.functional.mse_loss(model(x), y).backward()
        assert _grad_norm(model) > 0.01
        opt.step()
        opt.zero_grad(set_to_none=False)

    watcher = train(model, opt, steps=4, step_fn=step)
    assert [(f.cause, f.step, f.param) for f in _clip_order(watcher)] == [
        (BEFORE_BACKWARD, 2, "4.bias")
    ]


# ---------------------------------------------------------------- before_unscale


def test_clip_before_the_grad_scaler_unscales() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    g = _data()
    stepped: list[float] = []

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)  # unscales, then steps
        scaler.update()
        stepped.append(_grad_norm(model))  # what the step used, unscaled in place

    watcher = train(model, opt, steps=4, step_fn=step)
    # The bug bites: the clip brought scale x g to norm 1, so the step used norm 1 / scale.
    assert scaler.get_scale() == 2.0**16
    for norm in stepped:
        assert norm == pytest.approx(2.0**-16, rel=1e-3)
    found = _clip_order(watcher)
    assert [(f.cause, f.step, f.value, f.threshold) for f in found] == [
        (BEFORE_UNSCALE, 1, 2.0, 1.0)
    ]
    assert (found[0].param, found[0].params) == ("4.bias", MLP_BY_ARRIVAL)
    assert "before the GradScaler unscaled them" in found[0].message
    assert "scaler.unscale_(optimizer) before clipping" in found[0].message


def test_clip_before_an_explicit_unscale_of_a_cnn_with_autocast() -> None:
    model = cnn_bn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    g = _data()

    def step(_: int) -> None:
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(nn.functional.cross_entropy(out.float(), y)).backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    watcher = train(model, opt, steps=3, step_fn=step)
    found = _clip_order(watcher)
    assert [(f.cause, f.step, f.threshold) for f in found] == [(BEFORE_UNSCALE, 1, 0.1)]


# ---------------------------------------------------------------- front ends


def test_lightning_manual_optimization_clipping_after_the_step(tmp_path: pathlib.Path) -> None:
    pl: ModuleType = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class LateClip(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.model = EncoderDecoder()

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            x, y = batch
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(self.model(x), y))
            opt.step()
            self.clip_gradients(opt, gradient_clip_val=0.01, gradient_clip_algorithm="norm")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    callback = GradWatchCallback(on_finding="record", log_dir=False)
    fit(pl, LateClip(), [callback], tmp_path, steps=4, data=loader(batches=4, seed=1))
    found = [f for f in callback.findings if f.kind is Kind.CLIP_ORDER]
    assert [(f.cause, f.step, f.threshold) for f in found] == [(AFTER_STEP, 1, 0.01)]
    assert found[0].param == "model.decoder.2.bias"


def test_raise_policy_raises_from_the_clip_call_after_it_clipped() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    with gradwatch.watch(model, opt, on_finding="raise") as watcher:
        for i in range(3):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if i < 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
                continue
            with pytest.raises(GradientError) as raised:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            break
    assert raised.value.finding.kind is Kind.CLIP_ORDER
    assert raised.value.finding.cause == AFTER_STEP
    assert _grad_norm(model) == pytest.approx(0.01, rel=1e-4)  # the clip itself ran
    assert watcher.step == 2


def test_ignore_clip_order_leaves_torch_unwrapped() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, on_finding="record", ignore=["clip_order"]):
        assert not _clipping.installed()
    with gradwatch.watch(model, opt, on_finding="record"):
        assert _clipping.installed()
    assert not _clipping.installed()


# ---------------------------------------------------------------- torch left as found


def test_wrappers_are_installed_while_watched_and_removed_on_close() -> None:
    before = _originals()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, opt, on_finding="record")
    during = _originals()
    assert all(during[name] is not before[name] for name in before)
    # One function in two namespaces keeps one identity: ``a is b`` comparisons hold.
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_.__name__ == "clip_grad_norm_"
    assert torch.nn.utils.clip_grad_norm_.__wrapped__ is before["torch.nn.utils.clip_grad_norm_"]
    watcher.close()
    after = _originals()
    assert all(after[name] is before[name] for name in before)


def test_two_watchers_share_the_wrappers_until_the_last_closes() -> None:
    before = _originals()
    a, b = mlp(), mlp()
    first = gradwatch.watch(a, torch.optim.SGD(a.parameters(), lr=0.05), on_finding="record")
    wrapped = _originals()
    second = gradwatch.watch(b, torch.optim.SGD(b.parameters(), lr=0.05), on_finding="record")
    assert _originals() == wrapped  # installed once
    first.close()
    assert _originals() == wrapped
    second.close()
    assert _originals() == before


class _Listener:
    def __init__(self) -> None:
        self.seen: list[tuple[int, float | None]] = []

    def clipping(self, tensors: list[torch.Tensor], threshold: float | None) -> None:
        self.seen.append((len(tensors), threshold))

    def unscaled(self, optimizer: torch.optim.Optimizer) -> None:
        pass


def test_a_listener_collected_without_removing_its_handle_releases_torch() -> None:
    listener = _Listener()
    handle = _clipping.listen(listener)
    model = mlp()
    nn.functional.mse_loss(*_forward(model)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert listener.seen == [(6, 1.0)]
    del listener
    gc.collect()
    assert not _clipping.installed()
    handle.remove()  # later removal of a collected listener's handle is harmless


def _forward(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = regression_batch(generator=_data())
    return model(x), y


def test_a_wrapper_installed_over_ours_is_left_in_place() -> None:
    """A tool that wraps clip_grad_norm_ while gradwatch watches keeps its wrapper after close
    (taking it away would break it); ours beneath it then only calls torch's."""
    original = torch.nn.utils.clip_grad_norm_
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls: list[float] = []
    with gradwatch.watch(model, opt, on_finding="record"):
        ours = torch.nn.utils.clip_grad_norm_

        def theirs(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(max_norm)
            return ours(parameters, max_norm, *args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = theirs
    try:
        assert torch.nn.utils.clip_grad_norm_ is theirs
        x, y = regression_batch(generator=_data())
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        assert calls == [0.01]
        assert _grad_norm(model) == pytest.approx(0.01, rel=1e-4)
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is original  # the other namespace
    finally:
        torch.nn.utils.clip_grad_norm_ = original


# ---------------------------------------------------------------- the originals' behaviour


@pytest.mark.parametrize("foreach", [None, False, True])
def test_results_are_those_of_the_original(foreach: bool | None) -> None:
    def clipped(watched: bool) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watcher = gradwatch.watch(model, opt, on_finding="record") if watched else None
        x, y = regression_batch(generator=_data())
        nn.functional.mse_loss(model(x), y).backward()
        total = torch.nn.utils.clip_grad_norm_(
            (p for p in model.parameters()), 0.1, norm_type=2.0, foreach=foreach
        )
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3, foreach=foreach)
        if watcher is not None:
            watcher.close()
        return float(total), [p.grad.clone() for p in model.parameters()]

    plain_total, plain = clipped(False)
    watched_total, watched = clipped(True)
    assert watched_total == plain_total
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))


def test_errors_are_those_of_the_original() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = regression_batch(generator=_data())
    (nn.functional.mse_loss(model(x), y) * float("inf")).backward()
    with pytest.raises(RuntimeError) as plain:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    with gradwatch.watch(model, opt, on_finding="record"):
        with pytest.raises(RuntimeError) as watched:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        with pytest.raises(TypeError):
            torch.nn.utils.clip_grad_norm_(model.parameters())  # max_norm missing
    assert str(watched.value) == str(plain.value)


def test_a_failure_inside_gradwatch_warns_once_and_the_clip_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Monitor, tensors: list[torch.Tensor], threshold: float | None) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(Monitor, "clipping", broken)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    with (
        gradwatch.watch(model, opt, on_finding="record") as watcher,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        for _ in range(3):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            assert _grad_norm(model) == pytest.approx(0.01, rel=1e-4)
            opt.step()
        assert not _clipping.installed()  # stepped aside: torch's own functions are back
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert messages == [
        "gradwatch: the clip_order check stopped after an internal error and no longer watches "
        "where gradients are clipped (ZeroDivisionError: planted); training goes on unchanged. "
        "Please report this with the traceback."
    ]
    assert watcher.step == 3  # the training loop ran on, checked


def test_infinite_max_norm_reads_the_norm_and_is_never_judged() -> None:
    """``clip_grad_norm_(params, inf)`` after the step is how some loops log the norm."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    norms: list[float] = []

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))

    watcher = train(model, opt, steps=4, step_fn=step)
    assert watcher.findings == []
    assert all(n > 0 for n in norms)


def test_clip_inside_a_compiled_function_only_calls_torch() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    params = list(model.parameters())

    @torch.compile(backend="aot_eager", fullgraph=True)
    def clip() -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, 0.01)

    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for _ in range(3):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            clip()  # late, but compiled: fullgraph=True proves no graph break on our wrapper
            assert _grad_norm(model) == pytest.approx(0.01, rel=1e-4)
    assert watcher.findings == []
    torch._dynamo.reset()


# ---------------------------------------------------------------- state


def _setup() -> Setup:
    return Setup(DetectorOptions(), num_params=6, accumulation_steps=1)


def test_state_round_trips() -> None:
    detector = ClipOrderDetector(_setup())
    assert detector.state_dict() == {"streak": []}
    detector.load_state_dict({"streak": [["clip", 0, 1], ["check", 5, 0]]})
    assert detector.state_dict() == {"streak": [["clip", 0, 1], ["check", 5, 0]]}
    again = ClipOrderDetector(_setup())
    again.load_state_dict(detector.state_dict())
    assert again.state_dict() == detector.state_dict()


def test_a_late_clip_streak_survives_a_checkpoint() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()

    def late(_: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)

    first = train(model, opt, steps=1, step_fn=late)
    assert first.findings == []
    state = first.state_dict()
    assert state["detectors"]["clip_order"] == {
        "streak": [["clip", 0, 1]]
    }  # first clipped: 0.weight

    def resumed(state: dict[str, Any] | None) -> gradwatch.Watcher:
        with gradwatch.watch(model, opt, on_finding="record") as watcher:
            if state is not None:
                watcher.load_state_dict(state)
            late(0)
        return watcher

    assert [(f.cause, f.value) for f in resumed(state).findings] == [(AFTER_STEP, 2.0)]
    assert resumed(None).findings == []


@pytest.mark.parametrize(
    ("state", "error", "match"),
    [
        ({}, GradWatchValueError, r"^the state has no key 'streak'$"),
        ({"streak": {}}, GradWatchTypeError, r"^streak must be a list, got dict \{\}$"),
        (
            {"streak": [["clip", 0]]},
            GradWatchValueError,
            r"^streak\[0\] must be a list of 3 items, got 2 items$",
        ),
        (
            {"streak": [["later", 0, 1]]},
            GradWatchValueError,
            r"^streak\[0\]\[0\] must be one of \['check', 'clip', 'unscale'\], got str 'later'$",
        ),
        (
            {"streak": [["clip", 6, 1]]},
            GradWatchValueError,
            r"^streak\[0\]\[1\] must be an int in \[0, 5\], got 6$",
        ),
        (
            {"streak": [["clip", 0, -1]]},
            GradWatchValueError,
            r"^streak\[0\]\[2\] must be an int in \[0, 2\*\*62\], got -1$",
        ),
        (
            {"streak": [["clip", 0, 1.0]]},
            GradWatchTypeError,
            r"^streak\[0\]\[2\] must be an int in \[0, 2\*\*62\], got float 1\.0$",
        ),
    ],
    ids=["no-streak", "a-dict", "short-row", "unknown-moment", "position-out", "negative", "float"],
)
def test_a_bad_state_is_refused_naming_the_field(
    state: Any, error: type[Exception], match: str
) -> None:
    detector = ClipOrderDetector(_setup())
    detector.load_state_dict({"streak": [["clip", 0, 1]]})
    with pytest.raises(error, match=match):
        detector.load_state_dict(state)
    assert detector.state_dict() == {"streak": [["clip", 0, 1]]}  # left as it was


def test_an_unscale_before_the_clip_restarts_the_count() -> None:
    """Clipped before the unscale at steps 0, 2 and 4, after it at steps 1, 3 and 5: never two
    in a row, silent; then two in a row (6 and 7), reported at 7."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = _data()

    def step(i: int) -> None:
        x, y = regression_batch(generator=g)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        early = i % 2 == 0 or i >= 6
        if early:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.unscale_(opt)
        if not early:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    assert train(model, opt, steps=6, step_fn=step).findings == []
    watcher = train(model, opt, steps=8, step_fn=step)
    assert [(f.cause, f.step, f.value) for f in watcher.findings] == [(BEFORE_UNSCALE, 7, 2.0)]
