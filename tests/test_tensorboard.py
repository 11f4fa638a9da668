"""log_dir: readable TensorBoard event files with gradient norms and findings, read back with
TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch import Kind
from gradwatch.sinks import TensorBoardSink
from tests.helpers.models import mlp, regression_batch

STEPS = 23
NO_ZERO_GRAD_AT = 4
NAN_AT = 15


def _read(log_dir: pathlib.Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _train(
    model: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Runs STEPS steps with a missing zero_grad and a NaN planted; returns the norms at each."""
    generator = torch.Generator().manual_seed(0)
    norms: dict[int, list[float]] = {}
    totals: dict[int, float] = {}
    for step in range(STEPS):
        x, y = regression_batch(generator=generator)
        if step != NO_ZERO_GRAD_AT:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == NAN_AT:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        norms[step] = [float(torch.linalg.vector_norm(g.double())) for g in grads]  # type: ignore[union-attr]
        totals[step] = math.sqrt(sum(n * n for n in norms[step]))
        saved = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == NAN_AT:  # keep the weights finite: the NaN step is only looked at
            with torch.no_grad():
                for p, kept in zip(model.parameters(), saved, strict=True):
                    p.copy_(kept)
    return norms, totals


Run = tuple[pathlib.Path, gradwatch.Watcher, dict[int, list[float]], dict[int, float], list[str]]


@pytest.fixture
def run(tmp_path: pathlib.Path) -> Run:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log_dir = tmp_path / "runs"
    with gradwatch.watch(model, opt, log_dir=log_dir, on_finding="record") as watcher:
        norms, totals = _train(model, opt)
    names = [n for n, _ in model.named_parameters()]
    return log_dir, watcher, norms, totals, names


def test_event_file_is_written_and_readable(run: Run) -> None:
    log_dir, *_ = run
    files = list(log_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    assert files[0].stat().st_size > 0
    tags = _read(log_dir).Tags()
    assert "gradwatch/grad_norm/total" in tags["scalars"]


def test_total_norm_every_step_equals_the_norm_of_the_grads(run: Run) -> None:
    log_dir, _, _, totals, _ = run
    events = _read(log_dir).Scalars("gradwatch/grad_norm/total")
    # The NaN step has no finite total to plot.
    assert [e.step for e in events] == [s for s in range(STEPS) if s != NAN_AT]
    for event in events:
        assert event.value == pytest.approx(totals[event.step], rel=1e-6)


def test_per_parameter_norms(run: Run) -> None:
    log_dir, _, norms, _, names = run
    accumulator = _read(log_dir)
    scalars = accumulator.Tags()["scalars"]
    assert {f"gradwatch/grad_norm/{n}" for n in names} <= set(scalars)
    for j, name in enumerate(names):
        events = accumulator.Scalars(f"gradwatch/grad_norm/{name}")
        assert [e.step for e in events] == [0, 10, 20]
        for event in events:
            assert event.value == pytest.approx(norms[event.step][j], rel=1e-6)


def test_findings_are_written_as_text_and_counts(run: Run) -> None:
    log_dir, watcher, *_ = run
    assert [(f.kind, f.step) for f in watcher.findings] == [
        (Kind.MISSING_ZERO_GRAD, NO_ZERO_GRAD_AT),
        (Kind.NAN, NAN_AT),
    ]
    accumulator = _read(log_dir)
    tags = accumulator.Tags()
    assert "gradwatch/findings" in tags["tensors"]
    assert {t for t in tags["scalars"] if t.startswith("gradwatch/findings/")} == {
        "gradwatch/findings/missing_zero_grad",
        "gradwatch/findings/nan",
    }
    for finding in watcher.findings:
        events = accumulator.Scalars(f"gradwatch/findings/{finding.kind.value}")
        assert [(e.step, e.value) for e in events] == [(finding.step, 1.0)]

    texts = accumulator.Tensors("gradwatch/findings")
    assert [t.step for t in texts] == [f.step for f in watcher.findings]
    metadata = accumulator.SummaryMetadata("gradwatch/findings")
    assert metadata.plugin_data.plugin_name == "text"
    for event, finding in zip(texts, watcher.findings, strict=True):
        (text,) = event.tensor_proto.string_val
        decoded = text.decode("utf-8")
        assert decoded.startswith(f"**{finding.kind.value}** `{finding.param}`: ")
        assert finding.message in decoded


def test_kind_count_grows_with_each_parameter(tmp_path: pathlib.Path) -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.used = nn.Linear(4, 1)
            self.unused = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(self.body(x))

    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, log_dir=tmp_path, on_finding="record", no_grad_after=2
    ) as watcher:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    assert [(f.kind, f.param) for f in watcher.findings] == [(Kind.NO_GRAD, "unused.weight")]
    events = _read(tmp_path).Scalars("gradwatch/findings/no_grad")
    assert [(e.step, e.value) for e in events] == [(1, 1.0)]


def test_nothing_is_written_without_log_dir(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, on_finding="record"):
        _train(model, opt)
    assert list(tmp_path.rglob("*")) == []


def test_close_flushes_the_events(
    tmp_path: pathlib.Path,
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = gradwatch.watch(model, opt, log_dir=tmp_path, on_finding="record")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    watcher.close()
    assert [e.step for e in _read(tmp_path).Scalars("gradwatch/grad_norm/total")] == [0, 1, 2]
    watcher.close()  # idempotent: closing a closed writer again is harmless
    assert [e.step for e in _read(tmp_path).Scalars("gradwatch/grad_norm/total")] == [0, 1, 2]


def test_sink_directly(tmp_path: pathlib.Path) -> None:
    sink = TensorBoardSink(str(tmp_path), param_every=2)
    for step in range(5):
        sink.write_check(step, ["a", "b"], torch.tensor([3.0, 4.0]) * (step + 1), 5.0 * (step + 1))
    sink.write_check(5, ["a", "b"], torch.tensor([float("nan"), 1.0]), math.nan)
    sink.write_finding(gradwatch.Finding(Kind.INF, 3, "a", params=("a",)))
    sink.write_finding(gradwatch.Finding(Kind.INF, 4, "b", params=("b",)))
    sink.flush()
    sink.close()
    accumulator = _read(tmp_path)
    total = accumulator.Scalars("gradwatch/grad_norm/total")
    assert [(e.step, e.value) for e in total] == [(s, 5.0 * (s + 1)) for s in range(5)]
    assert [(e.step, e.value) for e in accumulator.Scalars("gradwatch/grad_norm/a")] == [
        (0, 3.0),
        (2, 9.0),
        (4, 15.0),
    ]
    assert [(e.step, e.value) for e in accumulator.Scalars("gradwatch/findings/inf")] == [
        (3, 1.0),
        (4, 2.0),
    ]
    assert [e.step for e in accumulator.Tensors("gradwatch/findings")] == [3, 4]


# ---------------------------------------------------------------------- histograms and layout

HISTOGRAM_EVERY = 5


def _read_all(log_dir: pathlib.Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


HistogramRun = tuple[pathlib.Path, dict[int, list[torch.Tensor]], dict[int, list[float]], float]


@pytest.fixture
def histogram_run(tmp_path: pathlib.Path) -> HistogramRun:
    """The planted-bug run of ``_train`` with histograms every 5 steps; the gradients and the
    weight norms before each step are recorded."""
    model = mlp()
    lr = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads: dict[int, list[torch.Tensor]] = {}
    weight_norms: dict[int, list[float]] = {}

    def record(optimizer: torch.optim.Optimizer, *_: object) -> None:
        step = len(grads)
        grads[step] = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        weight_norms[step] = [
            float(torch.linalg.vector_norm(p.detach().double())) for p in model.parameters()
        ]

    handle = opt.register_step_pre_hook(record)
    log_dir = tmp_path / "runs"
    with gradwatch.watch(
        model, opt, log_dir=log_dir, histogram_every=HISTOGRAM_EVERY, on_finding="record"
    ):
        _train(model, opt)
    handle.remove()
    return log_dir, grads, weight_norms, lr


def test_histograms_hold_the_finite_gradient_values(histogram_run: HistogramRun) -> None:
    log_dir, grads, _, _ = histogram_run
    names = [n for n, _ in mlp().named_parameters()]
    accumulator = _read_all(log_dir)
    assert {f"gradwatch/grad/{n}" for n in names} == set(accumulator.Tags()["histograms"])
    due = list(range(0, STEPS, HISTOGRAM_EVERY))
    assert NAN_AT in due
    for j, name in enumerate(names):
        events = accumulator.Histograms(f"gradwatch/grad/{name}")
        # No histogram where no value is finite; the NaN count below still says why.
        finite = {s: grads[s][j][torch.isfinite(grads[s][j])].double() for s in due}
        assert [e.step for e in events] == [s for s in due if finite[s].numel()]
        assert len(events) >= len(due) - 1
        for event in events:
            values = finite[event.step]
            value = event.histogram_value
            assert value.num == values.numel()
            assert sum(value.bucket) == values.numel()
            assert value.min == pytest.approx(float(values.min()))
            assert value.max == pytest.approx(float(values.max()))
            assert value.sum == pytest.approx(float(values.sum()), rel=1e-4, abs=1e-6)
            assert value.sum_squares == pytest.approx(float(values.square().sum()), rel=1e-4)
            limits = list(value.bucket_limit)
            assert limits == sorted(limits) and len(set(limits)) == len(limits)
            if value.max > value.min:
                assert limits[-1] == pytest.approx(value.max)
            else:  # one value v: buckets over [v - 0.5, v + 0.5], as numpy's
                assert limits[-1] == pytest.approx(value.max + 0.5)
        nan_counts = accumulator.Scalars(f"gradwatch/grad_nan/{name}")
        assert [e.step for e in nan_counts] == due
        expected = {s: float(grads[s][j].isnan().sum()) for s in due}
        assert {e.step: e.value for e in nan_counts} == expected
        assert expected[NAN_AT] > 0 and expected[0] == 0
        inf_counts = accumulator.Scalars(f"gradwatch/grad_inf/{name}")
        assert [(e.step, e.value) for e in inf_counts] == [(s, 0.0) for s in due]


def test_update_ratio_is_lr_times_grad_norm_over_weight_norm(
    histogram_run: HistogramRun,
) -> None:
    log_dir, grads, weight_norms, lr = histogram_run
    names = [n for n, _ in mlp().named_parameters()]
    accumulator = _read_all(log_dir)
    for j, name in enumerate(names):
        events = accumulator.Scalars(f"gradwatch/sgd_update_ratio/{name}")
        assert [e.step for e in events] == [0, 10, 20]
        for event in events:
            grad_norm = float(torch.linalg.vector_norm(grads[event.step][j].double()))
            expected = lr * grad_norm / weight_norms[event.step][j]
            assert event.value == pytest.approx(expected, rel=1e-5)


def test_custom_scalars_layout_groups_by_module(histogram_run: HistogramRun) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    log_dir, *_ = histogram_run
    accumulator = _read_all(log_dir)
    (event,) = accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    assert set(categories) == {
        "gradwatch",
        "gradwatch: gradient norm by module",
        "gradwatch: SGD update ratio by module",
    }
    by_module = categories["gradwatch: gradient norm by module"]
    charts = {c.title: list(c.multiline.tag) for c in by_module.chart}
    assert list(charts) == ["0", "2", "4"]  # nn.Sequential's Linear layers, in depth order
    assert charts["0"] == [r"^gradwatch/grad_norm/0\.weight$", r"^gradwatch/grad_norm/0\.bias$"]
    scalars = set(accumulator.Tags()["scalars"])
    import re

    for category in categories.values():
        for chart in category.chart:
            assert any(re.search(t, s) for t in chart.multiline.tag for s in scalars), chart


def test_gradient_flow_image(histogram_run: HistogramRun) -> None:
    pytest.importorskip("PIL")
    log_dir, *_ = histogram_run
    (image,) = _read_all(log_dir).Images("gradwatch/grad_flow")  # at most one per 100 steps
    assert image.step == 0
    assert image.encoded_image_string.startswith(b"\x89PNG")
    assert image.width > 200 and image.height > 200


def _train_plain(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = regression_batch(generator=generator)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(("every", "steps"), [(0, []), (1, list(range(9))), (4, [0, 4, 8])])
def test_histogram_interval(tmp_path: pathlib.Path, every: int, steps: list[int]) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, opt, log_dir=tmp_path, histogram_every=every, on_finding="record"):
        _train_plain(model, opt, 9)
    accumulator = _read_all(tmp_path)
    tags = accumulator.Tags()
    if not steps:
        assert tags["histograms"] == [] and tags["images"] == []
        assert not any(t.startswith("gradwatch/grad_nan/") for t in tags["scalars"])
        return
    for name, _ in model.named_parameters():
        assert [e.step for e in accumulator.Histograms(f"gradwatch/grad/{name}")] == steps
    # Adam is known too: the ratio uses its lr (Adam's own update is not what it measures).
    assert [e.step for e in accumulator.Scalars("gradwatch/sgd_update_ratio/0.weight")] == [0]


def test_figure_at_most_once_per_figure_every(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("PIL")
    from gradwatch._histograms import GradientHistograms, histogram_rows

    sink = TensorBoardSink(tmp_path, figure_every=100)
    hist = GradientHistograms(histogram_rows([torch.randn(4, 3), torch.randn(3)], 8))
    for step in range(0, 260, 30):
        sink.write_histograms(step, ["layer.weight", "layer.bias"], hist)
    sink.close()
    assert [e.step for e in _read_all(tmp_path).Images("gradwatch/grad_flow")] == [0, 120, 240]


def test_no_figure_without_pillow(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from gradwatch._histograms import GradientHistograms, histogram_rows
    from gradwatch.sinks.tensorboard import gradient_flow_image

    for module in ("PIL", "PIL.Image", "PIL.ImageDraw", "PIL.ImageFont"):
        monkeypatch.setitem(sys.modules, module, None)
    hist = GradientHistograms(histogram_rows([torch.randn(4, 3)], 8))
    assert gradient_flow_image(["w"], hist) is None
    sink = TensorBoardSink(tmp_path)
    sink.write_histograms(0, ["w"], hist)
    sink.close()
    accumulator = _read_all(tmp_path)
    assert accumulator.Tags()["images"] == []
    assert [e.step for e in accumulator.Histograms("gradwatch/grad/w")] == [0]


def test_one_host_copy_per_check(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Histogram steps and ratio steps add no device-to-host copy: one per check."""
    from gradwatch import _monitor

    copies: list[tuple[int, ...]] = []

    class CountingCopy(_monitor.HostCopy):
        def __init__(self, tensor: torch.Tensor) -> None:
            copies.append(tuple(tensor.shape))
            super().__init__(tensor)

    monkeypatch.setattr(_monitor, "HostCopy", CountingCopy)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, log_dir=tmp_path, histogram_every=3, on_finding="record"):
        _train_plain(model, opt, 12)
    assert len(copies) == 12
    params = len(list(model.parameters()))
    sizes = {s: n[0] for s, n in enumerate(copies)}
    assert sizes[1] == params  # norms only
    assert sizes[3] == params * (1 + 8 + 64)  # norms and histogram rows
    assert sizes[0] == params * (1 + 8 + 64 + 1)  # and weight norms for the ratios
    assert sizes[10] == params * 2  # norms and weight norms


def test_user_writer_is_used_and_left_open(tmp_path: pathlib.Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(
        model, opt, log_dir=writer, histogram_every=2, on_finding="record"
    ) as watcher:
        _train_plain(model, opt, 4)
    assert watcher.log_dir == str(tmp_path)
    writer.add_scalar("mine/after", 1.0, 7)  # still open
    writer.close()
    accumulator = _read_all(tmp_path)
    assert [e.step for e in accumulator.Scalars("mine/after")] == [7]
    assert [e.step for e in accumulator.Histograms("gradwatch/grad/0.weight")] == [0, 2]
    assert accumulator.Tags()["tensors"] == []  # the user's layout is theirs to write
    assert (tmp_path / "gradwatch-findings.jsonl").exists()


def test_exception_leaving_the_with_block_flushes(tmp_path: pathlib.Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        pytest.raises(KeyError),
        gradwatch.watch(model, opt, log_dir=tmp_path, histogram_every=1, on_finding="record"),
    ):
        _train_plain(model, opt, 3)
        raise KeyError("boom")
    accumulator = _read_all(tmp_path)
    assert [e.step for e in accumulator.Histograms("gradwatch/grad/0.weight")] == [0, 1, 2]


EXITS_WITHOUT_CLOSING = """
import sys, torch, gradwatch
sys.path.insert(0, {root!r})
from tests.helpers.models import mlp
model = mlp()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
watcher = gradwatch.watch(model, opt, log_dir={log_dir!r}, histogram_every=2, on_finding="record")
for _ in range(5):
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
raise SystemExit(3)  # never closed: only the exit-time flush writes the events
"""


def test_events_are_flushed_at_interpreter_exit(tmp_path: pathlib.Path) -> None:
    import subprocess
    import sys

    root = str(pathlib.Path(__file__).resolve().parent.parent)
    script = EXITS_WITHOUT_CLOSING.format(root=root, log_dir=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == 3, result.stderr
    accumulator = _read_all(tmp_path)
    assert [e.step for e in accumulator.Scalars("gradwatch/grad_norm/total")] == list(range(5))
    assert [e.step for e in accumulator.Histograms("gradwatch/grad/0.weight")] == [0, 2, 4]


def test_a_truncated_event_file_stays_readable(tmp_path: pathlib.Path) -> None:
    """A crash mid-write leaves a partial last record; every complete one still reads back."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, log_dir=tmp_path, histogram_every=1, on_finding="record"):
        _train_plain(model, opt, 6)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[: len(data) - 40])
    steps = [e.step for e in _read_all(tmp_path).Scalars("gradwatch/grad_norm/total")]
    assert steps == list(range(len(steps))) and len(steps) >= 5


def test_exit_handler_flushes_open_sinks_without_keeping_them_alive(
    tmp_path: pathlib.Path,
) -> None:
    import gc
    import weakref

    from gradwatch.sinks import tensorboard

    sink = TensorBoardSink(tmp_path / "open")
    sink.write_check(0, ["w"], torch.tensor([2.0]), 2.0)
    tensorboard._flush_at_exit()  # what the interpreter runs at exit
    assert [e.step for e in _read_all(tmp_path / "open").Scalars("gradwatch/grad_norm/total")] == [
        0
    ]
    sink.close()
    assert sink not in tensorboard._open_sinks
    dropped = TensorBoardSink(tmp_path / "dropped")
    alive = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert alive() is None


def test_a_failing_figure_is_reported_once_and_the_rest_goes_on(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradwatch._histograms import GradientHistograms, histogram_rows
    from gradwatch.sinks import tensorboard

    def broken(*_: object) -> None:
        raise RuntimeError("no fonts")

    monkeypatch.setattr(tensorboard, "gradient_flow_image", broken)
    sink = TensorBoardSink(tmp_path, figure_every=1)
    hist = GradientHistograms(histogram_rows([torch.randn(4, 3)], 8))
    with pytest.warns(RuntimeWarning, match="gradient-flow figure failed .*no fonts") as caught:
        for step in range(3):
            sink.write_histograms(step, ["w"], hist)
            sink.flush()
        sink.close()
    assert len([w for w in caught if "gradient-flow" in str(w.message)]) == 1
    accumulator = _read_all(tmp_path)
    assert [e.step for e in accumulator.Histograms("gradwatch/grad/w")] == [0, 1, 2]
    assert accumulator.Tags()["images"] == []
