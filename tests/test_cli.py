import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradwatch
from gradwatch.cli import EXIT_FINDINGS, EXIT_OK, main
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
    assert record["schema"] == 1
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
    assert "caught all 5 planted bugs; the healthy run was silent" in demo.stdout
    assert f"tensorboard --logdir {tmp_path}" in demo.stdout
    report = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    runs = {run["run"]: run for run in json.loads(report.stdout)["runs"]}
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
