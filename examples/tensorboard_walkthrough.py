"""A small run to look at in TensorBoard: gradient histograms, norms, the gradient-flow figure and
one finding.

An eight-layer tanh MLP learns a toy regression with Adam; every 10th step gradwatch writes a
histogram of every parameter's gradient, taken on the device. Step 60 forgets
``optimizer.zero_grad()``, so TensorBoard's Text tab shows a ``missing_zero_grad`` finding there.

    python examples/tensorboard_walkthrough.py [--log-dir DIR] [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch

FORGET_ZERO_GRAD_AT = 60


def model(depth: int = 8, width: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="runs/tensorboard-walkthrough")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(
        net, optimizer, log_dir=args.log_dir, histogram_every=10, on_finding="record"
    ) as watcher:
        for step in range(args.steps):
            x = torch.randn(128, 16, generator=generator)
            y = (x[:, :4].sum(dim=1, keepdim=True)).sin()
            if step != FORGET_ZERO_GRAD_AT:
                optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()

    print(watcher.summary())
    steps = list(range(0, args.steps, 10))
    print(
        f"histograms at steps {', '.join(map(str, steps))} for {len(watcher.param_names)} "
        f"parameters, written to {args.log_dir}"
    )
    print("look at them with:")
    print(f"  tensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
