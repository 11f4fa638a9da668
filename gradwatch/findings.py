"""Typed findings, the kinds of gradient bug gradwatch reports, and the library's exceptions."""

from __future__ import annotations

import dataclasses
from enum import Enum


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

    @property
    def message(self) -> str:
        """What happened, where, and what to do about it."""
        return f"step {self.step}: {_DESCRIBE[self.kind](self)}"

    def __str__(self) -> str:
        return f"[{self.kind.value}] {self.message}"


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


def _missing_zero_grad(f: Finding) -> str:
    return (
        f"backward() added new gradients on top of the ones the previous optimizer step used "
        f"({_names(f)}): .grad was not reset between steps. Call optimizer.zero_grad() "
        f"(or model.zero_grad()) once per step, before loss.backward()."
    )


def _unexpected_accumulation(f: Finding) -> str:
    return (
        f"{_fmt_int(f.value)} backward passes accumulated into the gradient of {_names(f)} before "
        f"this optimizer step, but accumulation_steps={_fmt_int(f.threshold)}. Reset gradients "
        f"with optimizer.zero_grad() after every step, call backward() once per step, or pass the "
        f"accumulation_steps you intend to gradwatch.watch()."
    )


def _nan(f: Finding) -> str:
    return (
        f"the gradient of {_where(f)} holds NaN (affected, in backward order: {_names(f)}). The "
        f"first of them is nearest to where the NaN entered: look for log(0), 0/0, sqrt of a "
        f"negative or an overflowing loss there; torch.autograd.detect_anomaly() names the "
        f"operation."
    )


def _inf(f: Finding) -> str:
    return (
        f"the gradient of {_where(f)} holds +/-Inf or values too large to square in float32 "
        f"(affected, in backward order: {_names(f)}). Lower the learning rate, clip gradients "
        f"(torch.nn.utils.clip_grad_norm_), or use torch.amp.GradScaler with float16."
    )


def _exploding(f: Finding) -> str:
    return (
        f"the gradient norm reached {_fmt(f.value)}, above the limit {_fmt(f.threshold)} set by "
        f"its recent history or the absolute ceiling; grew most: {_names(f)}. Lower the learning "
        f"rate, add warm-up, or clip with torch.nn.utils.clip_grad_norm_."
    )


def _vanishing(f: Finding) -> str:
    if f.value == 0.0:
        return (
            f"the gradient of {_names(f)} has been exactly zero for several steps while other "
            f"layers learn (dead ReLUs or a saturated activation upstream). Check the "
            f"initialisation and activations feeding it, or use LeakyReLU/GELU."
        )
    return (
        f"the earliest layers' gradients ({_names(f)}) have been {_fmt(f.value)} times those of "
        f"the last layers for several steps (limit {_fmt(f.threshold)}): gradients vanish with "
        f"depth. Use ReLU/GELU instead of sigmoid/tanh, residual connections, normalisation "
        f"layers or a better initialisation."
    )


def _no_grad(f: Finding) -> str:
    return (
        f"{_names(f)} {_plural(f, 'requires', 'require')} grad but received no gradient in "
        f"{_fmt_int(f.value)} backward passes: not connected to the loss (a .detach(), "
        f"torch.no_grad(), or a layer the forward pass never uses). Connect "
        f"{_plural(f, 'it', 'them')}, or freeze {_plural(f, 'it', 'them')} with "
        f"requires_grad_(False)."
    )


def _not_in_optimizer(f: Finding) -> str:
    return (
        f"{_names(f)} {_plural(f, 'receives', 'receive')} gradients but no watched optimizer "
        f"updates {_plural(f, 'it', 'them')} (created after the optimizer?). Build the optimizer "
        f"after the model is complete, or add {_plural(f, 'it', 'them')} with "
        f"optimizer.add_param_group()."
    )


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


_DESCRIBE = {
    Kind.MISSING_ZERO_GRAD: _missing_zero_grad,
    Kind.UNEXPECTED_ACCUMULATION: _unexpected_accumulation,
    Kind.NAN: _nan,
    Kind.INF: _inf,
    Kind.EXPLODING: _exploding,
    Kind.VANISHING: _vanishing,
    Kind.NO_GRAD: _no_grad,
    Kind.NOT_IN_OPTIMIZER: _not_in_optimizer,
    Kind.SKIPPED_STEP: _skipped_step,
}


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
