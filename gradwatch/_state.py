"""Checks of the fields of a saved state, for the ``load_state_dict`` of the monitor, the tracker
and the detectors.

Each check raises :class:`~gradwatch.findings.GradWatchTypeError` (a value of the wrong type) or
``GradWatchValueError`` (a value of the right type that is not allowed) with a message that
starts with the field's path and says what is allowed and what was received; it returns the
value to keep. A ``load_state_dict`` checks every field this way before it changes anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from gradwatch import _checks
from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError, Kind

MAX_COUNT = 2**62
"""The largest step, backward pass or streak count a state may hold: what keeps counting from
there still fits the int64 of ``torch.long`` tensors, numpy and TensorBoard's step numbers."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def describe(value: object) -> str:
    """``value`` for an error message: its type, then its beginning (a tensor's shape and dtype)."""
    if isinstance(value, torch.Tensor):
        where = "" if value.device.type == "cpu" else f" on {value.device}"
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}{where}"
    return _checks.received(value)


def fields(state: object, keys: Collection[str], what: str = "the state") -> Mapping[str, Any]:
    """``state`` if it is a dict with exactly ``keys``."""
    if not isinstance(state, dict):
        raise GradWatchTypeError(
            f"{what} must be a dict with the keys {sorted(keys)}, got {describe(state)}"
        )
    missing = [key for key in keys if key not in state]
    if missing:
        raise GradWatchValueError(f"{what} has no key {missing[0]!r}")
    unknown = [key for key in state if key not in keys]
    if unknown:
        holds = f"exactly the keys {sorted(keys)}" if keys else "no keys"
        raise GradWatchValueError(
            f"{what} has the unknown key {unknown[0]!r:.60}; it holds {holds}"
        )
    return state


def integer(path: str, value: object, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``."""
    top = "2**62" if maximum == MAX_COUNT else str(maximum)
    allowed = f"an int in [{minimum}, {top}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise GradWatchTypeError(f"{path} must be {allowed}, got {describe(value)}")
    if not minimum <= value <= maximum:
        raise GradWatchValueError(f"{path} must be {allowed}, got {value!r:.60}")
    return value


def flag(path: str, value: object) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise GradWatchTypeError(f"{path} must be a bool, got {describe(value)}")
    return value


def positive(path: str, value: object) -> float:
    """``value`` as a float, if it is a finite real number above 0."""
    allowed = "a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GradWatchTypeError(f"{path} must be {allowed}, got {describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    if not (math.isfinite(number) and number > 0):
        raise GradWatchValueError(f"{path} must be {allowed}, got {value!r:.60}")
    return number


def sequence(path: str, value: object, length: int | None = None) -> list[Any]:
    """``value`` as a list, if it is a list or tuple (of ``length`` items, when given)."""
    allowed = "a list" if length is None else f"a list of {length} items"
    if not isinstance(value, (list, tuple)):
        raise GradWatchTypeError(f"{path} must be {allowed}, got {describe(value)}")
    if length is not None and len(value) != length:
        raise GradWatchValueError(f"{path} must be {allowed}, got {len(value)} items")
    return list(value)


def by_group(path: str, value: object) -> dict[int, Any]:
    """``value`` if it is a dict keyed by optimizer group (an int >= 0)."""
    if not isinstance(value, dict):
        raise GradWatchTypeError(
            f"{path} must be a dict keyed by optimizer group, got {describe(value)}"
        )
    for group in value:
        integer(f"{path} key {group!r:.40}", group)
    return value


def tensor(
    path: str,
    value: object,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    shape_is: str,
    allowed: str,
    valid: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A CPU copy of ``value`` as ``dtype``, if it is a dense tensor of ``shape`` (which
    ``shape_is`` explains) whose dtype is of ``dtype``'s family (floating point or integer) and
    whose elements all pass ``valid`` (which ``allowed`` describes) once converted."""
    family = FLOAT_DTYPES if dtype.is_floating_point else INTEGER_DTYPES
    kind = "a floating-point" if dtype.is_floating_point else "an integer"
    expected = f"{kind} tensor of shape {shape} ({shape_is})"
    if (
        not isinstance(value, torch.Tensor)
        or value.layout is not torch.strided
        or value.is_meta
        or value.dtype not in family
    ):
        raise GradWatchTypeError(f"{path} must be {expected}, got {describe(value)}")
    if tuple(value.shape) != shape:
        raise GradWatchValueError(f"{path} must be {expected}, got shape {tuple(value.shape)}")
    saved = value.detach().to("cpu", copy=True)
    kept = saved.to(dtype=dtype, memory_format=torch.contiguous_format)
    wrong = ~valid(kept)
    if bool(wrong.any()):
        where = tuple(int(i) for i in wrong.nonzero()[0])
        index = ", ".join(map(str, where))
        raise GradWatchValueError(
            f"{path}[{index}] must be {allowed} (as {dtype}), got {saved[where].item()!r}"
        )
    return kept


def findings(path: str, value: object) -> list[Finding]:
    """``value`` as findings, if it is a list of what :meth:`Finding.to_dict` writes."""
    kept = []
    for i, data in enumerate(sequence(path, value)):
        try:
            kept.append(Finding.from_dict(data))
        except (TypeError, ValueError, OverflowError) as error:  # an int too large for a float
            raise GradWatchValueError(f"{path}[{i}]: {error}") from error
    return kept


def occurrences(path: str, value: object) -> dict[tuple[Kind, str | None], int]:
    """``value`` as counts by (kind, parameter), if it is a list of ``[kind, parameter or None,
    count >= 1]`` with each (kind, parameter) once."""
    kinds = [kind.value for kind in Kind]
    kept: dict[tuple[Kind, str | None], int] = {}
    for i, entry in enumerate(sequence(path, value)):
        where = f"{path}[{i}]"
        kind, param, count = sequence(where, entry, 3)
        if not isinstance(kind, str) or kind not in kinds:
            raise GradWatchValueError(f"{where}[0] must be one of {kinds}, got {describe(kind)}")
        if param is not None and not isinstance(param, str):
            raise GradWatchTypeError(
                f"{where}[1] must be a parameter name or None, got {describe(param)}"
            )
        key = (Kind(kind), param)
        if key in kept:
            raise GradWatchValueError(f"{where} counts ({kind!r}, {param!r:.60}) a second time")
        kept[key] = integer(f"{where}[2]", count, 1)
    return kept
