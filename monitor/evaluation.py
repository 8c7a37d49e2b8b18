"""Evaluation of one monitoring window: featurise the sample once and run every enabled detector."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from monitor.detectors.base import (
    STATUS_INSUFFICIENT,
    STATUS_OK,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    to_json_value,
    validate_alpha,
    validate_min_samples,
)
from monitor.detectors.confidence import ConfidenceDetector
from monitor.detectors.domain_classifier import DomainClassifierDetector
from monitor.detectors.embedding_mmd import EmbeddingMMDDetector
from monitor.detectors.label_shift import LabelShiftDetector
from monitor.detectors.novelty import NoveltyDetector
from monitor.detectors.token_length import TokenLengthDetector
from monitor.detectors.vocabulary import VocabularyDetector
from monitor.accuracy_estimate import AccuracyEstimate, AccuracyEstimator
from monitor.calibration import NullCalibration, calibration_window_size, heldout_window_indices
from monitor.config import (
    CALIBRATED_SIGNALS,
    DEFAULT_SIGNALS,
    EMBEDDING_SIGNALS,
    P_VALUE_SIGNALS,
    SIGNALS,
    Config,
    check_effect_floors,
    min_resamples,
)
from monitor.embedding import Embedder
from monitor.errors import ConfigError, InsufficientSamplesError
from monitor.reference import ReferenceProfile, tokenize_counts
from monitor.sampling import WindowSampler

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class WindowReport:
    """Drift verdict of one window.

    ``n_events`` counts every observation in the window and ``n_sampled`` those in
    the reservoir sample that the detectors tested. ``mean_confidence`` and the
    latency quantiles cover all events. ``started_at`` and ``ended_at`` are Unix
    seconds of the first and last event, or of the evaluation for an empty window.
    """

    window_id: str
    n_events: int
    n_sampled: int
    results: list[DriftResult]
    drifted: bool
    drifted_signals: list[str]
    mean_confidence: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    started_at: float
    ended_at: float
    status: str
    # Label-free accuracy estimate of the sample (see monitor.accuracy_estimate), or None.
    accuracy_estimate: AccuracyEstimate | None = None

    def to_dict(self) -> dict:
        """Return the report as a JSON-serialisable dict, with nan as None."""
        return {
            "window_id": self.window_id,
            "n_events": int(self.n_events),
            "n_sampled": int(self.n_sampled),
            "results": [result.to_dict() for result in self.results],
            "drifted": bool(self.drifted),
            "drifted_signals": list(self.drifted_signals),
            "mean_confidence": to_json_value(self.mean_confidence),
            "latency_p50_ms": to_json_value(self.latency_p50_ms),
            "latency_p99_ms": to_json_value(self.latency_p99_ms),
            "started_at": float(self.started_at),
            "ended_at": float(self.ended_at),
            "status": self.status,
            "accuracy_estimate": self.accuracy_estimate.to_dict() if self.accuracy_estimate else None,
        }


class WindowEvaluator:
    """Runs the enabled drift detectors of one reference profile on window samples.

    The p-value signals (token length, vocabulary, embedding, novelty and the
    optional ones) share the family-wise level ``alpha`` by the Bonferroni
    correction. Each one drifts when its p-value is below ``alpha / k``, with k
    the number of enabled p-value signals. That adjusted level is each result's
    ``threshold``. The confidence signal uses its effect threshold
    ``confidence_max_drop``. A window drifts when any signal drifts.

    Calibration: when the profile has a calibration pool and
    ``calibration_windows`` is above 0, the first window of each sample size n
    draws ``calibration_windows`` windows from the pool, sized for each
    statistic by ``calibration_window_size``. The statistics of token length,
    vocabulary and embedding on them become those detectors' nulls (see
    monitor.calibration). The pool holds validation texts that the
    reference statistics never saw, so the null includes the gap between
    training data and fresh data of the same distribution.

    ``vocabulary_null_windows`` and ``mmd_permutations`` are raised to at least
    ``min_resamples(alpha, enabled_signals)``, because a resampling p-value
    cannot fall below ``1 / (B + 1)``. Those nulls serve only when calibration
    is off, which also logs the raise as a warning.
    """

    def __init__(
        self,
        profile: ReferenceProfile,
        tokenizer,
        embedder: Embedder,
        *,
        alpha: float = 0.01,
        min_samples: int = 30,
        vocabulary_null_windows: int = 200,
        new_token_min_count: int = 3,
        mmd_permutations: int = 200,
        mmd_reference_sample: int = 500,
        mmd_exact_max_points: int = 2000,
        mmd_random_features: int = 512,
        confidence_max_drop: float = 0.1,
        low_confidence_threshold: float = 0.5,
        enabled_signals: tuple[str, ...] = DEFAULT_SIGNALS,
        seed: int = 0,
        effect_floors: dict[str, float] | None = None,
        domain_classifier: dict | None = None,
        label_distribution: dict | None = None,
        novelty: dict | None = None,
        calibration_windows: int = 1000,
        calibration_tail_size: int = 50,
    ):
        enabled = tuple(enabled_signals)
        unknown = [name for name in enabled if name not in SIGNALS]
        if unknown or not enabled:
            raise ConfigError(
                f"enabled_signals must be a non-empty subset of {list(SIGNALS)}, got {list(enabled_signals)}"
            )
        try:
            self.effect_floors = check_effect_floors(dict(effect_floors or {}))
        except ValueError as error:
            raise ConfigError(f"effect_floors: {error}") from None
        self.profile = profile
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.alpha = validate_alpha(alpha)
        self.min_samples = validate_min_samples(min_samples)
        self.enabled_signals = tuple(name for name in SIGNALS if name in enabled)
        n_p_value_signals = sum(name in P_VALUE_SIGNALS for name in self.enabled_signals)
        self.adjusted_alpha = self.alpha / max(n_p_value_signals, 1)
        if isinstance(calibration_windows, bool) or not isinstance(calibration_windows, int) or calibration_windows < 0:
            raise ConfigError(f"calibration_windows must be an integer >= 0, got {calibration_windows!r}")
        self.calibration_windows = calibration_windows
        self.calibration_tail_size = calibration_tail_size
        self.calibrated = calibration_windows > 0 and profile.has_calibration_pool
        self.vocabulary_null_windows = self._enough_resamples("vocabulary_null_windows", vocabulary_null_windows)
        self.mmd_permutations = self._enough_resamples("mmd_permutations", mmd_permutations)

        # Separate seeds per detector keep their random streams independent.
        seeds = np.random.SeedSequence(seed).spawn(3)
        factories = {
            "token_length": lambda: TokenLengthDetector(alpha=self.adjusted_alpha, min_samples=min_samples),
            "vocabulary": lambda: VocabularyDetector(
                alpha=self.adjusted_alpha,
                null_windows=self.vocabulary_null_windows,
                new_token_min_count=new_token_min_count,
                min_samples=min_samples,
                seed=int(seeds[0].generate_state(1)[0]),
                tokenizer=tokenizer,
            ),
            "embedding": lambda: EmbeddingMMDDetector(
                alpha=self.adjusted_alpha,
                permutations=self.mmd_permutations,
                reference_sample=mmd_reference_sample,
                exact_max_points=mmd_exact_max_points,
                random_features=mmd_random_features,
                min_samples=min_samples,
                seed=int(seeds[1].generate_state(1)[0]),
            ),
            "domain_classifier": lambda: DomainClassifierDetector(
                alpha=self.adjusted_alpha,
                min_samples=min_samples,
                seed=int(seeds[2].generate_state(1)[0]),
                **(domain_classifier or {}),
            ),
            "label_distribution": lambda: LabelShiftDetector(
                alpha=self.adjusted_alpha,
                min_samples=min_samples,
                **(label_distribution or {}),
            ),
            "novelty": lambda: NoveltyDetector(
                alpha=self.adjusted_alpha,
                min_samples=min_samples,
                **(novelty or {}),
            ),
            "confidence": lambda: ConfidenceDetector(
                max_drop=confidence_max_drop,
                low_confidence_threshold=low_confidence_threshold,
                min_samples=min_samples,
            ),
        }
        self.detectors = {}
        # Signals whose detector cannot fit this profile, with the reason; they report insufficient_data.
        self.unavailable: dict[str, str] = {}
        for name in self.enabled_signals:
            detector = factories[name]()
            try:
                self.detectors[name] = detector.fit(profile)
            except InsufficientSamplesError as error:
                self.unavailable[name] = str(error)
                logger.warning("signal %s is unavailable for this reference profile and reports insufficient "
                               "data: %s", name, error)
        self.accuracy_estimator = AccuracyEstimator(min_samples=self.min_samples).fit(profile)
        self.pool = self._calibration_pool(profile) if self.calibrated else None
        self._calibration_seed = seed

    @staticmethod
    def _calibration_pool(profile: ReferenceProfile) -> WindowFeatures:
        n = len(profile.pool_token_ids)
        return WindowFeatures(
            token_counts=profile.pool_token_counts,
            token_ids=profile.pool_token_ids,
            embeddings=profile.pool_embeddings,
            confidences=np.full(n, np.nan),
            predicted_labels=[""] * n,
            n_total=n,
        )

    def calibrate(self, n: int) -> dict[str, NullCalibration]:
        """Calibrate the nulls of the enabled calibrated signals for windows of ``n`` sampled texts.

        Returns the calibrations by signal; empty when calibration is off. A size
        already calibrated is not redone.
        """
        if not self.calibrated:
            return {}
        names = [name for name in CALIBRATED_SIGNALS if name in self.detectors]
        missing = [name for name in names if self.detectors[name].calibration_for(n) is None]
        if missing:
            started = time.perf_counter()
            rng = np.random.default_rng([self._calibration_seed, int(n)])
            pool_size = len(self.pool.token_ids)
            windows = {}
            calibrated = []
            for name in missing:
                detector = self.detectors[name]
                size = calibration_window_size(n, pool_size, detector.calibration_sampling)
                if size not in windows:
                    windows[size] = heldout_window_indices(pool_size, size, self.calibration_windows, rng)
                statistics = detector.calibration_statistics(self.pool, windows[size], int(n))
                try:
                    calibration = NullCalibration(name, int(n), statistics,
                                                  min(self.calibration_tail_size, self.calibration_windows - 1))
                except (ConfigError, InsufficientSamplesError) as error:
                    logger.warning("%s keeps its own null for windows of %d texts: %s", name, n, error)
                    continue
                detector.set_calibration(calibration)
                calibrated.append(name)
            logger.info("calibrated the nulls of %s for windows of %d texts on %d held-out windows (of %s texts) "
                        "from %d pool texts in %.1f s", ", ".join(calibrated) or "no signal", n, self.calibration_windows,
                        " and ".join(str(size) for size in sorted(windows)), pool_size,
                        time.perf_counter() - started)
        return {name: self.detectors[name].calibration_for(n) for name in names}

    def _enough_resamples(self, name: str, requested: int) -> int:
        """Return ``requested``, or the minimum from ``min_resamples`` when that is larger."""
        needed = min_resamples(self.alpha, self.enabled_signals)
        if not isinstance(requested, int) or requested >= needed:
            return requested
        if self.calibrated:
            # The resampled null serves no window while calibration is on.
            return needed
        logger.warning(
            "raising %s from %d to %d: with B resamples the smallest p-value is 1/(B+1), "
            "which must be below the Bonferroni-adjusted alpha %.3g",
            name,
            requested,
            needed,
            self.adjusted_alpha,
        )
        return needed

    def featurise(self, sampler: WindowSampler) -> WindowFeatures:
        """Tokenize, embed and collect confidences of the sampler's sample once for all detectors."""
        sample = list(sampler.sample)
        texts = [obs.text for obs in sample]
        token_counts, token_ids = tokenize_counts(self.tokenizer, texts)
        if any(name in self.detectors for name in EMBEDDING_SIGNALS):
            embeddings = self.embedder.encode(texts)
        else:
            embeddings = np.zeros((len(texts), 0), dtype=np.float32)
        return WindowFeatures(
            token_counts=token_counts,
            token_ids=token_ids,
            embeddings=embeddings,
            confidences=np.array([obs.confidence for obs in sample], dtype=np.float64),
            predicted_labels=[obs.predicted_label for obs in sample],
            n_total=sampler.count,
            texts=texts,
        )

    def evaluate(self, window_id: str, sampler: WindowSampler) -> WindowReport:
        """Test the sampler's sample against the reference and return the window report."""
        n_sampled = len(sampler.sample)
        if n_sampled < self.min_samples:
            # Every detector would return insufficient_data, so the tokenizer and embedder are skipped.
            results = [
                insufficient_result(name, n_sampled, self.min_samples, self._threshold(name))
                for name in self.enabled_signals
            ]
        else:
            window = self.featurise(sampler)
            self.calibrate(n_sampled)
            results = [
                self._apply_effect_floor(self.detectors[name].test(window)) if name in self.detectors
                else insufficient_result(name, n_sampled, self.min_samples, self._threshold(name),
                                         {"reason": self.unavailable[name]})
                for name in self.enabled_signals
            ]

        drifted_signals = [result.signal for result in results if result.drifted]
        # In a full window a signal may still report insufficient_data (texts without tokens), and the others still count.
        status = STATUS_INSUFFICIENT if n_sampled < self.min_samples else STATUS_OK
        confidences = np.array([observation.confidence for observation in sampler.sample], dtype=np.float64)
        accuracy_estimate = self.accuracy_estimator.estimate(confidences)
        quantiles = sampler.latency_quantiles()
        now = time.time()
        return WindowReport(
            window_id=str(window_id),
            n_events=sampler.count,
            n_sampled=n_sampled,
            results=results,
            drifted=bool(drifted_signals),
            drifted_signals=drifted_signals,
            mean_confidence=sampler.mean_confidence,
            latency_p50_ms=quantiles["p50"],
            latency_p99_ms=quantiles["p99"],
            started_at=sampler.started_at if sampler.started_at is not None else now,
            ended_at=sampler.last_at if sampler.last_at is not None else now,
            status=status,
            accuracy_estimate=accuracy_estimate,
        )

    def _apply_effect_floor(self, result: DriftResult) -> DriftResult:
        """Clear the drift flag of a significant result whose statistic is below the signal's effect floor.

        With large windows a two-sample test rejects on shifts too small to act on.
        The floor is in the detector's own statistic (KS D, JS divergence, MMD²).
        """
        floor = self.effect_floors.get(result.signal)
        if floor is None:
            return result
        details = {**result.details, "effect_floor": floor}
        below = result.statistic is not None and result.statistic < floor
        if result.drifted and below:
            details["below_effect_floor"] = True
            return replace(result, drifted=False, details=details)
        return replace(result, details=details)

    def _threshold(self, name: str) -> float:
        if name == "confidence" and name in self.detectors:
            return self.detectors[name].max_drop
        return self.adjusted_alpha


def evaluator_options(config: Config) -> dict:
    """Map a loaded config to the keyword arguments of WindowEvaluator."""
    detectors = config.detectors
    return {
        "alpha": config.alpha,
        "min_samples": detectors.min_samples,
        "vocabulary_null_windows": detectors.vocabulary.null_windows,
        "new_token_min_count": detectors.vocabulary.new_token_min_count,
        "mmd_permutations": detectors.embedding.permutations,
        "mmd_reference_sample": detectors.embedding.reference_sample,
        "mmd_exact_max_points": detectors.embedding.exact_max_points,
        "mmd_random_features": detectors.embedding.random_features,
        "confidence_max_drop": detectors.confidence.max_drop,
        "low_confidence_threshold": detectors.confidence.low_confidence_threshold,
        "enabled_signals": tuple(detectors.enabled),
        "effect_floors": dict(detectors.effect_floors),
        "domain_classifier": detectors.domain_classifier.model_dump(),
        "label_distribution": detectors.label_distribution.model_dump(),
        "novelty": detectors.novelty.model_dump(),
        "calibration_windows": detectors.calibration.windows,
        "calibration_tail_size": detectors.calibration.tail_size,
        "seed": detectors.seed,
    }
