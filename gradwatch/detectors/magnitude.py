"""Exploding and vanishing gradients, judged against each model's own history and depth profile.

Both look at the accumulated, unscaled ``.grad`` the optimizer is about to use, after any clipping
the user applies before ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections import deque
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from gradwatch import _checks, _state
from gradwatch.detectors.base import CheckContext, Detector, Option, Phase, Setup
from gradwatch.findings import Finding, GradWatchValueError, Kind, _fmt, _names


def _exploding(f: Finding) -> str:
    """Which rule fired, read from the fields (see :meth:`MagnitudeDetector._exploding`):
    ``param`` ``None``: the model's total norm above ``max_grad_norm``; ``params`` no more than
    ``param`` itself: that parameter's norm above ``explode_factor`` times its own median;
    otherwise the model's total norm above ``explode_factor`` times its median."""
    advice = "Lower the learning rate, add warm-up, or clip with torch.nn.utils.clip_grad_norm_."
    if f.param is None:
        largest = f"; largest: {_names(f)}" if f.params else ""
        return (
            f"the model's total gradient norm reached {_fmt(f.value)}, above the absolute "
            f"ceiling max_grad_norm (limit {_fmt(f.threshold)}){largest}. {advice} If norms "
            f"this large are expected, raise max_grad_norm."
        )
    if set(f.params) <= {f.param}:
        return (
            f"the gradient norm of {f.param!r} reached {_fmt(f.value)}, above explode_factor "
            f"times the median of its own recent norms (limit {_fmt(f.threshold)}). Look at "
            f"what feeds it (a custom backward, a loss term, a layer without normalisation). "
            f"{advice}"
        )
    return (
        f"the model's total gradient norm reached {_fmt(f.value)}, above explode_factor times "
        f"the median of its recent values (limit {_fmt(f.threshold)}); grew most: {_names(f)} "
        f"(ratio to their own median). {advice}"
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


SCALE_FLOOR = 1e-6
"""The relative exploding rule compares a norm with ``explode_factor`` times the larger of its
recent median and this fraction of the largest median seen so far in the run (per optimizer for
the total, per parameter for each parameter): at the bottom of a converged run, where the norms
are round-off a millionth of their scale or less, a jump of ``explode_factor`` within that noise
is not an explosion."""


def _check_max_grad_norm(name: str, value: object, values: object) -> None:
    if value is not None:
        _checks.number_above(name, value, 0.0)


def _check_history(name: str, value: object, values: Any) -> None:
    warmup = values["warmup_steps"]
    _checks.int_at_least(name, value, warmup, "warmup_steps", maximum=_checks.MAX_HISTORY)


def _check_vanish_ratio(name: str, value: object, values: object) -> None:
    _checks.number_above(name, value, 0.0)
    if value >= 1.0:  # type: ignore[operator]
        raise GradWatchValueError(f"{name} must be a number in (0, 1), got {value!r}")


class MagnitudeDetector(Detector):
    """Reports ``exploding`` and ``vanishing``.

    Exploding: after ``warmup_steps`` checks, the total gradient norm exceeds ``explode_factor``
    times the median of its last ``history`` values, or a parameter's norm exceeds
    ``explode_factor`` times its own median while being at least a tenth of the model's median
    total norm; or the total norm exceeds ``max_grad_norm`` at any time. A median is never taken
    below :data:`SCALE_FLOOR` times the largest one seen in the run, so round-off at the bottom
    of a converged run is not an explosion.

    Vanishing: among weight matrices (2+ dimensions) in depth order, the median RMS gradient of the
    earliest quarter is below ``vanish_ratio`` times that of the last quarter for ``vanish_steps``
    consecutive checks; or a parameter receives exactly-zero gradients for ``vanish_steps``
    consecutive checks while others do not.
    """

    name = "magnitude"
    kinds = MappingProxyType({Kind.EXPLODING: _exploding, Kind.VANISHING: _vanishing})
    options = (
        Option(
            "explode_factor",
            1000.0,
            lambda name, value, _: _checks.number_above(name, value, 1.0),
            "times its recent median that a gradient norm must exceed to be exploding",
        ),
        Option(
            "max_grad_norm",
            1e6,
            _check_max_grad_norm,
            "absolute ceiling of the total gradient norm (None: none)",
        ),
        Option(
            "warmup_steps",
            5,
            lambda name, value, _: _checks.int_at_least(
                name, value, 1, maximum=_checks.MAX_HISTORY
            ),
            "checks before the relative exploding rule applies",
        ),
        Option("history", 32, _check_history, "recent norms the medians are taken over"),
        Option(
            "vanish_ratio",
            1e-3,
            _check_vanish_ratio,
            "ratio of earliest to last layers' RMS gradient below which gradients vanish",
        ),
        Option(
            "vanish_steps",
            5,
            lambda name, value, _: _checks.int_at_least(name, value, 1),
            "consecutive checks a vanishing pattern must last",
        ),
    )
    phase = Phase.STATISTICS

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        options = setup.options
        num_params = setup.num_params
        self.explode_factor: float = options.explode_factor
        self.max_grad_norm: float | None = options.max_grad_norm
        self.warmup_steps: int = options.warmup_steps
        self.history: int = options.history
        self.vanish_ratio: float = options.vanish_ratio
        self.vanish_steps: int = options.vanish_steps
        self._totals: dict[int, deque[float]] = {}
        self._param_history = torch.full((self.history, num_params), math.nan)
        self._param_count = torch.zeros(num_params, dtype=torch.long)
        self._reference = torch.full((num_params,), math.nan)
        self._peak_totals: dict[int, float] = {}
        """Per optimizer group, the largest median of the totals seen (the run's scale)."""
        self._peak_reference = torch.full((num_params,), math.nan)
        """Per parameter, the largest median of its norms seen (NaN: none yet)."""
        self._checks_since_refresh = 0
        self._depth_streak: dict[int, int] = {}
        self._zero_streak = torch.zeros(num_params, dtype=torch.long)
        self._numels: np.ndarray | None = None
        self._is_matrix: np.ndarray | None = None

    def check(self, ctx: CheckContext) -> list[Finding]:
        if not ctx.indices:
            return []
        # A few dozen operations on one small host array per check: numpy costs a fraction of
        # what the same calls cost as torch operators.
        index = np.array(ctx.indices)
        magnitudes = ctx.magnitudes if ctx.magnitudes is not None else ctx.host_norms()
        norms = magnitudes.numpy().astype(np.float64)
        finite = np.isfinite(norms)
        fresh = np.array(ctx.tracker.last_pass)[index] >= ctx.window_start_pass
        findings = []
        with np.errstate(divide="ignore", invalid="ignore"):
            exploding = self._exploding(ctx, index, norms, finite)
            if exploding is not None:
                findings.append(exploding)
            findings.extend(self._vanishing(ctx, index, norms, finite & fresh))
            self._remember(ctx.group, index, norms, finite & fresh)
        return findings

    def _exploding(
        self, ctx: CheckContext, index: np.ndarray, norms: np.ndarray, finite: np.ndarray
    ) -> Finding | None:
        total = math.sqrt(float(np.square(norms[finite]).sum()))
        totals = self._totals.get(ctx.group, ())
        limit = math.inf
        typical_total = math.nan
        if len(totals) >= self.warmup_steps:
            typical_total = _median(totals)
            peak = max(self._peak_totals.get(ctx.group, 0.0), typical_total)
            self._peak_totals[ctx.group] = peak
            limit = self.explode_factor * max(typical_total, SCALE_FLOOR * peak)
        relative = limit
        if self.max_grad_norm is not None:
            limit = min(limit, self.max_grad_norm)
        reference = self._reference.numpy()[index].astype(np.float64)
        peaks = self._peak_reference.numpy()[index].astype(np.float64)
        param_limit = self.explode_factor * np.fmax(reference, SCALE_FLOOR * peaks)
        significant = norms >= 0.1 * typical_total if not math.isnan(typical_total) else finite
        grown = finite & significant & (norms > param_limit)
        if not (total > limit or grown.any()):
            return None
        ratio = np.where(reference > 0, norms / reference, norms)
        ratio = np.where(finite, ratio, 0.0)
        # The message tells the three rules apart by the fields (see _exploding above).
        if total > limit and limit < relative:
            # The absolute ceiling, on the model's total: no parameter singled out (param None);
            # params are the largest gradients.
            top = np.argsort(-np.where(finite, norms, 0.0), kind="stable")[:5].tolist()
            names = tuple(ctx.table.names[ctx.indices[j]] for j in top)
            return Finding(
                Kind.EXPLODING, ctx.step, None, value=total, threshold=limit, params=names
            )
        if total > limit:
            # explode_factor x the median total: the parameters that grew most, the first as param.
            top = np.argsort(-ratio, kind="stable")[:5].tolist()
            names = tuple(ctx.table.names[ctx.indices[j]] for j in top)
            return Finding(
                Kind.EXPLODING, ctx.step, names[0], value=total, threshold=limit, params=names
            )
        # One parameter above explode_factor x its own median: that one alone, as param and params.
        crossed = np.flatnonzero(grown)
        first = int(crossed[np.argmax(ratio[crossed])])
        name = ctx.table.names[ctx.indices[first]]
        return Finding(
            Kind.EXPLODING,
            ctx.step,
            name,
            value=float(norms[first]),
            threshold=float(param_limit[first]),
            params=(name,),
        )

    def _vanishing(
        self, ctx: CheckContext, index: np.ndarray, norms: np.ndarray, usable: np.ndarray
    ) -> list[Finding]:
        findings = []
        names = ctx.table.names
        all_numels, is_matrix = self._shapes(ctx)
        numels = all_numels[index]
        weights = usable & is_matrix[index] & (numels > 0)
        streak = 0
        if int(weights.sum()) >= 4:
            candidates = np.flatnonzero(weights)
            first_position = np.array(ctx.tracker.first_position)[index[candidates]]
            # Gradients arrive output side first: the largest position is the earliest layer.
            order = candidates[np.argsort(-first_position, kind="stable")]
            rms = norms[order] / np.sqrt(numels[order])
            quarter = max(1, len(order) // 4)
            late_median = _lower_median(rms[-quarter:])
            ratio = _lower_median(rms[:quarter]) / late_median if late_median > 0 else math.nan
            if ratio < self.vanish_ratio:
                streak = self._depth_streak.get(ctx.group, 0) + 1
                if streak == self.vanish_steps:
                    smallest = order[:quarter][np.argsort(rms[:quarter], kind="stable")].tolist()
                    early = tuple(names[ctx.indices[j]] for j in smallest)
                    findings.append(
                        Finding(
                            Kind.VANISHING,
                            ctx.step,
                            early[0],
                            value=ratio,
                            threshold=self.vanish_ratio,
                            params=early,
                        )
                    )
        self._depth_streak[ctx.group] = streak

        # Dead layers. A bias alone can be legitimately irrelevant to the loss (a WGAN critic's
        # output bias gets exactly zero gradient by construction), so a 1-D parameter counts only
        # beside a dead weight matrix of the same module.
        zero = usable & (numels > 0) & (norms == 0)
        all_streaks = self._zero_streak.numpy()
        streaks = all_streaks[index]
        streaks = np.where(zero, streaks + 1, np.where(usable, 0, streaks))
        all_streaks[index] = streaks
        dead = np.flatnonzero((streaks == self.vanish_steps) & zero).tolist()
        dead_matrices = {j for j in dead if is_matrix[ctx.indices[j]]}
        dead_modules = {names[ctx.indices[j]].rpartition(".")[0] for j in dead_matrices}
        dead_names = tuple(
            names[ctx.indices[j]]
            for j in dead
            if j in dead_matrices or names[ctx.indices[j]].rpartition(".")[0] in dead_modules
        )
        if dead_names and (usable & (norms > 0)).any():
            findings.append(
                Finding(
                    Kind.VANISHING,
                    ctx.step,
                    dead_names[0],
                    value=0.0,
                    threshold=0.0,
                    params=dead_names,
                )
            )
        return findings

    def _shapes(self, ctx: CheckContext) -> tuple[np.ndarray, np.ndarray]:
        """Element counts (float64) and is-a-matrix flags of every watched parameter."""
        if self._numels is None or len(self._numels) != len(ctx.table):
            self._numels = np.array(ctx.table.numels, dtype=np.float64)
            self._is_matrix = np.array([n >= 2 for n in ctx.table.ndims], dtype=bool)
        assert self._is_matrix is not None
        return self._numels, self._is_matrix

    def _remember(
        self, group: int, index: np.ndarray, norms: np.ndarray, usable: np.ndarray
    ) -> None:
        total = math.sqrt(float(np.square(norms[np.isfinite(norms)]).sum()))
        if math.isfinite(total) and total > 0:
            self._totals.setdefault(group, deque(maxlen=self.history)).append(total)
        keep = usable & (norms > 0)
        kept = index[keep]
        count = self._param_count.numpy()
        self._param_history.numpy()[count[kept] % self.history, kept] = norms[keep]
        count[kept] += 1
        self._checks_since_refresh += 1
        if self._checks_since_refresh >= max(1, self.history // 8):
            self._checks_since_refresh = 0
            reference = self._param_history.nanmedian(dim=0).values
            self._reference = torch.where(
                self._param_count >= self.warmup_steps,
                reference,
                torch.full_like(reference, math.nan),
            )
            self._peak_reference = torch.fmax(self._peak_reference, self._reference)

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": {group: list(values) for group, values in self._totals.items()},
            "param_history": self._param_history.clone(),
            "param_count": self._param_count.clone(),
            "reference": self._reference.clone(),
            "depth_streak": dict(self._depth_streak),
            "zero_streak": self._zero_streak.clone(),
            "peak_totals": dict(self._peak_totals),
            "peak_reference": self._peak_reference.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; every field is checked before any changes.

        The history is kept on the CPU, wherever the checkpoint was loaded to (the detector
        works on it through numpy views), in this detector's dtypes.

        Raises:
            GradWatchTypeError: A field has the wrong type (the message names it).
            GradWatchValueError: A field has a value that is not allowed: a tensor of another
                shape (saved with another ``history`` or for another model), a negative count,
                a norm that is negative or not finite, more totals than ``history``.
        """
        if isinstance(state, dict) and not set(_PEAK_FIELDS) & set(state):
            # Saved before the peaks were kept: the run's scale is taken from what was saved.
            state = {**state, "peak_totals": None, "peak_reference": None}
        fields = _state.fields(state, _STATE_FIELDS)
        num_params = self.setup.num_params
        norm_dtype = self._param_history.dtype
        param_history = _state.tensor(
            "param_history",
            fields["param_history"],
            (self.history, num_params),
            norm_dtype,
            "history x parameters: saved with another history or for another model?",
            _NORM,
            _is_norm,
        )
        param_count, reference, zero_streak = (
            _state.tensor(name, fields[name], (num_params,), dtype, "one per parameter", *rule)
            for name, dtype, rule in (
                ("param_count", torch.long, (_COUNT, _is_count)),
                ("reference", norm_dtype, (_NORM, _is_norm)),
                ("zero_streak", torch.long, (_COUNT, _is_count)),
            )
        )
        totals = {}
        for group, values in _state.by_group("totals", fields["totals"]).items():
            path = f"totals[{group}]"
            kept = _state.sequence(path, values)
            if len(kept) > self.history:
                raise GradWatchValueError(
                    f"{path} must hold at most history ({self.history}) totals, got {len(kept)}"
                )
            totals[group] = [_state.positive(f"{path}[{i}]", v) for i, v in enumerate(kept)]
        depth_streak = {
            group: _state.integer(f"depth_streak[{group}]", streak)
            for group, streak in _state.by_group("depth_streak", fields["depth_streak"]).items()
        }
        if fields["peak_totals"] is None:
            peak_totals = {
                group: _median(deque(values)) for group, values in totals.items() if values
            }
            peak_reference = reference.clone()
        else:
            peak_totals = {
                group: _state.positive(f"peak_totals[{group}]", value)
                for group, value in _state.by_group("peak_totals", fields["peak_totals"]).items()
            }
            peak_reference = _state.tensor(
                "peak_reference",
                fields["peak_reference"],
                (num_params,),
                norm_dtype,
                "one per parameter",
                _NORM,
                _is_norm,
            )
        self._totals = {
            group: deque(values, maxlen=self.history) for group, values in totals.items()
        }
        self._param_history = param_history
        self._param_count = param_count
        self._reference = reference
        self._depth_streak = depth_streak
        self._zero_streak = zero_streak
        self._peak_totals = peak_totals
        self._peak_reference = peak_reference


_STATE_FIELDS = (
    "totals",
    "param_history",
    "param_count",
    "reference",
    "depth_streak",
    "zero_streak",
    "peak_totals",
    "peak_reference",
)
_PEAK_FIELDS = ("peak_totals", "peak_reference")
_NORM = "NaN (none yet) or a finite norm >= 0"
_COUNT = "a count in [0, 2**62]"


def _is_norm(values: torch.Tensor) -> torch.Tensor:
    return values.isnan() | (values.isfinite() & (values >= 0))


def _is_count(values: torch.Tensor) -> torch.Tensor:
    return (values >= 0) & (values <= _state.MAX_COUNT)


def _median(values: deque[float] | tuple[()]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return 0.5 * (ordered[middle - 1] + ordered[middle])


def _lower_median(values: np.ndarray) -> float:
    """The lower of the two middle values when their number is even (as ``torch.median``)."""
    middle = (len(values) - 1) // 2
    return float(np.partition(values, middle)[middle])
