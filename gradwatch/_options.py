"""Validation of everything a user can pass to ``watch()``: one place, errors that teach."""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from gradwatch import _checks
from gradwatch.detectors import declared_options
from gradwatch.findings import Finding, GradWatchTypeError, GradWatchValueError, Kind

POLICIES = ("warn", "raise", "record")

MAX_HISTORY = _checks.MAX_HISTORY
check_int_at_least = _checks.check_int_at_least
_int_at_least = _checks.int_at_least
_number_above = _checks.number_above
_received = _checks.received

OnFinding = str | Callable[[Finding], Any]

OnNonFinite = Literal["report", "skip"]
NONFINITE_POLICIES: tuple[OnNonFinite, ...] = ("report", "skip")


class DetectorOptions:
    """Thresholds of the detectors: every option a registered detector declares, and ``ignore``.

    A frozen dataclass whose fields are built from :data:`gradwatch.detectors.REGISTRY` (each
    detector's ``options``, in registry order, then ``ignore``); every field is a keyword argument
    of ``watch()`` and of the callbacks. :meth:`from_kwargs` validates.
    """

    ignore: frozenset[Kind]

    if TYPE_CHECKING:
        # The detectors' options are fields made from the registry below: typed here as Any.
        def __init__(self, **values: Any) -> None: ...

        def __getattr__(self, name: str) -> Any: ...

    def as_dict(self) -> dict[str, Any]:
        """Every option by name, in registry order, ``ignore`` last."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def names(cls) -> list[str]:
        """Every option's name, in registry order, ``ignore`` last."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def check_names(cls, kwargs: dict[str, Any], entry: str = "watch()") -> None:
        allowed = cls.names()
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise GradWatchTypeError(
                f"{entry} got unknown option(s) {', '.join(map(repr, unknown))}; "
                f"detector options are: {', '.join(allowed)}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], entry: str = "watch()") -> DetectorOptions:
        cls.check_names(kwargs, entry)
        declared = declared_options()
        # numpy and other numbers are kept as the int or float they are (state keys, JSON).
        values = {
            name: _checks.plain_number(kwargs.get(name, option.default))
            for name, option in declared.items()
        }
        for name, option in declared.items():
            option.check(name, values[name], values)
        return cls(**values, ignore=_kinds("ignore", kwargs.get("ignore", frozenset())))


def _make_dataclass(cls: type[DetectorOptions]) -> type[DetectorOptions]:
    annotations: dict[str, Any] = {}
    for name, option in declared_options().items():
        annotations[name] = Any
        setattr(cls, name, option.default)
    annotations["ignore"] = frozenset[Kind]
    cls.ignore = frozenset()
    cls.__annotations__ = annotations
    return dataclasses.dataclass(frozen=True)(cls)


DetectorOptions = _make_dataclass(DetectorOptions)  # type: ignore[misc]


def check_on_finding(value: object) -> OnFinding:
    if isinstance(value, str):
        if value not in POLICIES:
            raise GradWatchValueError(
                f"on_finding must be one of {', '.join(map(repr, POLICIES))} or a callable "
                f"taking a Finding, got {_checks.one_line_repr(value)}"
            )
        return value
    if callable(value):
        _check_takes_one_argument(value)
        return value
    raise GradWatchTypeError(
        f"on_finding must be one of {', '.join(map(repr, POLICIES))} or a callable taking a "
        f"Finding, got {_received(value)}"
    )


def check_on_nonfinite(value: object) -> OnNonFinite:
    allowed = " or ".join(map(repr, NONFINITE_POLICIES))
    if not isinstance(value, str):
        raise GradWatchTypeError(f"on_nonfinite must be {allowed} (a str), got {_received(value)}")
    for policy in NONFINITE_POLICIES:
        if value == policy:
            return policy
    raise GradWatchValueError(
        f"on_nonfinite must be {allowed}: 'report' reports NaN/Inf gradients and lets the "
        f"optimizer step with them, 'skip' also skips that step; got {_checks.one_line_repr(value)}"
    )


def check_log_dir(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not isinstance(path, str):
            raise GradWatchTypeError(
                f"log_dir must be None, a str or an os.PathLike of str, got {_received(value)}"
            )
        if not path:
            raise GradWatchValueError(
                "log_dir must be a directory (or a path where one can be created), got '' "
                "(an empty path)"
            )
        if "\0" in path:
            # The file system cannot take it: os.makedirs would raise a bare ValueError later.
            raise GradWatchValueError(
                f"log_dir must be a path without NUL bytes ('\\x00'), got {path!r}"
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
        f"log_dir must be None, a str or an os.PathLike, got {_received(value)}"
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
            f"got {_checks.one_line_repr(value)}"
        ) from None
