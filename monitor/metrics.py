"""Prometheus collectors of the monitor daemon, on an injected registry."""

from __future__ import annotations

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


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0.1.0"):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("driftloop_build", "driftloop build information.", registry=r)
        self.build_info.info({"version": version})
        self.active_version = Info("driftloop_active_version", "Adapter version the monitor compares against.", registry=r)

        self.events_received = Counter("driftloop_events_received_total", "Prediction events accepted.", registry=r)
        self.events_rejected = Counter("driftloop_events_rejected_total", "Prediction events rejected as invalid.", registry=r)
        self.events_duplicate = Counter("driftloop_events_duplicate_total", "Prediction events ignored because their id was already stored.", registry=r)
        self.labels_received = Counter("driftloop_labels_received_total", "Delayed ground-truth labels accepted.", registry=r)
        self.labels_rejected = Counter("driftloop_labels_rejected_total", "Delayed labels rejected (invalid item, unknown label, or pending queue full).", registry=r)
        self.labels_pending = Gauge("driftloop_labels_pending", "Labels that arrived before their events and wait for them.", registry=r)
        self.labels_expired = Counter("driftloop_labels_expired_total", "Pending labels dropped because their event never arrived.", registry=r)
        self.windows_dropped = Counter("driftloop_windows_dropped_total", "Closed windows dropped because evaluation fell behind.", registry=r)

        self.window_events = Gauge("driftloop_window_events", "Events in the window being filled.", registry=r)
        self.windows_evaluated = Counter("driftloop_windows_evaluated_total", "Windows evaluated, by outcome.", ["status"], registry=r)
        for status in ("drift", "no_drift", "insufficient_data"):
            self.windows_evaluated.labels(status)
        self.evaluation_seconds = Histogram("driftloop_window_evaluation_seconds", "CPU wall time to evaluate one window.", registry=r,
                                            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30))

        self.drift_statistic = Gauge("driftloop_drift_statistic", "Test statistic of the last evaluated window.", ["signal"], registry=r)
        self.drift_p_value = Gauge("driftloop_drift_p_value", "p-value of the last evaluated window (NaN where the signal has none).", ["signal"], registry=r)
        self.drift_detected = Gauge("driftloop_drift_detected", "1 when the signal drifted in the last evaluated window.", ["signal"], registry=r)
        for signal in SIGNALS:
            self.drift_detected.labels(signal).set(0)
        self.window_drifted = Gauge("driftloop_window_drifted", "1 when the last evaluated window drifted.", registry=r)
        self.consecutive_drift = Gauge("driftloop_consecutive_drift_windows", "Drifted windows in a row.", registry=r)

        self.mean_confidence = Gauge("driftloop_mean_confidence", "Mean max-softmax of the last evaluated window.", registry=r)
        self.reference_confidence = Gauge("driftloop_reference_mean_confidence", "Mean max-softmax on the reference validation split.", registry=r)
        self.latency_p50 = Gauge("driftloop_prediction_latency_p50_seconds", "Median model latency in the last window.", registry=r)
        self.latency_p99 = Gauge("driftloop_prediction_latency_p99_seconds", "99th percentile model latency in the last window.", registry=r)
        self.realized_accuracy = Gauge("driftloop_realized_accuracy", "Accuracy on labelled events of the last evaluated window.", registry=r)
        self.estimated_accuracy = Gauge("driftloop_estimated_accuracy", "Label-free accuracy estimate of the last evaluated window, by bound (estimate, lower, upper).", ["bound"], registry=r)
        self.accuracy_estimate_gap = Gauge("driftloop_accuracy_estimate_gap", "Estimated minus realized accuracy of the last window that had labelled events.", registry=r)

        self.labels_needed = Gauge("driftloop_retrain_labels_needed", "Labelled events still missing before a triggered retrain can start.", registry=r)
        self.retrain_state = Enum("driftloop_retrain_state", "State of the latest retraining run.", states=list(RUN_STATES), registry=r)
        self.retrain_runs = Counter("driftloop_retrain_runs_total", "Retraining runs that ended, by outcome.", ["outcome"], registry=r)
        self.retrain_step = Gauge("driftloop_retrain_step", "Optimiser step of the running retrain.", registry=r)
        self.retrain_loss = Gauge("driftloop_retrain_loss", "Training loss at the last reported step.", registry=r)
        self.retrain_val_loss = Gauge("driftloop_retrain_validation_loss", "Validation loss at the last evaluation of the running retrain.", registry=r)
        self.retrain_overfitting = Gauge("driftloop_retrain_overfitting", "1 when the latest retrain's training loss fell while its validation loss rose.", registry=r)
        self.retrain_eta = Gauge("driftloop_retrain_eta_seconds", "Estimated seconds left in the running retrain.", registry=r)
        self.canary_passed = Gauge("driftloop_canary_passed", "1 when the last canary passed its gates, 0 otherwise.", registry=r)
        self.pending_approvals = Gauge("driftloop_pending_approvals", "Runs waiting for approval.", registry=r)
        self.oldest_pending_approval_age = Gauge(
            "driftloop_oldest_pending_approval_age_seconds",
            "Seconds the longest-waiting run has been pending approval; 0 when no run waits.", registry=r)
        self.notifications = Counter(
            "driftloop_notifications_total", "Notifications delivered, by target type and event.",
            ["target_type", "event"], registry=r)
        self.notify_failures = Counter(
            "driftloop_notify_failures_total",
            "Notifications given up after their last attempt, or dropped because the queue was full, by target type and event.",
            ["target_type", "event"], registry=r)
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

    def record_window(self, report) -> None:
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
        if report.latency_p50_ms is not None:
            self.latency_p50.set(report.latency_p50_ms / 1000.0)
        if report.latency_p99_ms is not None:
            self.latency_p99.set(report.latency_p99_ms / 1000.0)
        estimate = report.accuracy_estimate
        if estimate is not None and estimate.estimate is not None:
            self.estimated_accuracy.labels("estimate").set(estimate.estimate)
            self.estimated_accuracy.labels("lower").set(estimate.lower)
            self.estimated_accuracy.labels("upper").set(estimate.upper)
        for result in report.results:
            if result.statistic is not None:
                self.drift_statistic.labels(result.signal).set(result.statistic)
            self.drift_p_value.labels(result.signal).set(result.p_value if result.p_value is not None else float("nan"))
            self.drift_detected.labels(result.signal).set(1 if result.drifted else 0)
