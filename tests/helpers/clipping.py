"""A listener on gradwatch's clip wrappers: proof that a framework's clipping went through them
(and so was judged), not around them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gradwatch import _clipping


class ClipSpy:
    """Counts the clip calls (with their thresholds) and the unscales torch makes."""

    def __init__(self) -> None:
        self.clips: list[float | None] = []
        self.unscales = 0

    def clipping(self, tensors: list[torch.Tensor], threshold: float | None) -> None:
        self.clips.append(threshold)

    def unscaled(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscales += 1


@contextmanager
def clip_spy() -> Iterator[ClipSpy]:
    spy = ClipSpy()
    with _clipping.listen(spy):
        yield spy
