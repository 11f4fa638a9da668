"""Reliability of watch() in plain PyTorch: a run killed mid-way, exceptions leaving the loop,
outputs that fail, long runs, repeated watch/close, threads, and unusual entry points."""

from __future__ import annotations

import errno
import gc
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer, record_writer
from torch import nn

import gradwatch
from gradwatch import Finding, GradientError, Kind
from gradwatch.sinks import TensorBoardSink
from tests.helpers.contract import RecordingSink, hook_counts, run_steps
from tests.helpers.models import mlp, regression_batch

FINDINGS_LOG = "gradwatch-findings.jsonl"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _read_events(log_dir: pathlib.Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _scalar_steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return [event.step for event in accumulator.Scalars(tag)]


def _read_log(log_dir: pathlib.Path) -> list[dict[str, Any]]:
    lines = (log_dir / FINDINGS_LOG).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]  # every line must be valid JSON


def _triples(findings: list[Finding]) -> list[tuple[str, int, str | None]]:
    return [(f.kind.value, f.step, f.param) for f in findings]


def _nan_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    (model(torch.randn(4, 8)).sum() * torch.tensor(float("nan"))).backward()
    opt.step()


# ---------------------------------------------------------------- killed mid-run

_KILLED_CHILD = """
import sys, time
import torch
from torch import nn
import gradwatch

log_dir = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)


def report(finding):
    print("FINDING", finding.kind.value, finding.step, finding.param, flush=True)


generator = torch.Generator().manual_seed(0)
with gradwatch.watch(model, opt, log_dir=log_dir, on_finding=report):
    step = 0
    while True:  # until killed
        x = torch.randn(32, 8, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        if step != 2:  # missing zero_grad: found at step 2
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if step == 5:  # NaN
            loss = loss * float("nan")
        if step == 20:  # exploding
            loss = loss * 1e7
        loss.backward()
        if step == 30:  # a second backward pass: unexpected accumulation
            nn.functional.mse_loss(model(x), y).backward()
        saved = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step in (5, 20):  # keep the weights usable: those steps are only looked at
            with torch.no_grad():
                for p, kept in zip(model.parameters(), saved):
                    p.copy_(kept)
        print("STEP", step, flush=True)
        step += 1
        time.sleep(0.001)
"""

KILL_AFTER_FINDINGS = 4
NAN_STEP_IN_CHILD = 5


def _lines(stream: Any, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.mark.slow
def test_killed_run_keeps_every_reported_finding(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)
    log_dir = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(log_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    printed: list[tuple[str, int, str | None]] = []
    last_step = -1
    try:
        deadline = time.monotonic() + 180
        # Kill one step after the last planted bug was reported: the run is in full swing.
        while len(printed) < KILL_AFTER_FINDINGS or last_step <= 31:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"child did not report {KILL_AFTER_FINDINGS} findings in time"
            line = lines.get(timeout=remaining)
            assert line is not None, f"child exited early: {proc.stderr.read()}"  # type: ignore[union-attr]
            words = line.split()
            if words[0] == "FINDING":
                printed.append((words[1], int(words[2]), None if words[3] == "None" else words[3]))
            elif words[0] == "STEP":
                last_step = int(words[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # Lines the child printed before the kill that the reader had not got to yet (under
        # load it lags a step or two): the run's real progress.
        while True:
            try:
                line = lines.get(timeout=30)
            except queue.Empty:  # the end was read already (the child exited early)
                break
            if line is None:
                break
            words = line.split()
            if words[0] == "FINDING":
                printed.append((words[1], int(words[2]), None if words[3] == "None" else words[3]))
            elif words[0] == "STEP":
                last_step = int(words[1])
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL

    assert [(kind, step) for kind, step, _ in printed] == [
        ("missing_zero_grad", 2),
        ("nan", 5),
        ("exploding", 20),
        ("unexpected_accumulation", 30),
    ]
    records = _read_log(log_dir)
    assert [(r["kind"], r["step"], r["param"]) for r in records] == printed
    assert all(r["schema"] == 4 and r["rank"] == 0 for r in records)

    # The event file is readable. Whatever the writer got on disk is a prefix of the run: the
    # total norm of steps 0..k (the NaN step has no finite total), with no gap and no corruption.
    events = _read_events(log_dir)
    totals = _scalar_steps(events, "gradwatch/grad_norm/total")
    if totals:
        assert totals == [s for s in range(max(totals) + 1) if s != NAN_STEP_IN_CHILD]
        assert max(totals) <= last_step + 1
    for kind, step, _ in printed:
        assert _scalar_steps(events, f"gradwatch/findings/{kind}") in ([], [step])


def test_finding_is_flushed_to_tensorboard_when_reported(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every event and every flush of the event writer, in order.
    log: list[str] = []
    add_event = event_file_writer.EventFileWriter.add_event
    flush = event_file_writer.EventFileWriter.flush

    def recording_add_event(self: Any, event: Any) -> None:
        tags = [value.tag for value in event.summary.value]
        log.append("finding" if any(t.startswith("gradwatch/findings") for t in tags) else "event")
        add_event(self, event)

    def recording_flush(self: Any) -> None:
        log.append("flush")
        flush(self)

    monkeypatch.setattr(event_file_writer.EventFileWriter, "add_event", recording_add_event)
    monkeypatch.setattr(event_file_writer.EventFileWriter, "flush", recording_flush)
    flushed_when_reported: list[bool] = []

    def policy(finding: Finding) -> None:
        last_finding = max(i for i, entry in enumerate(log) if entry == "finding")
        flushed_when_reported.append("flush" in log[last_finding:])

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, log_dir=tmp_path, on_finding=policy):
        run_steps(model, opt, 3, zero_grad=False)
    assert flushed_when_reported == [True]


# ---------------------------------------------------------------- exceptions leaving the loop


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("error_type", [KeyError, _Interrupt], ids=["KeyError", "Ctrl-C"])
def test_exception_in_loop_flushes_the_outputs(
    tmp_path: pathlib.Path, error_type: type[BaseException]
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_counts(model, opt)
    error = error_type("stop")
    received: list[Finding] = []
    with (
        pytest.raises(error_type) as raised,
        gradwatch.watch(model, opt, log_dir=tmp_path, on_finding=received.append) as watcher,
    ):
        run_steps(model, opt, 4, zero_grad=False)  # missing_zero_grad at step 1
        _nan_step(model, opt)  # step 4
        raise error
    assert raised.value is error
    assert raised.value.__context__ is None
    assert watcher.closed
    assert hook_counts(model, opt) == before
    assert _triples(received) == _triples(watcher.findings)
    assert [(f.kind, f.step) for f in received] == [(Kind.MISSING_ZERO_GRAD, 1), (Kind.NAN, 4)]
    assert [(r["kind"], r["step"], r["param"]) for r in _read_log(tmp_path)] == _triples(received)
    events = _read_events(tmp_path)
    assert _scalar_steps(events, "gradwatch/grad_norm/total") == [0, 1, 2, 3]  # 4 is NaN
    assert _scalar_steps(events, "gradwatch/findings/missing_zero_grad") == [1]
    assert _scalar_steps(events, "gradwatch/findings/nan") == [4]


def test_raise_policy_leaves_the_finding_in_both_outputs(tmp_path: pathlib.Path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = hook_counts(model, opt)
    with (
        pytest.raises(GradientError) as raised,
        gradwatch.watch(model, opt, log_dir=tmp_path, on_finding="raise"),
    ):
        run_steps(model, opt, 2)
        _nan_step(model, opt)
    finding = raised.value.finding
    assert (finding.kind, finding.step) == (Kind.NAN, 2)
    assert hook_counts(model, opt) == before
    assert [(r["kind"], r["step"], r["param"]) for r in _read_log(tmp_path)] == [
        ("nan", 2, finding.param)
    ]
    assert _scalar_steps(_read_events(tmp_path), "gradwatch/findings/nan") == [2]


def test_backward_that_fails_midway_and_is_retried_is_not_a_finding() -> None:
    # A backward pass raising after some parameters have accumulated, caught by the user, who
    # zeroes the gradients and goes on: nothing to report, and later bugs are still found.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first_layer = model[0]
    assert isinstance(first_layer, nn.Linear)

    def fail(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("simulated failure inside backward")

    generator = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for i in range(12):
            x, y = regression_batch(generator=generator)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if i in (3, 4):
                handle = first_layer.weight.register_hook(fail)
                with pytest.raises(RuntimeError, match="simulated failure"):
                    loss.backward()
                handle.remove()
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
            if i == 9:
                loss = loss * torch.tensor(float("nan"))
            loss.backward()
            opt.step()
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.NAN, 9)]


# ---------------------------------------------------------------- outputs that fail


def _train_with_bugs(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 10) -> None:
    """missing_zero_grad at step 2, NaN at step 7."""
    generator = torch.Generator().manual_seed(0)
    for i in range(steps):
        x, y = regression_batch(generator=generator)
        if i != 2:
            opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if i == 7:
            loss = loss * torch.tensor(float("nan"))
        loss.backward()
        opt.step()


EXPECTED_BUGS = [(Kind.MISSING_ZERO_GRAD, 2), (Kind.NAN, 7)]


@pytest.fixture
def runtime_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "gradwatch" in str(w.message)
    ]


def test_findings_log_on_a_full_disk(
    tmp_path: pathlib.Path, runtime_warnings: list[warnings.WarningMessage]
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    (tmp_path / FINDINGS_LOG).symlink_to("/dev/full")  # every write: ENOSPC
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    received: list[Finding] = []
    with gradwatch.watch(model, opt, log_dir=tmp_path, on_finding=received.append) as watcher:
        _train_with_bugs(model, opt)
    ours = _ours(runtime_warnings)
    assert len(ours) == 1, ours
    assert "FindingsLog" in ours[0]
    assert "No space left on device" in ours[0]
    assert [(f.kind, f.step) for f in received] == EXPECTED_BUGS
    assert received == watcher.findings
    assert watcher.step == 10
    # TensorBoard still has everything.
    assert _scalar_steps(_read_events(tmp_path), "gradwatch/findings/nan") == [7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_disk_fills_up_mid_run(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    runtime_warnings: list[warnings.WarningMessage],
) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    received: list[Finding] = []
    watcher = gradwatch.watch(model, opt, log_dir=tmp_path, on_finding=received.append)

    def full(self: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    with watcher:
        _train_with_bugs(model, opt, steps=12)
    ours = _ours(runtime_warnings)
    assert len(ours) == 1, ours
    assert "TensorBoardSink" in ours[0]
    assert [(f.kind, f.step) for f in received] == EXPECTED_BUGS
    assert watcher.step == 12
    # The findings log is another output: it keeps working.
    assert [(r["kind"], r["step"]) for r in _read_log(tmp_path)] == [
        (k.value, s) for k, s in EXPECTED_BUGS
    ]


def test_sink_closed_before_training(
    tmp_path: pathlib.Path, runtime_warnings: list[warnings.WarningMessage]
) -> None:
    sink = TensorBoardSink(str(tmp_path))
    sink.close()  # its SummaryWriter is closed
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.Watcher(model, opt, on_finding="record", sinks=[sink]) as watcher:
        _train_with_bugs(model, opt)
    assert len(_ours(runtime_warnings)) <= 1
    assert [(f.kind, f.step) for f in watcher.findings] == EXPECTED_BUGS
    assert watcher.step == 10


class _FindingsFull(RecordingSink):
    """Checks are written; every finding fails with ENOSPC."""

    def write_finding(self, finding: Finding) -> None:
        super().write_finding(finding)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_sink_failing_only_on_findings(runtime_warnings: list[warnings.WarningMessage]) -> None:
    failing, healthy = _FindingsFull(), RecordingSink()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.Watcher(model, opt, on_finding="record", sinks=[failing, healthy]) as watcher:
        _train_with_bugs(model, opt)
    ours = _ours(runtime_warnings)
    assert len(ours) == 1
    assert "_FindingsFull.write_finding failed" in ours[0]
    assert "No space left on device" in ours[0]
    assert [(f.kind, f.step) for f in watcher.findings] == EXPECTED_BUGS
    assert len(failing.findings) == 1  # switched off after its first failure
    assert [c[0] for c in failing.checks] == [0, 1, 2]
    assert healthy.findings == watcher.findings
    assert len(healthy.checks) == 10


def test_a_sink_that_failed_is_still_closed(
    runtime_warnings: list[warnings.WarningMessage],
) -> None:
    failing = _FindingsFull()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.Watcher(model, opt, on_finding="record", sinks=[failing]):
        _train_with_bugs(model, opt)
    assert failing.calls[-1] == "close"


# ---------------------------------------------------------------- long runs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _internal_sizes(watcher: gradwatch.Watcher) -> dict[str, int]:
    """Sizes of every container the monitor and its detectors hold."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()

    def visit(prefix: str, obj: object, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        for name, value in vars(obj).items():
            key = f"{prefix}.{name}"
            if isinstance(value, (list, dict, set, frozenset, tuple)) or hasattr(value, "maxlen"):
                sizes[key] = len(value)  # type: ignore[arg-type]
                if isinstance(value, dict):
                    for k, v in value.items():
                        if hasattr(v, "__len__") and not isinstance(v, (str, torch.Tensor)):
                            sizes[f"{key}[{k}]"] = len(v)
            elif isinstance(value, torch.Tensor):
                sizes[key] = value.numel()
            elif hasattr(value, "__dict__") and type(value).__module__.startswith("gradwatch"):
                visit(key, value, depth + 1)

    monitor = watcher._monitor
    visit("monitor", monitor, 0)
    for i, detector in enumerate(monitor._detectors):
        visit(f"detector{i}", detector, 0)
    return sizes


@pytest.mark.slow
def test_ten_thousand_steps_use_bounded_memory() -> None:
    torch.manual_seed(0)
    model = mlp(width=8, depth=2, in_features=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    y = x.sum(dim=1, keepdim=True).sin()
    samples: dict[int, tuple[int, int, dict[str, int]]] = {}
    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for step in range(10_000):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step + 1 in (1_000, 10_000):
                gc.collect()
                samples[step + 1] = (_rss_bytes(), len(gc.get_objects()), _internal_sizes(watcher))
    assert watcher.step == 10_000
    assert watcher.findings == []
    (rss_a, objects_a, sizes_a), (rss_b, objects_b, sizes_b) = samples[1_000], samples[10_000]
    assert rss_b - rss_a < 20 * 2**20
    assert objects_b - objects_a < 500
    assert sizes_b == sizes_a  # no container of the monitor or its detectors grows
    history = [size for key, size in sizes_b.items() if key.startswith("detector")]
    assert max(history) <= 32 * len(watcher.param_names)  # `history` values per parameter


@pytest.mark.slow
def test_watch_and_close_500_times_leaves_nothing_behind() -> None:
    def cycle(follow: bool, train: bool) -> None:
        model = mlp(width=8, depth=2, in_features=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        before = hook_counts(model, opt)
        with gradwatch.watch(model, None if follow else opt, on_finding="record"):
            if train:
                run_steps(model, opt, 1)
        assert hook_counts(model, opt) == before

    for i in range(20):  # warm-up
        cycle(follow=i % 2 == 0, train=True)
    gc.collect()
    reference = mlp()
    global_hooks = hook_counts(reference)
    rss, objects = _rss_bytes(), len(gc.get_objects())
    models: list[weakref.ref[nn.Module]] = []
    for i in range(500):
        cycle(follow=i % 2 == 0, train=i % 10 < 2)
    for _ in range(3):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gradwatch.watch(model, opt).close()
        models.append(weakref.ref(model))
        del model, opt
    gc.collect()
    assert hook_counts(reference) == global_hooks  # global optimizer hooks too
    assert len(gc.get_objects()) - objects < 500
    assert _rss_bytes() - rss < 20 * 2**20
    assert all(ref() is None for ref in models)
    assert len(gradwatch.watcher._open_watchers) == 0


@pytest.mark.parametrize("log_dir", [False, True], ids=["plain", "log_dir"])
def test_model_is_freed_after_close_while_the_watcher_lives(
    tmp_path: pathlib.Path, log_dir: bool
) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    options: dict[str, Any] = {"log_dir": tmp_path} if log_dir else {}
    watcher = gradwatch.watch(model, opt, on_finding="record", **options)
    run_steps(model, opt, 3, zero_grad=False)
    watcher.close()
    model_ref, opt_ref = weakref.ref(model), weakref.ref(opt)
    param_refs = [weakref.ref(p) for p in model.parameters()]
    del model, opt
    gc.collect()
    assert model_ref() is None
    assert opt_ref() is None
    assert all(ref() is None for ref in param_refs)
    # The watcher still answers.
    assert [f.kind for f in watcher.findings] == [Kind.MISSING_ZERO_GRAD]
    assert watcher.step == 3
    assert "missing_zero_grad" in watcher.summary()


# ---------------------------------------------------------------- threads


def _worker(
    plant: str, results: dict[str, Any], barrier: threading.Barrier, seed: int
) -> Callable[[], None]:
    def run() -> None:
        try:
            torch.manual_seed(seed)
            model = mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            generator = torch.Generator().manual_seed(seed)
            with gradwatch.watch(model, opt, on_finding="record") as watcher:
                for i in range(40):
                    barrier.wait(timeout=60)  # both threads in the same step, interleaved
                    x, y = regression_batch(generator=generator)
                    if not (plant == "zero_grad" and i == 6):
                        opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), y)
                    if plant == "nan" and i == 11:
                        loss = loss * torch.tensor(float("nan"))
                    loss.backward()
                    saved = [p.detach().clone() for p in model.parameters()]
                    opt.step()
                    if plant == "nan" and i == 11:
                        with torch.no_grad():
                            for p, kept in zip(model.parameters(), saved, strict=True):
                                p.copy_(kept)
            results[plant] = watcher
        except BaseException as error:
            results[plant] = error
            barrier.abort()

    return run


def test_two_threads_training_two_watched_models() -> None:
    results: dict[str, Any] = {}
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=_worker(plant, results, barrier, seed))
        for seed, plant in enumerate(["zero_grad", "nan"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a training thread hung"
    for plant in ("zero_grad", "nan"):
        assert isinstance(results[plant], gradwatch.Watcher), results[plant]
    assert [(f.kind, f.step) for f in results["zero_grad"].findings] == [
        (Kind.MISSING_ZERO_GRAD, 6)
    ]
    nan = results["nan"].findings
    assert [(f.kind, f.step) for f in nan] == [(Kind.NAN, 11)]
    assert nan[0].param == "4.bias"  # the last layer is nearest to the loss
    assert results["zero_grad"].step == results["nan"].step == 40


def test_backward_on_another_thread_than_the_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    errors: list[BaseException] = []

    def backward(loss: torch.Tensor) -> None:
        try:
            loss.backward()
        except BaseException as error:
            errors.append(error)

    with gradwatch.watch(model, opt, on_finding="record") as watcher:
        for i in range(10):
            x, y = regression_batch(generator=generator)
            if i != 4:
                opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            thread = threading.Thread(target=backward, args=(loss,))
            thread.start()
            thread.join(timeout=60)
            assert not thread.is_alive()
            opt.step()
    assert errors == []
    assert [(f.kind, f.step) for f in watcher.findings] == [(Kind.MISSING_ZERO_GRAD, 4)]


# Unusual entry points (closed watchers, shared, sparse and complex parameters, foreign
# optimizers): the tables of tests/test_entry_points.py.


@pytest.mark.parametrize("steps", [0, 3])
def test_a_watcher_never_closed_does_not_keep_a_dropped_model_alive(steps: int) -> None:
    """Watched with its optimizer given and never closed (a notebook cell run again): once the
    model, the optimizer and the watcher are dropped, the parameters (and their gradients) are
    freed, and torch's clip functions and module hooks are as they were."""
    from gradwatch import _clipping

    module_hooks = torch.nn.modules.module

    def run() -> list[weakref.ref[torch.Tensor]]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gradwatch.watch(model, opt, on_finding="record")
        run_steps(model, opt, steps)
        return [weakref.ref(p) for p in model.parameters()]

    params = run()
    gc.collect()
    assert all(ref() is None for ref in params)
    assert not _clipping.installed()
    assert not module_hooks._global_forward_hooks
    assert not module_hooks._global_forward_pre_hooks


def test_a_watcher_not_kept_still_watches_while_its_optimizer_lives() -> None:
    """``gradwatch.watch(model, opt)`` without keeping the watcher: the optimizer's hooks keep
    the checks alive; a forgotten zero_grad is still reported."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    found: list[Finding] = []
    gradwatch.watch(model, opt, on_finding=found.append)
    gc.collect()
    run_steps(model, opt, 3, zero_grad=False)
    assert [f.kind for f in found] == [Kind.MISSING_ZERO_GRAD]
