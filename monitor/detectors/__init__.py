"""Drift detectors: each compares one feature of a window with the reference profile."""

from monitor.detectors.base import DriftResult, Detector, WindowFeatures
from monitor.detectors.confidence import ConfidenceDetector
from monitor.detectors.embedding_mmd import EmbeddingMMDDetector
from monitor.detectors.novelty import NoveltyDetector
from monitor.detectors.token_length import TokenLengthDetector
from monitor.detectors.vocabulary import VocabularyDetector

__all__ = [
    "ConfidenceDetector",
    "Detector",
    "DriftResult",
    "EmbeddingMMDDetector",
    "NoveltyDetector",
    "TokenLengthDetector",
    "VocabularyDetector",
    "WindowFeatures",
]
