"""Tiny models and a training-loop runner shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradwatch


def mlp(width: int = 32, depth: int = 3, in_features: int = 8, out_features: int = 1) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def regression_batch(
    batch: int = 32, in_features: int = 8, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, in_features, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    return x, y


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int = 30,
    *,
    step_fn: Callable[[int], None] | None = None,
    **watch_options: object,
) -> gradwatch.Watcher:
    """Run a plain loop under ``gradwatch.watch(..., on_finding="record")`` and return the watcher.

    ``step_fn(i)`` does one whole training step (zero_grad, forward, backward, step); by default
    an MSE regression step on synthetic data.
    """
    generator = torch.Generator().manual_seed(0)

    def default_step(_: int) -> None:
        x, y = regression_batch(generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    options: dict[str, object] = {"on_finding": "record", **watch_options}
    with gradwatch.watch(model, optimizer, **options) as watcher:  # type: ignore[arg-type]
        for i in range(steps):
            (step_fn or default_step)(i)
    return watcher


MLP_BY_ARRIVAL = ("4.bias", "4.weight", "2.bias", "2.weight", "0.bias", "0.weight")
"""The parameters of ``mlp()`` in the order their gradients arrive (nearest the loss first)."""


def weights(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's parameters, to compare with later."""
    return [p.detach().clone() for p in model.parameters()]


def unchanged(before: list[torch.Tensor], model: nn.Module) -> bool:
    """Whether every parameter is bit for bit what it was (``torch.equal``: same dtype too)."""
    return all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def kinds(watcher: gradwatch.Watcher) -> list[str]:
    return [f.kind.value for f in watcher.findings]


def cnn_bn(channels: int = 4, classes: int = 3) -> nn.Module:
    """A two-block CNN with BatchNorm for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes),
    )


class TransformerRegressor(nn.Module):
    """A two-layer ``nn.TransformerEncoder`` over short sequences, mean-pooled to one output."""

    def __init__(self, in_features: int = 4, d_model: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class LSTMRegressor(nn.Module):
    def __init__(self, in_features: int = 4, hidden: int = 16) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def sequence_batch(
    batch: int = 16, length: int = 6, in_features: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, length, in_features, generator=generator)
    y = x.mean(dim=(1, 2)).unsqueeze(1)
    return x, y


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual blocks: deep, but gradients reach the first layer intact."""

    def __init__(self, in_features: int = 8, width: int = 16, blocks: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
            )
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class TiedLM(nn.Module):
    """A next-token model whose output projection is the embedding matrix."""

    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embedding(tokens)))
        return h @ self.embedding.weight.t()


class TwoHead(nn.Module):
    """A shared trunk with two heads; each forward pass uses one of them."""

    def __init__(self, in_features: int = 8, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.head_a = nn.Linear(width, 1)
        self.head_b = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
        h = self.trunk(x)
        return self.head_a(h) if head == "a" else self.head_b(h)


def sigmoid_stack(depth: int = 20, width: int = 16, in_features: int = 8) -> nn.Module:
    """``depth`` Linear+Sigmoid layers: the textbook vanishing-gradient network."""
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.Sigmoid()]
        features = width
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Module):
    """An encoder feeding a decoder; ``detach=True`` is the bug that cuts the encoder off."""

    def __init__(self, in_features: int = 8, width: int = 16, *, detach: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
        self.detach = detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if self.detach:
            h = h.detach()
        return self.decoder(h)


def dead_relu_mlp(in_features: int = 8, width: int = 16) -> nn.Module:
    """An MLP whose middle layer's ReLU never fires: its bias is hugely negative."""
    model = mlp(width=width, depth=3, in_features=in_features)
    middle = model[2]
    assert isinstance(middle, nn.Linear)
    with torch.no_grad():
        middle.bias.fill_(-1e4)
    return model


class GAN(nn.Module):
    """A tiny generator and discriminator in one module, as a GAN's training script holds them."""

    def __init__(self, noise: int = 4, features: int = 2, width: int = 16) -> None:
        super().__init__()
        self.generator = nn.Sequential(
            nn.Linear(noise, width), nn.ReLU(), nn.Linear(width, features)
        )
        self.discriminator = nn.Sequential(
            nn.Linear(features, width), nn.LeakyReLU(0.2), nn.Linear(width, 1)
        )
