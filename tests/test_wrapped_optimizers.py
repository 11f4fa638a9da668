"""Optimizers wrapped by accelerate, Lightning Fabric and Lightning: unwrapped by ``watch()``, and
the recipes of both frameworks on CPU in one process, compared with the same loop in plain PyTorch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._wrapped import MAX_DEPTH, unwrap_model, unwrap_optimizer
from gradwatch.findings import GradWatchTypeError
from tests.helpers.models import mlp, regression_batch

NAN_STEP = 3
PARAM_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]

Triple = tuple[str, int, str | None]


def sgd(model: nn.Module | None = None) -> torch.optim.SGD:
    return torch.optim.SGD((model or nn.Linear(2, 1)).parameters(), lr=0.05)


def found(watcher: gradwatch.Watcher) -> list[Triple]:
    return [(f.kind.value, f.step, f.param) for f in watcher.findings]


def fake_wrapper(module: str, name: str, attribute: str) -> type:
    """A class that looks like a framework's wrapper by its module and name, nothing else."""
    cls = type(name, (), {"__init__": lambda self, inner: setattr(self, attribute, inner)})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


FakeAccelerated = fake_wrapper("accelerate.optimizer", "AcceleratedOptimizer", "optimizer")


class StepOnly:
    """Duck-types an optimizer: a ``step`` method and ``param_groups``, no torch base class."""

    def __init__(self, model: nn.Module) -> None:
        self.param_groups = [{"params": list(model.parameters())}]

    def step(self) -> None:
        pass


class UnknownShim(torch.optim.Optimizer):
    """An optimizer subclass that forwards to another without running ``Optimizer.__init__``."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------- unwrap_optimizer


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.LBFGS])
def test_an_optimizer_is_returned_as_is(cls: Callable[..., torch.optim.Optimizer]) -> None:
    optimizer = cls(nn.Linear(2, 1).parameters(), lr=0.1)
    assert unwrap_optimizer(optimizer) is optimizer


def test_accelerate_wrapper_is_followed(accelerator_factory: Callable[..., Any]) -> None:
    optimizer = sgd()
    wrapped = accelerator_factory().prepare(optimizer)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    assert isinstance(wrapped, torch.optim.Optimizer)  # why an isinstance check is not enough
    assert unwrap_optimizer(wrapped) is optimizer


def test_fabric_wrapper_is_followed(fabric: Any) -> None:
    optimizer = sgd()
    wrapped = fabric.setup_optimizers(optimizer)
    assert type(wrapped).__name__ == "FabricSGD"
    assert isinstance(wrapped, torch.optim.SGD)
    assert unwrap_optimizer(wrapped) is optimizer


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_lightning_wrapper_is_followed(namespace: str) -> None:
    core = pytest.importorskip(f"{namespace}.core.optimizer")
    optimizer = sgd()
    wrapped = core.LightningOptimizer(optimizer)
    assert isinstance(wrapped, torch.optim.SGD)
    assert unwrap_optimizer(wrapped) is optimizer


def test_nested_wrappers_are_followed(fabric: Any, accelerator_factory: Callable[..., Any]) -> None:
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    from accelerate.optimizer import AcceleratedOptimizer

    optimizer = sgd()
    accelerator_factory()
    twice = AcceleratedOptimizer(AcceleratedOptimizer(optimizer), device_placement=False)
    assert unwrap_optimizer(twice) is optimizer
    # LightningOptimizer over Fabric's: its run-time class derives from both wrappers.
    lightning_over_fabric = core.LightningOptimizer(fabric.setup_optimizers(optimizer))
    assert unwrap_optimizer(lightning_over_fabric) is optimizer


def test_wrappers_are_told_by_class_not_by_import() -> None:
    optimizer = sgd()
    assert unwrap_optimizer(FakeAccelerated(FakeAccelerated(optimizer))) is optimizer
    fabric_style = fake_wrapper("lightning_fabric.wrappers", "_FabricOptimizer", "optimizer")
    assert unwrap_optimizer(fabric_style(optimizer)) is optimizer
    # The same name from another module is not a wrapper.
    lookalike = fake_wrapper("mypackage.optim", "AcceleratedOptimizer", "optimizer")
    with pytest.raises(GradWatchTypeError, match=r"got AcceleratedOptimizer <"):
        unwrap_optimizer(lookalike(optimizer))


def test_a_duck_typed_optimizer_is_refused() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(
        GradWatchTypeError,
        match=(
            r"^watch\(\): optimizer must be a torch\.optim\.Optimizer, got StepOnly <.*>; "
            r"accelerate's AcceleratedOptimizer, Lightning Fabric's optimizer "
            r"\(from fabric\.setup\) and Lightning's LightningOptimizer are unwrapped to the "
            r"optimizer they hold, other "
            r"wrappers are not: pass the torch\.optim\.Optimizer itself$"
        ),
    ):
        unwrap_optimizer(StepOnly(model))


def test_the_message_names_the_entry_point_and_argument() -> None:
    with pytest.raises(
        GradWatchTypeError, match=r"^GradWatchCallback\(\): optimizer\[1\] must be a "
    ):
        unwrap_optimizer(None, argument="optimizer[1]", entry="GradWatchCallback()")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FakeAccelerated("adam"), r"got AcceleratedOptimizer wrapping str 'adam'; "),
        (lambda: FakeAccelerated(None), r"got AcceleratedOptimizer whose \.optimizer is not set; "),
        (
            lambda: UnknownShim(sgd()),
            r"got UnknownShim, an Optimizer subclass that never ran Optimizer\.__init__ ",
        ),
        (
            lambda: FakeAccelerated(UnknownShim(sgd())),
            r"got AcceleratedOptimizer wrapping UnknownShim, an Optimizer subclass that never",
        ),
    ],
    ids=["wraps-a-str", "wraps-nothing", "unknown-shim", "wraps-unknown-shim"],
)
def test_what_a_wrapper_holds_is_checked(make: Callable[[], object], match: str) -> None:
    with pytest.raises(GradWatchTypeError, match=match):
        unwrap_optimizer(make())


def test_nesting_is_bounded() -> None:
    deep: object = sgd()
    for _ in range(MAX_DEPTH):
        deep = FakeAccelerated(deep)
    assert isinstance(unwrap_optimizer(deep), torch.optim.SGD)
    with pytest.raises(GradWatchTypeError, match=rf"nested more than {MAX_DEPTH} deep"):
        unwrap_optimizer(FakeAccelerated(deep))
    cycle = FakeAccelerated(None)
    cycle.optimizer = cycle
    with pytest.raises(GradWatchTypeError, match=r"nested more than"):
        unwrap_optimizer(cycle)


def test_watch_refuses_what_is_no_optimizer() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(GradWatchTypeError, match=r"^watch\(\): optimizer must be .* StepOnly"):
        gradwatch.watch(model, StepOnly(model))  # type: ignore[arg-type]
    with pytest.raises(GradWatchTypeError, match=r"got UnknownShim"):
        gradwatch.watch(model, [sgd(model), UnknownShim(sgd(model))])
    with gradwatch.watch(model, sgd(model)):  # nothing was left open by the refusals
        pass


def test_an_optimizer_given_wrapped_and_bare_is_listed_twice(
    accelerator_factory: Callable[..., Any],
) -> None:
    model = nn.Linear(2, 1)
    optimizer = sgd(model)
    wrapped = accelerator_factory().prepare(optimizer)
    with pytest.raises(gradwatch.GradWatchError, match=r"same SGD at positions 0 and 1"):
        gradwatch.watch(model, [wrapped, optimizer])


def test_unwrapping_imports_no_framework(
    monkeypatch: pytest.MonkeyPatch, fabric: Any, accelerator_factory: Callable[..., Any]
) -> None:
    optimizer = sgd()
    wrapped = [accelerator_factory().prepare(optimizer), fabric.setup_optimizers(optimizer)]
    model = mlp(width=16)
    fabric_model = fabric.setup_module(model)
    for name in ("accelerate", "lightning", "lightning.fabric", "lightning_fabric"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    assert [unwrap_optimizer(item) for item in wrapped] == [optimizer, optimizer]
    assert unwrap_model(fabric_model) is model


# ---------------------------------------------------------------------------- unwrap_model


def test_unwrap_model_gives_the_module_fabric_was_given(fabric: Any) -> None:
    model = mlp(width=16)
    wrapped = fabric.setup_module(model)
    assert [n for n, _ in wrapped.named_parameters()] == [
        f"_forward_module.{name}" for name in PARAM_NAMES
    ]
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model
    assert wrapped.module is model  # what the recipe passes to watch()


# ---------------------------------------------------------------------------- recipes


def run_loop(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], None],
    optimizer: Any,
    *,
    bug: str | None,
    steps: int,
) -> list[Triple]:
    """``steps`` optimizer steps of an MSE regression under ``watch(model, optimizer)``.

    ``bug``: ``"missing_zero_grad"`` never resets the gradients, ``"nan"`` adds a NaN term on
    ``0.bias`` at step :data:`NAN_STEP` (the last), ``None`` is the healthy loop.
    """
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        for step in range(steps):
            x, y = regression_batch(generator=generator)
            if bug != "missing_zero_grad":
                optimizer.zero_grad()
            loss = nn.functional.mse_loss(forward(x).float(), y)
            if bug == "nan" and step == NAN_STEP:
                first = getattr(model, "module", model).get_submodule("0")
                assert isinstance(first, nn.Linear)
                loss = loss + (first.bias * float("nan")).sum()
            backward(loss)
            optimizer.step()
    assert watcher.step == steps
    return found(watcher)


BUGS: dict[str | None, tuple[int, list[tuple[str, int]]]] = {
    "missing_zero_grad": (3, [("missing_zero_grad", 1)]),
    "nan": (NAN_STEP + 1, [("nan", NAN_STEP)]),
    None: (8, []),
}


def plain_reference(bug: str | None, *, bf16: bool = False) -> list[Triple]:
    """What the same loop finds in plain PyTorch (under CPU bf16 autocast for ``bf16``, which
    changes the order in which gradients arrive, and so the parameter named first)."""
    model = mlp(width=16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(x)

    return run_loop(model, forward, _plain_backward, sgd(model), bug=bug, steps=BUGS[bug][0])


@pytest.mark.parametrize("bug", list(BUGS), ids=str)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_plain_reference(bug: str | None, bf16: bool) -> None:
    findings = plain_reference(bug, bf16=bf16)
    assert [(kind, step) for kind, step, _ in findings] == BUGS[bug][1]
    assert all(param in PARAM_NAMES for _, _, param in findings)
    if bug == "nan":
        assert findings[0][2] == "0.bias"  # the only gradient that is NaN
    if bug == "missing_zero_grad" and not bf16:
        assert findings[0][2] == "4.bias"  # the first gradient backward produces


@pytest.mark.parametrize("watched", ["wrapper", "module"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("bug", list(BUGS), ids=str)
def test_fabric_recipe(bug: str | None, precision: str, watched: str) -> None:
    """``watch()`` of what ``fabric.setup`` returns watches the module it holds: the same
    findings, named as the original module names its parameters."""
    fabric_module = pytest.importorskip("lightning.fabric")
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1, precision=precision)
    model = mlp(width=16)
    fabric_model, optimizer = fabric.setup(model, sgd(model))
    target = fabric_model if watched == "wrapper" else fabric_model.module
    findings = run_loop(
        target, fabric_model, fabric.backward, optimizer, bug=bug, steps=BUGS[bug][0]
    )
    assert findings == plain_reference(bug, bf16=precision == "bf16-mixed")


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("bug", list(BUGS), ids=str)
def test_accelerate_recipe(
    bug: str | None, precision: str, accelerator_factory: Callable[..., Any]
) -> None:
    accelerator = accelerator_factory(mixed_precision=precision)
    model = mlp(width=16)
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    assert prepared is model  # one process: prepare() returns the model itself
    findings = run_loop(
        model, prepared, accelerator.backward, optimizer, bug=bug, steps=BUGS[bug][0]
    )
    assert findings == plain_reference(bug, bf16=precision == "bf16")


def test_accelerate_without_optimizer_argument(accelerator_factory: Callable[..., Any]) -> None:
    """``watch(model)`` follows torch's global step hooks, which fire on the wrapped optimizer."""
    accelerator = accelerator_factory()
    model = mlp(width=16)
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, on_finding="record") as watcher:
        for _ in range(3):
            x, y = regression_batch(generator=generator)
            accelerator.backward(nn.functional.mse_loss(prepared(x), y))
            optimizer.step()
    assert found(watcher) == plain_reference("missing_zero_grad")


@pytest.mark.parametrize(("declared", "expected"), [(2, []), (1, [("unexpected_accumulation", 0)])])
def test_accelerate_gradient_accumulation(
    declared: int, expected: list[tuple[str, int]], accelerator_factory: Callable[..., Any]
) -> None:
    accelerator = accelerator_factory(gradient_accumulation_steps=2)
    model = mlp(width=16)
    prepared, optimizer = accelerator.prepare(model, sgd(model))
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, optimizer, accumulation_steps=declared, on_finding="record") as w:
        for _ in range(8):
            with accelerator.accumulate(prepared):
                x, y = regression_batch(generator=generator)
                accelerator.backward(nn.functional.mse_loss(prepared(x), y))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
                optimizer.step()  # steps the SGD inside only when gradients are synchronised
                optimizer.zero_grad()
    # Eight batches, two per optimizer step: four steps, each with two backward passes.
    assert w.step == 4
    assert [(kind, step) for kind, step, _ in found(w)] == expected


@pytest.mark.parametrize("framework", ["fabric", "accelerate"])
def test_close_removes_every_hook(
    framework: str, fabric: Any, accelerator_factory: Callable[..., Any]
) -> None:
    model = mlp(width=16)
    inner = sgd(model)
    if framework == "fabric":
        _, optimizer = fabric.setup(model, inner)
    else:
        _, optimizer = accelerator_factory().prepare(model, inner)
    watcher = gradwatch.watch(model, optimizer)
    assert inner._optimizer_step_pre_hooks and inner._optimizer_step_post_hooks
    assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    watcher.close()
    assert not inner._optimizer_step_pre_hooks
    assert not inner._optimizer_step_post_hooks
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    # Nothing was written onto the wrapper either.
    assert "_optimizer_step_pre_hooks" not in vars(optimizer)


# ---------------------------------------------------------------------------- fixtures


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


@pytest.fixture
def fabric() -> Any:
    fabric_module = pytest.importorskip("lightning.fabric")
    return fabric_module.Fabric(accelerator="cpu", devices=1)


@pytest.fixture
def accelerator_factory() -> Iterator[Callable[..., Any]]:
    """``Accelerator(cpu=True, **options)``; accelerate's process-wide state is reset afterwards,
    as its own test base class does, so each test may configure it anew."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    def make(**options: Any) -> Any:
        return accelerate.Accelerator(cpu=True, **options)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
