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
