"""Checks of numeric arguments, shared by the options of every detector and front end.

Each raises :class:`~gradwatch.findings.GradWatchTypeError` or ``GradWatchValueError`` naming the
argument, what is allowed and what was received. No dependency on the detector registry, so
detectors can declare their options with them.

Numbers are taken by what they are, not by their Python class: an int option takes any
:class:`numbers.Integral` (``numpy.int64``, ``numpy.uint16``), a number option any
:class:`numbers.Real` (``numpy.float32``, ``fractions.Fraction``); ``bool`` (and ``numpy.bool_``)
never counts as a number. :func:`plain_number` turns them into the ``int`` or ``float`` gradwatch
keeps.
"""

from __future__ import annotations

import math
import numbers

from gradwatch.findings import GradWatchTypeError, GradWatchValueError

MAX_HISTORY = 10_000
"""Upper bound of ``history`` (and so of ``warmup_steps``): the detector keeps ``history`` norms
per parameter, and a mistyped huge value would otherwise fail deep inside torch's allocator."""

REPR_LIMIT = 80
"""The most characters of a received value's repr an error message shows."""


def one_line_repr(value: object, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` on one line (whitespace runs joined), cut to ``limit`` characters.

    For error messages: an optimizer's or a module's repr spans many lines.

    Example:
        >>> one_line_repr("runs")
        "'runs'"
        >>> one_line_repr(list(range(40)), limit=20)
        '[0, 1, 2, 3, 4, 5...'
    """
    try:
        text = " ".join(repr(value).split())
    except Exception:  # a broken __repr__ must not hide the error being reported
        return "<repr failed>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def received(value: object) -> str:
    """``<type name> <one-line repr>``: what an error message says it received."""
    return f"{type(value).__name__} {one_line_repr(value)}"


def plain_number(value: object) -> object:
    """``value`` as an ``int`` when it is an integral number, as a ``float`` when it is another
    real number (numpy scalars, fractions), else unchanged; ``bool`` stays ``bool``."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is an integral number (not a bool) of at least ``minimum``."""
    int_at_least(name, value, minimum)
    checked = plain_number(value)
    assert isinstance(checked, int)
    return checked


def int_at_least(
    name: str,
    value: object,
    minimum: int,
    minimum_name: str | None = None,
    *,
    maximum: int | None = None,
) -> None:
    """Refuses ``value`` unless it is an integral number (not a bool) in ``[minimum, maximum]``."""
    bound = f"{minimum_name} ({minimum})" if minimum_name else str(minimum)
    allowed = f"an int >= {bound}" + (f" and <= {maximum}" if maximum is not None else "")
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GradWatchTypeError(f"{name} must be {allowed}, got {received(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        raise GradWatchValueError(f"{name} must be {allowed}, got {value!r}")


def number_above(name: str, value: object, minimum: float) -> None:
    """Refuses ``value`` unless it is a finite real number (not a bool) above ``minimum``."""
    value = plain_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GradWatchTypeError(f"{name} must be a number > {minimum:g}, got {received(value)}")
    if not (value > minimum) or math.isinf(value):
        raise GradWatchValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
