"""Detectors: each turns a check's statistics and its own bounded history into findings.

:data:`REGISTRY` lists every detector the monitor runs, in the order their options are
documented. Adding a detector is one new module here (a :class:`Detector` subclass declaring
its name, kinds with their messages, options and phase) and one entry in that tuple; the
options, the messages, the saved state and the callbacks' ``state_key`` follow from it.
"""

from __future__ import annotations

from gradwatch.detectors.accumulation import AccumulationDetector
from gradwatch.detectors.base import (
    CheckContext,
    ClipContext,
    ClipMoment,
    Coverage,
    Detector,
    Option,
    ParamTable,
    Phase,
    Setup,
    StallContext,
)
from gradwatch.detectors.cleared import ClearedDetector
from gradwatch.detectors.clipping import ClipOrderDetector
from gradwatch.detectors.coverage import CoverageDetector
from gradwatch.detectors.magnitude import MagnitudeDetector
from gradwatch.detectors.numerics import NumericsDetector
from gradwatch.detectors.replicas import ReplicaDetector
from gradwatch.detectors.steps import StepsDetector
from gradwatch.detectors.unregistered import UnregisteredDetector
from gradwatch.detectors.updates import NoUpdateDetector
from gradwatch.findings import Kind, register_messages

REGISTRY: tuple[type[Detector], ...] = (
    AccumulationDetector,
    CoverageDetector,
    NumericsDetector,
    MagnitudeDetector,
    ClearedDetector,
    StepsDetector,
    NoUpdateDetector,
    ClipOrderDetector,
    UnregisteredDetector,
    ReplicaDetector,
)

RELEASE_1_ORDER = ("accumulation", "coverage", "numerics", "magnitude")
"""The position of each detector's state in state dicts written by gradwatch 0.1 (a list)."""


def _check_registry(registry: tuple[type[Detector], ...]) -> dict[str, Option]:
    names: set[str] = set()
    owners: dict[Kind, str] = {}
    options: dict[str, Option] = {}
    for detector in registry:
        if detector.name in names:
            raise RuntimeError(f"two detectors are named {detector.name!r}")
        names.add(detector.name)
        for kind in detector.kinds:
            if kind in owners or kind is Kind.SKIPPED_STEP:
                raise RuntimeError(f"kind {kind.value!r} is declared by {detector.name!r} too")
            owners[kind] = detector.name
        for option in detector.options:
            if option.name in options or option.name == "ignore":
                raise RuntimeError(f"option {option.name!r} is declared twice")
            options[option.name] = option
        register_messages(detector.kinds, detector.name)
    return options


_OPTIONS = _check_registry(REGISTRY)


def declared_options() -> dict[str, Option]:
    """Every registered detector's options by name, in registry order."""
    return dict(_OPTIONS)


__all__ = [
    "REGISTRY",
    "AccumulationDetector",
    "CheckContext",
    "ClearedDetector",
    "ClipContext",
    "ClipMoment",
    "ClipOrderDetector",
    "Coverage",
    "CoverageDetector",
    "Detector",
    "MagnitudeDetector",
    "NoUpdateDetector",
    "NumericsDetector",
    "Option",
    "ParamTable",
    "Phase",
    "Setup",
    "StallContext",
    "StepsDetector",
    "declared_options",
]
