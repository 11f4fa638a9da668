"""What one gradient-flow figure costs: drawing it, and encoding it as TensorBoard's image does.

Four workloads: 6, 24 and 64 modules of a weight and a bias each, and the 1,000 parameter tensors
(500 modules) of ``overhead.py``'s ``many`` model, which the figure groups into 63 bars. For each,
in interleaved rounds: the first figure of a run (text not rendered yet), later figures (the
labels are kept), the PNG encoding ``SummaryWriter.add_image`` does with the result, and, when
matplotlib is installed, the matplotlib figure gradwatch drew before, for reference. Medians in
milliseconds; one thread, as the figure is drawn on one.

    .venv/bin/python benchmarks/gradient_flow.py               # about a minute on 2 CPU cores
    .venv/bin/python benchmarks/gradient_flow.py --rounds 3 --no-reference   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard.summary import image as image_summary

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradwatch._histograms import GradientHistograms, histogram_rows  # noqa: E402
from gradwatch.sinks import _gradient_flow  # noqa: E402
from gradwatch.sinks.tensorboard import gradient_flow_image, module_of  # noqa: E402


def layers(modules: int) -> list[str]:
    return [f"layers.{i}.{kind}" for i in range(modules) for kind in ("weight", "bias")]


def many_tensors(blocks: int = 250) -> list[str]:
    """The parameter names of ``overhead.py``'s ``many`` model."""
    return [
        f"blocks.{i}.{module}.{kind}"
        for i in range(blocks)
        for module in ("norm", "linear")
        for kind in ("weight", "bias")
    ]


WORKLOADS = {
    "6 modules": layers(6),
    "24 modules": layers(24),
    "64 modules": layers(64),
    "1,000 tensors (500 modules)": many_tensors(),
}


def histograms(names: list[str]) -> GradientHistograms:
    """Gradients of 16 values, 1 to 1e-5 in scale, one with a NaN."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(16, generator=generator) * 10.0 ** -(j % 6) for j in range(len(names))]
    grads[len(grads) // 2][0] = float("nan")
    return GradientHistograms(histogram_rows(grads, 64))


def matplotlib_figure(names: list[str], hist: GradientHistograms) -> Any:
    """The figure as gradwatch drew it with matplotlib, one bar per module."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        modules.setdefault(module_of(name), []).append(j)
    labels = list(modules)
    sum_abs, finite = hist.sum_abs.numpy(), hist.finite.numpy()
    nonfinite = (hist.nan + hist.inf).numpy()
    largest_abs = hist.max_abs.numpy()
    means, maxima, bad = [], [], []
    for members in modules.values():
        count = finite[members].sum()
        means.append(sum_abs[members].sum() / count if count > 0 else np.nan)
        valid = largest_abs[members][~np.isnan(largest_abs[members])]
        maxima.append(valid.max() if len(valid) else np.nan)
        bad.append(nonfinite[members].sum() > 0)
    figure = Figure(figsize=(min(4.0 + 0.3 * len(labels), 24.0), 4.5), dpi=80, layout="constrained")
    axes = figure.add_subplot()
    x = np.arange(len(labels))
    axes.bar(x, maxima, color="#9ecae1", label="max |grad|")
    axes.bar(x, means, width=0.5, color="#08519c", label="mean |grad|")
    positive = [v for v in (*means, *maxima) if np.isfinite(v) and v > 0]
    if positive:
        axes.set_yscale("log")
        axes.set_ylim(min(positive) / 2, max(positive) * 2)
    for position in np.flatnonzero(bad):
        axes.axvline(float(position), color="#cb181d", linestyle="--", linewidth=1)
    if any(bad):
        axes.plot([], [], color="#cb181d", linestyle="--", label="NaN/Inf present")
    axes.set_xticks(x, labels, rotation=90, fontsize=7)
    axes.set_xlim(-0.6, len(labels) - 0.4)
    axes.set_xlabel("module, in depth order (input first)")
    axes.set_ylabel("|gradient|")
    axes.set_title("gradient flow")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(axis="y", which="major", alpha=0.3)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def _ms(function: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    """CPU milliseconds of this thread: what the figure takes from training, and steadier than
    wall time on a machine shared with other work."""
    start = time.thread_time()
    function(*args, **kwargs)
    return (time.thread_time() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-reference", action="store_true", help="skip matplotlib")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = not args.no_reference
    if reference:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            reference = False
            print("matplotlib is not installed: no reference column")
    if not _gradient_flow.pillow_available():
        raise SystemExit("the figure needs Pillow (9.2 or later)")
    data = {label: (names, histograms(names)) for label, names in WORKLOADS.items()}
    times: dict[tuple[str, str], list[float]] = {}
    shapes = {}
    for _ in range(args.rounds):
        for label, (names, hist) in data.items():
            _gradient_flow._text.cache_clear()
            _gradient_flow._grouped.cache_clear()
            times.setdefault((label, "first"), []).append(_ms(gradient_flow_image, names, hist))
            times.setdefault((label, "later"), []).append(_ms(gradient_flow_image, names, hist))
            pixels = gradient_flow_image(names, hist)
            shapes[label] = pixels.shape
            png = _ms(image_summary, "t", pixels, dataformats="HWC")
            times.setdefault((label, "png"), []).append(png)
            if reference:
                times.setdefault((label, "matplotlib"), []).append(
                    _ms(matplotlib_figure, names, hist)
                )
    columns = ["first", "later", "png"] + (["matplotlib"] if reference else [])
    print(f"Median CPU ms over {args.rounds} interleaved rounds, one thread.\n")
    print("| workload | bars | image | first figure | later figures | add_image PNG |", end="")
    print(" matplotlib (before) |" if reference else "")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if reference else ""))
    for label, (names, _) in data.items():
        bars = len(_gradient_flow.group_parameters(names))
        height, width, _ = shapes[label]
        cells = [f"{statistics.median(times[label, column]):.1f}" for column in columns]
        print(f"| {label} | {bars} | {width}x{height} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
