"""Gradient histograms taken on the device, read by the host with the check's norms.

A histogram step adds one row per gradient to the small tensor the host reads at that check:
``[finite, nan, inf, min, max, sum, sum_squares, sum_abs, count_0, ..., count_{bins-1}]``, where
every statistic and bucket is taken over the finite values only and ``nan``/``inf`` count the
others. The buckets split ``[min, max]`` into ``bins`` equal parts (``[v - 0.5, v + 0.5]`` when
every finite value is ``v``, as numpy does). Bucketing costs several times a norm per value, so a
gradient with more than ``SAMPLE`` values fills its buckets from a fixed random sample of that
many, scaled to its number of finite values; its counts, minimum, maximum and sums stay exact.
Nothing here reads a device tensor on the host; on CPU the minimum and maximum are read to pick
the fast path, which costs no synchronisation there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from gradwatch._stats import _dense_values

DEFAULT_BINS = 64

FINITE, NAN, INF, MIN, MAX, SUM, SUM_SQUARES, SUM_ABS = range(8)
COLUMNS = 8
"""Statistics before the bucket counts in each row."""


SAMPLE = 1 << 16
"""Gradients with more values than this fill their buckets from a fixed random sample of this
many of them, scaled up to the number of finite values; every other statistic is exact."""

_SMALL_BATCH = 1 << 20
"""Values of small CPU gradients bucketed together in one pass (bounds the scratch space)."""


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
    values = [_values(g) for g in grads]
    rows: list[torch.Tensor | None] = [None] * len(values)
    small = [j for j, x in enumerate(values) if x.device.type == "cpu" and 0 < x.numel() <= SAMPLE]
    for batch in _batches(small, [values[j].numel() for j in small]):
        for j, row in zip(batch, _small_cpu_rows([values[j] for j in batch], bins), strict=True):
            rows[j] = row
    for j, x in enumerate(values):
        if rows[j] is None:
            rows[j] = _row(x, bins, dtype)
    return torch.stack([r.to(device, dtype, non_blocking=True) for r in rows if r is not None])


def _values(grad: torch.Tensor) -> torch.Tensor:
    """The values of ``grad`` as a flat float32 or float64 tensor (a view where possible)."""
    x = _flat(_dense_values(grad.detach()))
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _batches(indices: list[int], sizes: list[int]) -> list[list[int]]:
    batches: list[list[int]] = []
    total = _SMALL_BATCH
    for index, size in zip(indices, sizes, strict=True):
        if total + size > _SMALL_BATCH:
            batches.append([])
            total = 0
        batches[-1].append(index)
        total += size
    return batches


def _flat(grad: torch.Tensor) -> torch.Tensor:
    """The values of ``grad`` as a 1-D tensor, in memory order: a view whenever the layout is
    dense (a transposed gradient, as ``nn.Linear``'s weight gets, is not copied)."""
    if not grad.is_contiguous() and grad.dim() > 1:
        order = sorted(range(grad.dim()), key=lambda d: grad.stride(d), reverse=True)
        permuted = grad.permute(order)
        if permuted.is_contiguous():
            return permuted.view(-1)
    return grad.reshape(-1)


def _row(x: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    if x.numel() == 0:
        row = torch.zeros(COLUMNS + bins, dtype=dtype, device=x.device)
        row[MIN], row[MAX] = math.inf, -math.inf
        return row
    sample = _sample(x.numel(), x.device) if x.numel() > SAMPLE else None
    if x.device.type == "cpu":
        lo_t, hi_t = torch.aminmax(x)  # NaN propagates: both finite means every value is
        lo, hi = float(lo_t), float(hi_t)
        if math.isfinite(lo) and math.isfinite(hi):
            return _finite_cpu_row(x, lo, hi, bins, dtype, sample)
    return _device_row(x, bins, dtype, sample)


@functools.lru_cache(maxsize=32)
def _sample(numel: int, device: torch.device) -> torch.Tensor:
    """``SAMPLE`` positions in ``range(numel)``, the same ones at every step, in increasing order
    (drawn from a generator of their own: the user's random state is not touched)."""
    try:
        generator = torch.Generator(device).manual_seed(numel)
        positions = torch.randint(0, numel, (SAMPLE,), generator=generator, device=device)
    except (RuntimeError, TypeError):  # a device without generators of its own: draw on the CPU
        generator = torch.Generator().manual_seed(numel)
        positions = torch.randint(0, numel, (SAMPLE,), generator=generator).to(device)
    return positions.sort().values


def _finite_cpu_row(
    x: torch.Tensor,
    lo: float,
    hi: float,
    bins: int,
    dtype: torch.dtype,
    sample: torch.Tensor | None,
) -> torch.Tensor:
    sums = torch.stack([x.sum(), torch.dot(x, x), x.abs().sum()]).to(dtype)
    if hi > lo:
        scale = bins / (hi - lo)
        picked = x if sample is None else x.index_select(0, sample)
        # Values land in [0, bins]: truncation takes the rounding noise below 0 to bucket 0, and
        # the top bucket also takes the values equal to the maximum (index ``bins``).
        index = torch.mul(picked, scale).add_(-lo * scale).to(torch.int32)
        counts = torch.bincount(index, minlength=bins + 1).to(dtype)
        counts[bins - 1] += counts[bins:].sum()
        counts = counts[:bins]
        if sample is not None:
            counts *= x.numel() / len(sample)
    else:
        counts = torch.zeros(bins, dtype=dtype)
        counts[bins // 2] = x.numel()
    head = torch.tensor([x.numel(), 0, 0, lo, hi], dtype=dtype)
    return torch.cat([head, sums, counts])


def _small_cpu_rows(xs: list[torch.Tensor], bins: int) -> list[torch.Tensor]:
    """The rows of many small non-empty CPU gradients, bucketed together in float64 with numpy
    (a few calls in all instead of a dozen per gradient)."""
    lengths = np.array([x.numel() for x in xs])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    values = torch.cat([x.to(torch.float64) for x in xs]).numpy()
    lo = np.minimum.reduceat(values, starts)
    hi = np.maximum.reduceat(values, starts)
    finite = np.isfinite(lo) & np.isfinite(hi)  # NaN propagates through both
    constant = ~(hi > lo)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite gradients: redone below
        scale = np.where(constant | ~finite, 0.0, bins / np.where(constant, 1.0, hi - lo))
        position = (values - np.repeat(lo, lengths)) * np.repeat(scale, lengths)
        sums = [np.add.reduceat(v, starts) for v in (values, values * values, np.abs(values))]
    index = np.nan_to_num(position, nan=0.0, posinf=0.0, neginf=0.0).astype(np.int64)
    np.clip(index, 0, bins, out=index)
    index[np.repeat(constant, lengths)] = bins // 2
    index += np.repeat(np.arange(len(xs)) * (bins + 1), lengths)
    counts = np.bincount(index, minlength=len(xs) * (bins + 1)).reshape(len(xs), bins + 1)
    counts[:, bins - 1] += counts[:, bins]
    table = np.empty((len(xs), COLUMNS + bins))
    table[:, FINITE] = lengths
    table[:, NAN] = table[:, INF] = 0
    table[:, MIN], table[:, MAX] = lo, hi
    table[:, SUM], table[:, SUM_SQUARES], table[:, SUM_ABS] = sums
    table[:, COLUMNS:] = counts[:, :bins]
    rows = list(torch.from_numpy(table))
    for j in np.flatnonzero(~finite):
        rows[j] = _device_row(xs[j], bins, torch.float64)
    return rows


def _device_row(
    x: torch.Tensor, bins: int, dtype: torch.dtype, sample: torch.Tensor | None = None
) -> torch.Tensor:
    """The same row with no value read by the host (any device, non-finite values allowed)."""
    finite = torch.isfinite(x)
    lo = torch.where(finite, x, math.inf).amin()
    hi = torch.where(finite, x, -math.inf).amax()
    values = torch.where(finite, x, 0)
    finite_count = finite.sum()
    nan_count = torch.isnan(x).sum()
    constant = hi <= lo
    # All-non-finite: lo = inf, hi = -inf; no value is counted, any bucket index will do.
    scale = torch.where(constant, 0, bins / (hi - lo))
    picked, picked_finite = (
        (values, finite)
        if sample is None
        else (values.index_select(0, sample), finite.index_select(0, sample))
    )
    position = torch.nan_to_num((picked - lo) * scale, nan=0.0, posinf=0.0, neginf=0.0)
    index = position.clamp_(0, bins - 1).long()
    index = torch.where(constant, bins // 2, index)
    index = torch.where(picked_finite, index, bins)  # one spare bucket takes the non-finite values
    counts = torch.zeros(bins + 1, dtype=dtype, device=x.device)
    counts.scatter_add_(0, index, torch.ones((), dtype=dtype, device=x.device).expand(index.shape))
    counts = counts[:bins]
    if sample is not None:
        # A sample with no finite value while the gradient has some leaves the buckets empty.
        counts *= finite_count.to(dtype) / picked_finite.sum().clamp(min=1).to(dtype)
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
    return torch.cat([head, counts])


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
        rows = self.rows.double().numpy()
        lo, hi = rows[:, MIN].copy(), rows[:, MAX].copy()
        constant = hi <= lo
        lo[constant] -= 0.5
        hi[constant] += 0.5
        fraction = np.arange(1, self.bins + 1, dtype=np.float64) / self.bins
        with np.errstate(invalid="ignore"):  # rows without a finite value: inf - inf
            limits = lo[:, None] + (hi - lo)[:, None] * fraction
        limits[:, -1] = hi  # exactly the maximum, whatever the rounding
        limits[rows[:, FINITE] <= 0] = np.nan
        return torch.from_numpy(limits)

    def edges(self, j: int) -> torch.Tensor:
        """The ``bins + 1`` bucket edges of row ``j``, increasing (empty when no finite value)."""
        if self.finite[j] <= 0:
            return torch.zeros(0, dtype=self.rows.dtype)
        lo, hi = float(self.min[j]), float(self.max[j])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
