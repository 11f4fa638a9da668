"""The classic first PyTorch program, watched by gradwatch: fit y = 2x with nn.Linear(1, 1).

Run once correctly (gradwatch is silent), then once with ``optimizer.zero_grad()`` left out of the
loop: gradwatch names the forgotten ``zero_grad`` at the second step.

    python examples/first_model.py
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import gradwatch


def train(forget_zero_grad: bool, iterations: int = 5) -> gradwatch.Watcher:
    torch.manual_seed(0)
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[2.0], [4.0], [6.0]])
    model = nn.Linear(1, 1)
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    with gradwatch.watch(model, optimizer) as watcher:
        for i in range(iterations):
            if not forget_zero_grad:
                optimizer.zero_grad()  # the fix: reset gradients before every backward()
            loss = loss_fn(model(x), y)
            loss.backward()
            grads = ", ".join(
                f"{n}.grad={p.grad.flatten().tolist()}" for n, p in model.named_parameters()
            )
            print(f"  iteration {i}: loss before update {loss.item():.4f}; {grads}")
            optimizer.step()
            print(f"  iteration {i}: loss after update  {loss_fn(model(x), y).item():.4f}")
    return watcher


def main() -> None:
    print("With optimizer.zero_grad():")
    print(train(forget_zero_grad=False).summary())
    print("\nWithout optimizer.zero_grad():")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gradwatch.GradWatchWarning)
        watcher = train(forget_zero_grad=True)
    for warning in caught:
        print(f"  warning: {warning.message}")
    print(watcher.summary())


if __name__ == "__main__":
    main()
