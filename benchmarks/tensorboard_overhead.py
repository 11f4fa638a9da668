"""What gradwatch's TensorBoard output costs per training step, against an unwatched baseline.

Three models (an MLP, a small CNN, a small transformer), each trained by five identical copies in
one process: unwatched; watched with ``log_dir`` and histograms off (detection, norms, update
ratios and findings only); every 100 steps (the default); every step; and, for reference, the
unwatched loop plus ``SummaryWriter.add_histogram`` of every gradient every step (what gradwatch
avoids: a whole-gradient copy to the host). Rounds of
``--steps`` steps run interleaved, in a rotating order, so that drift of the machine hits every
variant alike; the table gives the median time per step over the rounds and its ratio to the
baseline. CPU time (all threads of the process, the event writer's included) is shown beside
wall time: on a machine shared with other work it is the steadier of the two.

    .venv/bin/python benchmarks/tensorboard_overhead.py            # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/tensorboard_overhead.py --rounds 3 # quicker, noisier
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


class Transformer(nn.Module):
    def __init__(self, vocab: int = 256, d_model: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(tokens)))
        return out


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _classes(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


WORKLOADS = [
    Workload(
        "MLP 256-512-512-10, batch 64",
        mlp,
        lambda g: (torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)),
        _classes,
    ),
    Workload(
        "CNN 2 conv+BN, 32x32x3, batch 32",
        cnn,
        lambda g: (
            torch.randn(32, 3, 32, 32, generator=g),
            torch.randint(0, 10, (32,), generator=g),
        ),
        _classes,
    ),
    Workload(
        "Transformer 2 layers d=64, seq 32, batch 16",
        Transformer,
        lambda g: (
            torch.randint(0, 256, (16, 32), generator=g),
            torch.randint(0, 256, (16, 32), generator=g),
        ),
        _classes,
    ),
]


@dataclass
class Variant:
    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_backward: Callable[[int], None] = lambda step: None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    step: int = 0


def _variants(workload: Workload, log_root: str) -> tuple[list[Variant], list[Callable[[], None]]]:
    torch.manual_seed(0)
    base = workload.build()
    variants: list[Variant] = []
    closers: list[Callable[[], None]] = []

    def fresh(label: str) -> Variant:
        model = copy.deepcopy(base)
        variant = Variant(label, model, torch.optim.Adam(model.parameters(), lr=1e-3))
        variants.append(variant)
        return variant

    fresh("unwatched")
    for every in (0, 100, 1):
        label = f"histograms every {every}" if every else "histograms off"
        variant = fresh(f"gradwatch + log_dir, {label}")
        watcher = gradwatch.watch(
            variant.model,
            variant.optimizer,
            log_dir=f"{log_root}/{workload.name[:3]}-{every}",
            histogram_every=every,
            on_finding="record",
        )
        closers.append(watcher.close)

    reference = fresh("reference: add_histogram every step")
    writer = SummaryWriter(f"{log_root}/{workload.name[:3]}-add_histogram")
    named = list(reference.model.named_parameters())

    def add_histograms(step: int) -> None:
        for name, p in named:
            if p.grad is not None:
                writer.add_histogram(f"grad/{name}", p.grad, step)

    reference.after_backward = add_histograms
    closers.append(writer.close)
    return variants, closers


def _run_round(workload: Workload, variant: Variant, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batches = [workload.batch(generator) for _ in range(steps)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for x, y in batches:
        variant.optimizer.zero_grad()
        workload.loss(variant.model(x), y).backward()
        variant.after_backward(variant.step)
        variant.optimizer.step()
        variant.step += 1
    variant.times.append((time.perf_counter() - start) / steps)
    variant.cpu_times.append((time.process_time() - cpu_start) / steps)


def measure(workload: Workload, rounds: int, steps: int) -> list[Variant]:
    with tempfile.TemporaryDirectory() as log_root:
        variants, closers = _variants(workload, log_root)
        try:
            for variant in variants:  # warm-up round, not timed
                _run_round(workload, variant, 5, seed=0)
                variant.times.clear()
                variant.cpu_times.clear()
            for r in range(rounds):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for variant in order:
                    _run_round(workload, variant, steps, seed=r + 1)
        finally:
            for close in closers:
                close()
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="steps per round (default 100)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--only", default="", help="run the workloads whose name starts so")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, Adam, CPU", flush=True)
    print(f"{args.rounds} interleaved rounds of {args.steps} steps; median ms/step per variant\n")
    print("| model | variant | wall ms/step | vs baseline | CPU ms/step | vs baseline |")
    print("|---|---|---:|---:|---:|---:|")
    for workload in WORKLOADS:
        if not workload.name.startswith(args.only):
            continue
        variants = measure(workload, args.rounds, args.steps)
        baseline = statistics.median(variants[0].times)
        cpu_baseline = statistics.median(variants[0].cpu_times)
        for variant in variants:
            median = statistics.median(variant.times)
            cpu = statistics.median(variant.cpu_times)
            print(
                f"| {workload.name} | {variant.label} | {median * 1e3:.2f} | "
                f"{median / baseline:.3f} | {cpu * 1e3:.2f} | {cpu / cpu_baseline:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
