"""The gradient-flow figure: grouping of parameters into at most 64 bars, the statistics of each
bar, and the pixels drawn, read back by colour."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from gradwatch._histograms import GradientHistograms, histogram_rows
from gradwatch.sinks import _gradient_flow
from gradwatch.sinks._gradient_flow import (
    MAX_COLOUR,
    MAX_GROUPS,
    MAX_LABEL_CHARS,
    MAX_WIDTH,
    MEAN_COLOUR,
    NONFINITE_COLOUR,
    group_parameters,
    group_statistics,
)
from gradwatch.sinks.tensorboard import gradient_flow_image, module_of

pytest.importorskip("PIL")

NAN, INF = float("nan"), float("inf")


def _blocks(count: int, *modules: str) -> list[str]:
    return [f"blocks.{i}.{m}.weight" for i in range(count) for m in modules]


GROUPING = {
    "one bar per module": (
        ["0.weight", "0.bias", "2.weight", "2.bias"],
        8,
        [("0", (0, 1)), ("2", (2, 3))],
    ),
    "the model's own parameters": (
        ["scale", "0.weight", "shift"],
        8,
        [("(model)", (0, 2)), ("0", (1,))],
    ),
    "no parameters": ([], 8, []),
    "cut to blocks": (
        [*_blocks(3, "norm", "linear"), "head.weight"],
        4,
        [("blocks.0", (0, 1)), ("blocks.1", (2, 3)), ("blocks.2", (4, 5)), ("head", (6,))],
    ),
    "a flat list in runs": (
        [f"{i}.weight" for i in range(10)],
        4,
        [("0-2", (0, 1, 2)), ("3-5", (3, 4, 5)), ("6-8", (6, 7, 8)), ("9", (9,))],
    ),
    "a nested list in runs of blocks": (
        _blocks(6, "norm", "linear"),
        4,
        [
            ("blocks.0-1", (0, 1, 2, 3)),
            ("blocks.2-3", (4, 5, 6, 7)),
            ("blocks.4-5", tuple(range(8, 12))),
        ],
    ),
    # Cut to embed, blocks and head, one bar would hide all the blocks.
    "a list between two modules": (
        ["embed.weight", *_blocks(6, "norm", "linear"), "head.weight"],
        8,
        [("embed", (0,))]
        + [(f"blocks.{i}", (1 + 2 * i, 2 + 2 * i)) for i in range(6)]
        + [("head", (13,))],
    ),
}


@pytest.mark.parametrize("case", GROUPING)
def test_group_parameters(case: str) -> None:
    names, max_groups, expected = GROUPING[case]
    assert group_parameters(names, max_groups) == expected


@pytest.mark.parametrize("count", [65, 100, 129, 250, 1000, 4097])
@pytest.mark.parametrize("nested", [False, True])
def test_more_modules_than_bars_are_grouped_in_order(count: int, nested: bool) -> None:
    names = _blocks(count, "norm", "linear") if nested else [f"{i}.weight" for i in range(count)]
    groups = group_parameters(names)
    assert 2 <= len(groups) <= MAX_GROUPS
    members = [j for group in groups for j in group.members]
    assert members == list(range(len(names)))  # every parameter once, in depth order
    sizes = {len(group.members) for group in groups}
    assert max(sizes) <= 2 * (-(-len(names) // MAX_GROUPS))  # runs as short as fit


def test_the_benchmark_model_of_1000_tensors_gets_63_bars() -> None:
    names = [
        f"blocks.{i}.{m}.{k}" for i in range(250) for m in ("norm", "linear") for k in ("w", "b")
    ]
    groups = group_parameters(names)
    assert len(groups) == 63
    assert [g.label for g in groups[:2]] == ["blocks.0-3", "blocks.4-7"]
    assert groups[-1] == ("blocks.248-249", tuple(range(992, 1000)))


@pytest.mark.parametrize("name", ["w", "0.weight", "encoder.layers.3.attn.in_proj_weight"])
def test_modules_are_the_sinks_modules(name: str) -> None:
    assert ".".join(_gradient_flow._module_parts(name)) == module_of(name)


def _histograms(*grads: list[float]) -> GradientHistograms:
    return GradientHistograms(histogram_rows([torch.tensor(g) for g in grads], 8))


def test_group_statistics() -> None:
    groups = [("a", (0, 1)), ("b", (2,)), ("c", (3,)), ("d", (4,))]
    hist = _histograms([1.0, -3.0], [2.0], [NAN, 4.0], [NAN, INF], [0.0, 0.0])
    means, maxima, bad = group_statistics([_gradient_flow.Group(*g) for g in groups], hist)
    np.testing.assert_allclose(means, [2.0, 4.0, NAN, 0.0])  # sum of |values| / finite count
    np.testing.assert_allclose(maxima, [3.0, 4.0, NAN, 0.0])
    assert bad.tolist() == [False, True, True, False]


def _image(scales: list[float], nan_at: tuple[int, ...] = ()) -> np.ndarray:
    """One module per scale, whose gradient's values are all ``scale`` (times 2 for the max)."""
    grads = [[scale, 2 * scale] for scale in scales]
    for i in nan_at:
        grads[i].append(NAN)
    names = [f"layer{i}.weight" for i in range(len(scales))]
    return gradient_flow_image(names, _histograms(*grads))


def _runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive true columns, as (first, last)."""
    runs: list[tuple[int, int]] = []
    for x in np.flatnonzero(columns).tolist():
        if runs and runs[-1][1] == x - 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


def _where(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return (image == np.array(colour, dtype=np.uint8)).all(axis=2)


def _below_legend(image: np.ndarray) -> np.ndarray:
    """The image from the plot's top edge down: the first row black across most of the width."""
    black = _where(image, (0, 0, 0)).sum(axis=1)
    return image[int(np.argmax(black > image.shape[1] // 2)) :]


def _bars(image: np.ndarray, colour: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(first column, last column, height in pixels) of each bar of ``colour``."""
    mask = _where(_below_legend(image), colour)
    bars = []
    for first, last in _runs(mask.any(axis=0)):
        rows = np.flatnonzero(mask[:, first])
        bars.append((first, last, int(rows[-1] - rows[0] + 1)))
    return bars


def test_image_is_rgb_uint8() -> None:
    image = _image([1e-3, 1e-2])
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 200 and image.shape[1] > 200


def test_ten_times_the_gradient_is_a_taller_bar_by_one_step() -> None:
    image = _image([1e-3, 1e-2, 1e-1, 1e-2])
    heights = [bar[2] for bar in _bars(image, MAX_COLOUR)]
    assert len(heights) == 4
    assert heights[0] < heights[1] < heights[2] > heights[3]
    assert heights[1] == heights[3]
    # A log scale: each factor of ten adds the same height, within a pixel of rounding.
    assert abs((heights[2] - heights[1]) - (heights[1] - heights[0])) <= 1
    means = [bar[2] for bar in _bars(image, MEAN_COLOUR)]
    assert means[0] < means[1] < means[2] > means[3]
    assert all(mean < largest for mean, largest in zip(means, heights, strict=True))


def test_nan_group_is_marked_red_at_its_bar() -> None:
    healthy = _image([1.0, 1.0, 1.0])
    assert not _where(healthy, NONFINITE_COLOUR).any()
    image = _image([1.0, 1.0, 1.0], nan_at=(1,))
    bars = _bars(image, MAX_COLOUR)
    red = _where(_below_legend(image), NONFINITE_COLOUR)
    (marked,) = _runs(red.any(axis=0))
    assert bars[1][0] < marked[0] <= marked[1] < bars[1][1]
    assert red.sum(axis=0).max() > 50  # a line across the plot, not a dot


@pytest.mark.parametrize(
    "grads",
    [pytest.param([], id="no parameters"), [[NAN], [NAN, INF]], [[0.0], [0.0, 0.0]]],
    ids=["no parameters", "all NaN/Inf", "all zero"],
)
def test_nothing_positive_still_draws_a_figure(grads: list[list[float]]) -> None:
    names = [f"m{i}.w" for i in range(len(grads))]
    image = gradient_flow_image(names, _histograms(*grads))
    assert image.ndim == 3 and image.shape[1] <= MAX_WIDTH
    assert not _bars(image, MAX_COLOUR) and not _bars(image, MEAN_COLOUR)
    nonfinite = any(not math.isfinite(v) for g in grads for v in g)
    assert _where(image, NONFINITE_COLOUR).any() == nonfinite


def test_more_modules_than_bars_draw_at_most_64_bars_within_the_width() -> None:
    scales = [10.0 ** -(i % 7) for i in range(500)]
    image = _image(scales)
    assert len(_bars(image, MAX_COLOUR)) == 63  # runs of 8 modules
    assert image.shape[1] <= MAX_WIDTH


def test_width_grows_with_the_groups_up_to_the_cap() -> None:
    widths = [_image([1.0] * n).shape[1] for n in (1, 6, 24, 64)]
    assert widths == sorted(widths) and widths[0] < widths[-1] <= MAX_WIDTH


def test_long_names_are_shortened_from_the_start() -> None:
    label = "encoder." * 10 + "out_proj"
    short = _gradient_flow._shorten(label)
    assert len(short) == MAX_LABEL_CHARS
    assert short.startswith("…") and short.endswith(".encoder.out_proj")
    assert _gradient_flow._shorten("blocks.0-3") == "blocks.0-3"
    names = [f"{label}{i}.weight" for i in range(64)]
    image = gradient_flow_image(names, _histograms(*[[1.0]] * 64))
    assert image.shape[1] <= MAX_WIDTH and image.shape[0] < 600


@pytest.fixture
def bitmap_font(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pillow before 10.1, or built without FreeType: ``load_default`` takes no size and gives
    a bitmap font that knows only Latin-1."""
    from PIL import ImageFont

    # Pillow 10.1 named the bitmap font's loader; before, load_default() returned it.
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()

    def load_default() -> ImageFont.ImageFont:  # no size: a call with one is a TypeError
        return bitmap

    caches = (_gradient_flow._font, _gradient_flow._line_height, _gradient_flow._text)
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(ImageFont, "load_default", load_default)
    yield
    for cache in caches:
        cache.cache_clear()


@pytest.mark.usefixtures("bitmap_font")
def test_bitmap_font_draws_any_name() -> None:
    from PIL import ImageFont

    assert not isinstance(_gradient_flow._font(11), ImageFont.FreeTypeFont)
    names = ["encoder.β_blocks.0.weight", "x" * 60 + ".weight"]
    image = gradient_flow_image(names, _histograms([1.0, 2.0], [0.1, 0.2]))
    assert image.ndim == 3 and len(_bars(image, MAX_COLOUR)) == 2


def test_no_figure_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("PIL", "PIL.Image", "PIL.ImageDraw", "PIL.ImageFont"):
        monkeypatch.setitem(sys.modules, module, None)
    assert gradient_flow_image(["w"], _histograms([1.0])) is None


def test_no_figure_with_a_pillow_older_than_9_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFont

    for cls in ImageFont.ImageFont.__mro__:
        if "getbbox" in vars(cls):
            monkeypatch.delattr(cls, "getbbox")
    assert gradient_flow_image(["w"], _histograms([1.0])) is None
