"""Drift test on the token frequency distribution, with a resampled null."""

from __future__ import annotations

import numpy as np
from scipy import sparse

from monitor.detectors.base import (
    STATUS_OK,
    CalibratedNull,
    DriftResult,
    WindowFeatures,
    insufficient_result,
    permutation_p_value,
    require_fitted,
    validate_alpha,
    validate_min_samples,
    validate_positive_int,
    validate_resample_count,
)
from monitor.calibration import SAMPLING_WINDOW_SIZE
from monitor.errors import ConfigError, DataError, InsufficientSamplesError
from monitor.reference import ReferenceProfile

# Null distributions are cached per window size. Windows usually share one size
# (the sampler's sample_size), so a few entries suffice.
MAX_CACHED_NULLS = 32


def jensen_shannon_rows(counts: sparse.csr_matrix, reference: np.ndarray) -> np.ndarray:
    """Return the base-2 Jensen-Shannon divergence of each row of ``counts`` from ``reference``.

    Each row contains raw token counts and is normalised to a distribution P. The
    reference Q must sum to 1. Only the support of P is visited: outside it
    ``M = Q / 2``, so those tokens add ``0.5 * Q`` each, ``0.5 * (1 - sum_S Q)`` in
    total. A row with no tokens gets ``inf``, so it counts as extreme.
    """
    counts = counts.tocsr()
    n_rows = counts.shape[0]
    row_of_entry = np.repeat(np.arange(n_rows), np.diff(counts.indptr))
    values = counts.data.astype(np.float64)
    totals = np.bincount(row_of_entry, weights=values, minlength=n_rows)

    with np.errstate(divide="ignore", invalid="ignore"):
        p = values / totals[row_of_entry]
        q = reference[counts.indices]
        m = 0.5 * (p + q)
        p_terms = p * np.log2(p / m)
        q_terms = np.where(q > 0, q * np.log2(q / m), 0.0)

    p_sum = np.bincount(row_of_entry, weights=p_terms, minlength=n_rows)
    q_sum = np.bincount(row_of_entry, weights=q_terms, minlength=n_rows)
    q_on_support = np.bincount(row_of_entry, weights=q, minlength=n_rows)
    divergence = 0.5 * p_sum + 0.5 * (q_sum + (1.0 - q_on_support))
    divergence = np.clip(divergence, 0.0, 1.0)
    divergence[totals == 0] = np.inf
    return divergence


def token_count_matrix(token_ids: list[list[int]], vocab_size: int) -> sparse.csr_matrix:
    """Return a sparse (texts, vocab_size) matrix of token counts; raise DataError on an id outside the vocabulary."""
    lengths = np.fromiter((len(row) for row in token_ids), dtype=np.int64, count=len(token_ids))
    flat = np.fromiter((token for row in token_ids for token in row), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise DataError(f"token ids fall outside the reference vocabulary of size {vocab_size}")
    rows = np.repeat(np.arange(len(token_ids)), lengths)
    return sparse.csr_matrix((np.ones(flat.size, dtype=np.float64), (rows, flat)), shape=(len(token_ids), vocab_size))


class VocabularyDetector(CalibratedNull):
    """Jensen-Shannon test of the window's token frequencies against the training frequencies.

    Parameters
    ----------
    alpha : float
        Significance level. The window drifts when the p-value is below it.
    null_windows : int
        Number B of resampled windows in each null distribution.
    new_token_min_count : int
        Smallest window count for a token to be reported as new.
    top_new_tokens : int
        Maximum number of new tokens reported.
    min_samples : int
        Smallest number of sampled texts that is tested.
    seed : int
        Seed of the detector's own ``numpy.random.Generator``.
    tokenizer : optional
        Hugging Face tokenizer used to report token strings instead of ids and to
        measure WordPiece fragmentation.
    rare_reference_frequency : float
        A token counts as new when its reference frequency is below this value.

    Notes
    -----
    Statistic: the Jensen-Shannon divergence (base 2, so in [0, 1]) between the
    window's token frequency distribution (special tokens excluded) and the
    reference ``token_frequencies``.

    Null distribution: the divergence of B windows with the same number of texts,
    drawn with replacement from the held-out training texts, which were not used
    for ``token_frequencies``. Drawing whole texts keeps the dependence between
    tokens of one text, and the held-out split accounts for the sampling noise
    of the reference estimate. Each null is computed on first use for a window
    size and cached.

    The null resamples a finite held-out pool, and repeated texts raise the
    divergence, so with a small pool (a few hundred texts) the test is
    conservative: same-distribution p-values lean towards 1 rather than being uniform.

    Decision rule: drifted when ``p < alpha``, with ``p = (b + 1) / (B + 1)`` and b
    the number of null divergences >= the observed one. When held-out reference
    windows calibrated the null (see monitor.calibration), the p-value is the
    calibrated one and no windows are resampled.

    Reference: Lin (1991), "Divergence measures based on the Shannon entropy",
    IEEE Transactions on Information Theory. The p-value form
    follows Phipson and Smyth (2010), see ``permutation_p_value``.
    """

    signal = "vocabulary"
    # The divergence's small-sample bias depends on the window size, so the null uses windows of that size.
    calibration_sampling = SAMPLING_WINDOW_SIZE

    def __init__(
        self,
        alpha: float = 0.01,
        null_windows: int = 200,
        new_token_min_count: int = 3,
        top_new_tokens: int = 10,
        min_samples: int = 30,
        seed: int = 0,
        tokenizer=None,
        rare_reference_frequency: float = 1e-5,
    ):
        self.alpha = validate_alpha(alpha)
        self.null_windows = validate_resample_count("null_windows", null_windows, self.alpha)
        self.new_token_min_count = validate_positive_int("new_token_min_count", new_token_min_count)
        self.top_new_tokens = validate_positive_int("top_new_tokens", top_new_tokens)
        self.min_samples = validate_min_samples(min_samples)
        if not isinstance(rare_reference_frequency, (int, float)) or not 0.0 <= rare_reference_frequency < 1.0:
            raise ConfigError(f"rare_reference_frequency must be in [0, 1), got {rare_reference_frequency!r}")
        self.rare_reference_frequency = float(rare_reference_frequency)
        self.seed = seed
        self.tokenizer = tokenizer
        self._rng = np.random.default_rng(seed)

    def fit(self, profile: ReferenceProfile) -> "VocabularyDetector":
        """Store the reference frequencies and index the held-out texts for resampling."""
        frequencies = np.asarray(profile.token_frequencies, dtype=np.float64)
        heldout = profile.heldout_token_ids
        if not heldout or not any(heldout):
            raise InsufficientSamplesError(
                f"the reference profile has {len(heldout)} held-out texts with tokens; "
                "the vocabulary null needs at least one"
            )
        vocab_size = frequencies.shape[0]
        try:
            self.heldout_counts_ = token_count_matrix(heldout, vocab_size)
        except DataError as error:
            raise DataError(f"held-out {error}") from None
        self.reference_frequencies_ = frequencies
        self.reference_unk_rate_ = float(profile.unk_rate)
        self.unk_token_id_ = profile.unk_token_id
        self.continuation_mask_ = self._continuation_mask(vocab_size)
        self.reference_continuation_share_ = (
            None if self.continuation_mask_ is None else float(frequencies[self.continuation_mask_].sum())
        )
        self.null_cache_: dict[int, np.ndarray] = {}
        return self

    def _continuation_mask(self, vocab_size: int) -> np.ndarray | None:
        # WordPiece marks a piece that continues a word with "##". Other tokenizers get no fragmentation figure.
        if self.tokenizer is None:
            return None
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        mask = np.fromiter((isinstance(t, str) and t.startswith("##") for t in tokens), dtype=bool, count=vocab_size)
        return mask if mask.any() else None

    def null_distribution(self, n_texts: int) -> np.ndarray:
        """Return the B null divergences for windows of ``n_texts`` texts, computing them on first use."""
        require_fitted(self, "reference_frequencies_")
        cached = self.null_cache_.get(n_texts)
        if cached is not None:
            return cached

        n_heldout = self.heldout_counts_.shape[0]
        draws = self._rng.integers(0, n_heldout, size=(self.null_windows, n_texts))
        window_rows = np.repeat(np.arange(self.null_windows), n_texts)
        selection = sparse.csr_matrix(
            (np.ones(draws.size, dtype=np.float64), (window_rows, draws.ravel())),
            shape=(self.null_windows, n_heldout),
        )
        null = jensen_shannon_rows(selection @ self.heldout_counts_, self.reference_frequencies_)

        if len(self.null_cache_) >= MAX_CACHED_NULLS:
            self.null_cache_.pop(next(iter(self.null_cache_)))
        self.null_cache_[n_texts] = null
        return null

    def test(self, window: WindowFeatures) -> DriftResult:
        """Compare the window's token frequencies with the reference."""
        require_fitted(self, "reference_frequencies_")
        n = len(window.token_ids)
        reference_details = {"reference_unk_rate": self.reference_unk_rate_}
        if self.reference_continuation_share_ is not None:
            reference_details["reference_continuation_share"] = self.reference_continuation_share_
        if n < self.min_samples:
            return insufficient_result(self.signal, n, self.min_samples, self.alpha, reference_details)

        vocab_size = self.reference_frequencies_.shape[0]
        flat = np.fromiter((token for row in window.token_ids for token in row), dtype=np.int64)
        if flat.size == 0:
            return insufficient_result(
                self.signal, n, self.min_samples, self.alpha, {"reason": "the window texts contain no tokens"}
            )
        if flat.min() < 0 or flat.max() >= vocab_size:
            raise DataError(
                f"window token id {int(flat.max())} is outside the reference vocabulary of size {vocab_size}; "
                "was the window tokenized with the reference tokenizer?"
            )
        counts = np.bincount(flat, minlength=vocab_size)
        observed = float(jensen_shannon_rows(sparse.csr_matrix(counts.reshape(1, -1)), self.reference_frequencies_)[0])
        details = {
            "unk_rate": self._unk_rate(counts, flat.size),
            **reference_details,
            "n_tokens": int(flat.size),
            "new_frequent_tokens": [],
            "new_frequent_token_counts": [],
        }
        calibration = self.calibration_for(n)
        if calibration is not None:
            p_value = calibration.p_value(observed)
            details.update(calibration.summary(self.alpha))
        else:
            null = self.null_distribution(n)
            p_value = permutation_p_value(null, observed)
            finite = null[np.isfinite(null)]
            details.update({"null": "heldout_training_texts", "null_windows": self.null_windows,
                            "null_median": float(np.median(finite)) if finite.size else None})
        if self.continuation_mask_ is not None:
            details["continuation_share"] = float(counts[self.continuation_mask_].sum() / flat.size)
        tokens, token_counts = self._new_frequent_tokens(counts)
        details["new_frequent_tokens"] = tokens
        details["new_frequent_token_counts"] = token_counts

        return DriftResult(
            signal=self.signal,
            status=STATUS_OK,
            drifted=p_value < self.alpha,
            statistic=observed,
            p_value=p_value,
            threshold=self.alpha,
            n=n,
            details=details,
        )

    def _unk_rate(self, counts: np.ndarray, n_tokens: int) -> float:
        if self.unk_token_id_ is None:
            return 0.0
        return float(counts[self.unk_token_id_] / n_tokens)

    def _new_frequent_tokens(self, counts: np.ndarray) -> tuple[list, list[int]]:
        candidates = np.flatnonzero(
            (counts >= self.new_token_min_count) & (self.reference_frequencies_ < self.rare_reference_frequency)
        )
        # Highest window count first. Ties keep ascending id order because the sort is stable.
        order = np.argsort(-counts[candidates], kind="stable")[: self.top_new_tokens]
        chosen = candidates[order]
        chosen_counts = [int(c) for c in counts[chosen]]
        if self.tokenizer is None:
            return [int(i) for i in chosen], chosen_counts
        return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in chosen])), chosen_counts

    def calibration_statistics(self, pool: WindowFeatures, windows: np.ndarray, sample_size: int) -> np.ndarray:
        """Return the Jensen-Shannon divergence of each window of pool texts from the reference."""
        require_fitted(self, "reference_frequencies_")
        pool_counts = token_count_matrix(pool.token_ids, self.reference_frequencies_.shape[0])
        n_windows, size = windows.shape
        selection = sparse.csr_matrix(
            (np.ones(windows.size), (np.repeat(np.arange(n_windows), size), windows.ravel())),
            shape=(n_windows, pool_counts.shape[0]),
        )
        return jensen_shannon_rows(selection @ pool_counts, self.reference_frequencies_)
