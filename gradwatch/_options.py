"""Validation of everything a user can pass to ``watch()``: one place, errors that teach."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError, Kind

POLICIES = ("warn", "raise", "record")

MAX_HISTORY = 10_000
"""Upper bound of ``history`` (and so of ``warmup_steps``): the detector keeps ``history`` norms
per parameter, and a mistyped huge value would otherwise fail deep inside torch's allocator."""

OnFinding = str | Callable[[Finding], Any]

OnNonFinite = Literal["report", "skip"]
NONFINITE_POLICIES: tuple[OnNonFinite, ...] = ("report", "skip")


@dataclasses.dataclass(frozen=True)
class DetectorOptions:
    """Thresholds of the detectors; every field is a keyword argument of ``watch()``."""

    no_grad_after: int = 5
    explode_factor: float = 1000.0
    max_grad_norm: float | None = 1e6
    warmup_steps: int = 5
    history: int = 32
    vanish_ratio: float = 1e-3
    vanish_steps: int = 5
    ignore: frozenset[Kind] = frozenset()

    @classmethod
    def check_names(cls, kwargs: dict[str, Any]) -> None:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise GradWatchTypeError(
                f"watch() got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"detector options are: {', '.join(allowed)}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> DetectorOptions:
        cls.check_names(kwargs)
        values = dict(kwargs)
        if "ignore" in values:
            values["ignore"] = _kinds("ignore", values["ignore"])
        options = cls(**values)
        options._validate()
        return options

    def _validate(self) -> None:
        _int_at_least("no_grad_after", self.no_grad_after, 1)
        _number_above("explode_factor", self.explode_factor, 1.0)
        if self.max_grad_norm is not None:
            _number_above("max_grad_norm", self.max_grad_norm, 0.0)
        _int_at_least("warmup_steps", self.warmup_steps, 1, maximum=MAX_HISTORY)
        _int_at_least(
            "history", self.history, self.warmup_steps, "warmup_steps", maximum=MAX_HISTORY
        )
        _number_above("vanish_ratio", self.vanish_ratio, 0.0)
        if self.vanish_ratio >= 1.0:
            raise GradWatchValueError(
                f"vanish_ratio must be a number in (0, 1), got {self.vanish_ratio!r}"
            )
        _int_at_least("vanish_steps", self.vanish_steps, 1)


def check_int_at_least(name: str, value: object, minimum: int) -> int:
    _int_at_least(name, value, minimum)
    return value  # type: ignore[return-value]


def check_on_finding(value: object) -> OnFinding:
    if isinstance(value, str):
        if value not in POLICIES:
            raise GradWatchValueError(
                f"on_finding must be one of {', '.join(map(repr, POLICIES))} or a callable "
                f"taking a Finding, got {value!r}"
            )
        return value
    if callable(value):
        _check_takes_one_argument(value)
        return value
    raise GradWatchTypeError(
        f"on_finding must be one of {', '.join(map(repr, POLICIES))} or a callable taking a "
        f"Finding, got {type(value).__name__} {value!r}"
    )


def check_on_nonfinite(value: object) -> OnNonFinite:
    allowed = " or ".join(map(repr, NONFINITE_POLICIES))
    if not isinstance(value, str):
        raise GradWatchTypeError(
            f"on_nonfinite must be {allowed} (a str), got {type(value).__name__} {value!r}"
        )
    for policy in NONFINITE_POLICIES:
        if value == policy:
            return policy
    raise GradWatchValueError(
        f"on_nonfinite must be {allowed}: 'report' reports NaN/Inf gradients and lets the "
        f"optimizer step with them, 'skip' also skips that step; got {value!r}"
    )


def check_log_dir(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not isinstance(path, str):
            raise GradWatchTypeError(
                f"log_dir must be None, a str or an os.PathLike of str, got "
                f"{type(value).__name__} {value!r}"
            )
        if not path:
            raise GradWatchValueError(
                "log_dir must be a directory (or a path where one can be created), got '' "
                "(an empty path)"
            )
        if os.path.exists(path) and not os.path.isdir(path):
            raise GradWatchValueError(
                f"log_dir must be a directory (or a path where one can be created), got "
                f"{path!r}, which is an existing file"
            )
        blocking = _existing_file_above(path)
        if blocking is not None:
            raise GradWatchValueError(
                f"log_dir must be a directory (or a path where one can be created), got "
                f"{path!r}, which lies under the existing file {blocking!r}"
            )
        return path
    raise GradWatchTypeError(
        f"log_dir must be None, a str or an os.PathLike, got {type(value).__name__} {value!r}"
    )


def _existing_file_above(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` if it is not a directory (nothing is created)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        above = os.path.dirname(parent)
        if above == parent:
            return None
        parent = above
    return None if os.path.isdir(parent) else parent


def _check_takes_one_argument(policy: Callable[..., Any]) -> None:
    """Refuses, at ``watch()`` rather than at the first finding, a callable that cannot be called
    with one Finding."""
    try:
        signature = inspect.signature(policy)
    except (TypeError, ValueError):
        return  # some builtins have no signature to read: trust them
    try:
        signature.bind(None)
    except TypeError:
        name = getattr(policy, "__qualname__", type(policy).__name__)
        raise GradWatchTypeError(
            f"on_finding must be one of {', '.join(map(repr, POLICIES))} or a callable taking a "
            f"Finding, got {name}{signature}, which cannot be called with one argument"
        ) from None


def _kinds(name: str, value: object) -> frozenset[Kind]:
    items: Iterable[object] = (value,) if isinstance(value, (str, Kind)) else value  # type: ignore[assignment]
    try:
        return frozenset(Kind(item) for item in items)
    except (TypeError, ValueError):
        raise GradWatchValueError(
            f"{name} must be kinds (or their names) among {', '.join(k.value for k in Kind)}, "
            f"got {value!r}"
        ) from None


def _int_at_least(
    name: str,
    value: object,
    minimum: int,
    minimum_name: str | None = None,
    *,
    maximum: int | None = None,
) -> None:
    bound = f"{minimum_name} ({minimum})" if minimum_name else str(minimum)
    allowed = f"an int >= {bound}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise GradWatchTypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise GradWatchValueError(f"{name} must be {allowed}, got {value!r}")


def _number_above(name: str, value: object, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GradWatchTypeError(
            f"{name} must be a number > {minimum:g}, got {type(value).__name__} {value!r}"
        )
    if not (value > minimum) or math.isinf(value):
        raise GradWatchValueError(f"{name} must be a finite number > {minimum:g}, got {value!r}")
