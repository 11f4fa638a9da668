"""The sink contract, which every sink gradwatch ships passes, and what each sink writes."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError, Kind
from gradwatch.sinks import FanOut, FindingsLog, LoggerSink, Sink, TensorBoardSink
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, finding_record
from gradwatch.sinks.loggers import FINDINGS_ARTIFACT, FINDINGS_COLUMNS
from tests.helpers.sinks import (
    BINS,
    INF_FINDING,
    MODEL_FINDING,
    NAMES,
    NAN_FINDING,
    BrokenSink,
    FakeHistogram,
    MlflowLikeLogger,
    RecordingLogger,
    WandbLikeLogger,
    empty_histograms,
    fake_wandb,
    feed,
    nonfinite_histograms,
    snapshot,
)

# ---------------------------------------------------------------------- the contract


@dataclasses.dataclass
class Case:
    """A sink under test, and where to look for what it wrote."""

    sink: Sink
    files: pathlib.Path | None = None
    """The directory its files are in; they must not change after ``close()``."""
    settle: Callable[[], None] = lambda: None
    """Pushes to disk what the sink's owner still buffers (a writer of yours, a logger)."""
    calls: list[tuple[Any, ...]] | None = None
    """A recording logger's calls; none may come after ``close()``."""
    cleanup: Callable[[], None] = lambda: None


def _tensorboard_writer(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    writer = SummaryWriter(str(tmp_path / "tb"))
    return Case(
        TensorBoardSink(writer=writer), tmp_path / "tb", settle=writer.flush, cleanup=writer.close
    )


def _csv_logger(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    logger = CSVLogger(str(tmp_path / "csv"))
    return Case(LoggerSink(logger), tmp_path / "csv", settle=logger.save)


def _recording(logger: RecordingLogger) -> Case:
    return Case(LoggerSink(logger), calls=logger.calls)


def _wandb_like(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb())
    return _recording(WandbLikeLogger())


def _fan_out(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    sinks: list[Sink] = [FindingsLog(tmp_path / "both"), TensorBoardSink(tmp_path / "both")]
    return Case(FanOut(sinks), tmp_path / "both")


CASES: dict[str, Callable[[pathlib.Path, pytest.MonkeyPatch], Case]] = {
    "Sink": lambda tmp_path, _: Case(Sink()),
    "TensorBoardSink(log_dir)": lambda tmp_path, _: Case(
        TensorBoardSink(tmp_path / "tb"), tmp_path / "tb"
    ),
    "TensorBoardSink(writer)": _tensorboard_writer,
    "FindingsLog": lambda tmp_path, _: Case(FindingsLog(tmp_path / "log"), tmp_path / "log"),
    "LoggerSink(CSVLogger)": _csv_logger,
    "LoggerSink(recording)": lambda tmp_path, _: _recording(RecordingLogger()),
    "LoggerSink(W&B-like)": _wandb_like,
    "LoggerSink(MLflow-like)": lambda tmp_path, _: _recording(MlflowLikeLogger()),
    "FanOut(FindingsLog, TensorBoardSink)": _fan_out,
}


@pytest.fixture(params=list(CASES))
def case(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Case]:
    built = CASES[request.param](tmp_path, monkeypatch)
    yield built
    built.sink.close()
    built.cleanup()


# A sink must take every edge case without a warning of its own (a figure that fails to draw, a
# write that fails): RuntimeWarnings are errors in the contract tests.
contract = pytest.mark.filterwarnings("error::RuntimeWarning")


@contract
def test_check_with_nan_and_inf_norms(case: Case) -> None:
    inf, nan = math.inf, math.nan
    case.sink.write_check(0, NAMES, torch.tensor([nan, inf, 3.0]), 3.0)
    case.sink.write_check(10, NAMES, torch.tensor([nan, nan, inf]), nan)
    case.sink.write_check(20, NAMES, torch.tensor([inf, inf, inf]), inf)
    case.sink.flush()


@contract
def test_empty_parameter_list(case: Case) -> None:
    case.sink.write_check(0, [], torch.zeros(0), math.nan)
    case.sink.write_histograms(0, [], empty_histograms())
    case.sink.write_update_ratios(0, [], torch.zeros(0))
    case.sink.flush()


@contract
def test_histograms_holding_nan_and_inf(case: Case) -> None:
    histograms = nonfinite_histograms()
    assert histograms.nan.tolist() == [1, 1, 0] and histograms.inf.tolist() == [0, 2, 0]
    case.sink.write_histograms(0, NAMES, histograms)
    case.sink.write_histograms(1, NAMES, histograms)
    case.sink.flush()


@contract
def test_update_ratios_with_nan(case: Case) -> None:
    case.sink.write_update_ratios(0, NAMES, torch.tensor([math.nan, 0.25, math.inf]))
    case.sink.write_update_ratios(10, NAMES, torch.full((3,), math.nan))
    case.sink.flush()


@contract
def test_findings_with_rank_0_and_rank_3(case: Case) -> None:
    case.sink.write_finding(NAN_FINDING, rank=0)
    case.sink.write_finding(INF_FINDING, rank=3)
    case.sink.write_finding(MODEL_FINDING)
    case.sink.flush()


@contract
def test_flush_then_close_twice(case: Case) -> None:
    feed(case.sink)
    case.sink.flush()
    case.sink.close()
    case.sink.close()
    case.sink.flush()


@contract
def test_every_call_after_close_is_harmless(case: Case) -> None:
    feed(case.sink)
    case.sink.close()
    case.settle()
    files = snapshot(case.files)
    calls = list(case.calls) if case.calls is not None else None
    feed(case.sink)  # every write, then flush
    case.sink.close()
    case.settle()
    assert snapshot(case.files) == files  # nothing written, no file reopened
    if case.calls is not None:
        assert case.calls == calls


@contract
def test_close_without_any_write(case: Case) -> None:
    case.sink.close()
    case.sink.close()


# ---------------------------------------------------------------------- the findings log


def _log_lines(directory: pathlib.Path) -> list[str]:
    return (directory / FINDINGS_LOG_NAME).read_text(encoding="utf-8").splitlines()


def test_finding_record_keeps_schema_4() -> None:
    finding = Finding(
        Kind.EXPLODING, 4, "fc.weight", value=math.inf, threshold=1e6, params=("fc.weight", "b")
    )
    record = finding_record(finding, rank=3, wall_time=12.5)
    assert list(record.items()) == [
        ("schema", 4),
        ("kind", "exploding"),
        ("step", 4),
        ("param", "fc.weight"),
        ("params", ["fc.weight", "b"]),
        ("value", "inf"),
        ("threshold", 1e6),
        ("message", finding.message),
        ("wall_time", 12.5),
        ("rank", 3),
    ]
    nan = finding_record(Finding(Kind.NAN, 0, None, value=-math.inf, threshold=math.nan))
    assert (nan["param"], nan["params"], nan["value"], nan["threshold"], nan["rank"]) == (
        None,
        [],
        "-inf",
        "nan",
        0,
    )
    assert isinstance(nan["wall_time"], float)


def test_finding_record_with_a_cause_and_its_round_trip(tmp_path: pathlib.Path) -> None:
    """Schema 3's field: ``cause`` right after ``threshold``, read back by ``from_dict``."""
    finding = Finding(Kind.NO_UPDATE, 4, "fc.bias", 5.0, 0.0, ("fc.bias",), "zero_lr")
    record = finding_record(finding, rank=0, wall_time=1.0)
    assert list(record)[6:9] == ["threshold", "cause", "message"]
    assert record["cause"] == "zero_lr"
    log = FindingsLog(tmp_path)
    log.write_finding(finding)
    log.close()
    (line,) = _log_lines(tmp_path)
    assert Finding.from_dict(json.loads(line)) == finding


def test_findings_log_lines_are_records_that_round_trip(tmp_path: pathlib.Path) -> None:
    log = FindingsLog(tmp_path, rank=2)
    written = [(NAN_FINDING, None, 2), (INF_FINDING, 3, 3), (MODEL_FINDING, 0, 0)]
    for finding, rank, _ in written:
        log.write_finding(finding, rank=rank)
    log.close()
    lines = _log_lines(tmp_path)
    assert len(lines) == len(written)
    for line, (finding, _, rank) in zip(lines, written, strict=True):
        record = json.loads(line)
        expected = finding_record(finding, rank=rank, wall_time=record["wall_time"])
        assert line == json.dumps(expected, allow_nan=False)
        assert Finding.from_dict(record) == finding


def test_findings_log_takes_a_path_and_keeps_appending(tmp_path: pathlib.Path) -> None:
    for finding in (NAN_FINDING, INF_FINDING):
        log = FindingsLog(tmp_path / "deep" / "run")
        log.write_finding(finding)
        log.close()
    lines = _log_lines(tmp_path / "deep" / "run")
    assert [Finding.from_dict(json.loads(line)) for line in lines] == [NAN_FINDING, INF_FINDING]


# ---------------------------------------------------------------------- TensorBoard


def test_tensorboard_text_names_a_nonzero_rank(tmp_path: pathlib.Path) -> None:
    sink = TensorBoardSink(tmp_path)
    sink.write_finding(NAN_FINDING, rank=0)
    sink.write_finding(INF_FINDING, rank=3)
    sink.write_finding(MODEL_FINDING)
    sink.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    texts = [
        e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("gradwatch/findings")
    ]
    assert texts == [
        f"**nan** `fc.weight`: {NAN_FINDING.message}",
        f"**inf** `fc.bias` (rank 3): {INF_FINDING.message}",
        f"**skipped_step** (model): {MODEL_FINDING.message}",
    ]
    counts = accumulator.Scalars("gradwatch/findings/inf")
    assert [(e.step, e.value) for e in counts] == [(10, 1.0)]


def test_tensorboard_leaves_a_writer_of_yours_open(tmp_path: pathlib.Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer=writer)
    sink.write_check(0, NAMES, torch.ones(3), 3.0)
    sink.close()
    sink.write_check(1, NAMES, torch.ones(3), 4.0)  # dropped: the sink is closed
    writer.add_scalar("mine", 1.0, 5)  # the writer is not
    writer.close()
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("gradwatch/grad_norm/total")] == [0]
    assert [e.step for e in accumulator.Scalars("mine")] == [5]


def test_tensorboard_needs_a_log_dir_or_a_writer() -> None:
    with pytest.raises(GradWatchTypeError, match="TensorBoardSink needs a log_dir or a writer"):
        TensorBoardSink()


# ---------------------------------------------------------------------- Lightning loggers

NAN, INF = "nan", "inf"


def _strings(metrics: dict[str, Any]) -> dict[str, str]:
    """Values as text, so that NaN equals NaN."""
    return {key: repr(value) for key, value in metrics.items()}


def _expected_metrics(*, finite_only: bool = False) -> list[tuple[dict[str, str], int]]:
    """The ``log_metrics`` calls ``feed`` makes on a plain logger, values as text."""
    g = "gradwatch/grad_norm/"
    step0 = {g + "total": "3.0", g + "fc.weight": NAN, g + "fc.bias": INF, g + "out.weight": "3.0"}
    step10 = {g + "fc.weight": NAN, g + "fc.bias": NAN, g + "out.weight": INF}
    if finite_only:
        step0 = {k: v for k, v in step0.items() if v not in (NAN, INF)}
        step10 = {}
    counts = {}
    for name, nan, inf in zip(NAMES, ("1.0", "1.0", "0.0"), ("0.0", "2.0", "0.0"), strict=True):
        counts[f"gradwatch/grad_nan/{name}"] = nan
        counts[f"gradwatch/grad_inf/{name}"] = inf
    calls = [
        (step0, 0),
        ({g + "total": "3.0"}, 1),
        (step10, 10),
        (counts, 10),
        ({"gradwatch/sgd_update_ratio/fc.bias": "0.25"}, 10),
        ({"gradwatch/findings/nan": "1.0"}, 10),
        ({"gradwatch/findings/inf": "1.0"}, 10),
        ({"gradwatch/findings/skipped_step": "1.0"}, 11),
    ]
    return [(metrics, step) for metrics, step in calls if metrics]


def test_logger_sink_sends_the_tensorboard_tags_at_their_steps() -> None:
    logger = RecordingLogger()
    sink = LoggerSink(logger)
    feed(sink)
    sink.close()
    assert [(_strings(m), step) for m, step in logger.metrics()] == _expected_metrics()
    # The logger is saved after each finding, at flush and at close; never finalised.
    kinds = [call[0] for call in logger.calls]
    assert kinds == ["log_metrics"] * 5 + ["log_metrics", "save"] * 3 + ["save", "save"]


def test_logger_sink_param_every() -> None:
    logger = RecordingLogger()
    sink = LoggerSink(logger, param_every=3)
    for step in range(7):
        sink.write_check(step, ["w"], torch.tensor([2.0]), 2.0)
    per_param = [step for m, step in logger.metrics() if "gradwatch/grad_norm/w" in m]
    assert per_param == [0, 3, 6]
    silent = RecordingLogger()
    LoggerSink(silent, param_every=0).write_check(0, ["w"], torch.tensor([2.0]), 2.0)
    assert silent.metrics() == [({"gradwatch/grad_norm/total": 2.0}, 0)]


def test_logger_sink_over_csv_logger_writes_metrics_csv(tmp_path: pathlib.Path) -> None:
    logger = CSVLogger(str(tmp_path))
    sink = LoggerSink(logger)
    feed(sink)
    sink.close()
    with open(pathlib.Path(logger.log_dir, "metrics.csv"), newline="") as file:
        reader = csv.DictReader(file)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    expected = _expected_metrics()
    keys = {key for metrics, _ in expected for key in metrics}
    assert header == sorted(keys | {"step"})
    cells = sorted(
        (int(row["step"]), key, value)
        for row in rows
        for key, value in row.items()
        if key != "step" and value != ""
    )
    assert cells == sorted(
        (step, key, value) for metrics, step in expected for key, value in metrics.items()
    )
    # Lightning still owns the logger: it is open after the sink is closed.
    logger.log_metrics({"loss": 1.5}, step=12)
    logger.save()
    with open(pathlib.Path(logger.log_dir, "metrics.csv"), newline="") as file:
        assert [row["loss"] for row in csv.DictReader(file) if row["loss"]] == ["1.5"]


def test_logger_sink_sends_histograms_and_a_findings_table_to_wandb(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb())
    logger = WandbLikeLogger()
    sink = LoggerSink(logger)
    feed(sink)
    sink.close()
    scalars = [
        ({k: v for k, v in m.items() if not isinstance(v, FakeHistogram)}, step)
        for m, step in logger.metrics()
    ]
    assert [(_strings(m), step) for m, step in scalars] == _expected_metrics()
    (histograms,) = [
        {k: v for k, v in m.items() if isinstance(v, FakeHistogram)}
        for m, _ in logger.metrics()
        if any(isinstance(v, FakeHistogram) for v in m.values())
    ]
    # fc.bias holds no finite value: no histogram, only its NaN/Inf counts.
    assert sorted(histograms) == ["gradwatch/grad/fc.weight", "gradwatch/grad/out.weight"]
    rows = nonfinite_histograms()
    for j, name in ((0, "fc.weight"), (2, "out.weight")):
        histogram = histograms[f"gradwatch/grad/{name}"]
        assert histogram.counts == rows.counts[j].tolist()
        assert histogram.edges == rows.edges(j).tolist()
        assert len(histogram.counts) == BINS and sum(histogram.counts) == rows.finite[j]
    tables = [call for call in logger.calls if call[0] == "log_text"]
    row = {
        NAN_FINDING: [10, 0, "nan", "fc.weight", NAN_FINDING.message],
        INF_FINDING: [10, 3, "inf", "fc.bias", INF_FINDING.message],
        MODEL_FINDING: [11, 0, "skipped_step", "", MODEL_FINDING.message],
    }
    assert tables == [
        ("log_text", "gradwatch/findings", list(FINDINGS_COLUMNS), [row[NAN_FINDING]], 10),
        (
            "log_text",
            "gradwatch/findings",
            list(FINDINGS_COLUMNS),
            [row[NAN_FINDING], row[INF_FINDING]],
            10,
        ),
        ("log_text", "gradwatch/findings", list(FINDINGS_COLUMNS), list(row.values()), 11),
    ]


def test_logger_sink_without_wandb_imported_sends_scalars_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    logger = WandbLikeLogger()
    sink = LoggerSink(logger)
    feed(sink)
    sink.close()
    assert [(_strings(m), step) for m, step in logger.metrics()] == _expected_metrics()
    assert [call for call in logger.calls if call[0] == "log_text"] == []


def test_logger_sink_mlflow_gets_finite_values_and_a_findings_artifact() -> None:
    logger = MlflowLikeLogger()
    sink = LoggerSink(logger)
    feed(sink)
    sink.close()
    assert [(_strings(m), step) for m, step in logger.metrics()] == _expected_metrics(
        finite_only=True
    )
    texts = [call for call in logger.calls if call[0] == "experiment.log_text"]
    lines = [
        f"- **nan** `fc.weight`: {NAN_FINDING.message}\n",
        f"- **inf** `fc.bias` (rank 3): {INF_FINDING.message}\n",
        f"- **skipped_step** (model): {MODEL_FINDING.message}\n",
    ]
    assert texts == [
        ("experiment.log_text", "run-1", "".join(lines[: n + 1]), FINDINGS_ARTIFACT)
        for n in range(3)
    ]


@pytest.mark.parametrize(
    ("logger", "param_every", "error", "match"),
    [
        (object(), 10, GradWatchTypeError, r"logger must be a Lightning logger .*got object"),
        (RecordingLogger, 10, GradWatchTypeError, r"logger must be .*got type"),
        (RecordingLogger(), -1, GradWatchValueError, r"param_every must be an int >= 0; got -1"),
        (RecordingLogger(), 2.5, GradWatchTypeError, r"param_every must be .*got float 2.5"),
        (RecordingLogger(), True, GradWatchTypeError, r"param_every must be .*got bool True"),
    ],
)
def test_logger_sink_rejects_bad_arguments(
    logger: Any, param_every: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        LoggerSink(logger, param_every=param_every)


def test_loggers_module_imports_no_framework() -> None:
    code = (
        "import sys, gradwatch.sinks.loggers\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'lightning_fabric', 'wandb', 'mlflow'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------- the fan-out


def test_fan_out_drops_a_failing_sink_after_one_warning(tmp_path: pathlib.Path) -> None:
    broken, logger = BrokenSink(), RecordingLogger()
    fan_out = FanOut([broken, FindingsLog(tmp_path), LoggerSink(logger)])
    with pytest.warns(RuntimeWarning) as caught:
        feed(fan_out)
        fan_out.close()
    ours = [str(w.message) for w in caught if str(w.message).startswith("gradwatch")]
    assert len(ours) == 1
    assert "BrokenSink.write_check failed (OSError('disk full'))" in ours[0]
    assert broken.calls == 1  # switched off after its first failure
    assert broken.closed  # but still closed, with the others
    assert [Finding.from_dict(json.loads(line)) for line in _log_lines(tmp_path)] == [
        NAN_FINDING,
        INF_FINDING,
        MODEL_FINDING,
    ]
    assert [json.loads(line)["rank"] for line in _log_lines(tmp_path)] == [0, 3, 0]
    assert [(_strings(m), step) for m, step in logger.metrics()] == _expected_metrics()
