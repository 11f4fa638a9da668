import torch

import gradwatch
from tests.helpers.models import kinds, mlp, train


def test_healthy_mlp_is_silent() -> None:
    model = mlp()
    watcher = train(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert watcher.findings == []
    assert watcher.step == 30


def test_public_api() -> None:
    assert {"watch", "Watcher", "Finding", "Kind", "GradientError", "GradWatchWarning"} <= set(
        gradwatch.__all__
    )


def test_missing_zero_grad_found_at_second_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(_: int) -> None:
        x = torch.randn(8, 8)
        model(x).pow(2).mean().backward()
        opt.step()

    watcher = train(model, opt, steps=5, step_fn=step)
    assert kinds(watcher) == ["missing_zero_grad"]
    assert watcher.findings[0].step == 1
