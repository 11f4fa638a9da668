"""gradient_norms / max_abs / HostCopy: the one pass of statistics per check."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch._stats import HostCopy, gradient_norms, max_abs

LOW = [torch.float16, torch.bfloat16]


def _reference(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


def test_no_gradients() -> None:
    norms = gradient_norms([])
    assert norms.shape == (0,)
    assert max_abs([]).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_one_dtype_matches_a_float64_reference(dtype: torch.dtype) -> None:
    grads = [torch.randn(5, 7).to(dtype), torch.randn(3).to(dtype), torch.randn(()).to(dtype)]
    norms = gradient_norms(grads)
    assert norms.shape == (3,)
    assert norms.dtype in (torch.float32, torch.float64)
    for norm, grad in zip(norms.tolist(), grads, strict=True):
        assert norm == pytest.approx(_reference(grad), rel=1e-5)


def test_mixed_dtypes_keep_their_positions() -> None:
    grads = [
        torch.full((4,), 1.0, dtype=torch.float16),
        torch.full((4,), 2.0, dtype=torch.float32),
        torch.full((4,), 3.0, dtype=torch.bfloat16),
        torch.full((4,), 4.0, dtype=torch.float16),
        torch.full((4,), 5.0, dtype=torch.float64),
    ]
    norms = gradient_norms(grads)
    assert norms.dtype == torch.float32
    assert norms.tolist() == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0])
    assert max_abs(grads).tolist() == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert max_abs(grads).dtype == torch.float32


def test_empty_tensors_have_zero_norm() -> None:
    grads = [torch.zeros(0), torch.ones(4), torch.zeros(0, 3, dtype=torch.float16)]
    assert gradient_norms(grads).tolist() == [0.0, 2.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_non_finite_values(dtype: torch.dtype) -> None:
    finite = torch.ones(6, dtype=dtype)
    all_nan = torch.full((6,), math.nan, dtype=dtype)
    one_nan = torch.ones(6, dtype=dtype)
    one_nan[3] = math.nan
    pos_inf = torch.ones(6, dtype=dtype)
    pos_inf[0] = math.inf
    neg_inf = torch.ones(6, dtype=dtype)
    neg_inf[5] = -math.inf
    both = torch.ones(6, dtype=dtype)
    both[1], both[2] = math.inf, math.nan
    norms = gradient_norms([finite, all_nan, one_nan, pos_inf, neg_inf, both])
    assert math.isfinite(norms[0])
    assert math.isnan(norms[1])
    assert math.isnan(norms[2])
    assert norms[3] == math.inf
    assert norms[4] == math.inf
    assert math.isnan(norms[5])  # NaN wins over Inf
    peaks = max_abs([pos_inf, neg_inf, finite])
    assert peaks.tolist() == [math.inf, math.inf, 1.0]


def test_float16_norm_accumulates_in_float32() -> None:
    """100 x 60000 is finite in float16, but its squares are not: the norm must still be."""
    grad = torch.full((10, 10), 60000.0, dtype=torch.float16)
    assert torch.isinf(torch.linalg.vector_norm(grad))  # what a float16 norm would give
    norm = gradient_norms([grad])
    assert norm.dtype == torch.float32
    assert float(norm[0]) == pytest.approx(600000.0, rel=1e-3)
    assert float(max_abs([grad])[0]) == 60000.0


def test_bfloat16_values_too_large_to_square_in_float32() -> None:
    """1e20 is an ordinary bfloat16 number; its square overflows float32. max_abs tells."""
    grad = torch.full((4,), 1e20, dtype=torch.bfloat16)
    assert bool(torch.isfinite(grad).all())
    assert float(max_abs([grad])[0]) == pytest.approx(1e20, rel=1e-2)
    assert math.isfinite(float(max_abs([grad])[0]))


def test_norms_stay_on_the_gradients_device_and_are_not_views() -> None:
    grad = torch.ones(3, 3)
    norms = gradient_norms([grad])
    grad.mul_(2)
    assert norms.tolist() == [3.0]
    assert norms.device == grad.device


def test_host_copy_on_cpu() -> None:
    values = torch.tensor([1.0, 2.0])
    copy = HostCopy(values)
    assert copy.ready()
    assert torch.equal(copy.wait(), values)
    assert copy.ready()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32),
            min_size=0,
            max_size=20,
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_norms_match_the_reference(values: list[list[float]], dtype: torch.dtype) -> None:
    grads = [torch.tensor(v, dtype=torch.float32).to(dtype) for v in values]
    norms = gradient_norms(grads)
    assert norms.shape == (len(grads),)
    for norm, grad in zip(norms.tolist(), grads, strict=True):
        assert norm == pytest.approx(_reference(grad), rel=1e-4, abs=1e-6)
        assert math.isfinite(norm)


def test_max_abs_of_empty_tensors_is_zero() -> None:
    grads = [torch.zeros(0), torch.tensor([-3.0, 2.0]), torch.zeros(0, 4, dtype=torch.bfloat16)]
    assert max_abs(grads).tolist() == [0.0, 3.0, 0.0]


def test_sparse_gradients() -> None:
    """nn.Embedding(sparse=True) gives sparse COO gradients, often with repeated rows."""
    uncoalesced = torch.sparse_coo_tensor(
        [[0, 0, 2]], [3.0, 1.0, -3.0], (5,), check_invariants=True
    )
    coalesced = torch.sparse_coo_tensor(
        [[1, 4]], [3.0, 4.0], (5,), check_invariants=True
    ).coalesce()
    empty = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (5,), check_invariants=True
    )
    dense = torch.tensor([1.0, 1.0, 1.0, 1.0])
    grads = [uncoalesced, coalesced, empty, dense]
    norms = gradient_norms(grads)
    assert norms.tolist() == pytest.approx([5.0, 5.0, 0.0, 2.0])  # rows 0: 3 + 1 = 4
    assert max_abs(grads).tolist() == [4.0, 4.0, 0.0, 1.0]


def test_sparse_gradient_from_an_embedding() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 1, 7])).sum().backward()
    grad = embedding.weight.grad
    assert grad is not None and grad.is_sparse
    norms = gradient_norms([grad, torch.ones(4)])
    assert norms.tolist() == pytest.approx([_reference(grad.to_dense()), 2.0])


def test_sparse_non_finite() -> None:
    grad = torch.sparse_coo_tensor([[0, 3]], [math.nan, 1.0], (5,), check_invariants=True)
    assert math.isnan(gradient_norms([grad])[0])
    grad = torch.sparse_coo_tensor([[0, 3]], [-math.inf, 1.0], (5,), check_invariants=True)
    assert gradient_norms([grad])[0] == math.inf
    assert max_abs([grad])[0] == math.inf
