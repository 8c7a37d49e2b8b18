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
        "detectors": {"vocabulary": {"null_windows": 30}, "embedding": {"permutations": 30, "reference_sample": 60}},
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
        {"id": "never-posted", "label": daemon.labels[0]},
        {"id": event["id"], "label": daemon.labels[1]},
    ]})
    assert response.status_code == 422
    payload = response.json()
    assert payload["accepted"] == 1
    fields = sorted(error["field"] for error in payload["rejected"])
    assert fields == ["labels[0].label", "labels[].id"]
    values = {error["value"] for error in payload["rejected"]}
    assert "not_a_label" in values
    assert "never-posted" in values


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


def test_write_endpoints_need_token(client):
    assert client.post("/v1/rollback", json={}).status_code == 401
    wrong = client.post("/v1/rollback", json={}, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401
    assert client.post("/v1/retrains/nope/approve", json={}).status_code == 401


def test_approve_unknown_run_with_token(client):
    response = client.post("/v1/retrains/nope/approve", json={"comment": "ok"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert "not found" in response.json()["error"]


def test_rollback_without_previous_version(client):
    response = client.post("/v1/rollback", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 409
    assert "no previous version" in response.json()["error"]
