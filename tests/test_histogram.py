"""Gradient histograms taken on the device, against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch._histograms import (
    SAMPLE,
    GradientHistograms,
    _device_row,
    _sample,
    histogram_rows,
)

BINS = 16
NAN, INF = float("nan"), float("inf")


def _cases() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(37, 11, generator=generator)
    mixed = normal.clone()
    mixed[0, :3] = NAN
    mixed[1, :2] = INF
    mixed[2, :1] = -INF
    return {
        "normal": normal,
        "scaled": torch.randn(500, generator=generator) * 1e-3 + 2.0,
        "mixed": mixed,
        "empty": torch.zeros(0, 4),
        "all_nan": torch.full((5, 2), NAN),
        "all_inf": torch.tensor([INF, -INF, INF]),
        "constant": torch.full((9,), -0.25),
        "zeros": torch.zeros(3, 3),
        "one_value": torch.tensor([7.5]),
        "inf_and_one": torch.tensor([INF, 1.0, -INF]),
    }


CASES = _cases()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _reference(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """np.histogram's buckets (it also widens a single value to [v - 0.5, v + 0.5])."""
    counts, _ = np.histogram(values, bins=BINS, range=(lo, hi) if hi > lo else None)
    return counts


def _check_row(hist: GradientHistograms, j: int, grad: torch.Tensor) -> None:
    values = grad.double().reshape(-1).numpy()
    finite = values[np.isfinite(values)]
    assert hist.finite[j] == len(finite)
    assert hist.nan[j] == np.isnan(values).sum()
    assert hist.inf[j] == np.isinf(values).sum()
    counts = hist.counts[j].numpy()
    assert (counts >= 0).all()
    assert counts.sum() == len(finite)  # every finite value in exactly one bucket
    edges = hist.edges(j).numpy()
    if len(finite) == 0:
        assert len(edges) == 0
        assert hist.min[j] == math.inf and hist.max[j] == -math.inf
        assert math.isnan(hist.mean_abs[j]) and math.isnan(hist.max_abs[j])
        return
    lo, hi = finite.min(), finite.max()
    assert hist.min[j] == lo and hist.max[j] == hi
    assert len(edges) == BINS + 1
    assert (np.diff(edges) > 0).all()  # strictly increasing
    assert edges[0] <= lo and edges[-1] >= hi
    assert float(hist.sum[j]) == pytest.approx(finite.sum(), rel=1e-5, abs=1e-5)
    assert float(hist.sum_squares[j]) == pytest.approx((finite**2).sum(), rel=1e-5, abs=1e-8)
    assert float(hist.sum_abs[j]) == pytest.approx(np.abs(finite).sum(), rel=1e-5, abs=1e-8)
    assert float(hist.max_abs[j]) == np.abs(finite).max()
    reference = _reference(finite, lo, hi)
    # Buckets are computed in float32: a value within rounding of an edge may land next door,
    # which moves the running total by at most the number of such values.
    assert np.abs(np.cumsum(counts) - np.cumsum(reference)).max() <= 1
    if hi == lo:
        (filled,) = np.flatnonzero(counts)
        assert edges[filled] <= lo < edges[filled + 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_row_matches_the_reference(case: str, dtype: torch.dtype) -> None:
    grad = CASES[case].to(dtype)
    hist = GradientHistograms(histogram_rows([grad], BINS))
    assert hist.rows.dtype == torch.float64
    assert hist.rows.shape == (1, 8 + BINS)
    assert hist.bins == BINS and len(hist) == 1
    _check_row(hist, 0, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(set(CASES) - {"empty"}))
def test_the_path_that_never_reads_the_device_agrees(case: str, dtype: torch.dtype) -> None:
    """The accelerator path (no host read at all), run on CPU, gives the same row."""
    grad = CASES[case].to(dtype)
    flat = grad.reshape(-1) if dtype in (torch.float32, torch.float64) else grad.reshape(-1).float()
    device_row = _device_row(flat, BINS, torch.float64)
    _check_row(GradientHistograms(device_row[None]), 0, grad)
    fast = histogram_rows([grad], BINS)[0]
    torch.testing.assert_close(device_row[:3], fast[:3])  # counts of finite, NaN, Inf
    torch.testing.assert_close(device_row[8:], fast[8:], atol=1, rtol=0)


def test_many_gradients_in_one_tensor() -> None:
    grads = [CASES[c].to(d) for c in sorted(CASES) for d in DTYPES]
    hist = GradientHistograms(histogram_rows(grads, BINS))
    assert len(hist) == len(grads)
    for j, grad in enumerate(grads):
        _check_row(hist, j, grad)


def test_no_gradients() -> None:
    assert histogram_rows([], BINS).shape == (0, 8 + BINS)


def test_sparse_gradient_counts_its_stored_values() -> None:
    dense = torch.zeros(6, 3)
    dense[1] = torch.tensor([1.0, -2.0, NAN])
    dense[4] = torch.tensor([0.5, 0.5, 3.0])
    hist = GradientHistograms(histogram_rows([dense.to_sparse()], BINS))
    assert hist.finite[0] == 5 and hist.nan[0] == 1
    assert hist.min[0] == -2.0 and hist.max[0] == 3.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rows_match_cpu_rows(dtype: torch.dtype) -> None:
    grads = [CASES[c].to(dtype) for c in sorted(CASES)]
    on_device = histogram_rows([g.cuda() for g in grads], BINS).cpu()
    hist = GradientHistograms(on_device)
    for j, grad in enumerate(grads):
        _check_row(hist, j, grad)


def test_bucket_limits_are_the_upper_edges() -> None:
    grads = [CASES[c] for c in sorted(CASES)]
    hist = GradientHistograms(histogram_rows(grads, BINS))
    limits = hist.bucket_limits()
    for j in range(len(grads)):
        edges = hist.edges(j)
        if len(edges) == 0:
            assert limits[j].isnan().all()
        else:
            torch.testing.assert_close(limits[j], edges[1:])


@pytest.mark.parametrize("layout", ["transposed", "permuted", "strided"])
def test_non_contiguous_gradients(layout: str) -> None:
    base = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(3))
    grad = {
        "transposed": base[0].t(),
        "permuted": base.permute(2, 0, 1),
        "strided": base[:, ::2, :],
    }[layout]
    assert not grad.is_contiguous()
    hist = GradientHistograms(histogram_rows([grad], BINS))
    _check_row(hist, 0, grad)


def _large(generator_seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(generator_seed)
    return torch.randn(SAMPLE * 4 + 3, generator=generator) * 0.1 + 0.3


def _assert_sampled_row(hist: GradientHistograms, grad: torch.Tensor) -> None:
    values = grad.double().reshape(-1).numpy()
    finite = values[np.isfinite(values)]
    assert hist.finite[0] == len(finite)
    assert hist.nan[0] == np.isnan(values).sum() and hist.inf[0] == np.isinf(values).sum()
    assert hist.min[0] == finite.min() and hist.max[0] == finite.max()
    assert float(hist.sum[0]) == pytest.approx(finite.sum(), rel=1e-4)
    assert float(hist.sum_squares[0]) == pytest.approx((finite**2).sum(), rel=1e-4)
    assert float(hist.sum_abs[0]) == pytest.approx(np.abs(finite).sum(), rel=1e-4)
    counts = hist.counts[0].numpy()
    assert counts.sum() == pytest.approx(len(finite), rel=1e-9)
    # A sample of 65,536 values: the empirical distribution is within a few tenths of a percent
    # of the whole one (Kolmogorov-Smirnov), far tighter than a bucket's share.
    reference = _reference(finite, finite.min(), finite.max())
    gap = np.abs(np.cumsum(counts) - np.cumsum(reference)).max() / len(finite)
    assert gap < 0.01


def test_a_large_gradient_fills_its_buckets_from_a_sample() -> None:
    grad = _large()
    assert grad.numel() > SAMPLE
    _assert_sampled_row(GradientHistograms(histogram_rows([grad], BINS)), grad)


def test_a_large_gradient_with_nan_on_the_device_path() -> None:
    grad = _large()
    grad[::1000] = NAN
    grad[7] = INF
    row = _device_row(grad, BINS, torch.float64, _sample(grad.numel(), grad.device))
    _assert_sampled_row(GradientHistograms(row[None]), grad)
    _assert_sampled_row(GradientHistograms(histogram_rows([grad], BINS)), grad)


def test_sampling_is_the_same_every_step_and_leaves_the_random_state_alone() -> None:
    grad = _large()
    state = torch.get_rng_state()
    first = histogram_rows([grad], BINS)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(histogram_rows([grad], BINS), first)


def test_small_gradients_are_bucketed_exactly_together() -> None:
    generator = torch.Generator().manual_seed(9)
    grads = [torch.randn(n, generator=generator) * n for n in (1, 2, 33, 1000, SAMPLE)]
    grads.insert(2, torch.full((4,), NAN))
    hist = GradientHistograms(histogram_rows(grads, BINS))
    for j, grad in enumerate(grads):
        _check_row(hist, j, grad)


def test_non_finite_small_cpu_gradients_raise_no_numpy_warning() -> None:
    """Gradients whose span is inf - inf (every value +inf) are bucketed without a numpy
    RuntimeWarning, which a user's ``-W error`` would turn into a crash."""
    import warnings

    grads = [
        torch.tensor([float("inf"), float("inf")]),
        torch.tensor([float("nan"), 2.0]),
        torch.tensor([0.5, 1.5]),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hist = GradientHistograms(histogram_rows(grads, BINS))
    assert hist.nan.tolist() == [0, 1, 0]
    assert hist.inf.tolist() == [2, 0, 0]
