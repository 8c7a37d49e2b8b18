"""The post-promotion watch: figures pooled over windows, the verdict, and a rollback by a real daemon."""

import pytest
from prometheus_client import generate_latest

from monitor.config import PostPromotionConfig, parse_config
from monitor.errors import ConfigError
from monitor.promotion_watch import PASSED, ROLLBACK, WATCHING, LiveFigures, judge, pool_windows
from retrain.bootstrap import bootstrap
from retrain.jobs import approve_run
from tests.conftest import post_labelled_events, started_daemon, tiny_deployment_config

SETTINGS = PostPromotionConfig(events=1000, min_events=200, min_labelled=50)


def figures(events=400, confidence=0.8, estimate=0.8, accuracy=0.8, labelled=100):
    return LiveFigures(events=events, windows=2, mean_confidence=confidence, accuracy_estimate=estimate,
                       realized_accuracy=accuracy, labelled=labelled)


def window(window_id, n, confidence, estimate=None):
    return {"window_id": window_id, "n_events": n, "mean_confidence": confidence,
            "accuracy_estimate": {"estimate": estimate} if estimate is not None else None}


def test_pool_weights_windows_by_size_and_labels():
    accuracy = {"a": (10, 1.0), "b": (30, 0.5), "c": (0, None)}
    pooled = pool_windows([window("a", 100, 0.9, 0.8), window("b", 300, 0.5), window("c", 0, None)],
                          lambda window_id: accuracy[window_id])
    assert pooled.events == 400
    assert pooled.windows == 3
    assert pooled.mean_confidence == pytest.approx((100 * 0.9 + 300 * 0.5) / 400)
    assert pooled.accuracy_estimate == pytest.approx(0.8)
    assert pooled.realized_accuracy == pytest.approx((10 * 1.0 + 30 * 0.5) / 40)
    assert pooled.labelled == 40


def test_pool_of_no_windows_has_no_figures():
    pooled = pool_windows([], lambda window_id: (0, None))
    assert (pooled.events, pooled.mean_confidence, pooled.accuracy_estimate, pooled.realized_accuracy) == (0, None, None, None)


def test_no_judgement_before_min_events():
    verdict = judge(figures(), figures(events=100, confidence=0.1), SETTINGS)
    assert verdict.status == WATCHING


@pytest.mark.parametrize("field", ["confidence", "estimate", "accuracy"])
def test_one_worse_figure_rolls_back(field):
    verdict = judge(figures(), figures(**{field: 0.7}), SETTINGS)
    assert verdict.status == ROLLBACK
    assert len(verdict.reasons) == 1


def test_drop_within_limit_keeps_watching_then_passes():
    assert judge(figures(), figures(confidence=0.76), SETTINGS).status == WATCHING
    verdict = judge(figures(), figures(events=1000, confidence=0.76), SETTINGS)
    assert verdict.status == PASSED


def test_accuracy_waits_for_labels():
    verdict = judge(figures(), figures(accuracy=0.1, labelled=49), SETTINGS)
    assert verdict.status == WATCHING
    check = next(check for check in verdict.checks if check["figure"] == "realized_accuracy")
    assert not check["judged"]


def test_missing_baseline_figure_is_not_judged():
    baseline = figures(estimate=None, accuracy=None, labelled=0)
    verdict = judge(baseline, figures(events=1000, estimate=0.0, accuracy=0.0), SETTINGS)
    assert verdict.status == PASSED


def test_min_events_above_events_is_a_config_error():
    with pytest.raises(ConfigError, match="min_events"):
        parse_config({"post_promotion": {"events": 100, "min_events": 200}})


def test_negative_drop_is_a_config_error():
    with pytest.raises(ConfigError, match="max_confidence_drop"):
        parse_config({"post_promotion": {"max_confidence_drop": -0.1}})


# ------------------------------------------------------------------ through a daemon


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, clinc_dir):
    state = tmp_path_factory.mktemp("watch-state")
    raw = tiny_deployment_config(state, tiny_model_dir)
    raw["post_promotion"] = {"events": 80, "min_events": 40, "baseline_windows": 2, "max_confidence_drop": 0.2}
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    return config


def post_events(daemon, count, offset, confidence):
    """Post ``count`` unlabelled events whose top probability is ``confidence``."""
    labels = daemon.labels
    rest = (1.0 - confidence) / (len(labels) - 1)
    rows = []
    for i in range(count):
        probabilities = [rest] * len(labels)
        probabilities[i % len(labels)] = confidence
        rows.append({"id": f"watch-{offset + i}", "text": f"how do I send money to my landlord {offset + i}",
                     "probabilities": probabilities, "latency_ms": 4.0})
    assert not daemon.ingest_events({"events": rows}).errors


def promote_new_version(daemon, offset: int) -> str:
    post_labelled_events(daemon, 60, offset=offset)
    run_id = daemon.start_retrain({"reason": "test"}, actor="test")
    daemon.job_thread.join(timeout=120)
    assert daemon.store.get_run(run_id)["state"] == "pending_approval"
    approve_run(daemon.store, run_id, actor="alice")
    daemon.tick()
    return run_id


def test_worse_version_is_rolled_back(config):
    daemon = started_daemon(config)
    try:
        # Baseline: two windows of v1 at confidence 0.9.
        post_events(daemon, 80, 0, 0.9)
        daemon.tick()
        run_id = promote_new_version(daemon, 10_000)
        assert daemon.active_name == "v2"
        watch = daemon.store.watch("v2")
        assert watch["status"] == WATCHING
        assert watch["baseline"]["mean_confidence"] == pytest.approx(0.9, abs=0.01)
        assert "driftloop_post_promotion_watch_active 1.0" in generate_latest(daemon.metrics.registry).decode()

        # v2 answers at confidence 0.3: one window is enough to judge (min_events 40).
        post_events(daemon, 40, 1000, 0.3)
        daemon.tick()
        assert daemon.active_name == "v1"
        assert daemon.registry.active().name == "v1"
        assert daemon.store.watch("v2")["status"] == "rolled_back"
        assert daemon.store.get_run(run_id)["state"] == "rolled_back"
        rollback = [entry for entry in daemon.store.audit_log() if entry["action"] == "rollback"][-1]
        assert rollback["actor"] == "post_promotion_watch"
        assert "mean confidence fell" in rollback["detail"]["reason"]
        metrics = generate_latest(daemon.metrics.registry).decode()
        assert "driftloop_post_promotion_rollbacks_total 1.0" in metrics
        assert "driftloop_post_promotion_watch_active 0.0" in metrics
    finally:
        daemon.stop()


def test_version_as_good_as_baseline_passes(config):
    daemon = started_daemon(config)
    try:
        base = daemon.active_name
        post_events(daemon, 80, 2000, 0.6)
        daemon.tick()
        promote_new_version(daemon, 20_000)
        new = daemon.active_name
        assert new != base
        post_events(daemon, 80, 3000, 0.7)
        daemon.tick()
        assert daemon.active_name == new
        assert daemon.store.watch(new)["status"] == PASSED
        actions = [entry["action"] for entry in daemon.store.audit_log() if entry["version"] == new]
        assert "watch_started" in actions
        assert "watch_passed" in actions
    finally:
        daemon.stop()
