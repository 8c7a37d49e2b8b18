"""Detection benchmark: replay CLINC150 drift scenarios through driftloop's detectors and Evidently 0.7.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/detection.py [--quick] [--out docs/detection.md]

The reference profile is built from the training split of the 7 domains of
config/demo.yaml (40 examples per intent, as the demo bootstrap uses). The
detectors, window size and trigger use the built-in default config. Every text
is embedded once with the bundled MiniLM and the embeddings are cached in memory.
Windows then go through the real ``WindowEvaluator.evaluate`` path (tokenizer,
reservoir sampler, detectors, Bonferroni level), with an embedder that serves the
cached vectors. Predicted labels and confidences come from a nearest-centroid
classifier on the same embeddings, a stand-in for the trained adapter.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from monitor.config import DEFAULT_SIGNALS, load_config, resolve_model_path  # noqa: E402
from monitor.detectors.embedding_mmd import EmbeddingMMDDetector  # noqa: E402
from monitor.embedding import Embedder  # noqa: E402
from monitor.evaluation import WindowEvaluator, evaluator_options  # noqa: E402
from monitor.policy import TriggerPolicy  # noqa: E402
from monitor.reference import ReferenceProfile, build_reference  # noqa: E402
from monitor.sampling import Observation, WindowSampler  # noqa: E402
from retrain.datasets import OUT_OF_SCOPE, clinc150_dataset, load_clinc150  # noqa: E402

logger = logging.getLogger("bench.detection")

DEMO_CONFIG = REPOSITORY / "config" / "demo.yaml"
# Detectors, window size and trigger run at the built-in defaults, the config the targets are stated for.
DEFAULTS = load_config(None)
WINDOW_SIZE = DEFAULTS.monitor.window_size
SAMPLE_SIZE = DEFAULTS.monitor.sample_size
# Softmax scale on cosine similarities of the nearest-centroid stand-in classifier.
CLASSIFIER_SCALE = 30.0
DEFAULT_SIGNAL_ORDER = DEFAULT_SIGNALS
# Largest gap between the mean label-free accuracy estimate and the realized accuracy of a scenario.
TARGET_ESTIMATE_GAP = 0.03
OPTIONAL_SIGNAL_ORDER = ("domain_classifier", "label_distribution")
EVIDENTLY_SIGNALS = ("ev_token_count", "ev_text", "ev_embeddings")
# Targets stated in docs/detection.md.
TARGET_FALSE_ALARMS_PER_1000 = 1.0
TARGET_DELAY_EVENTS = {"novel_10": 1000, "novel_20": 500}
TARGET_SPEEDUP = 10.0


@dataclass
class RunSize:
    """Window counts per scenario and the cap on every text pool."""

    stable_windows: int
    drift_windows: int
    evidently_text_windows: int
    evidently_embedding_windows: int
    pool_limit: int | None
    timing_evidently_embeddings: bool


FULL = RunSize(stable_windows=1000, drift_windows=30, evidently_text_windows=5,
               evidently_embedding_windows=5, pool_limit=None, timing_evidently_embeddings=True)
QUICK = RunSize(stable_windows=20, drift_windows=4, evidently_text_windows=1,
                evidently_embedding_windows=0, pool_limit=600, timing_evidently_embeddings=False)


# ---------------------------------------------------------------- data


@dataclass
class Pools:
    """Texts of each source as (text, gold intent) pairs. Out-of-scope texts carry the label ``oos``."""

    labels: list[str]
    train: list[tuple[str, str]]
    profile_val: list[tuple[str, str]]
    stable: list[tuple[str, str]]
    novel: list[tuple[str, str]]
    oos: list[tuple[str, str]]
    typo_10: list[tuple[str, str]] = field(default_factory=list)
    typo_30: list[tuple[str, str]] = field(default_factory=list)
    concatenated: list[tuple[str, str]] = field(default_factory=list)


def add_typos(text: str, word_rate: float, rng: np.random.Generator) -> str:
    """Put one typo (swap, deletion, insertion or substitution of a letter) into about ``word_rate`` of the words."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = text.split(" ")
    for index, word in enumerate(words):
        if len(word) < 2 or rng.random() >= word_rate:
            continue
        position = int(rng.integers(0, len(word) - 1))
        kind = int(rng.integers(0, 4))
        letter = letters[int(rng.integers(0, len(letters)))]
        if kind == 0:
            word = word[:position] + word[position + 1] + word[position] + word[position + 2:]
        elif kind == 1:
            word = word[:position] + word[position + 1:]
        elif kind == 2:
            word = word[:position] + letter + word[position:]
        else:
            word = word[:position] + letter + word[position + 1:]
        words[index] = word
    return " ".join(words)


def load_pools(limit: int | None, seed: int = 0) -> Pools:
    """Split CLINC150 into the reference training set, the profile's validation half and the window pools."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    domains = list(demo["data"]["clinc150"]["domains"])
    per_label_limit = demo["data"].get("per_label_limit")
    clinc = load_clinc150()
    dataset = clinc150_dataset(clinc, domains, per_label_limit, seed=demo["data"].get("seed", 0))
    known = clinc.intents_of(domains)
    novel_intents = clinc.intents_of([name for name in clinc.domains if name not in domains])
    rng = np.random.default_rng(seed)

    def capped(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
        return pairs if limit is None else pairs[:limit]

    novel = [pair for split in ("val", "test") for pair in clinc.splits[split] if pair[1] in novel_intents]
    oos = [pair for split in ("oos_val", "oos_test") for pair in clinc.splits[split]]
    pools = Pools(
        labels=sorted(known),
        # The training set is never capped, so every known intent keeps its examples.
        train=list(dataset.train),
        # The profile's confidences come from the even half of the validation split, and the
        # odd half joins the test split as stable traffic, so no window text is in the profile.
        profile_val=capped(dataset.validation[::2]),
        stable=capped(dataset.validation[1::2] + dataset.test),
        novel=capped(novel),
        oos=capped([(text, OUT_OF_SCOPE) for text, _ in oos]),
    )
    noise_rng = np.random.default_rng(seed + 1)
    pools.typo_10 = [(add_typos(text, 0.1, noise_rng), intent) for text, intent in pools.stable]
    pools.typo_30 = [(add_typos(text, 0.3, noise_rng), intent) for text, intent in pools.stable]
    partners = noise_rng.permutation(len(pools.stable))
    pools.concatenated = [
        (f"{text} {pools.stable[partner][0]}", intent) for (text, intent), partner in zip(pools.stable, partners)
    ]
    return pools


# ---------------------------------------------------------------- embeddings and stand-in classifier


class CachedEmbedder:
    """Embedder that serves precomputed MiniLM vectors and encodes only texts it has not seen."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.model_path = embedder.model_path
        self.vectors: dict[str, np.ndarray] = {}
        self.misses = 0

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    def warm(self, texts: list[str]) -> None:
        """Encode every distinct text of ``texts`` that is not cached yet, in one batch run."""
        missing = sorted({text for text in texts if text not in self.vectors})
        if missing:
            for text, vector in zip(missing, self.embedder.encode(missing)):
                self.vectors[text] = vector

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        missing = [text for text in texts if text not in self.vectors]
        if missing:
            self.misses += len(missing)
            self.warm(missing)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self.vectors[text] for text in texts]).astype(np.float32)


class CentroidClassifier:
    """Nearest-centroid intent classifier on MiniLM embeddings, standing in for the trained adapter.

    Class probabilities are the softmax of ``CLASSIFIER_SCALE`` times the cosine
    similarity to each intent's mean training embedding. Texts of unseen domains
    and out-of-scope texts get the closest known intent, usually with a lower confidence.
    """

    def __init__(self, embedder: CachedEmbedder, train: list[tuple[str, str]], labels: list[str]):
        self.embedder = embedder
        self.labels = labels
        vectors = embedder.encode([text for text, _ in train])
        intents = np.array([intent for _, intent in train])
        centroids = np.stack([vectors[intents == label].mean(axis=0) for label in labels])
        self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        logits = CLASSIFIER_SCALE * (self.embedder.encode(texts) @ self.centroids.T)
        logits -= logits.max(axis=1, keepdims=True)
        exponentials = np.exp(logits)
        return exponentials / exponentials.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    drifted: bool


SCENARIOS = [
    Scenario("stable", "held-out in-distribution validation and test texts", False),
    Scenario("novel_5", "5% texts of the 3 held-out domains", True),
    Scenario("novel_10", "10% texts of the 3 held-out domains", True),
    Scenario("novel_20", "20% texts of the 3 held-out domains", True),
    Scenario("novel_50", "50% texts of the 3 held-out domains", True),
    Scenario("oos_10", "10% CLINC150 out-of-scope texts", True),
    Scenario("oos_30", "30% CLINC150 out-of-scope texts", True),
    Scenario("typo_10", "one typo in 10% of the words of every text", True),
    Scenario("typo_30", "one typo in 30% of the words of every text", True),
    Scenario("length_x2", "every text is two in-distribution queries joined", True),
    Scenario("prior_shift", "20% of the known intents get half the traffic", True),
]


def draw(pool: list, count: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> list:
    """Draw ``count`` items without replacement, or with replacement from a pool smaller than ``count``."""
    index = rng.choice(len(pool), size=count, replace=count > len(pool), p=weights)
    return [pool[i] for i in index]


def window_pairs(scenario: str, pools: Pools, rng: np.random.Generator,
                 prior_weights: np.ndarray) -> list[tuple[str, str]]:
    """Return the WINDOW_SIZE (text, gold intent) events of one window of ``scenario``, in random order."""
    mixes = {"novel_5": 0.05, "novel_10": 0.1, "novel_20": 0.2, "novel_50": 0.5, "oos_10": 0.1, "oos_30": 0.3}
    whole = {"stable": pools.stable, "typo_10": pools.typo_10, "typo_30": pools.typo_30,
             "length_x2": pools.concatenated}
    if scenario in whole:
        return draw(whole[scenario], WINDOW_SIZE, rng)
    if scenario == "prior_shift":
        return draw(pools.stable, WINDOW_SIZE, rng, prior_weights)
    shifted_count = int(round(mixes[scenario] * WINDOW_SIZE))
    source = pools.novel if scenario.startswith("novel") else pools.oos
    pairs = draw(source, shifted_count, rng) + draw(pools.stable, WINDOW_SIZE - shifted_count, rng)
    return [pairs[i] for i in rng.permutation(len(pairs))]


def prior_shift_weights(pools: Pools, seed: int) -> np.ndarray:
    """Sampling weights over the stable pool that give 20% of the known intents half of the traffic."""
    rng = np.random.default_rng(seed)
    favoured = set(rng.choice(pools.labels, size=len(pools.labels) // 5, replace=False))
    is_favoured = np.array([intent in favoured for _, intent in pools.stable])
    weights = np.where(is_favoured, 0.5 / max(is_favoured.sum(), 1), 0.5 / max((~is_favoured).sum(), 1))
    return weights / weights.sum()


# ---------------------------------------------------------------- driftloop detectors


class TimedDetector:
    """Proxy that measures the CPU time of each ``test`` call of one detector."""

    def __init__(self, detector):
        self._detector = detector
        self.last_cpu_s = 0.0

    def test(self, window):
        started = time.process_time()
        result = self._detector.test(window)
        self.last_cpu_s = time.process_time() - started
        return result

    def __getattr__(self, name):
        return getattr(self._detector, name)


def make_evaluators(profile: ReferenceProfile, tokenizer, embedder: CachedEmbedder) -> dict[str, WindowEvaluator]:
    """Build the evaluator of the demo's default signals and one of the two optional signals."""
    common = evaluator_options(DEFAULTS)
    default_signals = common.pop("enabled_signals")
    evaluators = {
        "default": WindowEvaluator(profile, tokenizer, embedder, enabled_signals=default_signals, **common),
        "optional": WindowEvaluator(profile, tokenizer, embedder, enabled_signals=OPTIONAL_SIGNAL_ORDER, **common),
    }
    for evaluator in evaluators.values():
        evaluator.detectors = {name: TimedDetector(detector) for name, detector in evaluator.detectors.items()}
    return evaluators


def fill_sampler(pairs: list[tuple[str, str]], classifier: CentroidClassifier, seed: int,
                 probabilities: np.ndarray | None = None) -> WindowSampler:
    """Return a sampler filled with the classifier's predictions on ``pairs``; event ids end in the pair's index."""
    if probabilities is None:
        probabilities = classifier.probabilities([text for text, _ in pairs])
    sampler = WindowSampler(sample_size=SAMPLE_SIZE, seed=seed)
    for index, ((text, _), row) in enumerate(zip(pairs, probabilities)):
        best = int(row.argmax())
        sampler.add(Observation(event_id=f"{seed}-{index}", text=text, predicted_label=classifier.labels[best],
                                confidence=float(min(max(row[best], 0.0), 1.0))))
    return sampler


# ---------------------------------------------------------------- NannyML CBPE


class NannyCBPE:
    """NannyML's CBPE accuracy estimate, fitted on the same validation predictions as driftloop's estimator.

    Each window is one NannyML chunk of ``SAMPLE_SIZE`` rows. NannyML calibrates
    each class probability one-vs-rest with isotonic regression on the reference.
    """

    def __init__(self, labels: list[str], probabilities: np.ndarray, gold: list[str]):
        os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
        import nannyml

        self.labels = labels
        self.columns = {label: f"p{index}" for index, label in enumerate(labels)}
        self.estimator = nannyml.CBPE(
            metrics=["accuracy"], y_pred_proba=self.columns, y_pred="y_pred", y_true="y_true",
            problem_type="classification_multiclass", chunk_size=SAMPLE_SIZE,
        )
        self.estimator.fit(self._frame(probabilities, gold))

    def _frame(self, probabilities: np.ndarray, gold: list[str] | None = None):
        import pandas as pd

        frame = pd.DataFrame(probabilities, columns=list(self.columns.values()))
        frame["y_pred"] = [self.labels[i] for i in probabilities.argmax(axis=1)]
        if gold is not None:
            frame["y_true"] = gold
        return frame

    def estimate(self, windows: list[np.ndarray]) -> list[float]:
        """Return NannyML's estimated accuracy of each window, given its rows of class probabilities."""
        if not windows:
            return []
        result = self.estimator.estimate(self._frame(np.vstack(windows)))
        values = result.filter(period="analysis").to_df()[("accuracy", "value")].tolist()
        return [float(value) for value in values[: len(windows)]]


# ---------------------------------------------------------------- Evidently 0.7


class EvidentlyChecks:
    """Evidently 0.7 drift metrics at their defaults, against the same reference texts as the profile."""

    def __init__(self, profile: ReferenceProfile, reference_texts: list[str], reference_embeddings: np.ndarray):
        import pandas as pd
        from evidently import DataDefinition, Dataset

        self.pd = pd
        self.Dataset = Dataset
        self.DataDefinition = DataDefinition
        self.embedding_columns = [f"e{i}" for i in range(reference_embeddings.shape[1])]
        self.token_reference = self._dataset({"tokens": profile.token_counts}, numerical=["tokens"])
        self.text_reference = self._dataset({"text": reference_texts}, text=["text"])
        self.embedding_reference = self._embedding_dataset(reference_embeddings)

    def _dataset(self, columns: dict, numerical=None, text=None):
        definition = self.DataDefinition(numerical_columns=numerical, text_columns=text)
        return self.Dataset.from_pandas(self.pd.DataFrame(columns), data_definition=definition)

    def _embedding_dataset(self, embeddings: np.ndarray):
        frame = self.pd.DataFrame(np.asarray(embeddings, dtype=np.float64), columns=self.embedding_columns)
        definition = self.DataDefinition(numerical_columns=self.embedding_columns,
                                         embeddings={"minilm": self.embedding_columns})
        return self.Dataset.from_pandas(frame, data_definition=definition)

    @staticmethod
    def _value_drift_detected(snapshot) -> bool:
        # ValueDrift reports its decision as a test: FAIL means drift at the method's default threshold.
        tests = snapshot.dict().get("tests", [])
        return any(str(test["status"]).endswith("FAIL") for test in tests)

    def token_count(self, token_counts: np.ndarray) -> bool:
        from evidently import Report
        from evidently.metrics import ValueDrift

        current = self._dataset({"tokens": token_counts}, numerical=["tokens"])
        snapshot = Report([ValueDrift(column="tokens")], include_tests=True).run(current, self.token_reference)
        return self._value_drift_detected(snapshot)

    def text(self, texts: list[str]) -> bool:
        from evidently import Report
        from evidently.metrics import ValueDrift

        current = self._dataset({"text": texts}, text=["text"])
        snapshot = Report([ValueDrift(column="text")], include_tests=True).run(current, self.text_reference)
        return self._value_drift_detected(snapshot)

    def embeddings(self, embeddings: np.ndarray) -> bool:
        from evidently import Report
        from evidently.metrics import EmbeddingsDrift

        snapshot = Report([EmbeddingsDrift(embeddings_name="minilm")]).run(
            self._embedding_dataset(embeddings), self.embedding_reference)
        # NOTE: the 0.7 SingleValue result carries only the score (ROC AUC of the model method), so the
        # decision is read from the legacy result that Evidently caches in the snapshot's private context.
        results = [value[0] for value in snapshot.context._legacy_metrics.values()]
        return bool(next(result.drift_detected for result in results if hasattr(result, "drift_detected")))


# ---------------------------------------------------------------- replay


@dataclass
class SignalTally:
    windows: int = 0
    flagged: int = 0
    first_flagged: int | None = None
    cpu_s: float = 0.0

    def add(self, index: int, drifted: bool, cpu_s: float) -> None:
        if drifted and self.first_flagged is None:
            self.first_flagged = index
        self.windows += 1
        self.flagged += int(drifted)
        self.cpu_s += cpu_s


def replay(scenario: Scenario, count: int, pools: Pools, classifier: CentroidClassifier,
           evaluators: dict[str, WindowEvaluator], evidently: EvidentlyChecks | None, size: RunSize,
           prior_weights: np.ndarray, seed: int,
           nanny: NannyCBPE | None = None) -> tuple[dict[str, SignalTally], list[tuple]]:
    """Evaluate ``count`` seeded windows of one scenario.

    Returns the flagged windows per signal, and for each window the label-free
    accuracy estimate with the realized accuracy of the stand-in classifier and,
    on the first ``size.drift_windows`` windows when NannyML is installed,
    NannyML's CBPE estimate (None elsewhere).
    """
    tallies: dict[str, SignalTally] = {}
    estimates: list[list] = []
    nanny_windows: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    # The alarm that reaches on-call is the retrain trigger: K drifted windows in a row, K from the demo config.
    trigger = DEFAULTS.trigger
    policy = TriggerPolicy(trigger.consecutive_windows, min_labels=0, cooldown_s=0.0,
                           clear_windows=trigger.clear_windows)
    for index in range(count):
        pairs = window_pairs(scenario.name, pools, rng, prior_weights)
        probabilities = classifier.probabilities([text for text, _ in pairs])
        sampler = fill_sampler(pairs, classifier, seed=seed * 100_000 + index, probabilities=probabilities)
        sampled = [int(obs.event_id.rsplit("-", 1)[1]) for obs in sampler.sample]
        if nanny is not None and index < size.drift_windows:
            nanny_windows.append(probabilities[sampled])
        any_drift = {}
        for group, evaluator in evaluators.items():
            report = evaluator.evaluate(f"{scenario.name}-{index}", sampler)
            if group == "default" and report.accuracy_estimate is not None:
                gold = [pairs[position][1] for position in sampled]
                realized = float(np.mean([obs.predicted_label == label for obs, label in zip(sampler.sample, gold)]))
                estimates.append([report.accuracy_estimate, realized, None])
            for result in report.results:
                cpu_s = evaluator.detectors[result.signal].last_cpu_s
                tallies.setdefault(result.signal, SignalTally()).add(index, result.drifted, cpu_s)
            any_drift[group] = report.drifted
        tallies.setdefault("overall", SignalTally()).add(index, any_drift["default"], 0.0)
        decision = policy.observe(f"{scenario.name}-{index}", float(index), "ok", any_drift["default"],
                                  count_labelled=lambda since: 0, job_active=False, now=float(index))
        if decision.action == "trigger":
            policy.reset()
        tallies.setdefault("trigger", SignalTally()).add(index, decision.action == "trigger", 0.0)
        tallies.setdefault("overall_all", SignalTally()).add(index, any_drift["default"] or any_drift["optional"], 0.0)

        if evidently is None:
            continue
        texts = [text for text, _ in pairs]
        features = evaluators["default"].featurise(sampler)
        checks = [("ev_token_count", lambda: evidently.token_count(features.token_counts), count)]
        checks.append(("ev_text", lambda: evidently.text(texts), size.evidently_text_windows))
        checks.append(("ev_embeddings", lambda: evidently.embeddings(features.embeddings),
                       size.evidently_embedding_windows))
        for name, check, limit in checks:
            if index >= limit:
                continue
            started = time.process_time()
            drifted = check()
            tallies.setdefault(name, SignalTally()).add(index, drifted, time.process_time() - started)
    if nanny is not None:
        for row, value in zip(estimates, nanny.estimate(nanny_windows)):
            row[2] = value
    return tallies, estimates


# ---------------------------------------------------------------- timing line


def time_window_check(size: RunSize, seed: int = 0) -> dict:
    """Time one MMD window check, 1,000 current against 5,000 reference embeddings of 384 dimensions."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(5000, 384)).astype(np.float32)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    current = rng.normal(size=(1000, 384)).astype(np.float32)
    current[:, :8] += 0.1
    current /= np.linalg.norm(current, axis=1, keepdims=True)
    profile = ReferenceProfile.__new__(ReferenceProfile)
    profile.embeddings = reference

    from monitor.detectors.base import WindowFeatures

    window = WindowFeatures(token_counts=np.zeros(1000, dtype=np.int64), token_ids=[[] for _ in range(1000)],
                            embeddings=current, confidences=np.ones(1000), predicted_labels=["x"] * 1000,
                            n_total=1000, texts=[""] * 1000)
    timings = {}
    for label, detector in (
        ("driftloop_default", EmbeddingMMDDetector()),
        ("driftloop_5000_reference", EmbeddingMMDDetector(reference_sample=5000)),
    ):
        detector.fit(profile)
        started = time.perf_counter()
        result = detector.test(window)
        timings[label] = {"wall_s": time.perf_counter() - started, "method": result.details["method"],
                          "reference": result.details["reference_sample"], "drifted": result.drifted}
    if size.timing_evidently_embeddings:
        checks = EvidentlyChecks(profile_stub(), ["a"], reference)
        started = time.perf_counter()
        drifted = checks.embeddings(current)
        timings["evidently_embeddings_drift"] = {"wall_s": time.perf_counter() - started, "method": "model",
                                                 "reference": 5000, "drifted": drifted}
    return timings


def profile_stub() -> ReferenceProfile:
    stub = ReferenceProfile.__new__(ReferenceProfile)
    stub.token_counts = np.array([1, 2, 3])
    return stub


# ---------------------------------------------------------------- report


def per_1000(tally: SignalTally) -> float:
    return 1000.0 * tally.flagged / tally.windows if tally.windows else float("nan")


def delay_events(tally: SignalTally) -> str:
    if not tally.windows:
        return "-"
    if tally.first_flagged is None:
        return f"> {tally.windows * WINDOW_SIZE}"
    return str((tally.first_flagged + 1) * WINDOW_SIZE)


def format_cell(scenario: Scenario, tally: SignalTally | None) -> str:
    if tally is None or not tally.windows:
        return "-"
    if not scenario.drifted:
        return f"{per_1000(tally):.1f} ({tally.flagged}/{tally.windows})"
    return f"{tally.flagged / tally.windows:.2f} / {delay_events(tally)}"


def estimate_rows(estimates: dict[str, list[tuple]]) -> list[dict]:
    """Summarise, per scenario, the label-free accuracy estimates against the realized accuracy."""
    rows = []
    for scenario in SCENARIOS:
        entries = [entry for entry in estimates.get(scenario.name, []) if entry[0].estimate is not None]
        if not entries:
            continue
        estimated = np.array([estimate.estimate for estimate, _, _ in entries])
        realized = np.array([value for _, value, _ in entries])
        covered = np.mean([estimate.lower <= value <= estimate.upper for estimate, value, _ in entries])
        row = {"scenario": scenario.name, "windows": len(entries), "estimate": float(estimated.mean()),
               "realized": float(realized.mean()), "gap": float(estimated.mean() - realized.mean()),
               "window_gap": float(np.mean(np.abs(estimated - realized))), "covered": float(covered),
               "level": entries[0][0].level, "nanny_windows": 0}
        # NannyML ran on the first windows only, so its gap is against the realized accuracy of those windows.
        nanny = [(value, nanny_value) for _, value, nanny_value in entries if nanny_value is not None]
        if nanny:
            row.update({"nanny_windows": len(nanny),
                        "nanny_gap": float(np.mean([estimate - value for value, estimate in nanny])),
                        "ours_on_nanny_windows_gap": float(np.mean(
                            [entry[0].estimate - entry[1] for entry in entries if entry[2] is not None]))})
        rows.append(row)
    return rows


def render(results: dict[str, dict[str, SignalTally]], estimates: dict[str, list[tuple]], timings: dict, args,
           size: RunSize, elapsed_s: float, setup: dict) -> str:
    signals = list(DEFAULT_SIGNAL_ORDER) + ["overall", "trigger"] + list(OPTIONAL_SIGNAL_ORDER) + ["overall_all"]
    signals += list(EVIDENTLY_SIGNALS)
    lines = []
    command = "DRIFTLOOP_DATA=... HF_HUB_OFFLINE=1 .venv/bin/python bench/detection.py " + " ".join(args.argv)
    lines += [
        "# Detection benchmark",
        "",
        "Replays CLINC150 drift scenarios through driftloop's window detectors and through Evidently "
        f"{setup['evidently_version']} at its defaults, with fixed seeds. Produced by `bench/detection.py`.",
        "",
        "## What was run",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.date.today().isoformat()}; total run time {elapsed_s / 60:.1f} min.",
        f"- Machine: {os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}, {platform.machine()}.",
        f"- Mode: {'quick (smoke test)' if args.quick else 'full'}; window size {WINDOW_SIZE} events, "
        f"reservoir sample {SAMPLE_SIZE}, so every event of a window is tested.",
        f"- Windows per scenario: {size.stable_windows} stable, {size.drift_windows} per drift scenario. "
        f"Evidently text drift ran on the first {size.evidently_text_windows} windows of each scenario and "
        f"EmbeddingsDrift on the first {size.evidently_embedding_windows}, because each call costs seconds of "
        "CPU (last row of the results table; most of an EmbeddingsDrift call is a t-SNE plot). Evidently ValueDrift on "
        "token counts ran on every window.",
        f"- Reference: profile built with `monitor.reference.build_reference` from {setup['n_train']} training "
        f"texts of the 7 domains of config/demo.yaml ({setup['domains']}), 40 per intent as the demo uses, "
        f"with the tokenizer and embedder of the bundled all-MiniLM-L6-v2 (max_length 64, 1,000 embedded "
        f"texts). The profile's confidences come from {setup['n_profile_val']} validation texts (even "
        "positions of the validation split).",
        f"- Stable traffic: the other {setup['n_stable']} validation and test texts of the 7 domains, never "
        "used by the profile. Novel-domain texts: validation and test texts of the 3 other domains "
        f"({setup['n_novel']}). Out-of-scope texts: CLINC150 `oos_val` and `oos_test` ({setup['n_oos']}).",
        "- Detectors: `WindowEvaluator.evaluate` on a filled `WindowSampler`, at the built-in default config "
        f"with alpha {DEFAULTS.alpha:g} per window, Bonferroni over the p-value signals, and no effect floors. "
        f"The nulls of token_length, vocabulary and embedding are calibrated on "
        f"{DEFAULTS.detectors.calibration.windows} windows drawn from the profile's calibration pool of "
        f"validation texts, with an exponential tail over the top {DEFAULTS.detectors.calibration.tail_size}. "
        f"The novelty quantile is {DEFAULTS.detectors.novelty.quantile:g}. The default signals ("
        + ", ".join(DEFAULT_SIGNAL_ORDER) + ") form one evaluator. "
        "`overall` is its window verdict, and `trigger` counts the retrain triggers of the monitor's policy on "
        f"that verdict ({DEFAULTS.trigger.consecutive_windows} drifted windows in a row), the alarm that "
        "reaches on-call. Its detection rate is triggers per window, at most 1/K because the streak restarts "
        "after each trigger. The optional signals (domain_classifier, label_distribution) run in a second "
        f"evaluator on the same windows, with alpha {DEFAULTS.alpha:g} split between those two; `overall_all` "
        "flags a window when either evaluator does.",
        "- Embeddings: every text was embedded once with MiniLM and cached, and the evaluator's embedder "
        f"serves the cached vectors ({setup['n_embedded']} texts embedded in {setup['embed_s']:.0f} s).",
        "- Synthetic classifier output: predicted labels and confidences are not from a trained adapter. A "
        "nearest-centroid classifier on the MiniLM embeddings (softmax of "
        f"{CLASSIFIER_SCALE:g} x cosine similarity to each known intent's mean training embedding) stands "
        "in for it, on both the profile's validation texts and the window texts. The confidence and "
        "label_distribution results therefore measure this stand-in, not the demo's LoRA adapter. "
        f"Its accuracy on the stable pool is {setup['stand_in_accuracy']:.3f} and its mean confidence "
        f"{setup['stand_in_confidence']:.3f}.",
        "- Scenarios: " + "; ".join(f"`{s.name}`: {s.description}" for s in SCENARIOS) + ". Typos are one "
        "random letter swap, deletion, insertion or substitution in a word. In the prior shift, a seeded 21 "
        "of the 105 known intents receive half of the traffic instead of about a fifth.",
        "",
        "## Results",
        "",
        "Stable row: false alarms per 1,000 windows (flagged/windows). Drift rows: detection rate (power) at "
        f"{WINDOW_SIZE} events per window / detection delay in events, counted from the drift onset to the end of the "
        "first flagged window (\"> N\" means no window of the N events was flagged). Every drift stream starts "
        "drifted at event 0. The last row is the CPU time per window of each detector, in milliseconds "
        "(process time, featurisation excluded, mean over all windows it ran on).",
        "",
    ]
    lines.append("| scenario | " + " | ".join(signals) + " |")
    lines.append("|---|" + "---|" * len(signals))
    for scenario in SCENARIOS:
        tallies = results.get(scenario.name, {})
        lines.append(f"| {scenario.name} | " + " | ".join(format_cell(scenario, tallies.get(s)) for s in signals) + " |")
    cpu_cells = []
    for signal in signals:
        total = [t for tallies in results.values() for name, t in tallies.items() if name == signal]
        windows = sum(t.windows for t in total)
        cpu = sum(t.cpu_s for t in total)
        cpu_cells.append("-" if signal.startswith("overall") or not windows else f"{1000 * cpu / windows:.0f}")
    lines.append("| CPU ms/window | " + " | ".join(cpu_cells) + " |")
    lines += ["", "## Label-free accuracy estimate", ""]
    lines += [
        "Per scenario: the mean over windows of the CBPE-style estimate (monitor.accuracy_estimate, calibrated "
        "on the profile's validation predictions), and of the realized accuracy of the stand-in classifier on "
        "the same sampled events. Texts of unseen domains and out-of-scope texts are never correct. `gap` is "
        "estimate minus realized, `mean window gap` the mean absolute gap of single windows, and `covered` "
        "the share of windows whose realized accuracy lies inside the estimate's interval. A `length_x2` text joins "
        "two queries and counts as correct only for the first query's intent, so its realized accuracy understates "
        "the classifier.",
        "",
        "| scenario | windows | estimate | realized | gap | mean window gap | covered | "
        "NannyML CBPE gap (windows) | driftloop gap on those windows |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in estimate_rows(estimates):
        nanny = (f"{row['nanny_gap']:+.3f} ({row['nanny_windows']}) | {row['ours_on_nanny_windows_gap']:+.3f}"
                 if row["nanny_windows"] else "- | -")
        lines.append(f"| {row['scenario']} | {row['windows']} | {row['estimate']:.3f} | {row['realized']:.3f} | "
                     f"{row['gap']:+.3f} | {row['window_gap']:.3f} | {row['covered']:.2f} | {nanny} |")
    lines += ["", setup["nanny_note"]]
    lines += ["", "## One window check: 1,000 current against 5,000 reference embeddings", ""]
    lines += [
        "Synthetic unit-norm Gaussian embeddings of 384 dimensions (the current ones with a small mean shift), "
        "timed one after the other in the same process (wall time, one call each).",
        "",
        "| check | settings | reference points used | method | drifted | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    settings = {
        "driftloop_default": "EmbeddingMMDDetector() defaults: reference_sample 500, 200 permutations",
        "driftloop_5000_reference": "defaults except reference_sample=5000, so all 5,000 are used",
        "evidently_embeddings_drift": "EmbeddingsDrift defaults: model method, t-SNE plot included",
    }
    for name, timing in timings.items():
        lines.append(f"| {name} | {settings[name]} | {timing['reference']} | {timing['method']} | "
                     f"{timing['drifted']} | {timing['wall_s']:.2f} |")
    lines += ["", "## Targets", ""]
    lines += targets(results, timings, estimate_rows(estimates))
    return "\n".join(lines) + "\n"


def targets(results: dict[str, dict[str, SignalTally]], timings: dict, estimates: list[dict]) -> list[str]:
    lines = []
    stable = results.get("stable", {}).get("overall")
    if stable is not None and stable.windows:
        rate = per_1000(stable)
        met = rate <= TARGET_FALSE_ALARMS_PER_1000
        # With zero alarms in n windows, the one-sided 95% upper bound on the rate is about 3/n (rule of three).
        bound = 1000 * 3.0 / stable.windows
        lines.append(
            f"- At most {TARGET_FALSE_ALARMS_PER_1000:g} false alarm per 1,000 stable windows (default signals): "
            f"{rate:.1f} per 1,000 ({stable.flagged} of {stable.windows}). "
            + ("Met on this run" if met else f"Missed by {rate - TARGET_FALSE_ALARMS_PER_1000:.1f} per 1,000")
            + f". With {stable.windows} windows a rate of 1 per 1,000 cannot be confirmed: zero alarms would "
            f"still allow up to {bound:.1f} per 1,000 at 95% confidence."
        )
        triggers = results["stable"].get("trigger")
        if triggers is not None:
            lines.append(f"  Counting the alarm that reaches on-call, the retrain trigger ({triggers.flagged} in "
                         f"{triggers.windows} stable windows): {per_1000(triggers):.1f} per 1,000, "
                         + ("met on this run" if per_1000(triggers) <= TARGET_FALSE_ALARMS_PER_1000 else "missed")
                         + f", with the same {bound:.1f} per 1,000 bound on what {triggers.windows} windows can confirm.")
        every = results["stable"].get("overall_all")
        if every is not None:
            lines.append(f"  With the two optional signals also enabled: {per_1000(every):.1f} per 1,000 "
                         f"({every.flagged} of {every.windows}).")
    for scenario, limit in TARGET_DELAY_EVENTS.items():
        tally = results.get(scenario, {}).get("overall")
        if tally is None or not tally.windows:
            continue
        power = tally.flagged / tally.windows
        expected = WINDOW_SIZE / power if power else float("inf")
        first = delay_events(tally)
        # The verdict uses the expected delay, because one seeded stream's first flag can be a lucky hit
        # when the power per window is close to the false-alarm rate.
        verdict = "met" if expected <= limit else f"missed by {expected - limit:.0f} events"
        lines.append(
            f"- `{scenario}` detected within {limit} events (default signals): {verdict}. Power per window "
            f"is {power:.2f} ({tally.flagged} of {tally.windows}), so the expected delay with independent "
            f"windows is {expected:.0f} events. In this seeded stream the first flagged window ends at "
            f"{first} events."
        )
    if estimates:
        worst = max(estimates, key=lambda row: abs(row["gap"]))
        met = abs(worst["gap"]) <= TARGET_ESTIMATE_GAP
        lines.append(
            f"- Label-free accuracy estimate within {100 * TARGET_ESTIMATE_GAP:g} points of realized accuracy on "
            f"every scenario: " + ("met" if met else f"missed by {100 * (abs(worst['gap']) - TARGET_ESTIMATE_GAP):.1f} points")
            + f"; the largest gap is {100 * worst['gap']:+.1f} points on `{worst['scenario']}` (estimate "
            f"{worst['estimate']:.3f}, realized {worst['realized']:.3f}). "
            + ", ".join(f"`{row['scenario']}` {100 * row['gap']:+.1f}" for row in estimates if row is not worst) + "."
        )
    ours = timings.get("driftloop_5000_reference")
    theirs = timings.get("evidently_embeddings_drift")
    if ours and theirs:
        ratio = theirs["wall_s"] / ours["wall_s"]
        lines.append(
            f"- One window check at least {TARGET_SPEEDUP:g}x faster than Evidently EmbeddingsDrift: "
            f"{ratio:.1f}x with all 5,000 reference points ({ours['wall_s']:.2f} s against "
            f"{theirs['wall_s']:.2f} s), " + ("met" if ratio >= TARGET_SPEEDUP else "missed")
            + f"; {theirs['wall_s'] / timings['driftloop_default']['wall_s']:.1f}x with the default "
            "500-point reference sample."
        )
    elif ours:
        lines.append("- Speed target: not measured in this mode (Evidently EmbeddingsDrift skipped).")
    return lines


# ---------------------------------------------------------------- main


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few windows per scenario and no Evidently EmbeddingsDrift, for a smoke test")
    parser.add_argument("--out", default="docs/detection.md", help="Markdown file the results are written to")
    parser.add_argument("--stable-windows", type=int, help="stable windows to evaluate (overrides the mode)")
    parser.add_argument("--drift-windows", type=int, help="windows per drift scenario (overrides the mode)")
    parser.add_argument("--pool-limit", type=int,
                        help="maximum texts per window pool and in the validation half, for a fast smoke test. "
                             "The training set is always kept whole")
    parser.add_argument("--no-evidently", action="store_true", help="skip every Evidently check")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def run_size(args: argparse.Namespace) -> RunSize:
    base = QUICK if args.quick else FULL
    size = RunSize(**vars(base))
    if args.stable_windows is not None:
        size.stable_windows = args.stable_windows
    if args.drift_windows is not None:
        size.drift_windows = args.drift_windows
    if args.pool_limit is not None:
        size.pool_limit = args.pool_limit
    return size


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    size = run_size(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # NannyML sends usage events over the network unless this variable is set; the benchmark stays offline.
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    started = time.perf_counter()

    from transformers import AutoTokenizer
    import evidently

    pools = load_pools(size.pool_limit)
    model_path = resolve_model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    embedder = CachedEmbedder(Embedder(model_path))
    all_texts = [text for pool in (pools.train, pools.profile_val, pools.stable, pools.novel, pools.oos,
                                   pools.typo_10, pools.typo_30, pools.concatenated) for text, _ in pool]
    embed_started = time.perf_counter()
    embedder.warm(all_texts)
    embed_s = time.perf_counter() - embed_started
    logger.info("embedded %d texts in %.1f s", len(embedder.vectors), embed_s)

    classifier = CentroidClassifier(embedder, pools.train, pools.labels)
    val_texts = [text for text, _ in pools.profile_val]
    profile = build_reference(
        [text for text, _ in pools.train], val_texts, classifier.probabilities(val_texts), pools.labels,
        tokenizer, embedder, max_length=64, embedding_sample=1000, seed=0,
        val_gold_labels=[intent for _, intent in pools.profile_val],
    )
    evaluators = make_evaluators(profile, tokenizer, embedder)
    stable_probabilities = classifier.probabilities([text for text, _ in pools.stable])
    stable_predicted = [pools.labels[i] for i in stable_probabilities.argmax(axis=1)]
    setup = {
        "evidently_version": evidently.__version__,
        "domains": ", ".join(yaml.safe_load(DEMO_CONFIG.read_text())["data"]["clinc150"]["domains"]),
        "n_train": len(pools.train), "n_profile_val": len(pools.profile_val), "n_stable": len(pools.stable),
        "n_novel": len(pools.novel), "n_oos": len(pools.oos), "n_embedded": len(embedder.vectors),
        "embed_s": embed_s,
        "stand_in_accuracy": float(np.mean([p == g for p, (_, g) in zip(stable_predicted, pools.stable)])),
        "stand_in_confidence": float(stable_probabilities.max(axis=1).mean()),
    }

    evidently_checks = None
    if not args.no_evidently:
        evidently_checks = EvidentlyChecks(profile, embedded_reference_texts(profile, pools, embedder),
                                           profile.embeddings)

    nanny = None
    try:
        import nannyml
    except ImportError:
        setup["nanny_note"] = ("NannyML is not installed here, so its CBPE column is empty; `pip install "
                               "nannyml==0.13.1` beside the project's pins fills it.")
    else:
        nanny = NannyCBPE(pools.labels, classifier.probabilities(val_texts), [intent for _, intent in pools.profile_val])
        setup["nanny_note"] = (f"NannyML {nannyml.__version__} CBPE (accuracy, isotonic calibration per class) was "
                               "fitted on the same validation predictions and ran on the first "
                               f"{size.drift_windows} windows of each scenario, one chunk per window.")
    setup["nanny_note"] += (" Alibi Detect 0.13.0 does not install beside the project's pins: `pip install "
                            "--dry-run alibi-detect==0.13.0` in the project environment would replace numpy 2.4 "
                            "with 1.26 and transformers 5.25 with 4.57, so its MMDDrift is not compared.")

    prior_weights = prior_shift_weights(pools, seed=7)
    results = {}
    estimates = {}
    for number, scenario in enumerate(SCENARIOS):
        count = size.stable_windows if not scenario.drifted else size.drift_windows
        scenario_started = time.perf_counter()
        results[scenario.name], estimates[scenario.name] = replay(
            scenario, count, pools, classifier, evaluators, evidently_checks, size, prior_weights, seed=1000 + number,
            nanny=nanny)
        overall = results[scenario.name]["overall"]
        logger.info("%s: %d windows, %d flagged, %.0f s", scenario.name, count, overall.flagged,
                    time.perf_counter() - scenario_started)

    timings = time_window_check(size)
    logger.info("timing: %s", timings)
    if embedder.misses:
        logger.warning("%d texts were embedded during the replay instead of from the cache", embedder.misses)
    document = render(results, estimates, timings, args, size, time.perf_counter() - started, setup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document)
    logger.info("wrote %s", out)
    return out


def embedded_reference_texts(profile: ReferenceProfile, pools: Pools, embedder: CachedEmbedder) -> list[str]:
    """Return the training texts whose embeddings the profile stores, in the profile's order."""
    by_vector = {embedder.vectors[text].tobytes(): text for text, _ in pools.train}
    return [by_vector[row.tobytes()] for row in np.asarray(profile.embeddings, dtype=np.float32)]


if __name__ == "__main__":
    main()
