"""The whole loop on a small CLINC150 slice with the real MiniLM and real processes on loopback."""

import json

import pytest

from monitor.demo import Scenario, run_demo

pytestmark = pytest.mark.slow

SMALL_SLICE = {
    "data": {"clinc150": {"domains": ["banking", "travel", "home"]}, "per_label_limit": 15},
    "bootstrap": {"epochs": 5, "learning_rate": 0.005},
    "monitor": {"window_size": 80, "sample_size": 80, "check_interval_s": 1.0},
    "trigger": {"consecutive_windows": 2, "min_labels": 400, "cooldown_s": 30},
    "retrain": {"replay_per_label": 6, "training": {"epochs": 5, "learning_rate": 0.005},
                "sweep": {"ranks": [4, 8], "budget_steps": 20}},
    # The per-class gate keeps its defaults: with about 30 test texts a class, three changed predictions move
    # a class's F1 by 0.1, and the Holm-corrected test per class keeps such drops from counting.
    "canary": {"min_production_samples": 20, "shadow_sample": 80, "noninferiority_margin": 0.03},
}

SCENARIO = Scenario(
    phase1_events=320,
    post_swap_events=240,
    max_phase2_events=1500,
    new_domain_share=0.7,
    oos_share=0.0,
    label_fraction=0.9,
    events_per_second=40.0,
    timeout_s=600.0,
    new_domains=("utility", "work"),
)


@pytest.mark.timeout(1500)
def test_loop_closes_on_clinc150(tmp_path, clinc_dir):
    state = tmp_path / "state"
    overrides = dict(SMALL_SLICE, state_dir=str(state), cache_dir=str(tmp_path / "cache"))
    exit_code = run_demo("config/demo.yaml", overrides=overrides, scenario=SCENARIO)
    summary = json.loads((state / "summary.json").read_text())

    assert exit_code == 0
    assert summary["promoted_version"] == "v2"
    # Stable traffic raised no alarm; the shifted traffic did, within a few windows.
    assert summary["stable_windows"] >= 2
    assert summary["stable_windows_drifted"] == 0
    assert summary["events_to_detection"] is not None
    assert summary["events_to_detection"] <= 4 * 80
    # The swapped-in version learned the new domain on texts it never saw.
    new_before, new_after = summary["new_before"][0], summary["new_after"][0]
    assert new_after >= new_before + 0.3
    assert summary["run"]["canary"]["passed"] is True
