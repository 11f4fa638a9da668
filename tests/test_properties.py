"""Property-based: random healthy MLPs stay silent; a NaN planted anywhere is found where it is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradwatch
from gradwatch import Kind

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _optimizer(name: str, params: Any, lr_scale: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05 * lr_scale)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.02 * lr_scale, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 * lr_scale)
    return torch.optim.AdamW(params, lr=1e-3 * lr_scale, weight_decay=0.01)


configs = st.fixed_dictionaries(
    {
        "depth": st.integers(1, 5),
        "width": st.integers(4, 32),
        "activation": st.sampled_from(sorted(ACTIVATIONS)),
        "optimizer": st.sampled_from(["sgd", "sgd_momentum", "adam", "adamw"]),
        "lr_scale": st.sampled_from([0.1, 0.5, 1.0]),
        "accumulation": st.integers(1, 3),
        "steps": st.integers(10, 20),
        "set_to_none": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)

PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _model(config: dict[str, Any], in_features: int = 6) -> nn.Module:
    torch.manual_seed(config["seed"])
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(config["depth"]):
        layers += [nn.Linear(features, config["width"]), ACTIVATIONS[config["activation"]]()]
        features = config["width"]
    layers.append(nn.Linear(features, 1))
    return nn.Sequential(*layers)


def _batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 6, generator=generator)
    return x, (x[:, :3].sum(dim=1, keepdim=True)).tanh()


def _train(
    config: dict[str, Any],
    plant: Callable[[nn.Module, int, str], None] | None = None,
    stop_after: int | None = None,
) -> gradwatch.Watcher:
    """``plant(model, step, "before" | "after")`` runs before the step's first backward pass and
    after its last one (before ``optimizer.step()``)."""
    model = _model(config)
    opt = _optimizer(config["optimizer"], model.parameters(), config["lr_scale"])
    generator = torch.Generator().manual_seed(config["seed"])
    k = config["accumulation"]
    with gradwatch.watch(model, opt, accumulation_steps=k, on_finding="record") as watcher:
        for step in range(config["steps"]):
            opt.zero_grad(set_to_none=config["set_to_none"])
            if plant is not None:
                plant(model, step, "before")
            for _ in range(k):
                x, y = _batch(generator)
                (nn.functional.mse_loss(model(x), y) / k).backward()
            if plant is not None:
                plant(model, step, "after")
            opt.step()
            if stop_after is not None and step == stop_after:
                break
    return watcher


@PROPERTY_SETTINGS
@given(config=configs)
def test_healthy_random_mlp_is_silent(config: dict[str, Any]) -> None:
    watcher = _train(config)
    assert watcher.findings == [], watcher.summary()
    assert watcher.step == config["steps"]


@PROPERTY_SETTINGS
@given(config=configs, data=st.data())
def test_planted_nan_is_found_at_its_step_naming_its_parameter(
    config: dict[str, Any], data: st.DataObject
) -> None:
    names = [name for name, _ in _model(config).named_parameters()]
    target = data.draw(st.sampled_from(names), label="parameter")
    at = data.draw(st.integers(0, config["steps"] - 1), label="step")
    how = data.draw(st.sampled_from(["write_grad", "tensor_hook"]), label="how")
    hooks: list[torch.utils.hooks.RemovableHandle] = []

    def plant(model: nn.Module, step: int, phase: str) -> None:
        if step != at:
            return
        param = dict(model.named_parameters())[target]
        index = data.draw(st.integers(0, param.numel() - 1), label="index")
        if how == "write_grad" and phase == "after":
            # into the accumulated .grad, after backward and before the step
            assert param.grad is not None
            param.grad.view(-1)[index] = float("nan")
        elif how == "tensor_hook" and phase == "before":
            # into the gradient each backward pass computes for that parameter
            def poison(grad: torch.Tensor) -> torch.Tensor:
                grad = grad.clone()
                grad.view(-1)[index] = float("nan")
                return grad

            hooks.append(param.register_hook(poison))

    watcher = _train(config, plant, stop_after=at)
    for handle in hooks:
        handle.remove()
    assert watcher.step == at + 1
    assert [(f.kind, f.step, f.param, f.params) for f in watcher.findings] == [
        (Kind.NAN, at, target, (target,))
    ], watcher.summary()
