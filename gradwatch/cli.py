"""The ``gradwatch`` command: ``gradwatch demo`` and ``gradwatch report``.

Exit codes: 0 success; 1 ``report --fail-on`` matched a finding, or the demo missed a planted bug;
2 bad input (a missing directory, no findings log, an unknown kind, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from gradwatch._version import __version__
from gradwatch.findings import Finding, Kind
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, SCHEMA_VERSION

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


class _BadInput(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except _BadInput as error:
        print(f"gradwatch {args.command}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Catch gradient bugs in PyTorch training as they happen."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train small models with planted gradient bugs and show what gradwatch finds",
        description="Train small models with well-known gradient bugs planted (and one healthy "
        "run), print what gradwatch finds, and write TensorBoard logs and findings logs.",
    )
    demo.add_argument(
        "--log-dir", default="runs/gradwatch-demo", help="where logs go (default: %(default)s)"
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=30, help="steps per model (default: %(default)s)"
    )
    demo.set_defaults(run=_run_demo)

    report = commands.add_parser(
        "report",
        help="summarise the findings logs under a directory",
        description=f"Summarise every {FINDINGS_LOG_NAME} under LOG_DIR (searched recursively).",
    )
    report.add_argument("log_dir", metavar="LOG_DIR")
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.add_argument(
        "--fail-on",
        metavar="KINDS",
        type=_kinds,
        default=frozenset(),
        help="comma-separated kinds (e.g. nan,inf,exploding); exit 1 if any such finding exists",
    )
    report.set_defaults(run=_run_report)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _kinds(text: str) -> frozenset[str]:
    names = {part.strip() for part in text.split(",") if part.strip()}
    known = {k.value for k in Kind}
    unknown = sorted(names - known)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or repr(text)}; "
            f"known kinds: {', '.join(sorted(known))}"
        )
    return frozenset(names)


def _run_demo(args: argparse.Namespace) -> int:
    from gradwatch._demo import run_demo
    from gradwatch._options import check_log_dir
    from gradwatch.findings import GradWatchError

    try:
        check_log_dir(args.log_dir)
        os.makedirs(args.log_dir, exist_ok=True)
    except GradWatchError as error:
        raise _BadInput(str(error).replace("log_dir", "--log-dir", 1)) from None
    except OSError as error:
        reason = error.strerror or error
        raise _BadInput(f"--log-dir {args.log_dir!r} could not be created: {reason}") from None
    results = run_demo(args.log_dir, steps=args.steps)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FINDINGS


# ---------------------------------------------------------------------- report


def load_runs(root: str, warn: TextIO | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every findings log under ``root``: run directory (relative to ``root``) -> its records."""
    if not root:
        raise _BadInput("LOG_DIR is empty; give the directory the findings logs are under")
    base = Path(root)
    if not base.exists():
        raise _BadInput(f"{root}: no such directory")
    if not base.is_dir():
        raise _BadInput(f"{root}: not a directory")
    try:
        logs = sorted(base.rglob(FINDINGS_LOG_NAME))
    except OSError as error:
        raise _BadInput(f"{root}: could not be searched: {error}") from None
    if not logs:
        raise _BadInput(f"{root}: no {FINDINGS_LOG_NAME} found (was gradwatch given a log_dir?)")
    runs: dict[str, list[dict[str, Any]]] = {}
    for log in logs:
        run = os.path.relpath(log.parent, base)
        runs[run] = _read_log(log, warn or sys.stderr)
    return runs


def _read_log(path: Path, warn: TextIO) -> list[dict[str, Any]]:
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = list(file)
    except OSError as error:
        # A log that cannot be read is not skipped: --fail-on would pass on findings it never saw.
        raise _BadInput(f"{path}: could not be read: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = _check_record(json.loads(line))
        except (ValueError, KeyError, TypeError) as error:
            print(
                f"gradwatch report: skipped {path}:{number}: unreadable finding ({error})",
                file=warn,
            )
            continue
        if record["schema"] > SCHEMA_VERSION:
            raise _BadInput(
                f"{path}:{number}: written with findings-log schema {record['schema']}, newer "
                f"than the schema {SCHEMA_VERSION} this gradwatch ({__version__}) reads; "
                f"upgrade gradwatch"
            )
        records.append(record)
    return records


def _check_record(record: object) -> dict[str, Any]:
    """``record`` if it has the fields the report reads, with the types schema 1 gives them: a
    serialised :class:`~gradwatch.Finding` (``Finding.from_dict`` checks it) and its schema."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    schema = record.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ValueError(f"schema must be an integer >= 1, got {schema!r}")
    Finding.from_dict({"params": [], "value": None, "threshold": None, **record})
    return record


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    summaries = []
    for run, records in runs.items():
        counts = Counter(r["kind"] for r in records)
        first: dict[str, dict[str, Any]] = {}
        for record in sorted(records, key=lambda r: int(r["step"])):
            first.setdefault(record["kind"], record)
        params = Counter(p for r in records for p in (r.get("params") or [r.get("param")]) if p)
        summaries.append(
            {
                "run": run,
                "findings": len(records),
                "counts": dict(sorted(counts.items())),
                "first_step": {kind: int(r["step"]) for kind, r in sorted(first.items())},
                "most_affected": [name for name, _ in params.most_common(5)],
                "advice": {kind: _advice(r) for kind, r in sorted(first.items())},
            }
        )
    return summaries


def _advice(record: dict[str, Any]) -> str:
    message = str(record.get("message", ""))
    prefix = f"step {record['step']}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _run_report(args: argparse.Namespace) -> int:
    runs = load_runs(args.log_dir)
    summaries = summarise(runs)
    matched = sorted({k for s in summaries for k in s["counts"] if k in args.fail_on})
    if args.json:
        print(json.dumps({"runs": summaries, "fail_on_matched": matched}, indent=2))
    else:
        _print_report(summaries)
        if matched:
            print(f"\n--fail-on matched: {', '.join(matched)}")
    return EXIT_FINDINGS if matched else EXIT_OK


def _print_report(summaries: list[dict[str, Any]]) -> None:
    for summary in summaries:
        print(f"run {summary['run']}: {summary['findings']} finding(s)")
        for kind, count in summary["counts"].items():
            print(f"  {kind:<24} x{count:<4} first at step {summary['first_step'][kind]}")
            print(f"      {summary['advice'][kind]}")
        if summary["most_affected"]:
            print(f"  most affected: {', '.join(summary['most_affected'])}")
        print()
