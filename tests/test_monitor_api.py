"""The monitor's HTTP surface on a bootstrapped tiny model: ingest, labels, bad input, auth."""

import math

import pytest
from fastapi.testclient import TestClient

from monitor.api import create_app
from monitor.config import parse_config
from monitor.daemon import MonitorDaemon
from retrain.bootstrap import bootstrap

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir, clinc_dir):
    state = tmp_path_factory.mktemp("monitor-state")
    raw = {
        "state_dir": str(state),
        "model": {"base": str(tiny_model_dir), "max_length": 32},
        "embedding": {"model": str(tiny_model_dir)},
        "data": {"clinc150": {"domains": ["banking", "travel"]}, "per_label_limit": 5},
        "bootstrap": {"epochs": 1},
        "monitor": {"window_size": 40, "sample_size": 40, "check_interval_s": 3600, "max_batch": 50},
        "detectors": {"embedding": {"reference_sample": 60}},
    }
    config = parse_config(raw)
    bootstrap(config, log=lambda message: None)
    return config


@pytest.fixture()
def daemon(config, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_API_TOKEN", TOKEN)
    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    assert daemon.ready, daemon.startup_error
    yield daemon
    daemon.stop()


@pytest.fixture()
def client(daemon):
    return TestClient(create_app(daemon))


def make_event(daemon, index, **changes):
    labels = daemon.labels
    probabilities = [0.0] * len(labels)
    probabilities[index % len(labels)] = 0.7
    probabilities[(index + 1) % len(labels)] = 0.3
    event = {
        "id": f"e-{index}-{id(daemon)}",
        "timestamp": 1_700_000_000 + index,
        "text": f"what is my balance number {index}",
        "probabilities": probabilities,
        "latency_ms": 12.5,
        "version": "v1",
    }
    event.update(changes)
    return event


def test_health_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["active_version"] == "v1"


def test_valid_events_accepted(client, daemon):
    events = [make_event(daemon, i) for i in range(5)]
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 200
    assert response.json() == {"accepted": 5, "duplicates": 0, "rejected": []}
    assert daemon.window.sampler.count == 5


def test_resent_batch_is_deduplicated(client, daemon):
    events = [make_event(daemon, 100 + i) for i in range(3)]
    client.post("/v1/events", json={"events": events})
    again = client.post("/v1/events", json={"events": events}).json()
    assert again["accepted"] == 0
    assert again["duplicates"] == 3


def test_top_label_with_confidence_accepted(client, daemon):
    event = make_event(daemon, 200, probabilities=None, label=daemon.labels[0], confidence=0.8)
    assert client.post("/v1/events", json={"events": [event]}).status_code == 200


BAD_EVENTS = [
    ("nan-probability", {"probabilities": "nan"}, "probabilities[0]"),
    ("negative-probability", {"probabilities": "negative"}, "probabilities[0]"),
    ("not-normalised", {"probabilities": "half"}, "probabilities"),
    ("boolean-probability", {"probabilities": "one-hot-true"}, "probabilities[0]"),
    ("string-probability", {"probabilities": "string"}, "probabilities[0]"),
    ("integer-beyond-float", {"probabilities": "huge"}, "probabilities[0]"),
    ("latency-beyond-float", {"latency_ms": 10**400}, "latency_ms"),
    ("wrong-length", {"probabilities": [1.0]}, "probabilities"),
    ("empty-text", {"text": "   "}, "text"),
    ("missing-id", {"id": None}, "id"),
    ("negative-latency", {"latency_ms": -3}, "latency_ms"),
    ("bad-timestamp", {"timestamp": "yesterday"}, "timestamp"),
    ("unknown-label", {"probabilities": None, "label": "no_such_intent", "confidence": 0.5}, "label"),
    ("confidence-above-one", {"probabilities": None, "label": "oos", "confidence": 1.5}, "confidence"),
    ("no-prediction", {"probabilities": None}, "probabilities"),
]


@pytest.mark.parametrize("changes, field", [case[1:] for case in BAD_EVENTS], ids=[case[0] for case in BAD_EVENTS])
def test_bad_event_rejected_rest_kept(client, daemon, changes, field):
    bad = make_event(daemon, 300)
    if changes.get("probabilities") == "nan":
        bad["probabilities"] = [math.nan] + bad["probabilities"][1:]
        changes = {}
    elif changes.get("probabilities") == "negative":
        bad["probabilities"] = [-0.1] + bad["probabilities"][1:]
        changes = {}
    elif changes.get("probabilities") == "half":
        bad["probabilities"] = [value / 2 for value in bad["probabilities"]]
        changes = {}
    elif changes.get("probabilities") in ("one-hot-true", "string", "huge"):
        first = {"one-hot-true": True, "string": "1", "huge": 10**400}[changes["probabilities"]]
        bad["probabilities"] = [first] + [0] * (len(bad["probabilities"]) - 1)
        changes = {}
    bad.update(changes)
    good = make_event(daemon, 301 + len(field))
    # Starlette's JSON encoder rejects NaN, so serialise by hand as a client library would.
    import json

    body = json.dumps({"events": [bad, good]})
    response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    payload = response.json()
    assert payload["accepted"] == 1
    assert len(payload["rejected"]) == 1
    rejected = payload["rejected"][0]
    assert rejected["field"] == f"events[0].{field}"
    assert rejected["index"] == 0
    assert rejected["error"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "body, status, field",
    [
        ("not json", 400, "body"),
        ("[1, 2]", 422, "body"),
        ('{"event": []}', 422, "events"),
        ('{"events": []}', 422, "events"),
        ('{"events": {"id": 1}}', 422, "events"),
    ],
    ids=["invalid-json", "list-body", "missing-events", "empty-events", "events-not-list"],
)
def test_malformed_request(client, body, status, field):
    response = client.post("/v1/events", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["field"] == field


def test_oversized_batch(client, daemon):
    events = [make_event(daemon, 1000 + i) for i in range(51)]
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 422
    assert "51 items, at most 50" in response.json()["error"]


def test_unread_event_fields_reported(client, daemon, caplog):
    """A misspelt optional field is reported and logged, and the event is still stored."""
    events = [make_event(daemon, 1100 + i, latency_ms=None, latency=9.0) for i in range(3)]
    events[0]["request_id"] = "r-1"
    response = client.post("/v1/events", json={"events": events})
    assert response.status_code == 200
    payload = response.json()
    assert payload["accepted"] == 3
    assert payload["ignored_fields"] == {"latency": 3, "request_id": 1}
    assert list(payload["ignored_fields"]) == ["latency", "request_id"]
    assert "events carry fields that driftloop does not read, so they are ignored: latency, request_id" in caplog.text

    caplog.clear()
    client.post("/v1/events", json={"events": [make_event(daemon, 1110, latency=9.0)]})
    assert "does not read" not in caplog.text


def test_unread_label_fields_reported(client, daemon):
    event = make_event(daemon, 1200)
    client.post("/v1/events", json={"events": [event]})
    response = client.post("/v1/labels", json={"labels": [{"id": event["id"], "lable": daemon.labels[1]}]})
    assert response.status_code == 422
    payload = response.json()
    assert payload["ignored_fields"] == {"lable": 1}
    assert payload["rejected"][0]["field"] == "labels[0].label"


def test_ignored_field_names_are_bounded():
    from monitor.ingest import MAX_FIELD_NAME_CHARS, MAX_IGNORED_FIELD_NAMES, validate_labels

    item = {"id": "e-1", "label": "a", **{f"extra_{i}": i for i in range(MAX_IGNORED_FIELD_NAMES + 5)}, "x" * 500: 1}
    result = validate_labels({"labels": [item]}, ["a"], max_items=10)
    assert len(result.ignored_fields) == MAX_IGNORED_FIELD_NAMES
    assert all(len(name) <= MAX_FIELD_NAME_CHARS for name in result.ignored_fields)
    assert result.valid == {"e-1": "a"}


def test_long_rejected_id_is_shortened(client, daemon):
    event = make_event(daemon, 1300, id="x" * 129)
    rejected = client.post("/v1/events", json={"events": [event]}).json()["rejected"][0]
    assert rejected["field"] == "events[0].id"
    assert rejected["value"] == "x" * 77 + "..."
    assert rejected["id"] == "x" * 77 + "..."


def test_labels_join_by_event_id(client, daemon):
    event = make_event(daemon, 2000)
    client.post("/v1/events", json={"events": [event]})
    response = client.post("/v1/labels", json={"labels": [{"id": event["id"], "label": daemon.labels[3]}]})
    assert response.status_code == 200
    assert response.json()["accepted"] == 1
    assert daemon.store.count_labelled() >= 1


def test_labels_bad_items(client, daemon):
    event = make_event(daemon, 2100)
    client.post("/v1/events", json={"events": [event]})
    response = client.post("/v1/labels", json={"labels": [
        {"id": event["id"], "label": "not_a_label"},
        {"id": event["id"]},
        {"id": "", "label": daemon.labels[0]},
        {"id": event["id"], "label": daemon.labels[1]},
    ]})
    assert response.status_code == 422
    payload = response.json()
    assert payload["accepted"] == 1
    assert payload["pending"] == 0
    errors = {error["field"]: error for error in payload["rejected"]}
    assert sorted(errors) == ["labels[0].label", "labels[1].label", "labels[2].id"]
    assert errors["labels[0].label"]["value"] == "not_a_label"
    assert "unknown label" in errors["labels[0].label"]["error"]
    assert errors["labels[1].label"]["error"] == "missing field 'label'"
    assert errors["labels[2].id"]["index"] == 2


def test_label_before_event_waits_for_it(client, daemon):
    event = make_event(daemon, 2200)
    labelled_before = daemon.store.count_labelled()
    early = client.post("/v1/labels", json={"labels": [{"id": event["id"], "label": daemon.labels[2]}]})
    assert early.status_code == 200
    assert early.json() == {"accepted": 0, "pending": 1, "rejected": []}
    assert "driftloop_labels_pending 1.0" in client.get("/metrics").text

    assert client.post("/v1/events", json={"events": [event]}).status_code == 200
    assert daemon.store.count_labelled() == labelled_before + 1
    assert daemon.store.count_pending_labels() == 0
    assert "driftloop_labels_pending 0.0" in client.get("/metrics").text


def test_pending_labels_expire(client, daemon):
    client.post("/v1/labels", json={"labels": [{"id": "never-posted-2300", "label": daemon.labels[0]}]})
    waiting = daemon.store.count_pending_labels()
    assert waiting >= 1
    daemon.config = daemon.config.model_copy(
        update={"monitor": daemon.config.monitor.model_copy(update={"pending_label_ttl_s": 1e-6})}
    )
    daemon.tick()
    assert daemon.store.count_pending_labels() == 0
    assert f"driftloop_labels_expired_total {float(waiting)}" in client.get("/metrics").text


def test_pending_label_queue_limit(client, daemon):
    daemon.config = daemon.config.model_copy(
        update={"monitor": daemon.config.monitor.model_copy(update={"max_pending_labels": 1})}
    )
    response = client.post("/v1/labels", json={"labels": [
        {"id": "early-2400", "label": daemon.labels[0]},
        {"id": "early-2401", "label": daemon.labels[0]},
    ]})
    assert response.status_code == 422
    payload = response.json()
    assert payload["pending"] == 1
    assert len(payload["rejected"]) == 1
    rejected = payload["rejected"][0]
    assert rejected["field"] == "labels[1].id"
    assert rejected["value"] == "early-2401"
    assert "monitor.max_pending_labels" in rejected["error"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "timestamp, message",
    [
        (1_733_300_000_000, "looks like milliseconds"),
        ("2024-12-04T10:00:00", "without a time zone"),
    ],
    ids=["milliseconds", "naive-iso"],
)
def test_implausible_timestamp_rejected(client, daemon, timestamp, message):
    response = client.post("/v1/events", json={"events": [make_event(daemon, 2500, timestamp=timestamp)]})
    assert response.status_code == 422
    rejected = response.json()["rejected"][0]
    assert rejected["field"] == "events[0].timestamp"
    assert rejected["value"] == timestamp
    assert message in rejected["error"]


def test_window_closes_at_exact_size(client, daemon):
    events = [make_event(daemon, 2600 + i) for i in range(50)]
    assert client.post("/v1/events", json={"events": events}).status_code == 200
    assert len(daemon.pending) == 1
    closed = daemon.pending[0]
    assert closed.sampler.count == 40
    assert daemon.window.sampler.count == 10
    daemon.tick()
    windows = client.get("/v1/windows").json()["windows"]
    assert windows[0]["window_id"] == closed.id
    assert windows[0]["n_events"] == 40


def test_window_closes_and_is_evaluated(client, daemon):
    events = [make_event(daemon, 3000 + i, text=f"i need to check the balance of account {i}") for i in range(40)]
    client.post("/v1/events", json={"events": events})
    assert len(daemon.pending) == 1
    daemon.tick()
    windows = client.get("/v1/windows").json()["windows"]
    assert windows
    assert windows[0]["n_events"] == 40
    assert windows[0]["status"] in ("ok", "insufficient_data")
    metrics = client.get("/metrics").text
    assert "driftloop_windows_evaluated_total" in metrics
    assert "driftloop_events_received_total" in metrics


def test_window_report_pages(client, daemon):
    events = [make_event(daemon, 3500 + i, text=f"how much do i owe on card {i}") for i in range(40)]
    client.post("/v1/events", json={"events": events})
    daemon.tick()
    window_id = client.get("/v1/windows").json()["windows"][0]["window_id"]

    quick = client.get(f"/v1/windows/{window_id}/report", params={"evidently": "false"})
    assert quick.status_code == 200
    assert quick.headers["content-type"].startswith("text/html")
    assert f"driftloop window {window_id}" in quick.text
    assert "<h2>Signals</h2>" in quick.text
    assert "p-value &lt; " in quick.text
    assert "statistic (drop in mean confidence) &gt;= 0.1" in quick.text
    assert "Evidently" not in quick.text

    full = client.get(f"/v1/windows/{window_id}/report")
    assert full.status_code == 200
    assert "Evidently data drift" in full.text
    assert "<iframe srcdoc=" in full.text

    missing = client.get("/v1/windows/w-nope/report")
    assert missing.status_code == 404
    assert "'w-nope' not found" in missing.json()["error"]


def test_cli_report_writes_file(client, daemon, config, tmp_path, capsys):
    import yaml

    from monitor.cli import main

    events = [make_event(daemon, 3600 + i) for i in range(40)]
    client.post("/v1/events", json={"events": events})
    daemon.tick()
    window_id = client.get("/v1/windows").json()["windows"][0]["window_id"]
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    output = tmp_path / "report.html"

    assert main(["report", "--config", str(config_file), "--window", window_id, "--output", str(output),
                 "--no-evidently"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert window_id in output.read_text()
    assert main(["report", "--config", str(config_file), "--window", "w-nope"]) == 2
    assert "'w-nope' not found" in capsys.readouterr().err


def test_write_endpoints_need_token(client):
    assert client.post("/v1/rollback", json={}).status_code == 401
    wrong = client.post("/v1/rollback", json={}, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    assert client.post("/v1/retrains/nope/approve", json={}).status_code == 401


def test_approve_unknown_run_with_token(client):
    response = client.post("/v1/retrains/nope/approve", json={"comment": "ok"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


@pytest.mark.parametrize("path", ["/v1/retrains/nope/approve", "/v1/retrains/nope/reject", "/v1/rollback"])
def test_decision_with_invalid_json(client, path):
    response = client.post(path, content=b'{"by": "ml-owner",',
                           headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert "invalid JSON" in response.json()["error"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("path, body, field, message", [
    ("/v1/rollback", {"version": "v1"}, "version", "unknown field; this endpoint accepts by, comment, to"),
    ("/v1/rollback", {"to": 1}, "to", "expected a string, got int"),
    ("/v1/retrains/nope/approve", {"by": "ml-owner", "coment": "ok"}, "coment", "accepts by, comment"),
    ("/v1/retrains/nope/reject", {"comment": ["too", "many"]}, "comment", "expected a string, got list"),
])
def test_decision_body_checked(client, daemon, path, body, field, message):
    active = daemon.active_name
    response = client.post(path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert message in response.json()["error"]
    assert daemon.active_name == active


def test_rollback_to_unknown_version(client):
    response = client.post("/v1/rollback", json={"to": "v99"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404
    assert "'v99' not found" in response.json()["error"]


def test_rollback_without_previous_version(client):
    response = client.post("/v1/rollback", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert "no earlier version" in response.json()["error"]


def test_profile_without_pool_is_rebuilt(config, monkeypatch, caplog):
    import numpy as np

    from monitor.reference import ReferenceProfile

    monkeypatch.setenv("DRIFTLOOP_API_TOKEN", TOKEN)
    first = MonitorDaemon(config)
    first.start(background=False)
    profile_dir = first.registry.profile_dir(first.active_name)
    first.stop()
    # Remove the calibration pool, as in a profile saved before the pool existed.
    with np.load(profile_dir / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files if not name.startswith("pool_")}
    np.savez_compressed(profile_dir / "arrays.npz", **arrays)
    assert not ReferenceProfile.load(profile_dir).has_calibration_pool

    second = MonitorDaemon(config)
    with caplog.at_level("INFO", logger="monitor.daemon"):
        second.start(background=False)
    try:
        assert second.ready, second.startup_error
        assert "has no calibration pool; rebuilding it" in caplog.text
        assert ReferenceProfile.load(profile_dir).has_calibration_pool
        assert "novelty" in second.evaluator.detectors
    finally:
        second.stop()
