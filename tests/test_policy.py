from monitor.policy import TriggerPolicy


def observe(policy, drifted, labelled=500, status="ok", job_active=False, now=1000.0, started_at=900.0):
    return policy.observe("w", started_at, status, drifted, count_labelled=lambda since: labelled,
                          job_active=job_active, now=now)


def test_trigger_after_consecutive_windows():
    policy = TriggerPolicy(consecutive_windows=2, min_labels=100, cooldown_s=0)
    assert observe(policy, True).action == "none"
    assert observe(policy, True).action == "trigger"


def test_clean_window_breaks_streak():
    policy = TriggerPolicy(2, 100, 0)
    observe(policy, True)
    observe(policy, False)
    assert observe(policy, True).action == "none"


def test_insufficient_window_keeps_streak():
    policy = TriggerPolicy(2, 100, 0)
    observe(policy, True)
    observe(policy, False, status="insufficient_data")
    assert observe(policy, True).action == "trigger"


def test_needs_labels_says_how_many():
    policy = TriggerPolicy(1, 300, 0)
    decision = observe(policy, True, labelled=120)
    assert decision.action == "needs_labels"
    assert decision.labels_needed == 180
    assert "180" in decision.reason


def test_busy_and_cooldown():
    policy = TriggerPolicy(1, 10, cooldown_s=60)
    assert observe(policy, True, job_active=True).action == "busy"
    policy.run_ended(at=1000.0)
    assert observe(policy, True, now=1030.0).action == "cooldown"
    assert observe(policy, True, now=1100.0).action == "trigger"


def test_labels_counted_from_streak_start():
    policy = TriggerPolicy(2, 10, 0)
    seen = []

    def count(since):
        seen.append(since)
        return 50

    policy.observe("w1", 100.0, "ok", True, count_labelled=count, job_active=False, now=200.0)
    decision = policy.observe("w2", 150.0, "ok", True, count_labelled=count, job_active=False, now=200.0)
    assert decision.action == "trigger"
    assert seen == [100.0]


def test_hysteresis_keeps_streak_through_one_clean_window():
    policy = TriggerPolicy(3, 100, 0, clear_windows=2)
    observe(policy, True)
    observe(policy, True)
    decision = observe(policy, False)
    assert decision.action == "none"
    assert decision.streak == 2
    assert observe(policy, True).action == "trigger"


def test_hysteresis_ends_streak_after_clear_windows():
    policy = TriggerPolicy(3, 100, 0, clear_windows=2)
    observe(policy, True)
    observe(policy, True)
    observe(policy, False)
    assert observe(policy, False).streak == 0
    assert observe(policy, True).action == "none"
    assert policy.streak == 1


def test_recheck_triggers_when_labels_arrive():
    policy = TriggerPolicy(2, 300, 0)
    observe(policy, True, labelled=10)
    assert policy.recheck(count_labelled=lambda since: 500, job_active=False, now=1000.0).action == "none"

    assert observe(policy, True, labelled=10).action == "needs_labels"
    waiting = policy.recheck(count_labelled=lambda since: 250, job_active=False, now=1001.0)
    assert waiting.action == "needs_labels"
    assert waiting.labels_needed == 50
    assert policy.recheck(count_labelled=lambda since: 300, job_active=False, now=1002.0).action == "trigger"


def test_recheck_waits_out_cooldown():
    policy = TriggerPolicy(1, 10, cooldown_s=60)
    policy.run_ended(at=1000.0)
    assert observe(policy, True, now=1010.0).action == "cooldown"
    assert policy.recheck(count_labelled=lambda since: 500, job_active=False, now=1050.0).action == "cooldown"
    assert policy.recheck(count_labelled=lambda since: 500, job_active=False, now=1061.0).action == "trigger"
