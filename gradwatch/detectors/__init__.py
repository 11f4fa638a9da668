"""Detectors: each turns a check's statistics and its own bounded history into findings."""

from gradwatch.detectors.accumulation import AccumulationDetector
from gradwatch.detectors.base import CheckContext, Detector, ParamTable
from gradwatch.detectors.coverage import CoverageDetector
from gradwatch.detectors.magnitude import MagnitudeDetector
from gradwatch.detectors.numerics import NumericsDetector

__all__ = [
    "AccumulationDetector",
    "CheckContext",
    "CoverageDetector",
    "Detector",
    "MagnitudeDetector",
    "NumericsDetector",
    "ParamTable",
]
