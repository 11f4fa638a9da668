"""Gradient histograms taken on the device, read by the host with the check's norms.

A histogram step adds one row per gradient to the small tensor the host reads at that check:
``[finite, nan, inf, min, max, sum, sum_squares, sum_abs, count_0, ..., count_{bins-1}]``, where
every statistic and bucket is taken over the finite values only and ``nan``/``inf`` count the
others. The buckets split ``[min, max]`` into ``bins`` equal parts (``[v - 0.5, v + 0.5]`` when
every finite value is ``v``, as numpy does). Nothing here reads a device tensor on the host; on CPU
the minimum and maximum are read to pick the fast path, which costs no synchronisation there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from gradwatch._stats import _dense_values

DEFAULT_BINS = 64

FINITE, NAN, INF, MIN, MAX, SUM, SUM_SQUARES, SUM_ABS = range(8)
COLUMNS = 8
"""Statistics before the bucket counts in each row."""


def statistics_dtype(device: torch.device) -> torch.dtype:
    """Float64 (exact counts up to 2**53) wherever the device has it; float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def histogram_rows(
    grads: Sequence[torch.Tensor], bins: int = DEFAULT_BINS, device: torch.device | None = None
) -> torch.Tensor:
    """One row of statistics and bucket counts per gradient, as a ``(len(grads), 8 + bins)``
    tensor on ``device`` (the first gradient's by default)."""
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    dtype = statistics_dtype(device)
    if not grads:
        return torch.zeros(0, COLUMNS + bins, dtype=dtype, device=device)
    rows = [_row(_dense_values(g.detach()), bins, dtype) for g in grads]
    if all(r.device == device for r in rows):
        return torch.stack(rows)
    return torch.stack([r.to(device, non_blocking=True) for r in rows])


def _flat(grad: torch.Tensor) -> torch.Tensor:
    """The values of ``grad`` as a 1-D tensor, in memory order: a view whenever the layout is
    dense (a transposed gradient, as ``nn.Linear``'s weight gets, is not copied)."""
    if not grad.is_contiguous() and grad.dim() > 1:
        order = sorted(range(grad.dim()), key=lambda d: grad.stride(d), reverse=True)
        permuted = grad.permute(order)
        if permuted.is_contiguous():
            return permuted.view(-1)
    return grad.reshape(-1)


def _row(grad: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    x = _flat(grad)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half, bfloat16: bucket and sum in float32
    if x.numel() == 0:
        row = torch.zeros(COLUMNS + bins, dtype=dtype, device=x.device)
        row[MIN], row[MAX] = math.inf, -math.inf
        return row
    if x.device.type == "cpu":
        lo_t, hi_t = torch.aminmax(x)  # NaN propagates: both finite means every value is
        lo, hi = float(lo_t), float(hi_t)
        if math.isfinite(lo) and math.isfinite(hi):
            return _finite_cpu_row(x, lo, hi, bins, dtype)
    return _device_row(x, bins, dtype)


def _finite_cpu_row(
    x: torch.Tensor, lo: float, hi: float, bins: int, dtype: torch.dtype
) -> torch.Tensor:
    sums = torch.stack([x.sum(), torch.dot(x, x), x.abs().sum()]).to(dtype)
    if hi > lo:
        scale = bins / (hi - lo)
        # Values land in [0, bins]: truncation takes the rounding noise below 0 to bucket 0, and
        # the top bucket also takes the values equal to the maximum (index ``bins``).
        index = torch.mul(x, scale).add_(-lo * scale).to(torch.int32)
        counts = torch.bincount(index, minlength=bins + 1).to(dtype)
        counts[bins - 1] += counts[bins:].sum()
        counts = counts[:bins]
    else:
        counts = torch.zeros(bins, dtype=dtype)
        counts[bins // 2] = x.numel()
    head = torch.tensor([x.numel(), 0, 0, lo, hi], dtype=dtype)
    return torch.cat([head, sums, counts])


def _device_row(x: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """The same row with no value read by the host (any device, non-finite values allowed)."""
    finite = torch.isfinite(x)
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    lo = torch.where(finite, x, inf).amin()
    hi = torch.where(finite, x, -inf).amax()
    values = torch.where(finite, x, 0)
    finite_count = finite.sum()
    nan_count = torch.isnan(x).sum()
    constant = hi <= lo
    # All-non-finite: lo = inf, hi = -inf; no value is counted, any bucket index will do.
    scale = torch.where(constant, 0, bins / (hi - lo))
    position = torch.nan_to_num((values - lo) * scale, nan=0.0, posinf=0.0, neginf=0.0)
    index = position.clamp_(0, bins - 1).long()
    index = torch.where(constant, bins // 2, index)
    index = torch.where(finite, index, bins)  # one spare bucket takes the non-finite values
    counts = torch.zeros(bins + 1, dtype=dtype, device=x.device)
    counts.scatter_add_(0, index, torch.ones((), dtype=dtype, device=x.device).expand(x.shape))
    head = torch.stack(
        [
            finite_count.to(dtype),
            nan_count.to(dtype),
            (x.numel() - finite_count - nan_count).to(dtype),
            lo.to(dtype),
            hi.to(dtype),
            values.sum(dtype=dtype),
            torch.dot(values, values).to(dtype),
            values.abs().sum(dtype=dtype),
        ]
    )
    return torch.cat([head, counts[:bins]])


@dataclasses.dataclass(frozen=True)
class GradientHistograms:
    """Host-side histograms of one check's gradients, one row per parameter (see module doc)."""

    rows: torch.Tensor

    @property
    def bins(self) -> int:
        return self.rows.shape[1] - COLUMNS

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def finite(self) -> torch.Tensor:
        return self.rows[:, FINITE]

    @property
    def nan(self) -> torch.Tensor:
        return self.rows[:, NAN]

    @property
    def inf(self) -> torch.Tensor:
        return self.rows[:, INF]

    @property
    def min(self) -> torch.Tensor:
        """Smallest finite value (+inf where there is none)."""
        return self.rows[:, MIN]

    @property
    def max(self) -> torch.Tensor:
        """Largest finite value (-inf where there is none)."""
        return self.rows[:, MAX]

    @property
    def sum(self) -> torch.Tensor:
        return self.rows[:, SUM]

    @property
    def sum_squares(self) -> torch.Tensor:
        return self.rows[:, SUM_SQUARES]

    @property
    def sum_abs(self) -> torch.Tensor:
        return self.rows[:, SUM_ABS]

    @property
    def counts(self) -> torch.Tensor:
        return self.rows[:, COLUMNS:]

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |value| of the finite values (NaN where there is none)."""
        return self.sum_abs / self.finite

    @property
    def max_abs(self) -> torch.Tensor:
        """Largest finite |value| (NaN where there is none)."""
        largest = torch.maximum(self.min.abs(), self.max.abs())
        return torch.where(self.finite > 0, largest, math.nan)

    def bucket_limits(self) -> torch.Tensor:
        """The upper edge of every bucket of every row, ``(rows, bins)`` (rows without a finite
        value get NaN)."""
        lo, hi = self.min.clone(), self.max.clone()
        constant = hi <= lo
        lo[constant] -= 0.5
        hi[constant] += 0.5
        fraction = torch.arange(1, self.bins + 1, dtype=torch.float64) / self.bins
        limits = lo[:, None] + (hi - lo)[:, None] * fraction
        limits[:, -1] = hi  # exactly the maximum, whatever the rounding
        return torch.where((self.finite > 0)[:, None], limits, math.nan)

    def edges(self, j: int) -> torch.Tensor:
        """The ``bins + 1`` bucket edges of row ``j``, increasing (empty when no finite value)."""
        if self.finite[j] <= 0:
            return torch.zeros(0, dtype=self.rows.dtype)
        lo, hi = float(self.min[j]), float(self.max[j])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
