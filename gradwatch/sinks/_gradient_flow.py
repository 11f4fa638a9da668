"""The gradient-flow figure: mean and largest finite |grad| of each module, in depth order, as bars
on a log scale, drawn in a millisecond or two.

Parameters are grouped by module; a model with more than ``MAX_GROUPS`` modules is shown coarser
(see :func:`group_parameters`), so the figure never has more than ``MAX_GROUPS`` bars nor grows
wider than ``MAX_WIDTH`` pixels. Modules whose parameters have no gradient to measure at the step
but are known to be at fault (no gradient at all, or not in any optimizer) get a bar of their own
across the plot, in the colour of the reason.

Boxes are filled straight into a numpy array; Pillow renders the text (its default font), which
is the slow part (FreeType renders every glyph anew, about 7 µs each), so each piece of text is
rendered once and kept: the labels are the same at every figure of a run. Without Pillow 9.2 or
later there is no figure.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from gradwatch._histograms import GradientHistograms

if TYPE_CHECKING:
    from PIL import ImageFont

MAX_GROUPS = 64
"""The most bars the figure draws; larger models are grouped coarser."""

MAX_WIDTH = 1600
"""The widest the figure gets, in pixels."""

MAX_LABEL_CHARS = 32
"""Longer labels keep their last characters after an ellipsis: the end of a name tells its
neighbours apart."""

TITLE = "gradient flow"
CAPTION = "module, in depth order (input first)"
Y_LABEL = "|gradient|"
NOTHING_TO_DRAW = "no finite, non-zero |grad| at this step"

NO_GRAD = "no gradient"
"""Why a parameter without a histogram row is drawn: it received no gradient (a ``no_grad``
finding)."""

NOT_OPTIMIZED = "not in an optimizer"
"""Why a parameter without a histogram row is drawn: no optimizer updates it, so no check takes
its gradient (a ``not_in_optimizer`` finding)."""

MAX_COLOUR = (0x9E, 0xCA, 0xE1)  # light blue, as matplotlib's "Blues" palette
MEAN_COLOUR = (0x08, 0x51, 0x9C)  # dark blue
NONFINITE_COLOUR = (0xCB, 0x18, 0x1D)  # red
NO_GRAD_COLOUR = (0x96, 0x9A, 0xA0)  # slate grey
NOT_OPTIMIZED_COLOUR = (0xFD, 0xAE, 0x6B)  # orange, as matplotlib's "Oranges"
ABSENT_COLOURS = {NO_GRAD: NO_GRAD_COLOUR, NOT_OPTIMIZED: NOT_OPTIMIZED_COLOUR}
GRID_COLOUR = (0xE3, 0xE3, 0xE3)
INK = (0, 0, 0)
PAPER = (255, 255, 255)

_TEXT_SIZE = 11
_TITLE_SIZE = 14
_PAD = 8
_GAP = 4
_TICK = 4
_LEGEND_GAP = 12
_SLOT = 22  # pixels per bar at most (fewer when MAX_GROUPS bars would pass MAX_WIDTH)
_BAR = 40  # the widest a max |grad| bar gets, for figures of one or two groups
_PLOT_HEIGHT = 260
_MIN_PLOT_WIDTH = 240  # with the margins, under the 350 pixels of TensorBoard's image cards
_MAX_Y_LABELS = 8  # decades labelled at most; a wider range labels every second, third...
_DASH, _DASH_GAP = 6, 4
_HATCH = 3  # pixels per stripe of a bar without a value

Pixels = npt.NDArray[np.uint8]


class Group(NamedTuple):
    """One bar of the figure: its label and the indices of its parameters, in order."""

    label: str
    members: tuple[int, ...]


def _module_parts(name: str) -> tuple[str, ...]:
    """The parameter's module (``tensorboard.module_of``), split at its dots."""
    module = name.rpartition(".")[0] or "(model)"
    return tuple(module.split("."))


def _by_prefix(parts: Sequence[tuple[str, ...]], depth: int) -> dict[tuple[str, ...], list[int]]:
    """Parameter indices by the first ``depth`` parts of their module, in order of appearance."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for j, p in enumerate(parts):
        groups.setdefault(p[:depth], []).append(j)
    return groups


def _range_label(first: tuple[str, ...], last: tuple[str, ...]) -> str:
    """``blocks.0-7`` for the modules ``blocks.0`` to ``blocks.7``."""
    if first == last:
        return ".".join(first)
    common = 0
    while common < min(len(first), len(last)) - 1 and first[common] == last[common]:
        common += 1
    return ".".join(first) + "-" + ".".join(last[common:])


def _runs(parts: Sequence[tuple[str, ...]], depth: int, max_groups: int) -> list[Group]:
    """The modules cut at ``depth + 1`` parts, in runs of equally many consecutive ones inside
    each module cut at ``depth`` parts: the shortest runs that fit in ``max_groups`` bars."""
    segments: dict[tuple[str, ...], dict[tuple[str, ...], list[int]]] = {}
    for j, p in enumerate(parts):
        segments.setdefault(p[:depth], {}).setdefault(p[: depth + 1], []).append(j)
    sizes = [len(children) for children in segments.values()]
    # len(segments) <= max_groups, so runs as long as the largest segment always fit.
    run = -(-sum(sizes) // max_groups)
    while sum(-(-size // run) for size in sizes) > max_groups:
        run += 1
    groups = []
    for children in segments.values():
        keys = list(children)
        for start in range(0, len(keys), run):
            chunk = keys[start : start + run]
            members = sorted(j for key in chunk for j in children[key])
            groups.append(Group(_range_label(chunk[0], chunk[-1]), tuple(members)))
    return groups


def group_parameters(names: Sequence[str], max_groups: int = MAX_GROUPS) -> list[Group]:
    """The figure's bars: parameters grouped by module, at most ``max_groups`` groups.

    Each module with parameters is a group while there are at most ``max_groups`` of them.
    Otherwise modules are cut to their first ``d`` name parts, with the largest ``d`` that leaves
    at most ``max_groups`` groups (``blocks.12.norm`` becomes ``blocks.12``), unless that hides
    most of the model: when the modules one part deeper, taken in runs of consecutive ones inside
    each of those groups (the shortest runs that fit), give at least twice as many bars, those
    runs are the groups, labelled ``blocks.0-3``. A ``ModuleList`` of 250 blocks thus gets 63 bars
    of 4 blocks each instead of one bar. Groups keep the parameters' order (depth order).

    >>> [g.label for g in group_parameters(["0.weight", "0.bias", "2.weight"])]
    ['0', '2']
    >>> names = [f"blocks.{i}.{m}.weight" for i in range(100) for m in ("norm", "linear")]
    >>> [g.label for g in group_parameters(names)][:2]
    ['blocks.0-1', 'blocks.2-3']
    """
    parts = [_module_parts(name) for name in names]
    deepest = max(map(len, parts), default=0)
    modules = _by_prefix(parts, deepest)
    if len(modules) <= max_groups:
        return [Group(".".join(key), tuple(members)) for key, members in modules.items()]
    depth = deepest - 1
    while len(coarse := _by_prefix(parts, depth)) > max_groups:
        depth -= 1  # depth 0 is one group, so this ends
    runs = _runs(parts, depth, max_groups)
    if len(runs) >= 2 * len(coarse):
        return sorted(runs, key=lambda group: group.members[0])
    return [Group(".".join(key) or "(model)", tuple(members)) for key, members in coarse.items()]


class GroupStatistics(NamedTuple):
    """Per group: mean finite |grad| and largest finite |grad| (NaN where there is no finite
    value), and whether any value is NaN or ±Inf."""

    mean: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    nonfinite: npt.NDArray[np.bool_]


def group_statistics(
    groups: Sequence[Group], histograms: GradientHistograms, rows: Sequence[int] | None = None
) -> GroupStatistics:
    """Mean |grad| = sum of |values| / count of finite values over the members; max |grad| = the
    members' largest; NaN/Inf flagged if any member has one.

    Members are histogram rows, or with ``rows`` positions whose row is ``rows[member]`` (``-1``
    for none: such a member adds nothing, and a group of them only is NaN)."""
    count = len(groups)
    index = np.zeros(len(histograms), dtype=np.intp)
    for g, group in enumerate(groups):
        members = list(group.members)
        if rows is not None:
            members = [rows[k] for k in members if rows[k] >= 0]
        index[members] = g
    finite = histograms.finite.double().numpy()
    sums = np.bincount(index, weights=histograms.sum_abs.double().numpy(), minlength=count)
    counts = np.bincount(index, weights=finite, minlength=count)
    mean = np.full(count, math.nan)
    np.divide(sums, counts, out=mean, where=counts > 0)
    largest = np.full(count, -math.inf)
    np.fmax.at(largest, index, histograms.max_abs.double().numpy())  # fmax skips NaN
    largest[largest == -math.inf] = math.nan
    nonfinite = (histograms.nan + histograms.inf).double().numpy()
    bad = np.bincount(index, weights=nonfinite, minlength=count) > 0
    return GroupStatistics(mean, largest, bad)


def gradient_flow_image(
    names: Sequence[str],
    histograms: GradientHistograms,
    absent: Mapping[str, str] | None = None,
    order: Sequence[str] | None = None,
) -> Pixels | None:
    """The figure as an ``(H, W, 3)`` uint8 array, or ``None`` without Pillow (9.2 or later).

    Args:
        names: The parameter of each histogram row, in depth order.
        histograms: The rows.
        absent: Parameters without a row to draw all the same, each with why (:data:`NO_GRAD`
            or :data:`NOT_OPTIMIZED`); a name that has a row is drawn from it. A group none of
            whose parameters has a row gets a bar across the plot in the colour of its reason
            (``NOT_OPTIMIZED`` when any member has it).
        order: Every parameter of the model in depth order, to place the ``absent`` ones among
            the others; without it (or for a name it lacks) they come last, in the order given.
    """
    if not pillow_available():
        return None
    shown, rows, reasons = _layout(tuple(names), absent or {}, order)
    groups, modules = _grouped(shown)
    title = TITLE
    if len(groups) < modules:
        title += f" ({modules} modules in {len(groups)} groups)"
    statistics = group_statistics(groups, histograms, rows)
    why: list[str | None] = [None] * len(groups)
    if reasons:
        for g, group in enumerate(groups):
            if all(rows is not None and rows[k] < 0 for k in group.members):
                member_reasons = {reasons[shown[k]] for k in group.members}
                why[g] = NOT_OPTIMIZED if NOT_OPTIMIZED in member_reasons else NO_GRAD
    return draw([g.label for g in groups], statistics, title, why)


def _layout(
    names: tuple[str, ...], absent: Mapping[str, str], order: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[int, ...] | None, dict[str, str]]:
    """The parameters to show in depth order, each one's histogram row (``-1`` for none; ``None``
    when every one is a row, in order), and why each one without a row is shown."""
    with_rows = set(names)
    reasons = {name: why for name, why in absent.items() if name not in with_rows}
    if not reasons:
        return names, None, {}
    shown = names + tuple(reasons)
    if order is not None:
        position = _positions(tuple(order))
        last = len(position)
        shown = tuple(sorted(shown, key=lambda name: position.get(name, last)))  # stable
    row_of = {name: j for j, name in enumerate(names)}
    return shown, tuple(row_of.get(name, -1) for name in shown), reasons


@functools.lru_cache(maxsize=4)
def _positions(order: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(order)}


@functools.lru_cache(maxsize=8)
def _grouped(names: tuple[str, ...]) -> tuple[tuple[Group, ...], int]:
    """The groups and the number of modules; the same names come at every figure of a run."""
    return tuple(group_parameters(names)), len({_module_parts(name) for name in names})


def pillow_available() -> bool:
    """Whether Pillow is there, recent enough to measure text with ``getbbox`` (9.2)."""
    try:
        from PIL import Image, ImageDraw, ImageFont  # noqa: F401
    except ImportError:
        return False
    return hasattr(ImageFont.ImageFont, "getbbox")


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: Aileron
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # older, or without FreeType: a fixed bitmap font


@functools.lru_cache(maxsize=4)
def _line_height(size: int) -> int:
    return int(_font(size).getbbox("Agjy|([")[3]) + 1


_BITMAP_TEXT = str.maketrans({"…": "..."})
_text_lock = threading.Lock()


@functools.lru_cache(maxsize=512)
def _text(text: str, size: int = _TEXT_SIZE, rotated: bool = False) -> Pixels:
    """``text`` in black on white, one line high, as a read-only ``(h, w, 3)`` array to darken
    the canvas with; turned a quarter turn to read upwards when ``rotated``."""
    from PIL import Image, ImageDraw, ImageFont

    with _text_lock:  # FreeType faces must not be used by two threads at once
        font = _font(size)
        if not isinstance(font, ImageFont.FreeTypeFont):  # a bitmap font knows only Latin-1
            text = text.translate(_BITMAP_TEXT).encode("latin-1", "replace").decode("latin-1")
        else:  # the space of Pillow's Aileron is a fifth of an em: too narrow to read words
            text = text.replace(" ", "  ")
        width = max(int(font.getbbox(text)[2]), 1)
        image = Image.new("L", (width, _line_height(size)), 255)
        ImageDraw.Draw(image).text((0, 0), text, fill=0, font=font)
    pixels = np.asarray(image)
    if rotated:
        pixels = np.rot90(pixels)  # counterclockwise
    pixels = np.repeat(pixels[:, :, None], 3, axis=2)  # numpy is 10x slower broadcasting
    pixels.flags.writeable = False  # shared by every figure
    return pixels


@functools.lru_cache(maxsize=16)
def _row(colour: tuple[int, int, int]) -> Pixels:
    """A row of ``colour`` as wide as the widest figure: filling boxes from it is ten times as
    fast as from the colour alone."""
    row = np.tile(np.array(colour, dtype=np.uint8), (MAX_WIDTH, 1))
    row.flags.writeable = False
    return row


def _shorten(label: str) -> str:
    if len(label) <= MAX_LABEL_CHARS:
        return label
    return "…" + label[-(MAX_LABEL_CHARS - 1) :]


class _Canvas:
    """An ``(H, W, 3)`` uint8 array to draw on: filled boxes and black text, clipped to the
    canvas. Drawing into numpy directly avoids a Pillow image's copies to and from numpy, which
    would take longer than the drawing."""

    def __init__(self, width: int, height: int) -> None:
        self.pixels: Pixels = np.full((height, width, 3), 255, dtype=np.uint8)

    def box(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        """Fills columns ``x0`` to ``x1`` and rows ``y0`` to ``y1``, both included."""
        region = self.pixels[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1]
        region[...] = _row(colour)[: region.shape[1]]

    def hatch(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        """Diagonal stripes of ``colour`` over columns ``x0`` to ``x1`` and rows ``y0`` to
        ``y1``: a bar that stands for a module, not for a value."""
        region = self.pixels[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1]
        rows, columns = np.indices(region.shape[:2])
        region[(rows + columns) // _HATCH % 2 == 0] = colour

    def text(self, mask: Pixels, x: int, y: int) -> None:
        """Darkens the canvas by ``mask`` (see :func:`_text`) with its top left corner at x, y."""
        height, width = self.pixels.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + mask.shape[1], width), min(y + mask.shape[0], height)
        if x0 < x1 and y0 < y1:
            region = self.pixels[y0:y1, x0:x1]
            np.minimum(region, mask[y0 - y : y1 - y, x0 - x : x1 - x], out=region)


def draw(
    labels: Sequence[str],
    statistics: GroupStatistics,
    title: str = TITLE,
    absent: Sequence[str | None] = (),
) -> Pixels:
    """Draws the bars of ``statistics``, one per label: an ``(H, W, 3)`` uint8 array.

    ``absent[i]``, where given and not ``None``, is why group ``i`` has nothing to measure
    (:data:`NO_GRAD` or :data:`NOT_OPTIMIZED`): its slot gets a bar across the plot in that
    reason's colour, and the legend names the reason."""
    n = len(labels)
    means, maxima, bad = statistics
    line = _line_height(_TEXT_SIZE)
    values = np.concatenate([means, maxima])
    positive = values[np.isfinite(values) & (values > 0)]
    decades: list[int] = []
    low = high = 0
    if positive.size:
        low = math.floor(math.log10(float(positive.min()) / 2))
        high = max(math.ceil(math.log10(float(positive.max()) * 1.5)), low + 1)
        every = -(-(high - low) // _MAX_Y_LABELS)
        decades = [k for k in range(low, high + 1) if k % every == 0]
    y_labels = [_text(f"1e{k}") for k in decades]
    x_labels = [_text(_shorten(label), rotated=True) for label in labels]
    title_text = _text(title, _TITLE_SIZE)
    legend = [(MAX_COLOUR, "max |grad|"), (MEAN_COLOUR, "mean |grad|")]
    if bad.any():
        legend.append((NONFINITE_COLOUR, "NaN/Inf present"))
    for reason, colour in ABSENT_COLOURS.items():
        if reason in absent:
            legend.append((colour, reason))
    legend_texts = [_text(text) for _, text in legend]
    legend_width = sum(line + _GAP + t.shape[1] for t in legend_texts)
    legend_width += _LEGEND_GAP * (len(legend) - 1)

    # Layout, left to right: y label, decade labels, ticks, the plot (one slot per bar);
    # top to bottom: title and legend (the legend under the title when it does not fit beside
    # it), the plot, ticks, group labels, caption.
    left = _PAD + line + _GAP + max((t.shape[1] for t in y_labels), default=0) + _GAP + _TICK
    right_margin = _PAD
    slot = float(_SLOT)
    if n:
        slot = min(slot, (MAX_WIDTH - left - right_margin) / n)
    plot_width = max(round(n * slot), _MIN_PLOT_WIDTH)
    width = max(
        left + plot_width + right_margin,
        2 * _PAD + title_text.shape[1],
        _PAD + legend_width + right_margin,
    )
    width = min(width, MAX_WIDTH)
    plot_width = width - left - right_margin
    slot = plot_width / n if n else slot
    right = left + plot_width
    legend_x = width - right_margin - legend_width
    if legend_x >= 3 * _PAD + title_text.shape[1]:
        legend_y = _PAD + (title_text.shape[0] - line) // 2
        top: int = _PAD + title_text.shape[0] + _PAD
    else:
        legend_x = max(legend_x, _PAD)
        legend_y = _PAD + title_text.shape[0] + _GAP
        top = legend_y + line + _PAD
    bottom = top + _PLOT_HEIGHT
    label_top = bottom + _TICK + _GAP
    caption_top = label_top + max((t.shape[0] for t in x_labels), default=0) + _GAP
    canvas = _Canvas(width, caption_top + line + _PAD)

    def y_of(value: float) -> int:
        return round(bottom - (math.log10(value) - low) / (high - low) * _PLOT_HEIGHT)

    for k, text in zip(decades, y_labels, strict=True):
        y = y_of(10.0**k)
        canvas.box(left, y, right, y, GRID_COLOUR)
        canvas.box(left - _TICK, y, left, y, INK)
        canvas.text(text, left - _TICK - _GAP - text.shape[1], y - line // 2)
    centres = [round(left + (i + 0.5) * slot) for i in range(n)]
    bar = min(0.8 * slot, _BAR)
    for i, why in enumerate(absent):
        if why is not None:  # nothing to measure: a hatched bar across the plot says why
            x0 = round(centres[i] - bar / 2)
            x1 = max(round(centres[i] + bar / 2) - 1, x0)
            canvas.hatch(x0, top + 1, x1, bottom - 1, ABSENT_COLOURS[why])
    for i, centre in enumerate(centres):
        for value, half, colour in (
            (maxima[i], bar / 2, MAX_COLOUR),
            (means[i], bar * 0.3, MEAN_COLOUR),
        ):
            if math.isfinite(value) and value > 0:
                x0 = round(centre - half)
                canvas.box(
                    x0,
                    min(y_of(value), bottom - 1),
                    max(round(centre + half) - 1, x0),
                    bottom,
                    colour,
                )
        canvas.box(centre, bottom, centre, bottom + _TICK, INK)
        text = x_labels[i]
        canvas.text(text, centre - text.shape[1] // 2, label_top)
    for x0, y0, x1, y1 in (
        (left, top, right, top),
        (left, bottom, right, bottom),
        (left, top, left, bottom),
        (right, top, right, bottom),
    ):
        canvas.box(x0, y0, x1, y1, INK)
    dashes = np.arange(top + 1, bottom)
    dashes = dashes[(dashes - top - 1) % (_DASH + _DASH_GAP) < _DASH]
    for i in np.flatnonzero(bad).tolist():  # dashed red lines over the bars
        canvas.pixels[dashes, centres[i] - 1 : centres[i] + 1] = _row(NONFINITE_COLOUR)[:2]
    if not positive.size:
        note = _text(NOTHING_TO_DRAW)
        x, y = left + (plot_width - note.shape[1]) // 2, top + _PLOT_HEIGHT // 3
        canvas.box(x - _GAP, y - _GAP, x + note.shape[1] + _GAP, y + note.shape[0] + _GAP, PAPER)
        canvas.text(note, x, y)

    canvas.text(title_text, _PAD, _PAD)
    x, y = legend_x, legend_y
    for (colour, _), text in zip(legend, legend_texts, strict=True):
        if colour == NONFINITE_COLOUR:
            centre = x + line // 2
            for dash in range(0, line, _DASH + _DASH_GAP):
                canvas.box(centre - 1, y + dash, centre, y + min(dash + _DASH, line) - 1, colour)
        elif colour in ABSENT_COLOURS.values():
            canvas.hatch(x, y + 1, x + line - 2, y + line - 1, colour)
        else:
            canvas.box(x, y + 1, x + line - 2, y + line - 1, colour)
        canvas.text(text, x + line + _GAP, y)
        x += line + _GAP + text.shape[1] + _LEGEND_GAP
    y_label = _text(Y_LABEL, rotated=True)
    canvas.text(y_label, _PAD, top + (_PLOT_HEIGHT - y_label.shape[0]) // 2)
    caption = _text(CAPTION)
    canvas.text(caption, left + (plot_width - caption.shape[1]) // 2, caption_top)
    return canvas.pixels
