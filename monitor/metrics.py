"""Prometheus collectors of the monitor daemon, on an injected registry.

Names follow the Prometheus conventions: the ``driftloop_`` prefix, base units
(seconds, ratios from 0 to 1), ``_total`` on counters and labels with a fixed,
small set of values. Versions appear only as labels of info metrics. The
confidence and accuracy gauges start as NaN, so an alert rule that compares
them stays silent until a window has been evaluated. docs/metrics.md
documents every metric.
"""

from __future__ import annotations

import time
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info

from monitor.config import SIGNALS

RUN_STATES = (
    "idle",
    "queued",
    "training",
    "evaluating",
    "awaiting_data",
    "pending_approval",
    "approved",
    "promoting",
    "active",
    "rejected_by_gate",
    "rejected",
    "rolled_back",
    "superseded",
    "failed",
    "cancelling",
    "cancelled",
)
# Values of the outcome label of driftloop_retrain_runs_total, created at 0 so that
# increase() counts the first run that ends with each outcome.
RUN_OUTCOMES = ("promoted", "failed", "rejected_by_gate", "cancelled")
# Values of the status label of driftloop_canary_evaluations_total (see retrain.canary.decide).
CANARY_STATUSES = ("passed", "failed", "inconclusive")
WINDOW_STATUSES = ("drift", "no_drift", "insufficient_data")
# Quantiles of the model latency that each window report carries, as label values.
LATENCY_QUANTILES = {"0.5": "latency_p50_ms", "0.99": "latency_p99_ms"}
NAN = float("nan")


def package_version() -> str:
    """Return the installed driftloop version, or "unknown" when it is not installed as a package."""
    try:
        return metadata.version("driftloop")
    except metadata.PackageNotFoundError:
        return "unknown"


class MonitorMetrics:
    """The monitor sidecar's metrics; ``registry`` defaults to a new, private CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None, version: str | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("driftloop_build", "driftloop build information.", registry=r)
        self.build_info.info({"version": version or package_version()})
        self.active_version = Info("driftloop_active_version", "Adapter version the monitor compares against.", registry=r)

        # Ingest
        self.events_received = Counter("driftloop_events_received_total", "Prediction events accepted.", registry=r)
        self.events_rejected = Counter("driftloop_events_rejected_total", "Prediction events rejected as invalid.", registry=r)
        self.events_duplicate = Counter("driftloop_events_duplicate_total", "Prediction events ignored because their id was already stored.", registry=r)
        self.last_event_received = Gauge(
            "driftloop_last_event_received_timestamp_seconds",
            "Unix time of the last request that stored at least one new prediction event; the process start time "
            "until the first one.", registry=r)
        self.last_event_received.set(time.time())
        self.labels_received = Counter("driftloop_labels_received_total", "Delayed ground-truth labels accepted.", registry=r)
        self.labels_rejected = Counter("driftloop_labels_rejected_total", "Delayed labels rejected (invalid item, unknown label, or pending queue full).", registry=r)
        self.last_label_received = Gauge(
            "driftloop_last_label_received_timestamp_seconds",
            "Unix time of the last request that accepted at least one label; 0 until the first one.", registry=r)
        self.labels_pending = Gauge("driftloop_labels_pending", "Labels that arrived before their events and wait for them.", registry=r)
        self.labels_expired = Counter("driftloop_labels_expired_total", "Pending labels dropped because their event never arrived.", registry=r)
        self.retention_deleted = Counter(
            "driftloop_retention_deleted_total",
            "Stored records deleted because they were older than their database.*_retention_s setting, by record "
            "kind (unlabelled_event, labelled_event, window).", ["record"], registry=r)

        # Windows
        self.window_size = Gauge("driftloop_window_size_events", "Events per window (monitor.window_size).", registry=r)
        self.window_events = Gauge("driftloop_window_events", "Events in the window being filled.", registry=r)
        self.windows_pending = Gauge("driftloop_windows_pending", "Closed windows waiting for evaluation.", registry=r)
        self.windows_dropped = Counter("driftloop_windows_dropped_total", "Closed windows dropped because evaluation fell behind.", registry=r)
        self.windows_evaluated = Counter("driftloop_windows_evaluated_total", "Windows evaluated, by outcome.", ["status"], registry=r)
        for status in WINDOW_STATUSES:
            self.windows_evaluated.labels(status)
        self.last_window_evaluated = Gauge(
            "driftloop_last_window_evaluated_timestamp_seconds",
            "Unix time at which the last window was evaluated; 0 until the first one.", registry=r)
        self.evaluation_seconds = Histogram("driftloop_window_evaluation_seconds", "Wall time to evaluate one window.", registry=r,
                                            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))

        # Drift
        self.drift_statistic = Gauge("driftloop_drift_statistic", "Test statistic of the last evaluated window.", ["signal"], registry=r)
        self.drift_p_value = Gauge("driftloop_drift_p_value", "p-value of the last evaluated window (NaN where the signal has none).", ["signal"], registry=r)
        self.drift_threshold = Gauge(
            "driftloop_drift_threshold",
            "Value the signal was compared with in the last evaluated window: the Bonferroni-adjusted significance "
            "level for p-value signals, the maximum drop in mean confidence for the confidence signal.",
            ["signal"], registry=r)
        self.drift_detected = Gauge("driftloop_drift_detected", "1 when the signal drifted in the last evaluated window.", ["signal"], registry=r)
        for signal in SIGNALS:
            self.drift_detected.labels(signal).set(0)
        self.window_drifted = Gauge("driftloop_window_drifted", "1 when the last evaluated window drifted.", registry=r)
        self.consecutive_drift = Gauge("driftloop_consecutive_drift_windows", "Drifted windows in a row.", registry=r)
        self.trigger_windows = Gauge(
            "driftloop_retrain_trigger_windows", "Drifted windows in a row that trigger a retrain (trigger.consecutive_windows).",
            registry=r)

        # Confidence and accuracy
        self.mean_confidence = Gauge("driftloop_mean_confidence", "Mean max-softmax of the last evaluated window.", registry=r)
        self.mean_confidence.set(NAN)
        self.reference_confidence = Gauge("driftloop_reference_mean_confidence", "Mean max-softmax on the reference validation split.", registry=r)
        self.reference_confidence.set(NAN)
        self.latency = Gauge(
            "driftloop_prediction_latency_seconds",
            "Model latency reported by the events of the last evaluated window, by quantile (0.5, 0.99).",
            ["quantile"], registry=r)
        self.realized_accuracy = Gauge("driftloop_realized_accuracy", "Accuracy on labelled events of the last evaluated window.", registry=r)
        self.realized_accuracy.set(NAN)
        self.estimated_accuracy = Gauge("driftloop_estimated_accuracy", "Label-free accuracy estimate of the last evaluated window, by bound (estimate, lower, upper).", ["bound"], registry=r)
        self.reference_accuracy = Gauge(
            "driftloop_reference_accuracy",
            "Accuracy of the active version on the reference validation split, the baseline of the label-free estimate.",
            registry=r)
        self.reference_accuracy.set(NAN)
        self.accuracy_estimate_gap = Gauge("driftloop_accuracy_estimate_gap", "Estimated minus realized accuracy of the last window that had labelled events.", registry=r)
        self.accuracy_estimate_gap.set(NAN)

        # Retraining
        self.labels_needed = Gauge("driftloop_retrain_labels_needed", "Labelled events still missing before a triggered retrain can start.", registry=r)
        self.retrain_state = Enum("driftloop_retrain_state", "State of the latest retraining run.", states=list(RUN_STATES), registry=r)
        self.retrain_runs = Counter("driftloop_retrain_runs_total", "Retraining runs that ended, by outcome.", ["outcome"], registry=r)
        for outcome in RUN_OUTCOMES:
            self.retrain_runs.labels(outcome)
        self.retrain_step = Gauge("driftloop_retrain_step", "Optimiser step of the running retrain.", registry=r)
        self.retrain_loss = Gauge("driftloop_retrain_loss", "Training loss at the last reported step.", registry=r)
        self.retrain_val_loss = Gauge("driftloop_retrain_validation_loss", "Validation loss at the last evaluation of the running retrain.", registry=r)
        self.retrain_overfitting = Gauge("driftloop_retrain_overfitting", "1 when the latest retrain's training loss fell while its validation loss rose.", registry=r)
        self.retrain_eta = Gauge("driftloop_retrain_eta_seconds", "Estimated seconds left in the running retrain.", registry=r)
        self.canary_passed = Gauge("driftloop_canary_passed", "1 when the last canary passed its gates, 0 otherwise.", registry=r)
        self.canary_evaluations = Counter(
            "driftloop_canary_evaluations_total",
            "Canary evaluations of candidates, by status (passed, failed, inconclusive). An inconclusive candidate "
            "evaluated again counts again.", ["status"], registry=r)
        for status in CANARY_STATUSES:
            self.canary_evaluations.labels(status)

        # Approval and notifications
        self.pending_approvals = Gauge("driftloop_pending_approvals", "Runs waiting for approval.", registry=r)
        self.oldest_pending_approval_age = Gauge(
            "driftloop_oldest_pending_approval_age_seconds",
            "Seconds the longest-waiting run has been pending approval; 0 when no run waits.", registry=r)
        self.stale_approval_after = Gauge(
            "driftloop_stale_approval_after_seconds",
            "Seconds a run may wait for approval before its notification turns critical (notify.stale_approval_after_s).",
            registry=r)
        self.notifications = Counter(
            "driftloop_notifications_total", "Notifications delivered, by target type and event.",
            ["target_type", "event"], registry=r)
        self.notify_failures = Counter(
            "driftloop_notify_failures_total",
            "Notifications given up after their last attempt, or dropped because the queue was full, by target type and event.",
            ["target_type", "event"], registry=r)

        # Promotion and rollback
        self.promotions = Counter("driftloop_promotions_total", "Adapter versions promoted.", registry=r)
        self.rollbacks = Counter("driftloop_rollbacks_total", "Rollbacks to an earlier version.", registry=r)
        self.post_promotion_rollbacks = Counter(
            "driftloop_post_promotion_rollbacks_total",
            "Automatic rollbacks by the post-promotion watch, because the new version did worse than its baseline.",
            registry=r)
        self.post_promotion_watching = Gauge(
            "driftloop_post_promotion_watch_active", "1 while a newly promoted version is under its post-promotion watch.",
            registry=r)
        self.post_promotion_events = Gauge(
            "driftloop_post_promotion_watch_events", "Events of the watched version evaluated so far by the post-promotion watch.",
            registry=r)

    def record_config(self, config) -> None:
        """Export the settings that alert rules compare live values with."""
        self.window_size.set(config.monitor.window_size)
        self.trigger_windows.set(config.trigger.consecutive_windows)
        self.stale_approval_after.set(config.notify.stale_approval_after_s)

    def record_reference(self, mean_confidence: float | None, accuracy: float | None) -> None:
        """Export the active version's validation-split baselines; None becomes NaN."""
        self.reference_confidence.set(NAN if mean_confidence is None else mean_confidence)
        self.reference_accuracy.set(NAN if accuracy is None else accuracy)

    def record_window(self, report) -> None:
        self.last_window_evaluated.set(time.time())
        if report.status != "ok":
            status = report.status
        elif report.drifted:
            status = "drift"
        else:
            status = "no_drift"
        self.windows_evaluated.labels(status).inc()
        if report.status != "ok":
            return
        self.window_drifted.set(1 if report.drifted else 0)
        self.mean_confidence.set(report.mean_confidence)
        for quantile, field in LATENCY_QUANTILES.items():
            milliseconds = getattr(report, field)
            if milliseconds is not None:
                self.latency.labels(quantile).set(milliseconds / 1000.0)
        estimate = report.accuracy_estimate
        if estimate is not None and estimate.estimate is not None:
            self.estimated_accuracy.labels("estimate").set(estimate.estimate)
            self.estimated_accuracy.labels("lower").set(estimate.lower)
            self.estimated_accuracy.labels("upper").set(estimate.upper)
        for result in report.results:
            if result.statistic is not None:
                self.drift_statistic.labels(result.signal).set(result.statistic)
            self.drift_p_value.labels(result.signal).set(result.p_value if result.p_value is not None else NAN)
            if result.threshold is not None:
                self.drift_threshold.labels(result.signal).set(result.threshold)
            self.drift_detected.labels(result.signal).set(1 if result.drifted else 0)
