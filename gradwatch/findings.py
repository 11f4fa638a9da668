"""Typed findings, the kinds of gradient bug gradwatch reports, and the library's exceptions."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any


class Kind(str, Enum):
    """The kinds of gradient bug gradwatch detects, and the step it skipped.

    ``SKIPPED_STEP`` is not a bug of its own: it records that ``on_nonfinite="skip"`` kept an
    optimizer step from running because its gradients held NaN or Inf (reported with them).
    """

    MISSING_ZERO_GRAD = "missing_zero_grad"
    UNEXPECTED_ACCUMULATION = "unexpected_accumulation"
    NAN = "nan"
    INF = "inf"
    EXPLODING = "exploding"
    VANISHING = "vanishing"
    NO_GRAD = "no_grad"
    NOT_IN_OPTIMIZER = "not_in_optimizer"
    CLEARED_BEFORE_STEP = "cleared_before_step"
    STEP_NOT_TAKEN = "step_not_taken"
    NO_UPDATE = "no_update"
    CLIP_ORDER = "clip_order"
    UNREGISTERED_PARAMETER = "unregistered_parameter"
    REPLICA_DIVERGENCE = "replica_divergence"
    SKIPPED_STEP = "skipped_step"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Finding:
    """One gradient problem, found at one optimizer step.

    Attributes:
        kind: What went wrong.
        step: Index of the optimizer step during which it was found (0 for the first step).
        param: Qualified name of the parameter it concerns most (as in
            ``model.named_parameters()``), or ``None`` when it concerns the model as a whole
            (``skipped_step``: the whole optimizer step).
        value: The measured quantity the detector compared (a norm, a ratio, a count), if any.
        threshold: The limit that ``value`` crossed, if any.
        params: Every parameter involved, most relevant first (for ``nan``/``inf`` and
            ``skipped_step``: the parameters whose gradients were not finite, in the order their
            gradients arrived in the backward pass, so the first points at where the non-finite
            value entered).
        cause: For a kind with several causes, which one (``step_not_taken``: ``"no_step"``,
            ``"overflow"`` or ``"no_optimizer"``; ``no_update``: ``"zero_lr"`` or
            ``"unchanged"``; ``clip_order``: ``"after_step"``, ``"before_backward"`` or
            ``"before_unscale"``; ``no_grad``: ``"idle_optimizer"`` when a whole optimizer
            trains nothing; ``replica_divergence``: ``"gradients"`` or ``"weights"``);
            ``None`` otherwise.

    Example:
        >>> f = Finding(Kind.NAN, step=3, param="fc.weight", params=("fc.weight",))
        >>> print(f.message)
        step 3: the gradient of 'fc.weight' holds NaN ...
    """

    kind: Kind
    step: int
    param: str | None
    value: float | None = None
    threshold: float | None = None
    params: tuple[str, ...] = ()
    cause: str | None = None

    @property
    def message(self) -> str:
        """What happened, where, and what to do about it."""
        return f"step {self.step}: {_DESCRIBE.get(self.kind, _generic)(self)}"

    def __str__(self) -> str:
        return f"[{self.kind.value}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The one serialised form of a finding, shared by state dicts, the findings log and
        ``gradwatch report``: JSON-safe (NaN and infinities as the strings ``"nan"``, ``"inf"``,
        ``"-inf"``). ``cause`` is written only when set.

        Example:
            >>> Finding(Kind.INF, 2, "w", value=float("inf"), params=("w",)).to_dict()
            {'kind': 'inf', 'step': 2, 'param': 'w', 'params': ['w'], 'value': 'inf',
             'threshold': None}
        """
        data: dict[str, Any] = {
            "kind": self.kind.value,
            "step": self.step,
            "param": self.param,
            "params": list(self.params),
            "value": _json_number(self.value),
            "threshold": _json_number(self.threshold),
        }
        if self.cause is not None:
            data["cause"] = self.cause
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The finding :meth:`to_dict` wrote (extra keys, such as a log record's, are ignored).

        Raises:
            GradWatchValueError: ``data`` is not such a mapping: a key is missing, or a field has
                the wrong type or an unknown kind.
        """
        try:
            if not isinstance(data, Mapping):
                raise TypeError(f"a finding is a mapping, got {type(data).__name__}")
            kind = Kind(data["kind"])
            step, param, params = data["step"], data["param"], data["params"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise TypeError(f"step must be an integer >= 0, got {step!r:.40}")
            if param is not None and not isinstance(param, str):
                raise TypeError(f"param must be a string or null, got {param!r:.40}")
            if not isinstance(params, (list, tuple)) or not all(isinstance(n, str) for n in params):
                raise TypeError(f"params must be a list of strings, got {params!r:.40}")
            cause = data.get("cause")
            if cause is not None and not isinstance(cause, str):
                raise TypeError(f"cause must be a string or null, got {cause!r:.40}")
            return cls(
                kind=kind,
                step=step,
                param=param,
                value=_number_from_json("value", data["value"]),
                threshold=_number_from_json("threshold", data["threshold"]),
                params=tuple(params),
                cause=cause,
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            detail = f"no key {error}" if isinstance(error, KeyError) else str(error)
            raise GradWatchValueError(detail) from None


def _json_number(value: float | None) -> float | str | None:
    """JSON has no NaN or Infinity; write those as the strings "nan", "inf", "-inf"."""
    if value is None or math.isfinite(value):
        return value
    return str(value)


def _number_from_json(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, null or 'nan'/'inf'/'-inf', got {value!r:.40}")
    return float(value)


def _plural(f: Finding, one: str, many: str) -> str:
    return many if len(f.params) > 1 else one


def _names(f: Finding, limit: int = 5) -> str:
    names = f.params or ((f.param,) if f.param else ())
    if not names:
        return "the model"
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _where(f: Finding) -> str:
    return repr(f.param) if f.param is not None else "the model"


def _skipped_step(f: Finding) -> str:
    return (
        f"optimizer step skipped (on_nonfinite='skip'): the gradients of {_names(f)} held NaN "
        f"or Inf, so gradwatch cleared all of this optimizer's gradients before it ran; weights "
        f"and optimizer state are unchanged. Find the cause from this step's nan/inf finding; if "
        f"steps keep being skipped, fix the loss or lower the learning rate, or the model stops "
        f"learning."
    )


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


def _fmt_int(x: float | None) -> str:
    return "?" if x is None else str(int(x))


_DESCRIBE: dict[Kind, Callable[[Finding], str]] = {Kind.SKIPPED_STEP: _skipped_step}
"""The message of each kind. ``skipped_step`` belongs to the ``on_nonfinite`` policy; every other
kind's message is declared by the detector that reports it and registered here by
:mod:`gradwatch.detectors`."""


def register_messages(messages: Mapping[Kind, Callable[[Finding], str]], owner: str) -> None:
    """Registers the message of each kind a detector declares; a kind has one owner."""
    for kind, describe in messages.items():
        known = _DESCRIBE.get(kind)
        if known is not None and known is not describe:
            raise RuntimeError(f"the message of kind {kind.value!r} is declared twice ({owner})")
        _DESCRIBE[kind] = describe


def _generic(f: Finding) -> str:
    return f"{f.kind.value} at {_names(f)} (value {_fmt(f.value)}, threshold {_fmt(f.threshold)})."


class GradWatchError(Exception):
    """Root of every exception gradwatch raises."""


class GradWatchTypeError(GradWatchError, TypeError):
    """An argument of the wrong type."""


class GradWatchValueError(GradWatchError, ValueError):
    """An argument of the right type with a value that is not allowed."""


class GradientError(GradWatchError, RuntimeError):
    """Raised for a finding when ``on_finding="raise"``.

    Attributes:
        finding: The finding that stopped training.
    """

    def __init__(self, finding: Finding) -> None:
        super().__init__(str(finding))
        self.finding = finding

    def __reduce__(self) -> tuple[type[GradientError], tuple[Finding]]:
        return (type(self), (self.finding,))


class GradWatchWarning(UserWarning):
    """Warning category for findings reported with ``on_finding="warn"``.

    Attributes:
        finding: The finding being reported.
    """

    def __init__(self, finding: Finding) -> None:
        super().__init__(str(finding))
        self.finding = finding
