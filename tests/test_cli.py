import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch
from gradwatch.cli import EXIT_BAD_INPUT, EXIT_FINDINGS, EXIT_OK, main
from gradwatch.findings import Finding, Kind
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, FindingsLog


def write_log(directory: Path, findings: list[Finding]) -> Path:
    log = FindingsLog(str(directory))
    for finding in findings:
        log.write_finding(finding)
    log.close()
    return directory / FINDINGS_LOG_NAME


NAN = Finding(Kind.NAN, 7, "fc.weight", value=2.0, params=("fc.weight", "fc.bias"))
ZERO = Finding(Kind.MISSING_ZERO_GRAD, 1, "fc.bias", params=("fc.bias",))
EXPLODING = Finding(Kind.EXPLODING, 4, "fc.weight", value=float("inf"), threshold=1e6)


def test_report_summarises_each_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path / "a", [ZERO, NAN])
    write_log(tmp_path / "deep" / "b", [EXPLODING])
    assert main(["report", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run a: 2 finding(s)" in out
    assert "missing_zero_grad" in out and "first at step 1" in out
    assert "nan" in out and "first at step 7" in out
    assert f"run {Path('deep') / 'b'}: 1 finding(s)" in out
    assert "zero_grad()" in out  # the advice


def test_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path / "a", [ZERO, NAN, NAN])
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    (run,) = data["runs"]
    assert run["counts"] == {"missing_zero_grad": 1, "nan": 2}
    assert run["first_step"] == {"missing_zero_grad": 1, "nan": 7}
    assert run["most_affected"][0] == "fc.bias"
    assert data["fail_on_matched"] == []


@pytest.mark.parametrize(
    ("fail_on", "expected"),
    [("nan", EXIT_FINDINGS), ("inf,exploding", EXIT_FINDINGS), ("inf,vanishing", EXIT_OK)],
)
def test_fail_on(tmp_path: Path, fail_on: str, expected: int) -> None:
    write_log(tmp_path, [NAN, EXPLODING])
    assert main(["report", str(tmp_path), "--fail-on", fail_on]) == expected


def test_findings_log_schema(tmp_path: Path) -> None:
    path = write_log(tmp_path, [EXPLODING])
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["schema"] == 4
    assert record["kind"] == "exploding"
    assert record["step"] == 4
    assert record["param"] == "fc.weight"
    assert record["value"] == "inf"  # JSON has no Infinity
    assert record["threshold"] == 1e6
    assert record["rank"] == 0
    assert record["message"] == EXPLODING.message
    assert isinstance(record["wall_time"], float)


# Bad input (missing, empty or unreadable directories and logs, newer schemas, unknown kinds,
# bad flags): the table of tests/test_entry_points.py.


def test_corrupt_and_truncated_lines_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_log(tmp_path, [ZERO, NAN])
    lines = path.read_text().splitlines()
    path.write_text(
        "\n".join([lines[0], "not json", '{"kind": "bogus", "step": 1}', lines[1][:20]]) + "\n"
    )
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"][0]["counts"] == {"missing_zero_grad": 1}
    for number in (2, 3, 4):
        assert f"{path}:{number}" in captured.err


# The kinds each findings-log schema adds, as a gradwatch of that schema wrote them.
ADDED_BY_SCHEMA = {
    1: [],
    2: [Finding(Kind.CLEARED_BEFORE_STEP, 1, "fc.bias", value=2.0, params=("fc.bias",))],
    3: [
        Finding(Kind.NO_UPDATE, 4, "fc.bias", 5.0, 0.0, ("fc.bias", "fc.weight"), "zero_lr"),
        Finding(Kind.NO_UPDATE, 20, "fc.weight", 10.0, None, ("fc.weight",), "unchanged"),
        Finding(Kind.STEP_NOT_TAKEN, 51, "fc.bias", 51.0, 50.0, ("fc.bias",), "no_step"),
    ],
    4: [
        Finding(Kind.CLIP_ORDER, 1, "fc.bias", 2.0, 1.0, ("fc.bias", "fc.weight"), "after_step"),
        Finding(Kind.NO_GRAD, 4, "enc.weight", 5.0, 5.0, ("enc.weight",), "idle_optimizer"),
        Finding(
            Kind.UNREGISTERED_PARAMETER, 0, "blocks[0].weight", 1.0, None, ("blocks[0].weight",)
        ),
        Finding(Kind.REPLICA_DIVERGENCE, 0, "fc.weight", 0.4, 1e-3, ("fc.weight",), "gradients"),
    ],
}


@pytest.mark.parametrize("schema", sorted(ADDED_BY_SCHEMA))
def test_report_reads_the_logs_of_every_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], schema: int
) -> None:
    added = ADDED_BY_SCHEMA[schema]
    if schema == 3:
        assert all("cause" in f.to_dict() for f in added)  # the field schema 3 adds
    records = [raw_record(schema=schema)]
    records += [raw_record(schema=schema, **f.to_dict(), message=f.message) for f in added]
    (tmp_path / FINDINGS_LOG_NAME).write_text("\n".join(records) + "\n")
    assert main(["report", str(tmp_path), "--json", "--fail-on", "any"]) == EXIT_FINDINGS
    captured = capsys.readouterr()
    assert captured.err == ""  # no record skipped as unreadable
    counts = json.loads(captured.out)["runs"][0]["counts"]
    expected: dict[str, int] = {"nan": 1}
    for f in added:
        expected[f.kind.value] = expected.get(f.kind.value, 0) + 1
    assert counts == expected


def test_newer_schema_with_an_unknown_kind_stops_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kind from a newer gradwatch is not skipped as unreadable (``--fail-on any`` would pass
    on it): the schema is read first, and the report refuses the log."""
    (tmp_path / FINDINGS_LOG_NAME).write_text(
        raw_record() + "\n" + raw_record(schema=5, kind="from_the_future") + "\n"
    )
    assert main(["report", str(tmp_path), "--fail-on", "any"]) == EXIT_BAD_INPUT
    assert "schema 5, newer than the schema 4" in capsys.readouterr().err


def test_version_and_help() -> None:
    for args in (["--version"], ["--help"], ["demo", "--help"], ["report", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert "gradwatch" in result.stdout
    version = subprocess.run(
        [sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True
    )
    assert gradwatch.__version__ in version.stdout


@pytest.mark.slow
def test_demo_catches_every_planted_bug_and_report_reads_it(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--log-dir", str(tmp_path), "--steps", "30"],
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "caught all 6 planted bugs; the healthy run was silent" in demo.stdout
    assert f"tensorboard --logdir {tmp_path}" in demo.stdout
    report = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    (run_dir,) = tmp_path.iterdir()  # the demo's own new folder
    runs = {run["run"]: run for run in json.loads(report.stdout)["runs"]}
    runs = {str(Path(name).relative_to(run_dir.name)): run for name, run in runs.items()}
    assert "missing_zero_grad" in runs["forgotten-zero-grad"]["counts"]
    assert "nan" in runs["nan-from-log0"]["counts"]
    assert "exploding" in runs["lr-too-high"]["counts"]
    assert "vanishing" in runs["sigmoid-stack"]["counts"]
    assert "not_in_optimizer" in runs["head-not-in-optimizer"]["counts"]
    assert runs["healthy"]["findings"] == 0
    failing = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(tmp_path), "--fail-on", "nan"],
        capture_output=True,
        text=True,
    )
    assert failing.returncode == EXIT_FINDINGS


# ---------------------------------------------------------------------- untrusted findings logs


def raw_record(**changes: object) -> str:
    """One findings-log line, as any program could have written it."""
    record = {**NAN.to_dict(), "schema": 1, "message": NAN.message, "wall_time": 0.0, "rank": 0}
    return json.dumps({**record, **changes})


def printable(text: str) -> bool:
    """Whether ``text`` holds no character a terminal acts on but the newlines ending lines
    (``str.splitlines`` would also split at CR, U+2028 and others, and so hide them)."""
    return all(character.isprintable() for line in text.split("\n") for character in line)


@pytest.mark.parametrize(
    "line",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        raw_record(params=json.loads("[" * 900 + "]" * 900)),  # nests under json's own limit
        raw_record(message=json.loads("[" * 900 + "]" * 900)),
    ],
    ids=["list", "object", "params-just-under-the-limit", "message-just-under-the-limit"],
)
def test_deeply_nested_line_is_skipped_and_the_rest_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    path = tmp_path / FINDINGS_LOG_NAME
    path.write_text("\n".join([raw_record(), line, raw_record(kind="inf")]) + "\n")
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"][0]["counts"] == {"inf": 1, "nan": 1}
    (warning,) = captured.err.splitlines()
    assert warning.startswith(f"gradwatch report: skipped {path}:2: unreadable finding (")


def test_line_longer_than_the_limit_is_skipped_without_being_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / FINDINGS_LOG_NAME
    long = raw_record(message="x" * (3 << 20))
    path.write_text("\n".join([raw_record(), long, raw_record(kind="inf"), long]))  # no last \n
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runs"][0]["counts"] == {"inf": 1, "nan": 1}
    assert captured.err.splitlines() == [
        f"gradwatch report: skipped {path}:{n}: line longer than 1 MiB" for n in (2, 4)
    ]


def test_log_larger_than_the_limit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradwatch import cli

    monkeypatch.setattr(cli, "MAX_LOG_BYTES", 4096)
    path = tmp_path / FINDINGS_LOG_NAME
    path.write_text((raw_record() + "\n") * 20)
    assert main(["report", str(tmp_path), "--fail-on", "nan"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"gradwatch report: {path}: {path.stat().st_size} bytes, more than the 4096 a findings "
        f"log may hold (one line per new kind and parameter); was something else written there?\n"
    )


HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[1A\rall clear\x08\x9b\u202e\u2028\x00\t"


@pytest.mark.parametrize(
    "field", ["message", "param", "params", "run", "surrogate", "undecodable-run"]
)
def test_text_report_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str
) -> None:
    name = {"run": HOSTILE.replace("\x00", ""), "undecodable-run": os.fsdecode(b"run-\xff")}
    run = tmp_path / name.get(field, "run")
    try:
        run.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses such a name")
    changes: dict[str, object] = {
        "message": {"message": f"step 7: {HOSTILE}"},
        "param": {"param": HOSTILE, "params": []},  # most affected: the param
        "params": {"params": [HOSTILE, "fc.bias"]},
        "run": {},
        "surrogate": {"message": "step 7: \ud800 lone", "params": ["\udfff"]},
        "undecodable-run": {},
    }[field]
    (run / FINDINGS_LOG_NAME).write_text(raw_record(**changes) + "\nnot json\n")
    assert main(["report", str(tmp_path)]) == EXIT_OK
    captured = capsys.readouterr()
    assert printable(captured.out) and printable(captured.err)
    assert "run " in captured.out and "skipped" in captured.err
    escaped = {"surrogate": r"\ud800", "undecodable-run": r"run run-\udcff: 1 finding(s)"}.get(
        field, r"\x1b]0;owned\x07\x1b[2J"
    )
    assert escaped in captured.out + captured.err


def test_json_report_escapes_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = raw_record(message=f"step 7: {HOSTILE}\ud800", params=[HOSTILE])
    (tmp_path / FINDINGS_LOG_NAME).write_text(record + "\n")
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.isascii() and printable(out)
    (run,) = json.loads(out)["runs"]
    assert run["advice"]["nan"] == f"{HOSTILE}\ud800"
    assert run["most_affected"] == [HOSTILE]


def _report_process(*args: str) -> subprocess.Popen[bytes]:
    def limit_memory() -> None:  # a regression reading /dev/zero fails instead of filling memory
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))

    return subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "report", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit_memory,
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("good", [True, False], ids=["beside-a-good-log", "alone"])
def test_fifo_and_device_logs_are_skipped_without_reading_them(tmp_path: Path, good: bool) -> None:
    if good:
        write_log(tmp_path / "good", [NAN])
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / FINDINGS_LOG_NAME)
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / FINDINGS_LOG_NAME).symlink_to("/dev/zero")
    process = _report_process(str(tmp_path))
    try:
        out, err = process.communicate(timeout=120)  # a hang fails here
    finally:
        process.kill()
    assert process.returncode == (EXIT_OK if good else EXIT_BAD_INPUT), err
    lines = err.decode().splitlines()
    assert lines[:2] == [
        f"gradwatch report: skipped {tmp_path / 'fifo' / FINDINGS_LOG_NAME}: not a regular file "
        f"(a FIFO)",
        f"gradwatch report: skipped {tmp_path / 'zero' / FINDINGS_LOG_NAME}: not a regular file "
        f"(a character device)",
    ]
    if good:
        assert len(lines) == 2
        assert out.decode().startswith("run good: 1 finding(s)\n")
    else:
        assert lines[2:] == [
            f"gradwatch report: {tmp_path}: no findings log could be read (2 skipped: not "
            f"regular files)"
        ]
        assert out == b""


@pytest.mark.parametrize("fail_on", [[], ["--fail-on", "nan"]], ids=["plain", "fail-on"])
def test_output_piped_into_head_ends_quietly(tmp_path: Path, fail_on: list[str]) -> None:
    # Bigger than any pipe's buffer, so the report is still writing when the reader goes away.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / FINDINGS_LOG_NAME).write_text(raw_record(message="step 7: " + "x" * 900_000))
    process = _report_process(str(tmp_path), *fail_on)
    assert process.stdout is not None and process.stderr is not None
    try:
        assert process.stdout.readline() == b"run a: 1 finding(s)\n"
        process.stdout.close()  # what `| head -1` does
        err = process.stderr.read()
        process.wait(timeout=120)
    finally:
        process.kill()
    assert err == b""
    assert process.returncode == (EXIT_FINDINGS if fail_on else EXIT_OK)


def test_report_on_one_run_names_it_after_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_log(tmp_path / "my-run", [NAN])
    assert main(["report", str(tmp_path / "my-run")]) == EXIT_OK
    assert capsys.readouterr().out.startswith("run my-run: 1 finding(s)\n")
    monkeypatch.chdir(tmp_path / "my-run")
    assert main(["report", ".", "--json"]) == EXIT_OK
    assert [r["run"] for r in json.loads(capsys.readouterr().out)["runs"]] == ["my-run"]


def test_run_names_never_collide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path / "exp", [NAN])
    write_log(tmp_path / "exp" / "exp", [ZERO])  # the folder's name is taken by a run inside it
    assert main(["report", str(tmp_path / "exp"), "--json"]) == EXIT_OK
    runs = {r["run"]: r["counts"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs == {".": {"nan": 1}, "exp": {"missing_zero_grad": 1}}


@pytest.mark.parametrize(
    ("fail_on", "expected"),
    [("any", EXIT_FINDINGS), ("NaN", EXIT_FINDINGS), (" INF , Exploding", EXIT_FINDINGS),
     ("ANY", EXIT_FINDINGS), ("Vanishing", EXIT_OK)],
)  # fmt: skip
def test_fail_on_any_and_any_case(tmp_path: Path, fail_on: str, expected: int) -> None:
    write_log(tmp_path, [NAN, EXPLODING])
    assert main(["report", str(tmp_path), "--fail-on", fail_on]) == expected


def test_fail_on_any_names_the_matched_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(tmp_path, [NAN, EXPLODING])
    assert main(["report", str(tmp_path), "--fail-on", "any"]) == EXIT_FINDINGS
    assert capsys.readouterr().out.endswith("\n\n--fail-on matched: exploding, nan\n")


def test_fail_on_any_passes_a_healthy_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_log(tmp_path, [])
    assert main(["report", str(tmp_path), "--fail-on", "any", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["fail_on_matched"] == []


def test_unknown_fail_on_kind_lists_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path, [NAN])
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path), "--fail-on", "nan,everything"])
    assert exit_info.value.code == EXIT_BAD_INPUT
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(
        "unknown kind(s) everything; known kinds: cleared_before_step, clip_order, exploding, inf, "
        "missing_zero_grad, nan, no_grad, no_update, not_in_optimizer, replica_divergence, "
        "skipped_step, step_not_taken, unexpected_accumulation, unregistered_parameter, "
        "vanishing; or any (every kind)"
    )


# ---------------------------------------------------------------------- the demo


@pytest.fixture
def two_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo of one planted bug and the healthy run, to keep these tests short."""
    from gradwatch import _demo

    picked = [s for s in _demo.SCENARIOS if s.name in ("forgotten-zero-grad", "healthy")]
    monkeypatch.setattr(_demo, "SCENARIOS", picked)


@pytest.mark.usefixtures("two_scenarios")
def test_demo_run_twice_starts_afresh_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "healthy").mkdir()
    (tmp_path / "healthy" / "notes.txt").write_text("mine")
    printed = []
    for _ in range(2):
        assert main(["demo", "--log-dir", str(tmp_path), "--steps", "12"]) == EXIT_OK
        out = capsys.readouterr().out
        (command,) = [line for line in out.splitlines() if "gradwatch report " in line]
        printed.append(Path(command.split("gradwatch report ")[1].rstrip(")")))
    first, second = printed
    assert first != second and first.parent == second.parent == tmp_path
    assert (tmp_path / "healthy" / "notes.txt").read_text() == "mine"
    for run_dir in printed:
        assert main(["report", str(run_dir), "--json"]) == EXIT_OK
        runs = {r["run"]: r["counts"] for r in json.loads(capsys.readouterr().out)["runs"]}
        assert runs == {"forgotten-zero-grad": {"missing_zero_grad": 1}, "healthy": {}}
    assert main(["report", str(tmp_path), "--json"]) == EXIT_OK  # every demo run, each once
    runs = {r["run"]: r["counts"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs == {
        f"{d.name}/{name}": counts
        for d in printed
        for name, counts in [("forgotten-zero-grad", {"missing_zero_grad": 1}), ("healthy", {})]
    }


def test_demo_run_folders_are_never_reused(tmp_path: Path) -> None:
    from gradwatch._demo import fresh_run_dir

    made = [fresh_run_dir(str(tmp_path), now=0.0) for _ in range(3)]
    assert len(set(made)) == 3
    assert all(Path(d).is_dir() and not any(Path(d).iterdir()) for d in made)
    assert sorted(made) == made  # listed in the order they were made


@pytest.mark.usefixtures("two_scenarios")
def test_demo_writes_enough_histograms_for_tensorboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["demo", "--log-dir", str(tmp_path)]) == EXIT_OK  # the default 30 steps
    capsys.readouterr()
    (run_dir,) = tmp_path.glob("*/healthy")
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})
    events.Reload()
    steps = [e.step for e in events.Histograms("gradwatch/grad/0.weight")]
    assert len(steps) >= 10


def test_demo_refuses_too_few_steps_and_its_minimum_is_enough(tmp_path: Path) -> None:
    import io

    from gradwatch._demo import MIN_STEPS, run_demo

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--log-dir", str(tmp_path / "refused"), "--steps", str(MIN_STEPS - 1)])
    assert exit_info.value.code == EXIT_BAD_INPUT
    assert not (tmp_path / "refused").exists()
    # The minimum is the real one: one step fewer misses a planted bug, the minimum catches all.
    assert not all(r.ok for r in run_demo(str(tmp_path / "short"), MIN_STEPS - 1, io.StringIO()))
    assert all(r.ok for r in run_demo(str(tmp_path / "enough"), MIN_STEPS, io.StringIO()))
