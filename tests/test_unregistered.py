"""``unregistered_parameter`` (gradwatch/detectors/unregistered.py, gradwatch/_probe.py):
trainable tensors the model uses but does not own.

Bug programs first: each shows the bug bites (the optimizer built from ``model.parameters()``
leaves the tensors as they were, and ``state_dict()`` lacks them) and pins the finding. Then the
look-alikes that must stay silent, and the probe's contract: its hooks are gone after the first
forward passes, and on close.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import Finding, Kind
from gradwatch._probe import FORWARDS
from tests.helpers.lightning_fit import fit, loader
from tests.helpers.models import regression_batch, train


def _data() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _unregistered(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.kind is Kind.UNREGISTERED_PARAMETER]


def _global_module_hooks() -> int:
    module = torch.nn.modules.module
    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


class ListOfLayers(nn.Module):
    """Hidden layers kept in a plain Python list."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = [nn.Linear(16, 16) for _ in range(2)]
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.out(h)


def test_layers_kept_in_a_python_list() -> None:
    model = ListOfLayers()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for b in model.blocks for p in b.parameters()]
    watcher = train(model, opt, steps=5)
    after = [p.detach() for b in model.blocks for p in b.parameters()]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))  # never trained
    assert not any(key.startswith("blocks") for key in model.state_dict())  # never saved
    (found,) = watcher.findings
    assert (found.kind, found.step, found.param, found.value) == (
        Kind.UNREGISTERED_PARAMETER,
        0,
        "blocks[0].bias",
        4.0,
    )
    assert found.params == (
        "blocks[0].bias",
        "blocks[0].weight",
        "blocks[1].bias",
        "blocks[1].weight",
    )
    assert "Keep layers in nn.ModuleList or nn.ModuleDict" in found.message


class CreatedInForward(nn.Module):
    """A layer built inside ``forward`` (new weights every step), and a plain tensor attribute
    and a dict of layers that require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = {"a": nn.Linear(16, 1)}
        self.temperature = torch.ones(1, requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = nn.Linear(16, 16)(h)
        return self.heads["a"](h) / self.temperature


def test_modules_created_in_forward_a_dict_and_a_tensor_attribute() -> None:
    model = CreatedInForward()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = train(model, opt, steps=6)
    assert model.temperature.grad is not None and float(model.temperature) == 1.0
    (found,) = _unregistered(watcher.findings)  # once, though forward builds a new layer each time
    assert found.step == 0
    assert found.params == (
        "heads['a'].bias",
        "heads['a'].weight",
        "temperature",
        "<Linear in CreatedInForward.forward>.bias",
        "<Linear in CreatedInForward.forward>.weight",
    )


def test_lightning_module_holding_a_plain_list(tmp_path: pathlib.Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.lightning import GradWatchCallback

    class Regressor(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = ListOfLayers()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)  # not self(x): no LightningModule.forward

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    callback = GradWatchCallback(on_finding="record", log_dir=False)
    fit(pl, Regressor(), [callback], tmp_path, steps=4, data=loader(batches=4, seed=1))
    assert [(f.kind, f.step, f.param) for f in callback.findings] == [
        (Kind.UNREGISTERED_PARAMETER, 0, "net.blocks[0].bias")
    ]
    assert _global_module_hooks() == 0


# ---------------------------------------------------------------- look-alikes: silent


def test_frozen_teacher_and_ema_called_inside_forward() -> None:
    class Distilled(nn.Module):
        def __init__(self, teacher: nn.Module, ema: nn.Module) -> None:
            super().__init__()
            self.student = nn.Linear(8, 1)
            self._outside = {"teacher": teacher, "ema": ema}  # deliberately not submodules

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = self._outside["ema"](x)
            return self.student(x) + 0 * self._outside["teacher"](x) + 0 * target

    teacher = nn.Linear(8, 1).requires_grad_(False)
    ema = nn.Linear(8, 1)  # requires_grad left on, called under no_grad
    model = Distilled(teacher, ema)
    watcher = train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=4)
    assert watcher.findings == []


def test_functional_call_with_the_models_own_parameters() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            params = dict(self.inner.named_parameters())
            return torch.func.functional_call(self.inner, params, (x,))

    model = Wrapper()
    watcher = train(model, torch.optim.SGD(model.parameters(), lr=0.05), steps=4)
    assert watcher.findings == []


def test_tied_weights_parametrizations_and_adapters() -> None:
    class Adapter(nn.Module):
        def __init__(self, base: nn.Linear, rank: int = 2) -> None:
            super().__init__()
            self.base = base.requires_grad_(False)
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.up(self.down(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.mix = torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
            self.spectral = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
            self.adapter = Adapter(nn.Linear(8, 8))
            self.shared = nn.Linear(8, 8)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.embed(tokens)
            h = self.shared(torch.tanh(self.mix(h)))
            h = self.shared(self.adapter(self.spectral(h)))
            return h @ self.embed.weight.t()  # tied output layer

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = _data()

    def step(_: int) -> None:
        tokens = torch.randint(0, 20, (4, 6), generator=g)
        opt.zero_grad()
        logits = model(tokens)
        nn.functional.cross_entropy(logits.reshape(-1, 20), tokens.reshape(-1)).backward()
        opt.step()

    watcher = train(model, opt, steps=4, step_fn=step)
    assert watcher.findings == []


def test_inputs_that_require_grad_and_tensors_the_optimizer_holds() -> None:
    """Adversarial training differentiates with respect to its inputs; a prompt tensor kept
    outside the model but given to the optimizer is trained."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    prompt = torch.zeros(8, requires_grad=True)

    class Prompted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.prompt = prompt  # a plain attribute, but in the optimizer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x + self.prompt)

    wrapped = Prompted()
    opt = torch.optim.SGD([*wrapped.parameters(), prompt], lr=0.05)
    g = _data()

    def step(_: int) -> None:
        x, y = regression_batch(generator=g)
        x.requires_grad_(True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(wrapped(x), y)
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        (loss + 0.1 * grad.pow(2).sum()).backward()
        opt.step()

    watcher = train(wrapped, opt, steps=4, step_fn=step)
    assert watcher.findings == []
    assert float(prompt.abs().sum()) > 0  # trained


# ---------------------------------------------------------------- the probe's contract


def test_the_probe_looks_at_the_first_forwards_only_and_leaves_no_hook() -> None:
    model = ListOfLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = _data()
    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        assert _global_module_hooks() == 2
        with torch.no_grad():  # evaluation passes build no graph: not counted
            model(torch.randn(4, 8, generator=g))
        assert _global_module_hooks() == 2
        for _ in range(FORWARDS):
            x, y = regression_batch(generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert _global_module_hooks() == 0
        assert not model._forward_hooks and not model._forward_pre_hooks
    assert len(_unregistered(watcher.findings)) == 1


def test_close_before_any_forward_removes_the_hooks() -> None:
    model = ListOfLayers()
    watcher = gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert model._forward_hooks
    watcher.close()
    assert _global_module_hooks() == 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_ignoring_the_kind_installs_no_hook() -> None:
    model = ListOfLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt, ignore=["unregistered_parameter"]):
        assert _global_module_hooks() == 0
        assert not model._forward_hooks


def test_a_failure_in_the_probe_warns_once_and_training_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(outputs: object, limit: int = 0) -> list[torch.Tensor]:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("gradwatch._probe.graph_leaves", broken)
    model = ListOfLayers()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="unregistered_parameter check stopped"):
        watcher = train(model, opt, steps=3)
    assert watcher.step == 3
    assert _global_module_hooks() == 0
