"""On-device statistics of a step's gradients, read by the host once per check."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from gradwatch._compat import foreach_norm_fp32, group_by_device_and_dtype


def gradient_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each gradient, accumulated in float32, as one 1-D tensor on the first device.

    NaN anywhere in a gradient makes its norm NaN and +/-Inf makes it Inf, so one tensor carries
    both the magnitudes and the non-finite flags. Nothing is read by the host here. To take the
    norms of the same list of gradients step after step, build a :class:`NormPlan` once.
    """
    return NormPlan(grads).norms(grads)


@dataclasses.dataclass(frozen=True)
class _Group:
    positions: torch.Tensor | None
    """Where this group's norms go in the result; None when it is the only group."""
    members: list[int]


class NormPlan:
    """How to take the norms of one list of gradients: one foreach kernel per (device, dtype).

    The grouping is worked out once; the plan is valid for any list of gradients with the same
    layouts, devices and dtypes, in the same order, as the one it was built from.
    """

    def __init__(self, grads: Sequence[torch.Tensor]) -> None:
        self.size = len(grads)
        self.device = grads[0].device if grads else torch.device("cpu")
        self._sparse = any(g.layout != torch.strided for g in grads)
        grads = [_dense_values(g) for g in grads] if self._sparse else grads
        groups = group_by_device_and_dtype(grads)
        self._groups = [
            _Group(None if len(groups) == 1 else torch.tensor(members, device=self.device), members)
            for _, members in groups.values()
        ]

    def norms(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros(0)
        if self._sparse:
            grads = [_dense_values(g) for g in grads]
        if len(self._groups) == 1:
            return torch.stack(foreach_norm_fp32(grads))
        norms = torch.empty(self.size, dtype=torch.float32, device=self.device)
        for group in self._groups:
            group_norms = torch.stack(foreach_norm_fp32([grads[i] for i in group.members]))
            assert group.positions is not None
            norms[group.positions] = group_norms.to(self.device, torch.float32, non_blocking=True)
        return norms


def max_abs(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Largest absolute value of each gradient (float32, on the host)."""
    if not grads:
        return torch.zeros(0)
    return torch.stack([n.float().cpu() for n in _foreach_max_abs(grads)])


def _foreach_max_abs(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = [torch.zeros(())] * len(grads)
    # The infinity norm of an empty tensor has no identity and raises; its largest |value| is 0.
    present = [_dense_values(g) for g in grads]
    nonempty = [g for g in present if g.numel() > 0]
    where = [i for i, g in enumerate(present) if g.numel() > 0]
    for tensors, positions in group_by_device_and_dtype(nonempty).values():
        for position, norm in zip(
            positions, torch._foreach_norm(tensors, float("inf")), strict=True
        ):
            out[where[position]] = norm
    return out


def _dense_values(grad: torch.Tensor) -> torch.Tensor:
    """A strided tensor with the same L2 norm and largest |value| as ``grad``.

    Sparse gradients (``nn.Embedding(sparse=True)``) have no foreach or vector-norm kernels; the
    explicitly stored values of a coalesced sparse tensor carry its norm (duplicate indices of an
    uncoalesced one are summed first).
    """
    if grad.layout == torch.strided:
        return grad
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()
    return grad.values()


class HostCopy:
    """A device tensor on its way to the host.

    On CPU the values are available at once. On an accelerator the copy goes into pinned memory
    without blocking, and :meth:`ready` asks the device whether it has landed, so that a step with
    nothing to report never waits for the device.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cpu":
            self._host = tensor
        elif tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.to("cpu")

    def ready(self) -> bool:
        return self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
