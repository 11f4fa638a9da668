"""Outputs of gradwatch behind one small interface."""

from gradwatch.sinks.base import GuardedSinks, Sink
from gradwatch.sinks.tensorboard import TensorBoardSink

__all__ = ["GuardedSinks", "Sink", "TensorBoardSink"]
