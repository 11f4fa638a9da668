"""What every detector receives at a check, and what it must provide."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from gradwatch._tracker import GradientTracker
from gradwatch.findings import Finding


@dataclasses.dataclass
class ParamTable:
    """The watched parameters, by position: the index every detector and hook uses."""

    names: list[str]
    params: list[torch.nn.Parameter]
    numels: list[int]
    ndims: list[int]

    @classmethod
    def from_named(cls, named: Sequence[tuple[str, torch.nn.Parameter]]) -> ParamTable:
        return cls(
            names=[n for n, _ in named],
            params=[p for _, p in named],
            numels=[p.numel() for _, p in named],
            ndims=[p.dim() for _, p in named],
        )

    def __len__(self) -> int:
        return len(self.names)


@dataclasses.dataclass
class CheckContext:
    """One check: the gradients one optimizer is about to use, and what the hooks saw.

    ``norms[j]`` is the float32 L2 norm of ``params[indices[j]].grad`` (NaN or Inf when the
    gradient holds such values).
    """

    step: int
    group: int
    """Which optimizer's parameters these are; detectors keep per-group history under it."""
    indices: list[int]
    table: ParamTable
    tracker: GradientTracker
    window_start_pass: int
    """Backward passes before this index happened before the group's previous check."""
    norms: torch.Tensor | None = None
    """Set once the statistics have reached the host; see :meth:`host_norms`."""
    max_abs: Callable[[list[int]], torch.Tensor] | None = None
    """Largest |value| of the given positions' gradients, when the gradients are still at hand."""

    def host_norms(self) -> torch.Tensor:
        if self.norms is None:
            raise RuntimeError("this detector needs statistics; run it once they are on the host")
        return self.norms


class Detector(Protocol):
    """Turns one check into findings, keeping whatever bounded history it needs.

    Detectors whose ``needs_statistics`` is false use only the hooks' bookkeeping and run at the
    moment of the check; the others run once the check's norms have reached the host.
    """

    needs_statistics: bool

    def check(self, ctx: CheckContext) -> list[Finding]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def by_arrival(ctx: CheckContext, indices: Sequence[int]) -> list[int]:
    """``indices`` in the order their latest gradients arrived (nearest the loss first)."""
    arrival = ctx.tracker.arrival
    return sorted(indices, key=arrival.__getitem__)
