"""torch.compile: a compiled model is watched like an eager one.

The default (inductor) backend needs a C++ compiler on CPU; without one these tests use the
``aot_eager`` backend, which goes through the same AOTAutograd backward.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Kind
from tests.helpers.models import mlp, regression_batch, sigmoid_stack

pytestmark = pytest.mark.slow

BACKEND = "inductor" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "aot_eager"

NO_ZERO_GRAD_AT = 4
NAN_AT = 8
EXPLODE_AT = 14
STEPS = 18


def _train(
    model: nn.Module, watched: nn.Module, forward: Any, *, plant: bool, steps: int = STEPS
) -> gradwatch.Watcher:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(watched, opt, on_finding="record") as watcher:
        for step in range(steps):
            x, y = regression_batch(generator=generator)
            if not (plant and step == NO_ZERO_GRAD_AT):
                opt.zero_grad()
            loss = nn.functional.mse_loss(forward(x), y)
            if plant and step == NAN_AT:
                loss = loss * torch.tensor(float("nan"))
            if plant and step == EXPLODE_AT:
                loss = loss * 1e7
            loss.backward()
            saved = [p.detach().clone() for p in model.parameters()]
            opt.step()
            if plant and step in (NAN_AT, EXPLODE_AT):  # those steps are only looked at
                with torch.no_grad():
                    for p, kept in zip(model.parameters(), saved, strict=True):
                        p.copy_(kept)
    return watcher


def _compiled(model: nn.Module) -> nn.Module:
    compiled: nn.Module = torch.compile(model, backend=BACKEND)  # type: ignore[assignment]
    return compiled


@pytest.mark.parametrize("watch", ["compiled", "original"])
def test_healthy_compiled_model_is_silent(watch: str) -> None:
    model = mlp()
    compiled = _compiled(model)
    watcher = _train(model, compiled if watch == "compiled" else model, compiled, plant=False)
    assert watcher.findings == []
    assert watcher.step == STEPS


@pytest.mark.parametrize("watch", ["compiled", "original"])
def test_planted_bugs_are_found_at_their_steps(watch: str) -> None:
    model = mlp()
    compiled = _compiled(model)
    watcher = _train(model, compiled if watch == "compiled" else model, compiled, plant=True)
    prefix = "_orig_mod." if watch == "compiled" else ""
    assert watcher.param_names == [prefix + n for n, _ in model.named_parameters()]
    found = {f.kind: f for f in watcher.findings}
    assert [(f.kind, f.step) for f in watcher.findings] == [
        (Kind.MISSING_ZERO_GRAD, NO_ZERO_GRAD_AT),
        (Kind.NAN, NAN_AT),
        (Kind.EXPLODING, EXPLODE_AT),
    ]
    assert set(found[Kind.NAN].params) == set(watcher.param_names)
    assert set(found[Kind.MISSING_ZERO_GRAD].params) == set(watcher.param_names)
    assert watcher.step == STEPS


@pytest.mark.xfail(
    strict=True,
    reason="under torch.compile every gradient arrives at once from one compiled backward node, "
    "in parameter order, so the arrival order gradwatch uses as depth is wrong: a NaN entering "
    "at the loss is attributed to the first layer (_orig_mod.0.weight) instead of the last",
)
def test_nan_is_localised_as_in_eager_mode() -> None:
    eager_model = mlp()
    eager = _train(eager_model, eager_model, eager_model, plant=True, steps=NAN_AT + 1)
    model = mlp()
    compiled = _compiled(model)
    watcher = _train(model, compiled, compiled, plant=True, steps=NAN_AT + 1)
    eager_nan = next(f for f in eager.findings if f.kind is Kind.NAN)
    nan = next(f for f in watcher.findings if f.kind is Kind.NAN)
    assert eager_nan.param == "4.bias"  # the layer nearest to the loss
    assert nan.params == tuple("_orig_mod." + name for name in eager_nan.params)


@pytest.mark.xfail(
    strict=True,
    reason="under torch.compile the depth order taken from gradient arrival is not the layers' "
    "depth, so the vanishing detector compares the wrong layers and a 12-layer sigmoid stack "
    "that eager mode reports as vanishing is silently passed",
)
def test_vanishing_is_found_in_a_compiled_sigmoid_stack() -> None:
    results = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = sigmoid_stack(depth=12)
        forward = _compiled(model) if compile_it else model
        watcher = _train(model, forward, forward, plant=False, steps=10)
        results.append([(f.kind, f.step, f.param) for f in watcher.findings])
    eager, compiled = results
    assert [(kind, step) for kind, step, _ in eager] == [(Kind.VANISHING, 4)]
    assert compiled == [(kind, step, "_orig_mod." + str(p)) for kind, step, p in eager]
