"""Inference server on two real adapters of the tiny BERT: validation, events, hot swap."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from retrain.emitter import EventEmitter
from retrain.model import Classifier
from retrain.server import create_app
from retrain.trainer import TrainSettings, train_adapter
from tests.conftest import ServerThread
from tests.test_emitter import EventReceiver

V1_LABELS = ["greeting", "farewell", "question"]
V1_TRAIN = [
    ("hello there", "greeting"),
    ("good morning to you", "greeting"),
    ("bye for now", "farewell"),
    ("see you tomorrow", "farewell"),
    ("what time is it", "question"),
    ("where is the station", "question"),
]
V2_LABELS = ["billing", "shipping", "refund", "account"]
V2_TRAIN = [
    ("my invoice is wrong", "billing"),
    ("charge on my card", "billing"),
    ("where is my parcel", "shipping"),
    ("delivery is late", "shipping"),
    ("i want my money back", "refund"),
    ("return this item", "refund"),
    ("reset my password", "account"),
    ("change my email address", "account"),
]
PROBE_TEXTS = [
    "hello, is my parcel late?",
    "bye",
    "reset the password on my account please",
    "what is the refund policy",
    "see you",
]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapter versions with different label sets, trained for one epoch."""
    root = tmp_path_factory.mktemp("adapters")
    base = str(tiny_model_dir)
    train_adapter(base, V1_LABELS, V1_TRAIN, root / "v1", TrainSettings(epochs=1, seed=0, device="cpu"))
    train_adapter(base, V2_LABELS, V2_TRAIN, root / "v2", TrainSettings(epochs=1, seed=1, device="cpu"))
    return {"v1": root / "v1", "v2": root / "v2"}


@pytest.fixture(scope="module")
def expected_probabilities(tiny_model_dir, adapters) -> dict[str, np.ndarray]:
    """PROBE_TEXTS probabilities of each version, computed without the server."""
    expected = {}
    for version, adapter_dir in adapters.items():
        classifier = Classifier.load(str(tiny_model_dir), adapter_dir, version, device="cpu")
        expected[version] = classifier.predict_proba(PROBE_TEXTS)
    return expected


class VersionSource:
    """Mutable stand-in for the adapter registry: returns the active (version, adapter_dir)."""

    def __init__(self, adapters: dict[str, Path], active: str | None) -> None:
        self.adapters = adapters
        self.active = active
        self.missing_dir: Path | None = None

    def activate(self, version: str | None) -> None:
        self.active = version

    def __call__(self) -> tuple[str, str] | None:
        if self.active is None:
            return None
        adapter_dir = self.adapters.get(self.active, self.missing_dir)
        return self.active, str(adapter_dir)


def _make_app(tiny_model_dir, source, emitter=None, **kwargs):
    kwargs.setdefault("poll_interval_s", 60.0)
    return create_app(
        base_model=str(tiny_model_dir),
        version_source=source,
        emitter=emitter,
        device="cpu",
        registry=CollectorRegistry(),
        **kwargs,
    )


@pytest.fixture
def source(adapters) -> VersionSource:
    return VersionSource(adapters, active="v1")


@pytest.fixture
def client(tiny_model_dir, source):
    with TestClient(_make_app(tiny_model_dir, source)) as test_client:
        yield test_client


def _assert_matches_version(response_body: dict, texts: list[str], expected: dict[str, np.ndarray]):
    """Check that every prediction equals the direct output of the version that the body names."""
    version = response_body["version"]
    labels = V1_LABELS if version == "v1" else V2_LABELS
    assert version in ("v1", "v2")
    assert response_body["labels"] == labels
    for text, prediction in zip(texts, response_body["predictions"], strict=True):
        row = expected[version][PROBE_TEXTS.index(text)]
        assert prediction["label"] == labels[int(np.argmax(row))], (version, text)
        np.testing.assert_allclose(prediction["probabilities"], row, atol=1e-5)


def test_classify_one_prediction_per_text(client):
    texts = ["hello there", "what time is it", "bye"]
    response = client.post("/v1/classify", json={"texts": texts})

    assert response.status_code == 200
    body = response.json()
    assert body["version"] == "v1"
    assert len(body["predictions"]) == len(texts)
    assert "labels" not in body
    for prediction in body["predictions"]:
        assert prediction["label"] in V1_LABELS
        assert 0.0 < prediction["probability"] <= 1.0
        assert "probabilities" not in prediction
        assert re.fullmatch(r"[0-9a-f]{32}", prediction["event_id"])
    assert len({p["event_id"] for p in body["predictions"]}) == len(texts)


def test_classify_probabilities_when_requested(client, expected_probabilities):
    response = client.post(
        "/v1/classify", json={"texts": PROBE_TEXTS, "return_probabilities": True}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["labels"] == V1_LABELS
    for prediction in body["predictions"]:
        assert len(prediction["probabilities"]) == len(V1_LABELS)
        assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert prediction["probability"] == max(prediction["probabilities"])
    _assert_matches_version(body, PROBE_TEXTS, expected_probabilities)


@pytest.mark.parametrize(
    ("body", "expected_messages"),
    [
        ({}, ["texts: missing required field"]),
        ({"texts": []}, ["texts: empty list"]),
        ({"texts": "hello"}, ["texts: expected a list of strings, got string 'hello'"]),
        ({"texts": ["ok", "   "]}, ["texts[1]: empty string '   '"]),
        ({"texts": ["ok", ""]}, ["texts[1]: empty string ''"]),
        ({"texts": [5, "ok"]}, ["texts[0]: expected a string, got number 5"]),
        ({"texts": ["ok", None]}, ["texts[1]: expected a string, got null None"]),
        ({"texts": ["x" * 2001]}, ["texts[0]: 2001 characters, at most 2000 allowed ('xxx"]),
        ({"texts": ["hi"] * 257}, ["texts: 257 items, at most 256 allowed"]),
        (
            {"texts": ["hi"], "return_probabilities": "yes"},
            ["return_probabilities: expected true or false, got string 'yes'"],
        ),
        (["hi"], ["body: expected a JSON object, got array ['hi']"]),
        (
            {"texts": ["", 3]},
            ["texts[0]: empty string ''", "texts[1]: expected a string, got number 3"],
        ),
    ],
)
def test_classify_rejects_invalid_body(client, body, expected_messages):
    response = client.post("/v1/classify", json=body)

    assert response.status_code == 422
    errors = response.json()["errors"]
    messages = [f"{error['field']}: {error['error']}" for error in errors]
    assert len(messages) == len(expected_messages), messages
    for message, expected in zip(messages, expected_messages):
        assert message.startswith(expected), messages
    assert response.json()["error"] == "; ".join(messages)


def test_classify_error_lists_fields_and_values(client):
    response = client.post("/v1/classify", json={"texts": ["ok", 5, "", "y" * 3000]})

    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [error["field"] for error in errors] == ["texts[1]", "texts[2]", "texts[3]"]
    assert errors[0]["value"] == 5
    assert errors[1]["value"] == ""
    assert errors[2]["value"] == "y" * 77 + "..."


def test_classify_error_count_is_bounded(client):
    response = client.post("/v1/classify", json={"texts": [""] * 30})

    body = response.json()
    assert len(body["errors"]) == 20
    assert body["error"].endswith("; ... and 10 more errors")


def test_classify_rejects_invalid_json(client):
    response = client.post(
        "/v1/classify", content=b'{"texts": [', headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"].startswith("body: invalid JSON")
    assert response.json()["errors"][0]["value"] == '{"texts": ['



def test_metrics_count_invalid_and_ok_requests(client):
    client.post("/v1/classify", json={"texts": []})
    client.post("/v1/classify", json={"texts": ["hello"]})
    text = client.get("/metrics").text

    assert 'driftloop_server_requests_total{outcome="invalid"} 1.0' in text
    assert 'driftloop_server_requests_total{outcome="ok"} 1.0' in text
    assert "driftloop_server_request_latency_seconds_count 1.0" in text
    assert 'driftloop_server_active_version_info{version="v1"} 1.0' in text
    assert "driftloop_server_swaps_total 1.0" in text
    assert "driftloop_server_load_failures_total 0.0" in text


def test_not_ready_without_version(tiny_model_dir, adapters):
    source = VersionSource(adapters, active=None)
    with TestClient(_make_app(tiny_model_dir, source)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 503
        assert client.get("/v1/version").status_code == 503

        response = client.post("/v1/classify", json={"texts": ["hello"]})
        assert response.status_code == 503
        assert response.json()["error"].startswith("no model loaded yet")

        source.activate("v1")
        assert client.post("/v1/admin/reload").json() == {"version": "v1"}
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/classify", json={"texts": ["hello"]}).status_code == 200


def test_ready_and_version_after_startup(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/version").json() == {"version": "v1", "labels_count": 3}


def test_admin_reload_swaps_version(client, source, expected_probabilities):
    source.activate("v2")
    response = client.post("/v1/admin/reload")

    assert response.status_code == 200
    assert response.json() == {"version": "v2"}
    assert client.get("/v1/version").json() == {"version": "v2", "labels_count": 4}
    body = client.post(
        "/v1/classify", json={"texts": PROBE_TEXTS, "return_probabilities": True}
    ).json()
    assert body["version"] == "v2"
    _assert_matches_version(body, PROBE_TEXTS, expected_probabilities)



def test_admin_reload_takes_only_the_configured_token(tiny_model_dir, source):
    with TestClient(_make_app(tiny_model_dir, source, reload_token="s3cret")) as client:
        source.activate("v2")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = client.post("/v1/admin/reload", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/version").json()["version"] == "v1"

        response = client.post("/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert response.json() == {"version": "v2"}

def test_load_failure_keeps_old_version(client, source, tmp_path):
    source.missing_dir = tmp_path / "no-such-adapter"
    source.activate("v3")
    response = client.post("/v1/admin/reload")

    assert response.status_code == 500
    assert response.json()["version"] == "v1"
    assert "v3" in response.json()["error"]
    assert client.post("/v1/classify", json={"texts": ["hello"]}).json()["version"] == "v1"
    assert "driftloop_server_load_failures_total 1.0" in client.get("/metrics").text


def test_poll_thread_picks_up_new_version(tiny_model_dir, source):
    app = _make_app(tiny_model_dir, source, poll_interval_s=0.05)
    with TestClient(app) as client:
        source.activate("v2")

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if client.get("/v1/version").json()["version"] == "v2":
                break
            time.sleep(0.05)
        assert client.get("/v1/version").json()["version"] == "v2"


def test_classify_emits_one_event_per_text(tiny_model_dir, source):
    receiver = EventReceiver()
    receiver_thread = threading.Thread(
        target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    receiver_thread.start()
    emitter = EventEmitter(
        receiver.url, batch_size=16, flush_interval_s=0.1, registry=CollectorRegistry()
    )
    try:
        texts = ["hello there", "where is the station"]
        with TestClient(_make_app(tiny_model_dir, source, emitter=emitter)) as client:
            body = client.post("/v1/classify", json={"texts": texts}).json()
            metrics_text = client.get("/metrics").text
        # Leaving the TestClient closes the emitter, which flushes the queue.
        events = receiver.events()
    finally:
        receiver.shutdown()
        receiver.server_close()
        receiver_thread.join(5)

    assert "driftloop_server_events_sent_total" in metrics_text
    assert [event["id"] for event in events] == [p["event_id"] for p in body["predictions"]]
    for event, text, prediction in zip(events, texts, body["predictions"], strict=True):
        assert event["text"] == text
        assert event["version"] == "v1"
        assert event["label"] == prediction["label"]
        assert event["confidence"] == prediction["probability"]
        assert len(event["probabilities"]) == len(V1_LABELS)
        assert event["latency_ms"] > 0
        assert abs(event["timestamp"] - time.time()) < 60
    assert emitter.sent == 2


def test_classify_succeeds_while_monitor_down(tiny_model_dir, source):
    closed_port = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed_port.bind(("127.0.0.1", 0))
    monitor_url = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
    emitter = EventEmitter(
        monitor_url, batch_size=8, flush_interval_s=0.05, registry=CollectorRegistry()
    )
    try:
        with TestClient(_make_app(tiny_model_dir, source, emitter=emitter)) as client:
            statuses = [
                client.post("/v1/classify", json={"texts": ["hello", "bye"]}).status_code
                for _ in range(20)
            ]
    finally:
        closed_port.close()

    assert statuses == [200] * 20
    assert emitter.sent == 0
    assert emitter.dropped_by_reason["send_failed"] == 40


def test_hot_swap_under_concurrent_load(tiny_model_dir, source, expected_probabilities):
    app = _make_app(tiny_model_dir, source, poll_interval_s=0.05)
    stop = threading.Event()
    lock = threading.Lock()
    failures: list[str] = []
    results: list[tuple[int, int, dict]] = []  # (worker, sequence number, body)

    def send_requests(worker: int, url: str) -> None:
        texts = PROBE_TEXTS[worker % 2 :]
        sequence = 0
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        "/v1/classify", json={"texts": texts, "return_probabilities": True}
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"worker {worker}: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if response.status_code != 200:
                        failures.append(f"worker {worker}: {response.status_code} {response.text}")
                    else:
                        results.append((worker, sequence, response.json()))
                sequence += 1

    def versions_seen() -> set[str]:
        with lock:
            return {body["version"] for _, _, body in results}

    def wait_until(condition, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    with ServerThread(app) as server:
        workers = [
            threading.Thread(target=send_requests, args=(worker, server.url)) for worker in range(4)
        ]
        for worker in workers:
            worker.start()
        try:
            wait_until(lambda: len(results) >= 20)
            source.activate("v2")
            wait_until(lambda: "v2" in versions_seen())
            with lock:
                count_at_swap = len(results)
            wait_until(lambda: len(results) >= count_at_swap + 20)
        finally:
            stop.set()
            for worker in workers:
                worker.join(30)

        final = httpx.post(f"{server.url}/v1/classify", json={"texts": ["hello"]}, timeout=30)

    assert failures == []
    assert versions_seen() == {"v1", "v2"}
    assert final.json()["version"] == "v2"
    for worker, _, body in results:
        _assert_matches_version(body, PROBE_TEXTS[worker % 2 :], expected_probabilities)

    # Requests of one worker are sequential, so after its first v2 response it gets no v1.
    for worker in range(4):
        ordered = sorted((sequence, body["version"]) for w, sequence, body in results if w == worker)
        versions = [version for _, version in ordered]
        if "v2" in versions:
            first_v2 = versions.index("v2")
            assert "v1" not in versions[first_v2:], (worker, versions)


def test_base_cache_loads_match_disk_loads(tiny_model_dir, adapters, expected_probabilities):
    """Versions loaded through one BaseModelCache, back and forth, predict as loads from disk."""
    from retrain.model import BaseModelCache, Classifier

    cache = BaseModelCache()
    # A repeated version is served from the cache, so a changed cached model would show.
    for version in ("v1", "v1", "v2", "v2", "v1"):
        model = Classifier.load(str(tiny_model_dir), adapters[version], version, device="cpu", base_cache=cache)
        np.testing.assert_allclose(model.predict_proba(PROBE_TEXTS), expected_probabilities[version], atol=1e-5)


# Models kept warm: preloaded candidates and replaced versions


class CountingLoader:
    """Loads through one BaseModelCache and records each (version, adapter_dir) it loaded."""

    def __init__(self, tiny_model_dir) -> None:
        from retrain.model import BaseModelCache

        self.base = str(tiny_model_dir)
        self.cache = BaseModelCache()
        self.calls: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None

    def __call__(self, version: str, adapter_dir: str):
        self.calls.append((version, adapter_dir))
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        return Classifier.load(self.base, adapter_dir, version, device="cpu", base_cache=self.cache)


def _holder(loader, version_source, candidate_source=None, **kwargs):
    from retrain.server import ModelHolder, ServerMetrics

    metrics = ServerMetrics.register(CollectorRegistry())
    holder = ModelHolder(version_source, loader, poll_interval_s=60.0, metrics=metrics,
                         candidate_source=candidate_source, **kwargs)
    return holder, metrics


def _registered_copy(adapter_dir: Path, target: Path) -> str:
    """Copy an adapter folder, as the registry's rename gives a candidate a new path."""
    import shutil

    shutil.copytree(adapter_dir, target)
    return str(target)


def test_preloaded_candidate_swaps_without_a_load(tiny_model_dir, adapters, expected_probabilities, tmp_path):
    loader = CountingLoader(tiny_model_dir)
    active = ["v1", str(adapters["v1"]), None]
    candidates = [("r7", str(adapters["v2"]))]
    holder, metrics = _holder(loader, lambda: tuple(active), lambda: list(candidates))

    assert holder.refresh().version == "v1"
    assert holder.preload() == ["candidate:r7"]
    assert holder.preload() == []  # already warm
    assert holder.warm_versions() == ["candidate:r7"]
    assert metrics.preloads.labels(outcome="loaded")._value.get() == 1
    assert len(loader.calls) == 2

    # Promotion renames the candidate folder to the version's and names its run.
    active[:] = ["v2", _registered_copy(adapters["v2"], tmp_path / "v2"), "r7"]
    outcome = holder.refresh()

    assert outcome.changed and outcome.version == "v2"
    assert len(loader.calls) == 2, "the swap loaded from disk although the candidate was warm"
    assert holder.model.version == "v2"
    np.testing.assert_allclose(holder.model.predict_proba(PROBE_TEXTS), expected_probabilities["v2"], atol=1e-5)
    # The replaced version stays warm for a rollback; the candidate left the warm set.
    assert holder.warm_versions() == [f"version:v1:{adapters['v1']}"]
    assert metrics.warm_models._value.get() == 1


def test_rollback_to_replaced_version_swaps_without_a_load(tiny_model_dir, adapters, expected_probabilities):
    loader = CountingLoader(tiny_model_dir)
    source = VersionSource(adapters, active="v1")
    holder, _ = _holder(loader, source)
    holder.refresh()
    source.activate("v2")
    holder.refresh()
    assert [version for version, _ in loader.calls] == ["v1", "v2"]

    source.activate("v1")
    assert holder.refresh().version == "v1"
    source.activate("v2")
    assert holder.refresh().version == "v2"

    assert [version for version, _ in loader.calls] == ["v1", "v2"]
    np.testing.assert_allclose(holder.model.predict_proba(PROBE_TEXTS), expected_probabilities["v2"], atol=1e-5)


def test_no_warm_models_when_disabled(tiny_model_dir, adapters):
    loader = CountingLoader(tiny_model_dir)
    source = VersionSource(adapters, active="v1")
    holder, metrics = _holder(loader, source, lambda: [("r1", str(adapters["v2"]))],
                              preload_candidates=0, keep_previous=0)
    holder.refresh()
    assert holder.preload() == []
    source.activate("v2")
    holder.refresh()
    source.activate("v1")
    holder.refresh()

    assert [version for version, _ in loader.calls] == ["v1", "v2", "v1"]
    assert holder.warm_versions() == []
    assert metrics.warm_models._value.get() == 0


def test_candidate_that_stops_waiting_is_dropped(tiny_model_dir, adapters):
    loader = CountingLoader(tiny_model_dir)
    candidates = [("r1", str(adapters["v2"]))]
    holder, _ = _holder(loader, VersionSource(adapters, active="v1"), lambda: list(candidates))
    holder.refresh()
    holder.preload()
    assert holder.warm_versions() == ["candidate:r1"]

    candidates.clear()  # rejected, cancelled or superseded
    holder.preload()
    assert holder.warm_versions() == []


def test_only_the_newest_candidates_are_preloaded(tiny_model_dir, adapters):
    loader = CountingLoader(tiny_model_dir)
    candidates = [("r2", str(adapters["v2"])), ("r1", str(adapters["v1"]))]
    holder, _ = _holder(loader, VersionSource(adapters, active="v1"), lambda: list(candidates))
    holder.refresh()

    assert holder.preload() == ["candidate:r2"]


def test_failed_preload_is_counted_and_the_swap_still_loads(tiny_model_dir, adapters, tmp_path, caplog):
    loader = CountingLoader(tiny_model_dir)
    missing = tmp_path / "gone"
    active = ["v1", str(adapters["v1"]), None]
    holder, metrics = _holder(loader, lambda: tuple(active), lambda: [("r3", str(missing))])
    holder.refresh()

    with caplog.at_level("WARNING", logger="retrain.server"):
        assert holder.preload() == []
    assert f"preloading candidate:r3 from {missing} failed" in caplog.text
    assert metrics.preloads.labels(outcome="failed")._value.get() == 1
    assert holder.preload() == []  # not retried within FAILED_LOAD_RETRY_S
    assert metrics.preloads.labels(outcome="failed")._value.get() == 1

    active[:] = ["v2", str(adapters["v2"]), "r3"]
    assert holder.refresh().version == "v2"
    assert holder.model.version == "v2"


def test_candidate_source_error_keeps_serving(tiny_model_dir, adapters, caplog):
    def broken():
        raise RuntimeError("database is locked")

    loader = CountingLoader(tiny_model_dir)
    holder, _ = _holder(loader, VersionSource(adapters, active="v1"), broken)
    holder.refresh()
    with caplog.at_level("WARNING", logger="retrain.server"):
        assert holder.preload() == []
        assert holder.preload() == []
    assert caplog.text.count("candidate source failed: RuntimeError: database is locked") == 1
    assert holder.model.version == "v1"


def test_swap_waits_for_the_preload_in_flight(tiny_model_dir, adapters):
    """Approval during the candidate's preload: the swap uses that load instead of a second one."""
    loader = CountingLoader(tiny_model_dir)
    active = ["v1", str(adapters["v1"]), None]
    holder, _ = _holder(loader, lambda: tuple(active), lambda: [("r5", str(adapters["v2"]))])
    holder.refresh()

    loader.gate = threading.Event()
    preloading = threading.Thread(target=holder.preload)
    preloading.start()
    deadline = time.monotonic() + 10
    while len(loader.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    active[:] = ["v2", str(adapters["v2"]), "r5"]
    swapping = threading.Thread(target=holder.refresh)
    swapping.start()
    time.sleep(0.2)
    assert holder.model.version == "v1", "the swap did not wait for the preload"
    loader.gate.set()
    preloading.join(30)
    swapping.join(30)

    assert holder.model.version == "v2"
    assert [version for version, _ in loader.calls] == ["v1", "candidate:r5"]


@pytest.mark.parametrize("field, value", [("preload_candidates", -1), ("keep_previous", -2)])
def test_negative_warm_limits_are_rejected(tiny_model_dir, adapters, field, value):
    with pytest.raises(ValueError, match=f"{field} must be at least 0, got {value}"):
        _holder(CountingLoader(tiny_model_dir), VersionSource(adapters, active="v1"), **{field: value})


def test_poll_thread_preloads_candidates(tiny_model_dir, source, adapters):
    app = _make_app(tiny_model_dir, source, poll_interval_s=0.05,
                    candidate_source=lambda: [("r9", str(adapters["v2"]))])
    with TestClient(app) as client:
        deadline = time.monotonic() + 20
        while "driftloop_server_warm_models 1.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the poll thread did not preload the candidate"
            time.sleep(0.05)
        metrics = client.get("/metrics").text
    assert 'driftloop_server_preloads_total{outcome="loaded"} 1.0' in metrics


def test_prediction_error_names_version(client, caplog):
    model = client.app.state.model_holder.model

    def broken(texts, batch_size=64):
        raise RuntimeError("CUDA error: device-side assert triggered")

    model.predict_proba = broken
    with caplog.at_level("ERROR", logger="retrain.server"):
        response = client.post("/v1/classify", json={"texts": ["hello"]})

    assert response.status_code == 500
    assert response.json() == {"error": "prediction failed on version v1: RuntimeError"}
    assert "classify failed on version v1 for 1 texts" in caplog.text
    assert "device-side assert triggered" in caplog.text
    assert 'driftloop_server_requests_total{outcome="error"} 1.0' in client.get("/metrics").text


def test_forward_passes_are_bounded(tiny_model_dir, source):
    """Eight concurrent requests with max_concurrent_predictions=2: never more than two passes at once."""
    app = _make_app(tiny_model_dir, source, max_concurrent_predictions=2)
    running, peak, lock = [0], [0], threading.Lock()
    with ServerThread(app) as server:
        model = app.state.model_holder.model
        real = model.predict_proba

        def slow(texts, batch_size=64):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.1)
            try:
                return real(texts, batch_size)
            finally:
                with lock:
                    running[0] -= 1

        model.predict_proba = slow
        results = []

        def send():
            results.append(httpx.post(f"{server.url}/v1/classify", json={"texts": ["hello"]}, timeout=30).status_code)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    assert results == [200] * 8
    assert peak[0] == 2


def test_zero_concurrent_predictions_rejected(tiny_model_dir, source):
    with pytest.raises(ValueError, match="max_concurrent_predictions must be at least 1, got 0"):
        _make_app(tiny_model_dir, source, max_concurrent_predictions=0)


def test_oversized_body_rejected_with_size(tiny_model_dir, source):
    with TestClient(_make_app(tiny_model_dir, source, max_batch=1, max_text_chars=10)) as client:
        response = client.post("/v1/classify", json={"texts": ["x" * 5000]})

    assert response.status_code == 413
    [error] = response.json()["errors"]
    assert error["field"] == "body"
    assert error["error"].endswith("at most 4232 allowed")
