"""The ``gradwatch`` command: ``gradwatch demo`` and ``gradwatch report``.

Exit codes: 0 success; 1 ``report --fail-on`` matched a finding, or the demo missed a planted bug;
2 bad input (a missing directory, no findings log that can be read, a log larger than
:data:`MAX_LOG_BYTES`, an unknown kind, bad arguments). When the reader of the output goes away
early (``gradwatch report DIR | head``), the command stops writing, without a traceback:
``report`` still exits with its verdict (0, or 1 when ``--fail-on`` matched), which it decides
before it prints; ``demo`` exits with its verdict if it had finished, else 141 (128 + SIGPIPE,
what a shell reports for a program that a closed pipe stopped).

``report`` reads findings logs as untrusted input: only regular files (a FIFO or a device by that
name is skipped with a warning, and never opened in a way that can block), lines of at most
:data:`MAX_LINE_BYTES` (a longer one is skipped with a warning without being held in memory), and
in the text output every character a terminal could act on (escape sequences, carriage returns,
bidirectional controls, lone surrogates) is printed as a Python escape such as ``\\x1b``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from gradwatch._version import __version__
from gradwatch.findings import Finding, Kind
from gradwatch.sinks.jsonl import FINDINGS_LOG_NAME, SCHEMA_VERSION

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_BROKEN_PIPE = 141
"""The demo's code when its output pipe closed before it finished: 128 + SIGPIPE."""

MAX_LINE_BYTES = 1 << 20
"""The longest line ``report`` reads (1 MiB; a finding's line is a few hundred bytes)."""
MAX_LOG_BYTES = 1 << 30
"""The largest findings log ``report`` reads (1 GiB; a run logs one line per new kind and
parameter, so even a large model's log is a few MB)."""

ANY_KIND = "any"


class _BadInput(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    code = EXIT_BROKEN_PIPE
    try:
        try:
            code = args.run(args)
        except _BadInput as error:
            _say(f"gradwatch {args.command}: {error}", sys.stderr)
            return EXIT_BAD_INPUT
        sys.stdout.flush()
    except BrokenPipeError:
        _stop_writing()
    return code


def _stop_writing() -> None:
    """After the reader of stdout has gone: send stdout to the null device, so that neither what
    is still buffered nor Python's flush at exit raises again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured or replaced): no flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _printable(text: str) -> str:
    """``text`` with every character a terminal could act on written as a Python escape.

    Controls (ESC, CR, BS, C1 codes), format characters (bidirectional overrides, zero-width
    characters), line separators and lone surrogates become ``\\x1b``, ``\\u202e``,
    ``\\ud800``; everything ``str.isprintable`` accepts, backslashes included, is kept.

    Example:
        >>> _printable("step 3: \\x1b[2Jall clear\\r")
        'step 3: \\\\x1b[2Jall clear\\\\r'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _say(text: str, file: TextIO | None = None) -> None:
    """Prints one line of text output, escaped with :func:`_printable`; a character the stream's
    encoding lacks is written as a backslash escape too."""
    file = sys.stdout if file is None else file
    text = _printable(text)
    encoding = getattr(file, "encoding", None) or "utf-8"
    text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    print(text, file=file)


def _parser() -> argparse.ArgumentParser:
    from gradwatch._demo import MIN_STEPS  # torch is loaded already, by the gradwatch package

    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Catch gradient bugs in PyTorch training as they happen."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train small models with planted gradient bugs and show what gradwatch finds",
        description="Train small models with well-known gradient bugs planted (and one healthy "
        "run), print what gradwatch finds, and write TensorBoard logs and findings logs into a "
        "new folder under --log-dir (named after the date and time; nothing is overwritten).",
    )
    demo.add_argument(
        "--log-dir",
        default="runs/gradwatch-demo",
        help="where each demo run gets its own new folder (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=_demo_steps,
        default=30,
        help=f"steps per model, at least {MIN_STEPS} so that every planted bug happens "
        f"(default: %(default)s)",
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
        help="comma-separated kinds in any case (e.g. nan,inf,exploding), or 'any' for every "
        "kind; exit 1 if any such finding exists",
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


def _demo_steps(text: str) -> int:
    from gradwatch._demo import MIN_STEPS, SLOWEST

    value = _positive_int(text)
    if value < MIN_STEPS:
        raise argparse.ArgumentTypeError(
            f"the demo needs at least {MIN_STEPS} steps so that every planted bug has happened "
            f"({SLOWEST.name}: {SLOWEST.bug}), got {text!r}"
        )
    return value


def _kinds(text: str) -> frozenset[str]:
    names = {part.strip() for part in text.split(",") if part.strip()}
    known = {k.value for k in Kind}
    unknown = sorted(n for n in names if n.lower() not in {*known, ANY_KIND})
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(map(_printable, unknown)) or repr(text)}; "
            f"known kinds: {', '.join(sorted(known))}; or {ANY_KIND} (every kind)"
        )
    wanted = {n.lower() for n in names}
    return frozenset(known if ANY_KIND in wanted else wanted)


def _run_demo(args: argparse.Namespace) -> int:
    from gradwatch._demo import fresh_run_dir, run_demo
    from gradwatch._options import check_log_dir
    from gradwatch.findings import GradWatchError

    try:
        check_log_dir(args.log_dir)
        os.makedirs(args.log_dir, exist_ok=True)
        # Each demo run writes into a folder of its own, so that a second run neither appends to
        # the first one's findings logs nor deletes anything: the folders of earlier runs, and
        # anything else under --log-dir, are left exactly as they are.
        run_dir = fresh_run_dir(args.log_dir)
    except GradWatchError as error:
        raise _BadInput(str(error).replace("log_dir", "--log-dir", 1)) from None
    except OSError as error:
        reason = error.strerror or error
        raise _BadInput(f"--log-dir {args.log_dir!r} could not be created: {reason}") from None
    results = run_demo(run_dir, steps=args.steps)
    return EXIT_OK if all(r.ok for r in results) else EXIT_FINDINGS


# ---------------------------------------------------------------------- report


def load_runs(root: str, warn: TextIO | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every findings log under ``root``: run name -> its records.

    A run is named by its directory relative to ``root``; the log in ``root`` itself by the name
    of that folder (``.`` if a run inside it already has that name)."""
    return {name: list(_records(path, file, warn)) for name, path, file in _logs(root, warn)}


def _logs(root: str, warn: TextIO | None) -> Iterator[tuple[str, Path, IO[bytes]]]:
    """(run name, path, the open log) for every findings log under ``root`` that is a regular
    file, each closed when the next is asked for."""
    if not root:
        raise _BadInput("LOG_DIR is empty; give the directory the findings logs are under")
    base = Path(root)
    try:
        if not base.exists():
            raise _BadInput(f"{root}: no such directory")
        if not base.is_dir():
            raise _BadInput(f"{root}: not a directory")
        logs = sorted(base.rglob(FINDINGS_LOG_NAME))
    except (OSError, ValueError) as error:
        raise _BadInput(f"{root}: could not be searched: {error}") from None
    if not logs:
        raise _BadInput(f"{root}: no {FINDINGS_LOG_NAME} found (was gradwatch given a log_dir?)")
    names = [os.path.relpath(log.parent, base) for log in logs]
    own = os.path.basename(os.path.abspath(root))
    if own and own not in names:
        names = [own if name == os.curdir else name for name in names]
    skipped = 0
    for name, log in zip(names, logs, strict=True):
        file = _open_log(log, warn)
        if file is None:
            skipped += 1
            continue
        with file:
            yield name, log, file
    if skipped == len(logs):
        raise _BadInput(
            f"{root}: no findings log could be read ({skipped} skipped: not regular files)"
        )


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_OPEN_FLAGS = os.O_RDONLY | _NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
_NOT_REGULAR = [
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
]


def _open_log(path: Path, warn: TextIO | None) -> IO[bytes] | None:
    """The findings log at ``path`` opened for reading, or None, after a warning, when it is not a
    regular file: a FIFO would block, a device such as ``/dev/zero`` never ends."""
    try:
        mode = os.stat(path).st_mode  # follows symbolic links: a link to a log is a log
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stat.S_ISREG(mode):
            # O_NONBLOCK: had a FIFO replaced the file since the stat, open() would not wait for
            # a writer; fstat then tells.
            fd = os.open(path, _OPEN_FLAGS)
            try:
                info = os.fstat(fd)
                mode = info.st_mode
                if stat.S_ISREG(mode):
                    if info.st_size > MAX_LOG_BYTES:
                        raise _BadInput(
                            f"{path}: {info.st_size} bytes, more than the {MAX_LOG_BYTES} a "
                            f"findings log may hold (one line per new kind and parameter); was "
                            f"something else written there?"
                        )
                    if _OPEN_FLAGS & _NONBLOCK:
                        os.set_blocking(fd, True)
                    return os.fdopen(fd, "rb")
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    except OSError as error:
        # A log that cannot be read is not skipped: --fail-on would pass on findings it never saw.
        raise _BadInput(f"{path}: could not be read: {error.strerror or error}") from None
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "something else")
    _say(f"gradwatch report: skipped {path}: not a regular file ({what})", warn or sys.stderr)
    return None


def _lines(file: IO[bytes]) -> Iterator[bytes | None]:
    """Each line of ``file``, or None for a line longer than :data:`MAX_LINE_BYTES`, which is
    read past in pieces of that size, never held whole."""
    while True:
        line = file.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = file.readline(MAX_LINE_BYTES)
        yield None


def _records(path: Path, file: IO[bytes], warn: TextIO | None) -> Iterator[dict[str, Any]]:
    warn = warn or sys.stderr
    try:
        for number, line in enumerate(_lines(file), 1):
            if line is None:
                limit = f"{MAX_LINE_BYTES / (1 << 20):g} MiB"
                _say(f"gradwatch report: skipped {path}:{number}: line longer than {limit}", warn)
                continue
            text = line.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                record = _check_record(json.loads(text))
            except _NewerSchema as newer:
                raise _BadInput(
                    f"{path}:{number}: written with findings-log schema {newer.schema}, newer "
                    f"than the schema {SCHEMA_VERSION} this gradwatch ({__version__}) reads; "
                    f"upgrade gradwatch"
                ) from None
            except (ValueError, KeyError, TypeError, RecursionError) as error:
                # RecursionError: json and repr() recurse once per level of [[[...]]] or {"a":...}.
                reason = "nested too deeply" if isinstance(error, RecursionError) else error
                skipped = f"skipped {path}:{number}: unreadable finding ({reason})"
                _say(f"gradwatch report: {skipped}", warn)
                continue
            yield record
    except OSError as error:
        raise _BadInput(f"{path}: could not be read: {error.strerror or error}") from None


class _NewerSchema(Exception):
    def __init__(self, schema: int) -> None:
        super().__init__(schema)
        self.schema = schema


def _check_record(record: object) -> dict[str, Any]:
    """``record`` if it has the fields the report reads, with the types schemas 1 to 4 give
    them: a serialised :class:`~gradwatch.Finding` (``Finding.from_dict`` checks it), its schema
    and its message. Schema 2 only adds kinds (``cleared_before_step``).

    Raises:
        _NewerSchema: The record's schema is newer than :data:`SCHEMA_VERSION`; checked before
            the finding, so that a kind this gradwatch does not know stops the report instead
            of being skipped as unreadable.
    """
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    schema = record.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ValueError(f"schema must be an integer >= 1, got {schema!r:.40}")
    if schema > SCHEMA_VERSION:
        raise _NewerSchema(schema)
    message = record.get("message", "")
    if not isinstance(message, str):
        raise ValueError(f"message must be a string, got {type(message).__name__}")
    Finding.from_dict({"params": [], "value": None, "threshold": None, **record})
    return record


class _Run:
    """What the report says of one run, gathered one record at a time: it keeps a count per kind
    and per parameter and the first finding of each kind, not the records."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.findings = 0
        self.counts: Counter[str] = Counter()
        self.first: dict[str, tuple[int, str]] = {}
        """kind -> (step, advice) of its earliest finding (the first in the log among equals)."""
        self.params: Counter[str] = Counter()

    def add(self, record: dict[str, Any]) -> None:
        kind, step = record["kind"], int(record["step"])
        self.findings += 1
        self.counts[kind] += 1
        if kind not in self.first or step < self.first[kind][0]:
            self.first[kind] = (step, _advice(record))
        self.params.update(p for p in (record.get("params") or [record.get("param")]) if p)

    def summary(self) -> dict[str, Any]:
        first = sorted(self.first.items())
        return {
            "run": self.name,
            "findings": self.findings,
            "counts": dict(sorted(self.counts.items())),
            "first_step": {kind: step for kind, (step, _) in first},
            "most_affected": [name for name, _ in self.params.most_common(5)],
            "advice": {kind: advice for kind, (_, advice) in first},
        }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    summaries = []
    for name, records in runs.items():
        run = _Run(name)
        for record in records:
            run.add(record)
        summaries.append(run.summary())
    return summaries


def _advice(record: dict[str, Any]) -> str:
    message = str(record.get("message", ""))
    prefix = f"step {record['step']}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _run_report(args: argparse.Namespace) -> int:
    runs = []
    for name, path, file in _logs(args.log_dir, None):
        run = _Run(name)
        for record in _records(path, file, None):
            run.add(record)
        runs.append(run)
    summaries = [run.summary() for run in runs]
    matched = sorted({k for s in summaries for k in s["counts"] if k in args.fail_on})
    try:
        if args.json:
            print(json.dumps({"runs": summaries, "fail_on_matched": matched}, indent=2))
        else:
            _print_report(summaries)
            if matched:
                _say("")
                _say(f"--fail-on matched: {', '.join(matched)}")
        sys.stdout.flush()
    except BrokenPipeError:
        _stop_writing()
    return EXIT_FINDINGS if matched else EXIT_OK


def _print_report(summaries: list[dict[str, Any]]) -> None:
    for summary in summaries:
        _say(f"run {summary['run']}: {summary['findings']} finding(s)")
        for kind, count in summary["counts"].items():
            _say(f"  {kind:<24} x{count:<4} first at step {summary['first_step'][kind]}")
            _say(f"      {summary['advice'][kind]}")
        if summary["most_affected"]:
            _say(f"  most affected: {', '.join(summary['most_affected'])}")
        _say("")
