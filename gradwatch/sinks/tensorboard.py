"""TensorBoard output: gradient norms, histograms, findings and layout as standard event files."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import math
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradwatch._histograms import GradientHistograms
from gradwatch.findings import Finding, GradWatchTypeError, Kind
from gradwatch.sinks import _gradient_flow
from gradwatch.sinks.base import Sink

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

FLUSH_SECS = 10
"""Seconds between flushes of a writer gradwatch owns: a crash loses at most this much."""

_AT_FAULT = {
    Kind.NO_GRAD: _gradient_flow.NO_GRAD,
    Kind.NOT_IN_OPTIMIZER: _gradient_flow.NOT_OPTIMIZED,
}
"""The findings whose parameters no check measures, and how the figure marks them."""

_open_sinks: weakref.WeakSet[TensorBoardSink] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for sink in list(_open_sinks):
        with contextlib.suppress(Exception):  # the interpreter is exiting: nobody to tell
            sink.flush()


class TensorBoardSink(Sink):
    """Writes under ``log_dir``, or to ``writer``, a ``SummaryWriter`` of yours.

    Tags (see the README's TensorBoard section): ``gradwatch/grad_norm/total`` every check;
    ``gradwatch/grad_norm/<param>`` every ``param_every`` steps; histograms
    ``gradwatch/grad/<param>`` with scalars ``gradwatch/grad_nan/<param>`` and
    ``gradwatch/grad_inf/<param>`` (exact counts) and the image ``gradwatch/grad_flow`` (at most
    one every ``figure_every`` steps, when Pillow is installed) whenever the monitor sends
    histograms; ``gradwatch/grad_has_nan/<param>`` and ``gradwatch/grad_has_inf/<param>`` (1 or
    0, from the norms: see :meth:`write_check`) at every check where that parameter's norm is not
    finite, and at the next check of it once it is again; ``gradwatch/sgd_update_ratio/<param>``
    whenever it sends ratios; ``gradwatch/findings/<kind>`` (count so far) and a text entry
    ``gradwatch/findings`` for every finding, at the step it was found (naming the rank when it
    is not zero); a custom-scalars layout grouping the per-parameter scalars by module.

    The gradient-flow figure also draws the modules of the parameters that ``no_grad`` and
    ``not_in_optimizer`` findings named, which no check measures: a hatched grey bar ("no
    gradient") or a hatched orange one ("not in an optimizer") across the plot. ``param_names``,
    the watched parameters in the model's order, places them among the others; without it they
    come after the measured modules.

    When ``writer`` is given, ``log_dir`` is ignored; that writer is flushed but never closed,
    and its custom-scalars layout is left alone (see :func:`custom_scalars_layout`). A writer
    created here is flushed every ``FLUSH_SECS`` seconds and closed by :meth:`close`. Either is
    flushed at interpreter exit. After :meth:`close`, every write is dropped: nothing more goes
    to the writer, and no event file is reopened.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: SummaryWriter | None = None,
        param_every: int = 10,
        figure_every: int = 100,
        param_names: Sequence[str] | None = None,
    ) -> None:
        if writer is None:
            if log_dir is None:
                raise GradWatchTypeError("TensorBoardSink needs a log_dir or a writer")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=os.fspath(log_dir), flush_secs=FLUSH_SECS)
            self._owns_writer = True
        else:
            self._owns_writer = False
        self._writer: SummaryWriter = writer
        self.log_dir: str = writer.get_logdir()  # type: ignore[no-untyped-call]
        self._param_every = param_every
        self._figure_every = figure_every
        self._last_figure: int | None = None
        self._figure_broken = False
        self._counts: dict[str, int] = {}
        self._layout_names: dict[str, None] = {}
        self._order = None if param_names is None else tuple(param_names)
        self._at_fault: dict[str, str] = {}
        """Parameters that findings showed no check measures, with how the figure marks them."""
        self._flagged: set[str] = set()
        """Parameters whose last presence flags said NaN or Inf."""
        self._closed = False
        _open_sinks.add(self)

    def write_check(
        self, step: int, names: Sequence[str], norms: torch.Tensor, total_norm: float
    ) -> None:
        if self._closed:
            return
        writer = self._writer
        if self._owns_writer and not self._layout_names.keys() >= set(names):
            self._layout_names.update(dict.fromkeys(names))
            writer.add_custom_scalars(custom_scalars_layout(list(self._layout_names)))
        values = []
        if math.isfinite(total_norm):
            values.append(_scalar("gradwatch/grad_norm/total", total_norm))
        if self._param_every and step % self._param_every == 0:
            for name, norm in zip(names, norms.tolist(), strict=True):
                values.append(_scalar(f"gradwatch/grad_norm/{name}", norm))
        host = norms.numpy()  # a CPU tensor: no device is read
        if self._flagged or not np.isfinite(host).all():
            values.extend(self._presence(names, host))
        self._emit(step, values)

    def _presence(self, names: Sequence[str], norms: np.ndarray) -> list[Any]:
        """``gradwatch/grad_has_nan/<param>`` and ``gradwatch/grad_has_inf/<param>`` of each
        parameter whose norm is not finite (1 for the one that says so, 0 for the other), and
        both 0 for a parameter flagged at an earlier check whose norm is finite again.

        A NaN norm means the gradient holds NaN; an infinite one that it holds ±Inf or finite
        values whose squares overflow float32 (the norms cannot tell these apart; the exact
        counts come with the histograms)."""
        values = []
        flagged = self._flagged
        nans, infs = np.isnan(norms).tolist(), np.isinf(norms).tolist()
        for name, nan, inf in zip(names, nans, infs, strict=True):
            if nan or inf:
                flagged.add(name)
            elif name in flagged:
                flagged.discard(name)
            else:
                continue
            values.append(_scalar(f"gradwatch/grad_has_nan/{name}", float(nan)))
            values.append(_scalar(f"gradwatch/grad_has_inf/{name}", float(inf)))
        return values

    def _emit(self, step: int, values: list[Any]) -> None:
        """Writes ``values`` (``Summary.Value``) as one event: each event wakes the writer's
        thread, so one per call instead of one per tag saves most of the cost of writing."""
        if values:
            summary = _protos().Summary(value=values)
            self._writer._get_file_writer().add_summary(summary, step)  # type: ignore[no-untyped-call]

    def write_histograms(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        if self._closed:
            return
        protos = _protos()
        finite = histograms.finite.tolist()
        nans = histograms.nan.tolist()
        infs = histograms.inf.tolist()
        lows = histograms.min.tolist()
        highs = histograms.max.tolist()
        sums = histograms.sum.tolist()
        squares = histograms.sum_squares.tolist()
        limits = histograms.bucket_limits().tolist()
        counts = histograms.counts.tolist()
        values = []
        for j, name in enumerate(names):
            values.append(_scalar(f"gradwatch/grad_nan/{name}", nans[j]))
            values.append(_scalar(f"gradwatch/grad_inf/{name}", infs[j]))
            if finite[j] <= 0:
                continue  # no finite value: nothing to draw, the counts above say why
            # What SummaryWriter.add_histogram_raw writes, for all parameters in one event.
            histogram = protos.HistogramProto(
                min=lows[j],
                max=highs[j],
                num=finite[j],
                sum=sums[j],
                sum_squares=squares[j],
                bucket_limit=limits[j],
                bucket=counts[j],
            )
            values.append(protos.Summary.Value(tag=f"gradwatch/grad/{name}", histo=histogram))
        self._emit(step, values)
        if not self._figure_broken and (
            self._last_figure is None or step >= self._last_figure + self._figure_every
        ):
            self._last_figure = step
            self._write_figure(step, names, histograms)

    def _write_figure(
        self, step: int, names: Sequence[str], histograms: GradientHistograms
    ) -> None:
        """Draws the gradient-flow figure (a few milliseconds) at the histogram step itself."""
        try:
            image = gradient_flow_image(names, histograms, self._at_fault, self._order)
            value = None if image is None else _image("gradwatch/grad_flow", image)
        except Exception as error:  # a broken figure must never stop training
            self._figure_broken = True
            from gradwatch._reporting import warn_user  # imports the sinks

            warn_user(
                f"gradwatch: drawing the gradient-flow figure failed ({error!r}); no more "
                f"figures are drawn in this run",
                RuntimeWarning,
            )
            return
        if value is not None:
            self._emit(step, [value])  # a failed write is the sink's failure, not the figure's

    def write_update_ratios(self, step: int, names: Sequence[str], ratios: torch.Tensor) -> None:
        if self._closed:
            return
        self._emit(
            step,
            [
                _scalar(f"gradwatch/sgd_update_ratio/{name}", ratio)
                for name, ratio in zip(names, ratios.tolist(), strict=True)
                if math.isfinite(ratio)
            ],
        )

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        if self._closed:
            return
        reason = _AT_FAULT.get(finding.kind)
        if reason is not None:
            for name in finding.params or (() if finding.param is None else (finding.param,)):
                self._at_fault[name] = reason
        kind = finding.kind.value
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self._writer.add_scalar(f"gradwatch/findings/{kind}", self._counts[kind], finding.step)
        self._add_text("gradwatch/findings", finding_markdown(finding, rank=rank), finding.step)
        self._writer.flush()  # findings are rare; a run killed right after keeps them

    def _add_text(self, tag: str, text: str, step: int) -> None:
        # SummaryWriter.add_text would file it under "<tag>/text_summary"; keep the tag as given.
        from torch.utils.tensorboard.summary import text as text_summary

        summary = text_summary(tag, text)  # type: ignore[no-untyped-call]
        summary.value[0].tag = tag
        self._writer._get_file_writer().add_summary(summary, step)  # type: ignore[no-untyped-call]

    def flush(self) -> None:
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _open_sinks.discard(self)
        if self._owns_writer:
            self._writer.close()
        else:
            self._writer.flush()


def finding_markdown(finding: Finding, *, rank: int | None = None) -> str:
    """The text entry of a finding: its kind in bold, the parameter, the rank when it is not
    zero, and the message."""
    where = f"`{finding.param}`" if finding.param is not None else "(model)"
    if rank:
        where += f" (rank {rank})"
    return f"**{finding.kind.value}** {where}: {finding.message}"


def _scalar(tag: str, value: float) -> Any:
    """The ``Summary.Value`` that ``SummaryWriter.add_scalar`` writes."""
    return _protos().Summary.Value(tag=tag, simple_value=value)


@functools.cache
def _protos() -> Any:
    """TensorBoard's summary protocol buffers, imported on first use."""
    from tensorboard.compat.proto import summary_pb2  # type: ignore[import-untyped]

    return summary_pb2


def _image(tag: str, pixels: Any) -> Any:
    """The ``Summary.Value`` of an ``(H, W, 3)`` uint8 image, as ``SummaryWriter.add_image``
    writes it, with the PNG compressed at Pillow's fastest level (a figure is mostly flat
    colour: a few milliseconds instead of ``add_image``'s tens)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    height, width, channels = pixels.shape
    image = _protos().Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue()
    )
    return _protos().Summary.Value(tag=tag, image=image)


def module_of(name: str) -> str:
    """The module a parameter belongs to: its qualified name without the last part."""
    return name.rpartition(".")[0] or "(model)"


def custom_scalars_layout(names: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout gradwatch writes: per-parameter scalars grouped by module.

    For a ``SummaryWriter`` of your own, merge it into your layout and pass it to
    ``writer.add_custom_scalars``.
    """
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(module_of(name), []).append(name)

    def charts(prefix: str) -> dict[str, list[Any]]:
        return {
            module: ["Multiline", [f"^{re.escape(f'{prefix}/{n}')}$" for n in members]]
            for module, members in modules.items()
        }

    return {
        "gradwatch": {
            "total gradient norm": ["Multiline", ["^gradwatch/grad_norm/total$"]],
            "findings so far, by kind": ["Multiline", ["^gradwatch/findings/"]],
            "non-finite gradient values": ["Multiline", ["^gradwatch/grad_(nan|inf)/"]],
            "non-finite gradient values present (1) or not (0), every check": [
                "Multiline",
                ["^gradwatch/grad_has_(nan|inf)/"],
            ],
        },
        "gradwatch: gradient norm by module": charts("gradwatch/grad_norm"),
        "gradwatch: SGD update ratio by module": charts("gradwatch/sgd_update_ratio"),
    }


def gradient_flow_image(
    names: Sequence[str],
    histograms: GradientHistograms,
    absent: Mapping[str, str] | None = None,
    order: Sequence[str] | None = None,
) -> Any:
    """Mean and largest finite |grad| of each module, in the parameters' order, on a log scale
    (at most 64 bars: see ``_gradient_flow.group_parameters``): an ``(H, W, 3)`` uint8 array, or
    ``None`` without Pillow.

    ``absent`` maps parameters without a histogram row to draw anyway to why
    (``_gradient_flow.NO_GRAD`` or ``NOT_OPTIMIZED``), placed by ``order`` (see
    ``_gradient_flow.gradient_flow_image``)."""
    return _gradient_flow.gradient_flow_image(names, histograms, absent, order)
