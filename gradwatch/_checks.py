"""Checks of numeric arguments, shared by the options of every detector and front end.

Each raises :class:`~gradwatch.findings.GradWatchTypeError` or ``GradWatchValueError`` naming the
argument, what is allowed and what was received. No dependency on the detector registry, so
detectors can declare their options with them.
"""

from __future__ import annotations

import math

from gradwatch.findings import GradWatchTypeError, GradWatchValueError

MAX_HISTORY = 10_000
"""Upper bound of ``history`` (and so of ``warmup_steps``): the detector keeps ``history`` norms
per parameter, and a mistyped huge value would otherwise fail deep inside torch's allocator."""


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    int_at_least(name, value, minimum)
    return value  # type: ignore[return-value]


def int_at_least(
    name: str,
    value: object,
    minimum: int,
    minimum_name: str | None = None,
    *,
    maximum: int | None = None,
) -> None:
    """Refuses ``value`` unless it is an int (not a bool) in ``[minimum, maximum]``."""
    bound = f"{minimum_name} ({minimum})" if minimum_name else str(minimum)
    allowed = f"an int >= {bound}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise GradWatchTypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise GradWatchValueError(f"{name} must be {allowed}, got {value!r}")


def number_above(name: str, value: object, minimum: float) -> None:
    """Refuses ``value`` unless it is a finite real number above ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GradWatchTypeError(
            f"{name} must be a number > {minimum:g}, got {type(value).__name__} {value!r}"
        )
    if not (value > minimum) or math.isinf(value):
        raise GradWatchValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
