"""The findings log: one JSON object per line, written and flushed the moment a finding is made."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from gradwatch.findings import Finding
from gradwatch.sinks.base import Sink

FINDINGS_LOG_NAME = "gradwatch-findings.jsonl"
SCHEMA_VERSION = 4
"""The findings log's record format. 2 adds the kind ``cleared_before_step`` to the fields of 1;
3 adds the kinds ``step_not_taken`` and ``no_update`` and the field ``cause`` (present only on a
finding of a kind with several causes); 4 adds the kinds ``clip_order``,
``unregistered_parameter`` and ``replica_divergence`` and the ``no_grad`` cause
``"idle_optimizer"``. A reader of an older
schema cannot read every record, so it must refuse the log, not skip lines."""


def finding_record(
    finding: Finding, *, rank: int = 0, wall_time: float | None = None
) -> dict[str, Any]:
    """The JSON object the findings log holds for ``finding`` (schema version 4):
    :meth:`Finding.to_dict` with ``schema`` first and ``message``, ``wall_time``, ``rank`` last.

    Example:
        >>> from gradwatch import Finding, Kind
        >>> finding_record(Finding(Kind.INF, 2, "w", value=float("inf")), wall_time=0.0)
        {'schema': 4, 'kind': 'inf', 'step': 2, 'param': 'w', 'params': [], 'value': 'inf',
         'threshold': None, 'message': "step 2: the gradient of 'w' holds ...",
         'wall_time': 0.0, 'rank': 0}
    """
    return {
        "schema": SCHEMA_VERSION,
        **finding.to_dict(),
        "message": finding.message,
        "wall_time": time.time() if wall_time is None else wall_time,
        "rank": rank,
    }


class FindingsLog(Sink):
    """Appends each finding to ``<log_dir>/gradwatch-findings.jsonl``.

    Each line is flushed as it is written, so a process that crashes or is killed keeps every
    finding it reported. After :meth:`close`, findings are dropped: the file is never reopened.

    Args:
        log_dir: The directory, created if missing.
        rank: The rank written for a finding whose caller gives none.

    Example:
        >>> import json, pathlib, tempfile
        >>> from gradwatch import Finding, Kind
        >>> log = FindingsLog(tempfile.mkdtemp())
        >>> log.write_finding(Finding(Kind.NAN, 7, "fc.weight"), rank=1)
        >>> log.close()
        >>> record = json.loads(pathlib.Path(log.path).read_text())
        >>> record["kind"], record["step"], record["rank"]
        ('nan', 7, 1)
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, rank: int = 0) -> None:
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(os.fspath(log_dir), FINDINGS_LOG_NAME)
        self._rank = rank
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives until close()

    def write_finding(self, finding: Finding, *, rank: int | None = None) -> None:
        """Append ``finding`` and flush.

        A log whose file was deleted during the run (its directory removed) is recreated, with
        one ``RuntimeWarning`` (the findings written before are gone with the old file); when it
        cannot be recreated, findings are dropped, with one ``RuntimeWarning`` too.
        """
        record = finding_record(finding, rank=self._rank if rank is None else rank)
        line = json.dumps(record, allow_nan=False)
        with self._lock:
            if self._file.closed:
                return
            try:
                # Findings are rare: two stats per finding tell whether the file is still there.
                gone = os.fstat(self._file.fileno()).st_nlink == 0 or not os.path.exists(self.path)
            except OSError:
                gone = True
            if gone:
                from gradwatch._reporting import warn_user  # not at import: a cycle via sinks

                warned = getattr(self, "_warned_gone", False)
                self._warned_gone = True
                try:
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                    reopened = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - until close()
                except OSError as error:
                    if not warned:
                        warn_user(
                            f"gradwatch: the findings log {self.path!r} was deleted during the run "
                            f"and could not be recreated ({error.strerror or error}); findings are "
                            f"no longer written to it (they are still reported and kept in "
                            f"Watcher.findings)",
                            RuntimeWarning,
                        )
                    return
                self._file.close()
                self._file = reopened
                if not warned:
                    warn_user(
                        f"gradwatch: the findings log {self.path!r} was deleted during the run; "
                        f"gradwatch recreated it, without the findings written before",
                        RuntimeWarning,
                    )
            self._file.write(line + "\n")
            self._file.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
