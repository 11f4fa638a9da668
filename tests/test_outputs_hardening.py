"""What the outputs say about a run that goes wrong: NaN/Inf at the check that saw it, the modules
without a gradient in the gradient-flow figure, findings that follow an earlier one in the
summary, which limit an exploding gradient crossed, and the package's license."""

from __future__ import annotations

import hashlib
import io
import math
import pathlib
import re
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch import Finding, Kind
from gradwatch._histograms import GradientHistograms, histogram_rows
from gradwatch._monitor import format_summary
from gradwatch.sinks import TensorBoardSink
from gradwatch.sinks._gradient_flow import (
    MAX_COLOUR,
    NO_GRAD,
    NO_GRAD_COLOUR,
    NOT_OPTIMIZED,
    NOT_OPTIMIZED_COLOUR,
)
from gradwatch.sinks.tensorboard import custom_scalars_layout, gradient_flow_image
from tests.helpers.models import mlp, regression_batch

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf


def _read(log_dir: pathlib.Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


def _scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _presence_tags(accumulator: EventAccumulator) -> set[str]:
    return {t for t in accumulator.Tags()["scalars"] if t.startswith("gradwatch/grad_has_")}


# ---------------------------------------------------------------- NaN/Inf at every check


def test_presence_flags_at_the_check_that_saw_a_nonfinite_norm(tmp_path: pathlib.Path) -> None:
    sink = TensorBoardSink(tmp_path)
    names = ["a", "b", "c"]
    sink.write_check(0, names, torch.tensor([1.0, 2.0, 3.0]), 3.74)
    sink.write_check(3, names, torch.tensor([NAN, INF, 1.0]), 1.0)
    sink.write_check(4, names, torch.tensor([NAN, 1.0, 1.0]), 1.41)
    sink.write_check(5, names, torch.tensor([1.0, 1.0, 1.0]), 1.73)
    sink.write_check(6, names, torch.tensor([1.0, 1.0, 1.0]), 1.73)
    sink.close()
    accumulator = _read(tmp_path)
    # NaN norm: NaN present; Inf norm: Inf present (or squares overflowing float32); back to 0
    # at the first check where the norm is finite again, then nothing more.
    assert _scalars(accumulator, "gradwatch/grad_has_nan/a") == [(3, 1.0), (4, 1.0), (5, 0.0)]
    assert _scalars(accumulator, "gradwatch/grad_has_inf/a") == [(3, 0.0), (4, 0.0), (5, 0.0)]
    assert _scalars(accumulator, "gradwatch/grad_has_nan/b") == [(3, 0.0), (4, 0.0)]
    assert _scalars(accumulator, "gradwatch/grad_has_inf/b") == [(3, 1.0), (4, 0.0)]
    assert _presence_tags(accumulator) == {
        f"gradwatch/grad_has_{k}/{n}" for k in ("nan", "inf") for n in ("a", "b")
    }
    # The counts keep their meaning: exact counts, at histogram steps only.
    assert not any(t.startswith("gradwatch/grad_nan/") for t in accumulator.Tags()["scalars"])


def _train_with_nan_at(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, nan_at: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = regression_batch(generator=generator)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == nan_at:
            loss = loss * torch.tensor(NAN)
        loss.backward()
        saved = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == nan_at:  # keep the weights finite: only this step's gradients are NaN
            with torch.no_grad():
                for p, kept in zip(model.parameters(), saved, strict=True):
                    p.copy_(kept)


def test_a_nan_between_histogram_steps_is_charted_at_its_step(tmp_path: pathlib.Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, log_dir=tmp_path, histogram_every=5, on_finding="record"
    ) as watcher:
        _train_with_nan_at(model, opt, steps=12, nan_at=7)
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.NAN, 7)]
    accumulator = _read(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    for name in names:
        assert _scalars(accumulator, f"gradwatch/grad_has_nan/{name}") == [(7, 1.0), (8, 0.0)]
        assert _scalars(accumulator, f"gradwatch/grad_has_inf/{name}") == [(7, 0.0), (8, 0.0)]
        counts = _scalars(accumulator, f"gradwatch/grad_nan/{name}")
        assert counts == [(0, 0.0), (5, 0.0), (10, 0.0)]  # histogram steps, exact counts
    (event,) = accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (page,) = [c for c in layout.category if c.title == "gradwatch"]
    charts = {chart.title: list(chart.multiline.tag) for chart in page.chart}
    presence = [tags for title, tags in charts.items() if "every check" in title]
    assert presence == [["^gradwatch/grad_has_(nan|inf)/"]]
    for tag in _presence_tags(accumulator):
        assert re.search(presence[0][0], tag)


def test_a_healthy_run_writes_no_presence_flags(tmp_path: pathlib.Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, log_dir=tmp_path, histogram_every=5, on_finding="record"):
        _train_with_nan_at(model, opt, steps=6, nan_at=-1)
    assert _presence_tags(_read(tmp_path)) == set()


def test_the_layout_keeps_its_count_chart() -> None:
    page = custom_scalars_layout(["a.w"])["gradwatch"]
    assert page["non-finite gradient values"] == ["Multiline", ["^gradwatch/grad_(nan|inf)/"]]


# ---------------------------------------------------------------- the gradient-flow figure


def _hist(*grads: list[float]) -> GradientHistograms:
    return GradientHistograms(histogram_rows([torch.tensor(g) for g in grads], 8))


def _below_legend(image: np.ndarray) -> np.ndarray:
    black = (image == 0).all(axis=2).sum(axis=1)
    return image[int(np.argmax(black > image.shape[1] // 2)) :]


def _columns(image: np.ndarray, colour: tuple[int, int, int]) -> list[int]:
    """The columns of the plot (below the legend) where ``colour`` is."""
    mask = (_below_legend(image) == np.array(colour, dtype=np.uint8)).all(axis=2)
    return np.flatnonzero(mask.any(axis=0)).tolist()


def test_figure_draws_parameters_without_a_gradient_marked() -> None:
    pytest.importorskip("PIL")
    hist = _hist([1.0, 2.0])
    plain = gradient_flow_image(["head.weight"], hist)
    assert not _columns(plain, NO_GRAD_COLOUR)
    image = gradient_flow_image(
        ["head.weight"],
        hist,
        absent={"encoder.0.weight": NO_GRAD, "extra.weight": NOT_OPTIMIZED},
        order=["encoder.0.weight", "head.weight", "extra.weight"],
    )
    grey, orange, blue = (
        _columns(image, c) for c in (NO_GRAD_COLOUR, NOT_OPTIMIZED_COLOUR, MAX_COLOUR)
    )
    assert grey and orange and blue
    assert max(grey) < min(blue) and max(blue) < min(orange)  # in the order given
    # A hatched bar across the plot's height: the module is there, with nothing to measure.
    mask = (_below_legend(image) == np.array(NO_GRAD_COLOUR, dtype=np.uint8)).all(axis=2)
    rows = np.flatnonzero(mask[:, grey[len(grey) // 2]])
    assert rows[-1] - rows[0] > 250 and 0.3 < len(rows) / (rows[-1] - rows[0] + 1) < 0.7


def test_a_parameter_with_a_row_is_drawn_from_it_even_if_once_reported() -> None:
    pytest.importorskip("PIL")
    image = gradient_flow_image(["a.w", "b.w"], _hist([1.0], [2.0]), absent={"a.w": NO_GRAD})
    assert not _columns(image, NO_GRAD_COLOUR)


def _figures(log_dir: pathlib.Path) -> dict[int, np.ndarray]:
    from PIL import Image

    return {
        e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        for e in _read(log_dir).Images("gradwatch/grad_flow")
    }


def test_the_sink_learns_the_parameters_at_fault_from_findings(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("PIL")
    sink = TensorBoardSink(tmp_path, figure_every=1)
    hist = _hist([1.0, 2.0])
    sink.write_histograms(0, ["head.weight"], hist)
    sink.write_finding(Finding(Kind.NO_GRAD, 1, "enc.weight", 5.0, 5.0, ("enc.weight", "enc.bias")))
    sink.write_finding(Finding(Kind.NOT_IN_OPTIMIZER, 1, "extra.weight", params=("extra.weight",)))
    sink.write_histograms(2, ["head.weight"], hist)
    sink.close()
    figures = _figures(tmp_path)
    assert not _columns(figures[0], NO_GRAD_COLOUR)
    assert _columns(figures[2], NO_GRAD_COLOUR) and _columns(figures[2], NOT_OPTIMIZED_COLOUR)


def test_param_names_give_the_figure_the_models_order(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("PIL")
    sink = TensorBoardSink(
        tmp_path, figure_every=1, param_names=["enc.weight", "enc.bias", "head.weight"]
    )
    sink.write_finding(Finding(Kind.NO_GRAD, 0, "enc.weight", 5.0, 5.0, ("enc.weight", "enc.bias")))
    sink.write_histograms(0, ["head.weight"], _hist([1.0, 2.0]))
    sink.close()
    (figure,) = _figures(tmp_path).values()
    assert max(_columns(figure, NO_GRAD_COLOUR)) < min(_columns(figure, MAX_COLOUR))


class DetachedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).detach())


def test_a_detached_encoder_is_in_the_figure(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("PIL")
    model = DetachedEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, log_dir=tmp_path, histogram_every=100, on_finding="record"
    ) as watcher:
        generator = torch.Generator().manual_seed(0)
        for _ in range(101):
            x, y = regression_batch(generator=generator)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert [(f.kind, f.param) for f in watcher.findings] == [(Kind.NO_GRAD, "encoder.weight")]
    figures = _figures(tmp_path)
    assert sorted(figures) == [0, 100]
    assert not _columns(figures[0], NO_GRAD_COLOUR)  # not known to be at fault yet
    assert _columns(figures[100], NO_GRAD_COLOUR)


# ---------------------------------------------------------------- findings that follow


def _lines(summary: str) -> dict[str, str]:
    """Each finding's headline in the summary, by its "[kind] where" start."""
    heads = [line.strip() for line in summary.splitlines() if line.startswith("  [")]
    return {" ".join(head.split(" ")[:2]): head for head in heads}


def test_summary_marks_findings_that_follow_an_earlier_one() -> None:
    findings = [
        Finding(Kind.EXPLODING, 12, "a", 1e5, 10.0, ("a", "b")),
        Finding(Kind.NAN, 13, "b", 2.0, params=("b", "c")),  # overlaps the exploding one
        Finding(Kind.SKIPPED_STEP, 13, None, 2.0, params=("b", "c")),
        Finding(Kind.NAN, 20, "c", 1.0, params=("c",)),  # overlaps the nan at 13, 7 steps on
        Finding(Kind.INF, 14, "d", 1.0, params=("d",)),  # nothing in common
        Finding(Kind.EXPLODING, 15, "b", 1e6, 10.0, ("b", "a")),
        Finding(Kind.NAN, 40, "a", 1.0, params=("a",)),  # too late
        Finding(Kind.MISSING_ZERO_GRAD, 13, "a", 2.0, 1.0, ("a",)),  # not a consequence
    ]
    occurrences = {(f.kind, f.param): 1 for f in findings}
    occurrences[(Kind.NAN, "b")] = 3
    lines = _lines(format_summary(findings, occurrences, 50))
    follows = "(follows exploding at step 12)"
    assert lines["[exploding] a"] == "[exploding] a"
    assert lines["[nan] b"] == f"[nan] b (seen at 3 checks) {follows}"
    assert lines["[skipped_step] (model)"].endswith(follows)
    assert lines["[nan] c"].endswith(follows)  # through the nan at step 13
    assert lines["[exploding] b"].endswith(follows)
    assert lines["[inf] d"] == "[inf] d"
    assert lines["[nan] a"] == "[nan] a"
    assert lines["[missing_zero_grad] a"] == "[missing_zero_grad] a"


def test_a_nan_at_the_check_of_an_exploding_follows_it() -> None:
    # At one check the numerics detector reports before the magnitude detector.
    findings = [
        Finding(Kind.NAN, 5, "b", 1.0, params=("b",)),
        Finding(Kind.EXPLODING, 5, "b", 1e9, 10.0, ("a", "b")),
    ]
    lines = _lines(format_summary(findings, {}, 6))
    assert lines["[nan] b"] == "[nan] b (follows exploding at step 5)"
    assert lines["[exploding] b"] == "[exploding] b"


def test_the_summary_of_a_learning_rate_raised_1000x() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, optimizer, on_finding="record") as watcher:
        for step in range(30):
            if step == 15:
                for group in optimizer.param_groups:
                    group["lr"] *= 1000
            x = torch.randn(64, 8)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True)).backward()
            optimizer.step()
    first = watcher.findings[0]
    assert first.kind == Kind.EXPLODING
    heads = [line for line in watcher.summary().splitlines() if line.startswith("  [")]
    assert "follows" not in heads[0]
    later = [h for h, f in zip(heads[1:], watcher.findings[1:], strict=True) if f.kind == Kind.NAN]
    assert later and all(h.endswith(f"(follows exploding at step {first.step})") for h in later)


# ---------------------------------------------------------------- the exploding message


def _mlp_run(
    step_fn: Callable[[nn.Module, int], None], steps: int, **options: object
) -> gradwatch.Watcher:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: no_update ignored
    options.setdefault("ignore", ["no_update"])
    with gradwatch.watch(model, opt, on_finding="record", **options) as watcher:  # type: ignore[arg-type]
        for i in range(steps):
            x, y = regression_batch()
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            step_fn(model, i)
            opt.step()
    return watcher


def _scale_all(at: int, factor: float) -> Callable[[nn.Module, int], None]:
    def step(model: nn.Module, i: int) -> None:
        if i == at:
            for p in model.parameters():
                assert p.grad is not None
                p.grad.mul_(factor)

    return step


def test_exploding_above_the_ceiling_names_it_and_the_models_total() -> None:
    watcher = _mlp_run(_scale_all(2, 1e8), steps=4)
    (finding,) = watcher.findings
    assert (finding.kind, finding.step, finding.param) == (Kind.EXPLODING, 2, None)
    assert finding.threshold == 1e6 and len(finding.params) == 5
    message = finding.message
    assert "the model's total gradient norm reached" in message
    assert "the absolute ceiling max_grad_norm" in message and "limit 1e+06" in message
    assert "median" not in message


def test_exploding_above_its_history_names_it_and_the_models_total() -> None:
    watcher = _mlp_run(_scale_all(12, 1e4), steps=14)
    (finding,) = watcher.findings
    assert finding.kind == Kind.EXPLODING and finding.param is not None
    message = finding.message
    assert "the model's total gradient norm reached" in message
    assert "explode_factor times the median of its recent values" in message
    assert "max_grad_norm" not in message
    assert f"grew most: {finding.param!r}" in message


def test_exploding_of_one_parameter_names_it_and_its_own_history() -> None:
    # The first layer's bias carries about a tenth of the total norm: a 3000-fold jump in its
    # gradient crosses its own limit, while the total (about 300 times its own) stays below the
    # model's.
    def step(model: nn.Module, i: int) -> None:
        if i == 12:
            bias = model[0].bias
            assert bias.grad is not None
            bias.grad.mul_(3000)

    watcher = _mlp_run(step, steps=14, max_grad_norm=None)
    (finding,) = watcher.findings
    assert (finding.kind, finding.step, finding.param) == (Kind.EXPLODING, 12, "0.bias")
    assert finding.params == ("0.bias",)
    message = finding.message
    assert "the gradient norm of '0.bias' reached" in message
    assert "explode_factor times the median of its own recent norms" in message
    assert "total gradient norm reached" not in message


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        (Finding(Kind.EXPLODING, 1, None, 2e6, 1e6, ("a", "b")), "max_grad_norm"),
        (Finding(Kind.EXPLODING, 1, "a", 5e3, 40.0, ("a", "b")), "recent values"),
        (Finding(Kind.EXPLODING, 1, "a", 5e3, 40.0, ("a",)), "own recent norms"),
        (Finding(Kind.EXPLODING, 1, "a", 5e3, 40.0), "own recent norms"),
    ],
)
def test_the_exploding_message_is_read_from_the_fields(finding: Finding, expected: str) -> None:
    assert expected in finding.message
    assert Finding.from_dict(finding.to_dict()).message == finding.message


# ---------------------------------------------------------------- packaging

APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"
"""The MD5 of https://www.apache.org/licenses/LICENSE-2.0.txt."""


def test_the_license_file_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.md5(text).hexdigest() == APACHE_2_MD5
    assert b"Apache License\n                           Version 2.0, January 2004" in text


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pyproject_declares_the_license_as_an_spdx_expression() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project.get("classifiers", ()))
