"""What gradwatch costs per training step, next to the floor and to what users do today.

Every variant trains the same model on the same synthetic batch. Variants are interleaved in
rounds in one process: in each round every variant (the unwatched baseline included) installs its
instrumentation, runs a few untimed warm-up steps, then ``--steps`` timed steps, and removes it
again; the order of the variants rotates from round to round. Each variant's cost is the median
over rounds of its ms/step divided by the baseline's ms/step *of the same round*, with the
min-max of those per-round ratios as the spread, so that load from other processes on the machine
cancels out as far as it can.

Run ``python benchmarks/overhead.py --help`` for the options; ``benchmarks/README.md`` explains
the variants, the machine name and how to read the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gradwatch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Workload:
    """A model, its optimizer and one fixed synthetic batch."""

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def num_tensors(self) -> int:
        return sum(1 for p in self.model.parameters() if p.requires_grad)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _SmallResNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.layers = nn.Sequential(
            _BasicBlock(width, width, 1),
            _BasicBlock(width, 2 * width, 2),
            _BasicBlock(2 * width, 4 * width, 2),
            _BasicBlock(4 * width, 4 * width, 1),
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class _TokenTransformer(nn.Module):
    def __init__(
        self, vocab: int, d_model: int, heads: int, layers: int, seq: int, causal: bool
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.causal = causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        mask = None
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], x.device)
        x = self.encoder(x, mask=mask, is_causal=self.causal)
        return self.head(self.norm(x))


class _ManyTensors(nn.Module):
    """Residual blocks of a small Linear and a LayerNorm: four parameter tensors per block."""

    def __init__(self, blocks: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(width), "linear": nn.Linear(width, width)})
            for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + 0.1 * torch.tanh(block["linear"](block["norm"](x)))
        return x


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(name: str, device: torch.device, quick: bool) -> Workload:
    """The named workload, built from fixed seeds; ``quick`` shrinks it for a smoke test."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if name == "mlp":
        width, batch, depth = (64, 8, 6) if quick else (1024, 128, 6)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        model: nn.Module = nn.Sequential(*layers)
        inputs = torch.randn(batch, width, generator=generator)
        targets = torch.randint(0, width, (batch,), generator=generator)
        opt: Callable[[Any], torch.optim.Optimizer] = lambda ps: torch.optim.SGD(ps, lr=1e-3)  # noqa: E731
        description = f"{depth} x Linear({width}, {width}), batch {batch}, SGD"
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    elif name == "cnn":
        width, batch, size = (8, 4, 16) if quick else (32, 32, 32)
        model = _SmallResNet(width)
        inputs = torch.randn(batch, 3, size, size, generator=generator)
        targets = torch.randint(0, 10, (batch,), generator=generator)
        opt = lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)  # noqa: E731
        description = f"ResNet-like, 4 basic blocks + BatchNorm, {size}x{size}, batch {batch}, SGD"
        loss_fn = nn.functional.cross_entropy
    elif name in ("transformer", "gpt2"):
        if name == "transformer":
            vocab, d, heads, n_layers, seq, batch = (
                (100, 32, 2, 2, 8, 2) if quick else (1000, 256, 4, 4, 64, 16)
            )
            causal = False
        else:
            vocab, d, heads, n_layers, seq, batch = (
                (100, 32, 2, 2, 8, 2) if quick else (50257, 768, 12, 12, 512, 8)
            )
            causal = True
        model = _TokenTransformer(vocab, d, heads, n_layers, seq, causal)
        inputs = torch.randint(0, vocab, (batch, seq), generator=generator)
        targets = torch.randint(0, vocab, (batch, seq), generator=generator)
        opt = lambda ps: torch.optim.AdamW(ps, lr=1e-4)  # noqa: E731
        kind = "GPT-2-small-sized causal" if name == "gpt2" else "encoder"
        description = (
            f"{kind} transformer, {n_layers} layers, d_model {d}, seq {seq}, batch {batch}, AdamW"
        )
        loss_fn = _token_loss
    elif name == "many":
        blocks, width, batch = (25, 8, 4) if quick else (250, 32, 32)
        model = _ManyTensors(blocks, width)
        inputs = torch.randn(batch, width, generator=generator)
        targets = torch.randn(batch, width, generator=generator)
        opt = lambda ps: torch.optim.SGD(ps, lr=1e-3)  # noqa: E731
        description = f"{blocks} residual blocks of LayerNorm + Linear({width}), batch {batch}, SGD"
        loss_fn = nn.functional.mse_loss
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = model.to(device)
    return Workload(
        name=name,
        description=description,
        model=model,
        optimizer=opt(model.parameters()),
        inputs=inputs.to(device),
        targets=targets.to(device),
        loss_fn=loss_fn,
    )


MODELS = ("mlp", "cnn", "transformer", "many", "gpt2")
CPU_MODELS = ("mlp", "cnn", "transformer", "many")
CUDA_MODELS = ("gpt2", "many")


# -------------------------------------------------------------------------------------- variants


class Skip(Exception):
    """The variant cannot run here (an optional package is missing)."""


class Variant:
    """Instrumentation installed for one round: ``after_backward`` runs before each step."""

    def __init__(self, work: Workload, tmp: str) -> None:
        self.work = work
        self.tmp = tmp
        self.step = 0

    def after_backward(self) -> None:
        pass

    def settle(self) -> None:
        """Finishes what the warm-up steps left in flight, so that the timed steps do not pay it."""

    def close(self) -> None:
        pass


class Baseline(Variant):
    pass


class GradWatch(Variant):
    log = False
    histogram_every = 0
    on_nonfinite = "report"

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        self.watcher = gradwatch.watch(
            work.model,
            work.optimizer,
            log_dir=tmp if self.log else None,
            histogram_every=self.histogram_every,
            on_finding="record",
            on_nonfinite=self.on_nonfinite,
        )

    def settle(self) -> None:
        # A histogram taken in the warm-up is written when the host reads it (a step later on an
        # accelerator): the every-N variants pay it once per N steps, in ``amortised``.
        monitor = self.watcher._monitor
        monitor.drain()
        monitor._sinks.flush()

    def close(self) -> None:
        self.watcher.close()


class GradWatchSkip(GradWatch):
    """``on_nonfinite="skip"``: on CUDA the host waits for each step's statistics."""

    on_nonfinite = "skip"


class GradWatchHist100(GradWatch):
    log = True
    histogram_every = 100


class GradWatchHist1(GradWatch):
    log = True
    histogram_every = 1


class Floor(Variant):
    """One ``torch._foreach_norm`` over every gradient, stacked, and one host read."""

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        self.params = [p for p in work.model.parameters() if p.requires_grad]

    def after_backward(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = torch.stack(torch._foreach_norm(grads))
        norms.cpu().numpy()


class LightningGradNorm(Variant):
    """``lightning.pytorch.utilities.grad_norm`` every step, each value read as a logger would."""

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        try:
            from lightning.pytorch.utilities import grad_norm
        except ImportError as error:
            raise Skip(f"lightning is not installed ({error})") from error
        self.grad_norm = grad_norm

    def after_backward(self) -> None:
        norms = self.grad_norm(self.work.model, norm_type=2)
        {name: float(value) for name, value in norms.items()}


class AddHistogram(Variant):
    """``SummaryWriter.add_histogram`` of every parameter's gradient every ``every`` steps."""

    every = 1

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=tmp)
        self.named = [(n, p) for n, p in work.model.named_parameters() if p.requires_grad]

    def after_backward(self) -> None:
        if self.step % self.every == 0:
            for name, param in self.named:
                if param.grad is not None:
                    self.writer.add_histogram(f"grad/{name}", param.grad, self.step)
        self.step += 1

    def close(self) -> None:
        self.writer.close()


class AddHistogram100(AddHistogram):
    every = 100


class Anomaly(Variant):
    """``torch.autograd.set_detect_anomaly(True)`` around the steps."""

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        self.mode = torch.autograd.set_detect_anomaly(True)
        self.mode.__enter__()

    def close(self) -> None:
        self.mode.__exit__(None, None, None)


class WandbWatch(Variant):
    """``wandb.watch(model, log="gradients", log_freq=1)`` in offline mode, one log per step."""

    run: Any = None

    def __init__(self, work: Workload, tmp: str) -> None:
        super().__init__(work, tmp)
        try:
            import wandb
        except ImportError as error:
            raise Skip(f"wandb is not installed ({error.__class__.__name__})") from error
        self.wandb = wandb
        if WandbWatch.run is None:
            os.environ.setdefault("WANDB_SILENT", "true")
            WandbWatch.run = wandb.init(
                mode="offline", dir=tempfile.mkdtemp(prefix="gradwatch-bench-wandb-")
            )
        wandb.watch(work.model, log="gradients", log_freq=1)

    def after_backward(self) -> None:
        WandbWatch.run.log({"step": self.step})
        self.step += 1

    def close(self) -> None:
        self.wandb.unwatch(self.work.model)


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    key: str
    label: str
    factory: type[Variant]
    every: int = 1
    """Steps between its histograms (1 for every step or none)."""


VARIANTS = [
    VariantSpec("baseline", "unwatched baseline", Baseline),
    VariantSpec("gradwatch", "gradwatch, all detectors, no TensorBoard", GradWatch),
    VariantSpec("gradwatch-skip", 'gradwatch, on_nonfinite="skip"', GradWatchSkip),
    VariantSpec(
        "gradwatch-hist100", "gradwatch + TensorBoard, histograms every 100", GradWatchHist100, 100
    ),
    VariantSpec("gradwatch-hist1", "gradwatch + TensorBoard, histograms every 1", GradWatchHist1),
    VariantSpec("floor", "floor: one _foreach_norm + one host read", Floor),
    VariantSpec("lightning-grad-norm", "Lightning grad_norm every step", LightningGradNorm),
    VariantSpec("add-histogram-100", "add_histogram every 100", AddHistogram100, 100),
    VariantSpec("add-histogram-1", "add_histogram every step", AddHistogram),
    VariantSpec("anomaly", "set_detect_anomaly(True)", Anomaly),
    VariantSpec("wandb", 'wandb.watch(log="gradients", log_freq=1), offline', WandbWatch),
]
SPECS = {spec.key: spec for spec in VARIANTS}


# ----------------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(work: Workload, variant: Variant) -> None:
    work.optimizer.zero_grad(set_to_none=True)
    loss = work.loss_fn(work.model(work.inputs), work.targets)
    loss.backward()
    variant.after_backward()
    work.optimizer.step()


def run_variant(
    work: Workload, spec: VariantSpec, warmup: int, steps: int, device: torch.device
) -> float:
    """Install ``spec``, run ``warmup`` untimed then ``steps`` timed steps, remove it: s/step."""
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        variant = spec.factory(work, tmp)
        try:
            for _ in range(warmup):
                train_step(work, variant)
            _sync(device)
            variant.settle()
            gc.collect()
            start = time.perf_counter()
            for _ in range(steps):
                train_step(work, variant)
            _sync(device)
            elapsed = time.perf_counter() - start
        finally:
            variant.close()
    return elapsed / steps


@dataclasses.dataclass
class Row:
    spec: VariantSpec
    ms: float = float("nan")
    ratio: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    amortised: float = float("nan")
    best: float = float("nan")
    skipped: str = ""


@dataclasses.dataclass
class ModelResult:
    work_name: str
    description: str
    num_tensors: int
    num_params: int
    steps: tuple[int, int]
    warmup: int
    rounds: int
    rows: list[Row]
    per_tensor_us: dict[str, float]


def measure_model(
    name: str,
    keys: list[str],
    *,
    device: torch.device,
    quick: bool,
    rounds: int,
    steps: int | None,
    warmup: int,
    round_seconds: float,
    log: Callable[[str], None],
) -> ModelResult:
    work = build(name, device, quick)
    gc.collect()
    gc.freeze()  # keeps the collections between timed windows short
    specs = [SPECS[k] for k in keys]
    if "baseline" not in keys:
        specs.insert(0, SPECS["baseline"])
    rows = {spec.key: Row(spec) for spec in specs}
    # Probe every variant once: skip those that cannot run here, warm up allocators and caches,
    # and size each one's timed window to about ``round_seconds``.
    runnable: list[VariantSpec] = []
    probe: dict[str, float] = {}
    for spec in specs:
        try:
            probe[spec.key] = run_variant(work, spec, warmup, 2, device)
        except Skip as reason:
            rows[spec.key].skipped = str(reason)
            log(f"  skipping {spec.key}: {reason}")
            continue
        runnable.append(spec)
    limit = 60
    if any(spec.every > 1 for spec in runnable):
        # Keep every histogram of an every-N variant in the untimed warm-up (see amortised).
        limit = min(s.every for s in runnable if s.every > 1) - 1 - warmup
    window = {
        spec.key: max(2, min(limit, steps or round(round_seconds / probe[spec.key])))
        for spec in runnable
    }
    log(
        f"  {work.description}: {work.num_tensors} tensors, {work.num_params / 1e6:.2f}M "
        f"parameters; {rounds} rounds of {min(window.values())}-{max(window.values())} steps "
        f"(+{warmup} warm-up) per variant"
    )
    times: dict[str, list[float]] = {spec.key: [] for spec in runnable}
    for r in range(rounds):
        order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)]
        if r % 2:
            order.reverse()
        for spec in order:
            times[spec.key].append(run_variant(work, spec, warmup, window[spec.key], device))
        base = times["baseline"][-1]
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {v[-1] / base:.3f}" for k, v in times.items() if k != "baseline")
        )
    baseline = times["baseline"]
    for key, values in times.items():
        ratios = [v / b for v, b in zip(values, baseline, strict=True)]
        row = rows[key]
        row.ms = 1000 * statistics.median(values)
        row.ratio = statistics.median(ratios)
        row.low, row.high = min(ratios), max(ratios)
        row.amortised = row.ratio
        row.best = min(values) / min(baseline)
    # An every-N variant's timed steps are its quiet steps; add 1/N of a histogram step's extra
    # cost, measured by the same tool's every-step variant.
    for key, every_step, quiet in (
        ("gradwatch-hist100", "gradwatch-hist1", "gradwatch"),
        ("add-histogram-100", "add-histogram-1", "baseline"),
    ):
        if key in times and every_step in times and quiet in times:
            extra = rows[every_step].ratio - rows[quiet].ratio
            rows[key].amortised = rows[key].ratio + max(extra, 0.0) / SPECS[key].every
        elif key in times:
            rows[key].amortised = float("nan")
    per_tensor = {}
    for key, values in times.items():
        if key.startswith("gradwatch") or key == "floor":
            diffs = [v - b for v, b in zip(values, baseline, strict=True)]
            per_tensor[key] = 1e6 * statistics.median(diffs) / work.num_tensors
    return ModelResult(
        work_name=name,
        description=work.description,
        num_tensors=work.num_tensors,
        num_params=work.num_params,
        steps=(min(window.values()), max(window.values())),
        warmup=warmup,
        rounds=rounds,
        rows=[rows[spec.key] for spec in specs],
        per_tensor_us=per_tensor,
    )


# ------------------------------------------------------------------------------------ peak memory


def _peak_rss_kib() -> int:
    """This process's peak resident set, KiB.

    ``VmHWM`` where Linux provides it: ``ru_maxrss`` survives ``exec``, so a child forked from a
    large parent would report the parent's size.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def rss_child(name: str, key: str, device: str, quick: bool, steps: int) -> None:
    """Run ``steps`` steps of one variant and print peak RSS (KiB) as JSON: for a subprocess."""
    torch.set_num_threads(2)
    dev = torch.device(device)
    work = build(name, dev, quick)
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        variant = SPECS[key].factory(work, tmp)
        try:
            for _ in range(5):
                train_step(work, variant)
            after_warmup = _peak_rss_kib()
            for _ in range(steps):
                train_step(work, variant)
            _sync(dev)
        finally:
            variant.close()
    peak = _peak_rss_kib()
    print(json.dumps({"peak_kib": peak, "after_warmup_kib": after_warmup}))


def measure_rss(
    name: str, keys: list[str], device: str, quick: bool, steps: int
) -> dict[str, dict[str, int]]:
    out = {}
    for key in keys:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rss-child",
            f"{name}:{key}",
            "--device",
            device,
            "--steps",
            str(steps),
        ]
        if quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"peak-RSS subprocess for {name}/{key} failed:\n{done.stderr}")
        out[key] = json.loads(lines[-1])
    return out


# ----------------------------------------------------------------------------------------- report


def machine_name(device: torch.device) -> str:
    """``cpu-<cores>core-<arch>`` or ``cuda-<card>``, in lower case, for the results file."""
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu-{cores}core-{platform.machine().lower()}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no", "--", "gradwatch"):
        commit += " + uncommitted changes to gradwatch/"
    return commit


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def render(
    results: list[ModelResult],
    rss: dict[str, dict[str, dict[str, int]]],
    *,
    device: torch.device,
    machine: str,
    command: str,
    load_at_start: tuple[float, float, float],
) -> str:
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{_cpu_model()}, torch.get_num_threads() = {torch.get_num_threads()}"
    )
    lines = [
        f"# gradwatch overhead: {machine}",
        "",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Commit measured: {_commit()}",
        f"- Machine: {machine} ({hardware}), Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- Command: `{command}`",
        "- Load average (1, 5, 15 min) at start: "
        + ", ".join(f"{x:.2f}" for x in load_at_start)
        + "; at end: "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "- ratio: median over rounds of (variant ms/step) / (baseline ms/step of the same round); "
        "spread: min-max of those per-round ratios; amortised: for every-100 variants, the ratio "
        "of their quiet steps plus 1/100 of the extra cost of a histogram step (measured by the "
        "same tool's every-step variant); fastest rounds: the variant's fastest round over the "
        "baseline's fastest round (least disturbed by other load); ms/step: median over rounds.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result.work_name}: {result.description}",
            "",
            f"{result.num_tensors} parameter tensors, {result.num_params / 1e6:.2f}M parameters; "
            f"{result.rounds} rounds of {result.steps[0]}-{result.steps[1]} timed steps "
            f"(+{result.warmup} warm-up) per variant.",
            "",
            "| variant | ms/step | ratio | spread | amortised | fastest rounds |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in result.rows:
            if row.skipped:
                lines.append(f"| {row.spec.label} | skipped: {row.skipped} | | | | |")
                continue
            lines.append(
                f"| {row.spec.label} | {row.ms:.2f} | {_fmt(row.ratio)}x | "
                f"{_fmt(row.low)}-{_fmt(row.high)} | {_fmt(row.amortised)}x | {_fmt(row.best)}x |"
            )
        if result.per_tensor_us:
            cost = ", ".join(f"{k} {v:.2f} us" for k, v in result.per_tensor_us.items())
            lines += ["", f"Extra cost per parameter tensor per step (median): {cost}."]
        model_rss = rss.get(result.work_name)
        if model_rss:
            base = model_rss.get("baseline", {}).get("peak_kib")
            parts = []
            for key, values in model_rss.items():
                part = f"{key} {values['peak_kib'] / 1024:.1f} MiB"
                if base and key != "baseline":
                    part += f" ({(values['peak_kib'] - base) / 1024:+.1f} MiB)"
                growth = values["peak_kib"] - values["after_warmup_kib"]
                part += f", +{growth / 1024:.1f} MiB after warm-up"
                parts.append(part)
            lines += ["", "Peak RSS (separate processes): " + "; ".join(parts) + "."]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="gradwatch's cost per training step against an unwatched baseline, the "
        "floor and the tools users have; prints a markdown table and writes it to "
        "benchmarks/results/<machine>.md."
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, 2 rounds of 2 steps, peak RSS of the first model only: a smoke test",
    )
    parser.add_argument(
        "--models",
        help=f"comma-separated, from {', '.join(MODELS)} (default: {', '.join(CPU_MODELS)} "
        f"on CPU, {', '.join(CUDA_MODELS)} on CUDA)",
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated, from {', '.join(SPECS)} (default: all; baseline always runs)",
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 7, 2 with --quick)")
    parser.add_argument(
        "--steps",
        type=int,
        help="timed steps per variant per round (default: about --round-seconds worth of each)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round")
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=0.3,
        help="seconds per variant per round when --steps is not given",
    )
    parser.add_argument("--rss-steps", type=int, default=20, help="steps of each peak-RSS process")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument(
        "--output",
        help="where to write the table (default benchmarks/results/<machine>.md; "
        "--quick writes nothing unless given)",
    )
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.quick:
        args.steps = args.steps or 2
        args.warmup = min(args.warmup, 1)
        args.rss_steps = min(args.rss_steps, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/overhead.py: --device cuda needs a CUDA device, and torch sees none "
            f"(torch {torch.__version__}); run without --device for the CPU benchmark.",
            file=sys.stderr,
        )
        return 2
    if args.rss_child:
        name, key = args.rss_child.split(":")
        rss_child(name, key, args.device, args.quick, args.steps or args.rss_steps)
        return 0
    torch.set_num_threads(2)
    random.seed(0)
    device = torch.device(args.device)
    models = (
        args.models.split(",")
        if args.models
        else list(CUDA_MODELS if device.type == "cuda" else CPU_MODELS)
    )
    keys = args.variants.split(",") if args.variants else list(SPECS)
    for problem in [m for m in models if m not in MODELS] + [k for k in keys if k not in SPECS]:
        print(f"benchmarks/overhead.py: unknown model or variant {problem!r}", file=sys.stderr)
        return 2
    machine = machine_name(device)
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    output = args.output or (None if args.quick else str(RESULTS / f"{machine}.md"))
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    results = []
    rss: dict[str, dict[str, dict[str, int]]] = {}
    table = ""
    for name in models:
        log(f"{name}:")
        results.append(
            measure_model(
                name,
                keys,
                device=device,
                quick=args.quick,
                rounds=args.rounds,
                steps=args.steps,
                warmup=args.warmup,
                round_seconds=args.round_seconds,
                log=log,
            )
        )
        if not args.no_rss and not (args.quick and rss):
            rss_keys = [k for k in ("baseline", "gradwatch", "gradwatch-hist1") if k in SPECS]
            rss[name] = measure_rss(name, rss_keys, args.device, args.quick, args.rss_steps)
        table = render(
            results,
            rss,
            device=device,
            machine=machine,
            command=command.strip(),
            load_at_start=load_at_start,
        )
        if len(results) < len(models):
            table += f"\n(partial: {len(results)} of {len(models)} models so far)\n"
        if output:
            # Written after every model, so that an interrupted run keeps what it measured.
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(table)
    print(table)
    log(f"done in {time.perf_counter() - started:.0f} s")
    if output:
        log(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
