"""Outputs of gradwatch: one base class with do-nothing defaults, and the sinks it ships.

``Sink`` is the extension point: subclass it, override what you write, and pass instances with
``sinks=[...]`` to ``gradwatch.watch`` or either callback.
"""

from gradwatch.sinks.base import FanOut, GuardedSinks, Sink, as_sink
from gradwatch.sinks.jsonl import FindingsLog
from gradwatch.sinks.loggers import LoggerSink
from gradwatch.sinks.tensorboard import TensorBoardSink

__all__ = [
    "FanOut",
    "FindingsLog",
    "GuardedSinks",
    "LoggerSink",
    "Sink",
    "TensorBoardSink",
    "as_sink",
]
