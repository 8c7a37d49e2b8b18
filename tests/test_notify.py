"""Notifications: approval requests, stale and resolved approvals, version hooks, retries and failures.

Every target is a stand-in HTTP server on 127.0.0.1 started by the test, or a small script
written to tmp_path, and records what it received.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from monitor.config import parse_config
from monitor.errors import ConfigError
from monitor.metrics import MonitorMetrics
from monitor.store import Store
from retrain.jobs import approve_run, reject_run
from retrain.notify import Notifier, deciding_gate, monitor_url

# A canary that could not decide: too few labelled production events.
INCONCLUSIVE_CANARY = {
    "passed": False,
    "status": "inconclusive",
    "gates": [
        {"name": "production_samples", "passed": False, "evaluated": True, "value": 12, "threshold": 30,
         "message": "12 labelled production samples, need at least 30"},
        {"name": "production_gain", "passed": False, "evaluated": False, "value": 0.05, "threshold": 0.0,
         "message": "not evaluated: only 12 labelled production samples"},
        {"name": "test_regression", "passed": True, "evaluated": True, "value": 0.0, "threshold": 0.01,
         "message": "test accuracy drop +0.0000 (<= +0.0100)"},
    ],
    "production": {"name": "production_holdout", "n": 12, "current_accuracy": 0.75, "candidate_accuracy": 0.8},
    "test": {"name": "original_test", "n": 200, "current_accuracy": 0.9, "candidate_accuracy": 0.9},
    "shadow": {"n": 50, "agreement": 0.94},
}
FAST_RETRIES = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 3, "timeout_s": 2}


class StandIn:
    """A local HTTP server that records each POST and responds with the queued statuses, then 200."""

    def __init__(self, statuses: list[tuple[int, str]] | None = None):
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                with stand_in.lock:
                    stand_in.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, text = stand_in.statuses.pop(0) if stand_in.statuses else (200, "{}")
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str | None = None) -> list:
        with self.lock:
            return [request["body"] for request in self.requests if path is None or request["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def closed_port() -> int:
    """Return a loopback port that nothing listens on, so a connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_pending(store: Store, run_id: str = "r-pending", canary: dict | None = None) -> None:
    store.create_run(run_id, "evaluating", "v1", {})
    store.update_run(run_id, canary=canary or INCONCLUSIVE_CANARY)
    assert store.transition_run(run_id, ("evaluating",), "pending_approval", actor="retrain",
                                action="run_pending_approval")


def sample(notifier: Notifier, name: str, **labels) -> float:
    return notifier.metrics.registry.get_sample_value(name, labels) or 0.0


def notify_audit(store: Store) -> list[dict]:
    return [entry for entry in store.audit_log() if entry["actor"] == "notify"]


@pytest.fixture()
def stand_ins():
    servers: list[StandIn] = []

    def start(statuses=None) -> StandIn:
        server = StandIn(statuses)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def setup(tmp_path):
    """Return (store, make) where make(**notify) builds and starts a Notifier on that store."""
    store = Store(f"sqlite:///{tmp_path / 'notify.db'}")
    notifiers: list[Notifier] = []

    def make(drain_timeout_s: float = 2.0, **notify) -> Notifier:
        config = parse_config({"notify": {**FAST_RETRIES, **notify}}).notify
        notifier = Notifier(config, store, MonitorMetrics(), drain_timeout_s=drain_timeout_s)
        notifier.start()
        notifiers.append(notifier)
        return notifier

    yield store, make
    for notifier in notifiers:
        notifier.stop()
    store.close()


def test_slack_request_shape(setup, stand_ins):
    store, make = setup
    slack = stand_ins()
    notifier = make(ui_base_url="https://driftloop.example.com/",
                    approval_webhooks=[{"name": "ops", "url": slack.url + "/hook", "format": "slack"}])
    make_pending(store)

    notifier.approval_requested("r-pending")

    [body] = wait_for(lambda: slack.bodies("/hook"))
    assert "r-pending" in body["text"]
    assert "base version v1" in body["text"]
    assert "canary inconclusive" in body["text"]
    assert "production_samples" in body["text"]
    blocks = json.dumps(body["blocks"])
    assert "r-pending" in blocks
    assert "*Production accuracy*\\n0.750 \\u2192 0.800 (12 events)" in blocks
    assert "*Shadow agreement*\\n0.940" in blocks
    assert "<https://driftloop.example.com/ui#run=r-pending|Open the canary report>" in blocks
    assert all(block["type"] == "section" for block in body["blocks"])
    wait_for(lambda: notify_audit(store))
    [entry] = notify_audit(store)
    assert (entry["action"], entry["run_id"]) == ("notify_sent", "r-pending")
    assert entry["detail"]["target"] == "ops"
    assert entry["detail"]["event"] == "approval_requested"
    assert sample(notifier, "driftloop_notifications_total", target_type="slack", event="approval_requested") == 1


def test_alertmanager_alert_and_resolve(setup, stand_ins):
    store, make = setup
    alertmanager = stand_ins()
    notifier = make(ui_base_url="http://monitor.internal:8081",
                    approval_webhooks=[{"name": "am", "url": alertmanager.url + "/api/v2/alerts",
                                        "format": "alertmanager", "runbook_url": "https://wiki/approve"}])
    make_pending(store)

    notifier.check_pending()
    [alerts] = wait_for(lambda: alertmanager.bodies())
    assert isinstance(alerts, list)
    [alert] = alerts
    assert alert["labels"] == {"alertname": "DriftloopApprovalPending", "severity": "warning",
                               "run_id": "r-pending", "service": "driftloop"}
    assert "r-pending" in alert["annotations"]["summary"]
    assert "production_samples" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"] == "https://wiki/approve"
    assert alert["generatorURL"] == "http://monitor.internal:8081/ui#run=r-pending"
    assert alert["startsAt"].endswith("Z")
    assert "endsAt" not in alert

    # Approved by another process: the next check finds it in the store and resolves the alert.
    approve_run(store, "r-pending", actor="dana")
    notifier.check_pending()
    resolved = wait_for(lambda: alertmanager.bodies()[1:])[0]
    [ended] = resolved
    assert ended["labels"]["run_id"] == "r-pending"
    assert ended["labels"]["severity"] == "warning"
    assert ended["endsAt"] >= ended["startsAt"]
    assert ended["annotations"]["summary"] == "Retrain run r-pending no longer waits for approval (now approved)"
    events = wait_for(lambda: [entry["detail"]["event"] for entry in notify_audit(store)][1:] and
                      [entry["detail"]["event"] for entry in notify_audit(store)])
    assert events == ["approval_requested", "approval_resolved"]


def test_json_summary_and_gauges(setup, stand_ins):
    store, make = setup
    receiver = stand_ins()
    notifier = make(approval_webhooks=[{"name": "plain", "url": receiver.url}])
    notifier.listen_url = monitor_url("127.0.0.1", 18181)
    make_pending(store)

    notifier.check_pending()
    [summary] = wait_for(lambda: receiver.bodies())
    assert summary["run_id"] == "r-pending"
    assert summary["state"] == "pending_approval"
    assert summary["canary_status"] == "inconclusive"
    assert summary["deciding_gate"]["name"] == "production_samples"
    assert summary["figures"]["production_samples"] == 12
    assert summary["report_url"] == "http://127.0.0.1:18181/ui#run=r-pending"
    assert summary["run_url"] == "http://127.0.0.1:18181/v1/retrains/r-pending"
    assert sample(notifier, "driftloop_pending_approvals") == 1
    assert sample(notifier, "driftloop_oldest_pending_approval_age_seconds") > 0

    reject_run(store, "r-pending", actor="dana")
    notifier.check_pending()
    assert sample(notifier, "driftloop_pending_approvals") == 0
    assert sample(notifier, "driftloop_oldest_pending_approval_age_seconds") == 0
    # Only alertmanager targets get a resolve.
    notifier.stop()
    assert len(receiver.bodies()) == 1


def test_links_left_out_without_address(setup, stand_ins):
    store, make = setup
    receiver = stand_ins()
    notifier = make(approval_webhooks=[{"name": "plain", "url": receiver.url}])
    notifier.listen_url = monitor_url("0.0.0.0", 8081)
    make_pending(store)
    notifier.check_pending()
    [summary] = wait_for(lambda: receiver.bodies())
    assert summary["report_url"] is None
    assert summary["run_url"] is None


def test_stale_approval_sent_once(setup, stand_ins):
    store, make = setup
    slack, alertmanager = stand_ins(), stand_ins()
    notifier = make(stale_approval_after_s=0.2, resend_interval_s=3600,
                    approval_webhooks=[{"name": "ops", "url": slack.url, "format": "slack"},
                                       {"name": "am", "url": alertmanager.url, "format": "alertmanager"}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: slack.bodies() and alertmanager.bodies())
    time.sleep(0.3)

    notifier.check_pending()
    notifier.check_pending()
    stale_slack = wait_for(lambda: slack.bodies()[1:])
    stale_alerts = wait_for(lambda: alertmanager.bodies()[1:])
    notifier.stop()
    assert len(slack.bodies()) == 2
    assert len(alertmanager.bodies()) == 2
    assert stale_slack[0]["text"].startswith("STALE: retrain run r-pending has waited")
    severities = {alert["labels"]["severity"]: alert for alert in stale_alerts[0]}
    assert "endsAt" in severities["warning"]
    assert "endsAt" not in severities["critical"]
    assert sample(notifier, "driftloop_notifications_total", target_type="slack", event="approval_stale") == 1


def test_alertmanager_resend_while_pending(setup, stand_ins):
    store, make = setup
    alertmanager, slack = stand_ins(), stand_ins()
    notifier = make(resend_interval_s=0.05,
                    approval_webhooks=[{"name": "am", "url": alertmanager.url, "format": "alertmanager"},
                                       {"name": "ops", "url": slack.url, "format": "slack"}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: alertmanager.bodies())
    time.sleep(0.1)
    notifier.check_pending()
    wait_for(lambda: alertmanager.bodies()[1:])
    notifier.stop()
    assert len(slack.bodies()) == 1
    assert [entry["detail"]["event"] for entry in notify_audit(store)].count("approval_resend") == 0
    assert sample(notifier, "driftloop_notifications_total", target_type="alertmanager", event="approval_resend") == 1


def test_restart_does_not_repeat_request(setup, stand_ins):
    store, make = setup
    receiver = stand_ins()
    first = make(approval_webhooks=[{"name": "plain", "url": receiver.url}])
    make_pending(store)
    first.check_pending()
    wait_for(lambda: notify_audit(store))
    first.stop()

    second = make(approval_webhooks=[{"name": "plain", "url": receiver.url}])
    second.check_pending()
    second.stop()
    assert len(receiver.bodies()) == 1
    assert sample(second, "driftloop_pending_approvals") == 1


def test_vllm_load_then_unload(setup, stand_ins, monkeypatch):
    store, make = setup
    vllm = stand_ins()
    monkeypatch.setenv("VLLM_TEST_TOKEN", "tok-123")
    notifier = make(version_hooks=[{"name": "vllm", "type": "vllm", "url": vllm.url + "/", "unload_previous": True,
                                    "name_prefix": "intent-", "token_env": "VLLM_TEST_TOKEN"}])

    notifier.version_changed("v2", Path("/state/adapters/v2"), "v1", "promote")

    wait_for(lambda: vllm.bodies("/v1/unload_lora_adapter"))
    assert [request["path"] for request in vllm.requests] == ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    assert vllm.bodies("/v1/load_lora_adapter") == [{"lora_name": "intent-v2", "lora_path": "/state/adapters/v2"}]
    assert vllm.bodies("/v1/unload_lora_adapter") == [{"lora_name": "intent-v1"}]
    assert vllm.requests[0]["headers"]["Authorization"] == "Bearer tok-123"
    wait_for(lambda: len(notify_audit(store)) == 2)
    entries = notify_audit(store)
    assert [entry["version"] for entry in entries] == ["v2", "v1"]
    assert "tok-123" not in json.dumps(entries)


def test_vllm_failed_load_skips_unload(setup, stand_ins):
    store, make = setup
    vllm = stand_ins([(400, '{"message": "The lora adapter intent-v2 could not be found"}')])
    notifier = make(version_hooks=[{"name": "vllm", "type": "vllm", "url": vllm.url, "unload_previous": True}])
    notifier.version_changed("v2", "/state/adapters/v2", "v1", "promote")
    wait_for(lambda: notify_audit(store))
    notifier.stop()
    assert [request["path"] for request in vllm.requests] == ["/v1/load_lora_adapter"]


def test_webhook_hook_body(setup, stand_ins):
    store, make = setup
    receiver = stand_ins()
    notifier = make(version_hooks=[{"name": "deploy", "type": "webhook", "url": receiver.url + "/deploy"}])
    notifier.version_changed("v1", "/state/adapters/v1", "v3", "rollback")
    [body] = wait_for(lambda: receiver.bodies("/deploy"))
    assert body["event"] == "version_activated"
    assert (body["version"], body["previous"], body["reason"]) == ("v1", "v3", "rollback")
    assert body["adapter_dir"] == "/state/adapters/v1"
    assert body["at"].endswith("Z")
    assert "Authorization" not in receiver.requests[0]["headers"]


def test_command_hook_environment(setup, tmp_path):
    store, make = setup
    output = tmp_path / "env.json"
    script = tmp_path / "hook.py"
    script.write_text(
        "import json, os, sys\n"
        "keys = ['DRIFTLOOP_VERSION', 'DRIFTLOOP_ADAPTER_DIR', 'DRIFTLOOP_PREVIOUS_VERSION', 'DRIFTLOOP_REASON']\n"
        "json.dump({key: os.environ[key] for key in keys} | {'argv': sys.argv[1:]}, open(sys.argv[1], 'w'))\n"
    )
    notifier = make(version_hooks=[{"name": "reload", "type": "command",
                                    "command": [sys.executable, str(script), str(output)]}])
    notifier.version_changed("v2", "/state/adapters/v2", "v1", "promote")
    wait_for(output.is_file)
    wait_for(lambda: notify_audit(store))
    assert json.loads(output.read_text()) == {
        "DRIFTLOOP_VERSION": "v2", "DRIFTLOOP_ADAPTER_DIR": "/state/adapters/v2",
        "DRIFTLOOP_PREVIOUS_VERSION": "v1", "DRIFTLOOP_REASON": "promote", "argv": [str(output)],
    }
    assert notify_audit(store)[0]["action"] == "notify_sent"


def test_command_failure_logs_stderr(setup, tmp_path, caplog):
    store, make = setup
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('adapter folder missing on this host', file=sys.stderr)\nsys.exit(3)\n")
    caplog.set_level("INFO", logger="retrain.notify")
    notifier = make(version_hooks=[{"name": "reload", "type": "command", "command": [sys.executable, str(script)]}])
    notifier.version_changed("v2", "/state/adapters/v2", "v1", "promote")
    wait_for(lambda: notify_audit(store))
    [entry] = notify_audit(store)
    assert entry["action"] == "notify_failed"
    assert "exited with status 3: adapter folder missing on this host" in entry["detail"]["error"]
    assert entry["detail"]["attempts"] == 3
    failures = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(failures) == 1
    assert "adapter folder missing on this host" in failures[0]


def test_unreachable_target_retried_then_failed(setup, caplog):
    store, make = setup
    caplog.set_level("INFO", logger="retrain.notify")
    notifier = make(approval_webhooks=[{"name": "down", "url": f"http://127.0.0.1:{closed_port()}/hook"}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: notify_audit(store))
    [entry] = notify_audit(store)
    assert entry["action"] == "notify_failed"
    assert entry["detail"]["target"] == "down"
    assert entry["detail"]["attempts"] == 3
    messages = [record.getMessage() for record in caplog.records]
    assert sum("attempt" in message and "failed" in message and "retrying" in message for message in messages) == 2
    errors = [message for record, message in zip(caplog.records, messages) if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "approval_requested to down" in errors[0]
    assert sample(notifier, "driftloop_notify_failures_total", target_type="json", event="approval_requested") == 1


def test_client_error_not_retried(setup, stand_ins, caplog):
    store, make = setup
    receiver = stand_ins([(400, "bad payload: " + "x" * 1000)])
    caplog.set_level("INFO", logger="retrain.notify")
    notifier = make(approval_webhooks=[{"name": "strict", "url": receiver.url}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: notify_audit(store))
    notifier.stop()
    assert len(receiver.bodies()) == 1
    error = notify_audit(store)[0]["detail"]["error"]
    assert "HTTP 400: bad payload: xxx" in error
    assert len(error) < 700
    assert sample(notifier, "driftloop_notify_failures_total", target_type="json", event="approval_requested") == 1


@pytest.mark.parametrize("status", [429, 503, 408])
def test_transient_status_retried(setup, stand_ins, status):
    store, make = setup
    receiver = stand_ins([(status, "busy")])
    notifier = make(approval_webhooks=[{"name": "busy", "url": receiver.url}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: notify_audit(store))
    assert len(receiver.bodies()) == 2
    assert notify_audit(store)[0]["action"] == "notify_sent"
    assert notify_audit(store)[0]["detail"]["attempts"] == 2


def test_missing_token_env_fails(setup, stand_ins, monkeypatch):
    store, make = setup
    receiver = stand_ins()
    monkeypatch.delenv("DRIFTLOOP_TEST_MISSING", raising=False)
    notifier = make(approval_webhooks=[{"name": "auth", "url": receiver.url, "token_env": "DRIFTLOOP_TEST_MISSING"}])
    make_pending(store)
    notifier.check_pending()
    wait_for(lambda: notify_audit(store))
    assert receiver.bodies() == []
    assert "DRIFTLOOP_TEST_MISSING" in notify_audit(store)[0]["detail"]["error"]


def test_stop_gives_up_after_drain(setup, caplog):
    store, make = setup
    caplog.set_level("INFO", logger="retrain.notify")
    notifier = make(drain_timeout_s=0.2, backoff_initial_s=30, backoff_max_s=60,
                    version_hooks=[{"name": "down", "type": "webhook", "url": f"http://127.0.0.1:{closed_port()}"}])
    notifier.version_changed("v2", "/state/adapters/v2", "v1", "promote")
    wait_for(lambda: any("retrying in 30.0 s" in record.getMessage() for record in caplog.records))
    notifier.stop()
    assert any("stopped with 1 notifications unsent: version_activated to down" in record.getMessage()
               for record in caplog.records)
    assert notify_audit(store)[0]["action"] == "notify_failed"


def test_deciding_gate_choice():
    canary = {"status": "passed", "gates": [{"name": "production_gain", "passed": True, "evaluated": True}]}
    assert deciding_gate(canary) is None
    assert deciding_gate(INCONCLUSIVE_CANARY)["name"] == "production_samples"
    recorded = {**INCONCLUSIVE_CANARY, "deciding_gate": "production_gain"}
    assert deciding_gate(recorded)["name"] == "production_gain"


@pytest.mark.parametrize(("notify", "key", "text"), [
    ({"version_hooks": [{"name": "vllm", "type": "vllm"}]}, "notify.version_hooks.0.url", "a vllm hook needs a url"),
    ({"version_hooks": [{"name": "run", "type": "command", "command": []}]}, "notify.version_hooks.0.command",
     "invalid value []"),
    ({"version_hooks": [{"name": "run", "type": "command", "command": [""]}]}, "notify.version_hooks.0.command",
     "needs a non-empty list"),
    ({"version_hooks": [{"name": "hook", "type": "grpc", "url": "http://127.0.0.1:1"}]},
     "notify.version_hooks.0.type", "'grpc'"),
    ({"approval_webhooks": [{"name": "chat", "url": "http://127.0.0.1:1", "format": "teams"}]},
     "notify.approval_webhooks.0.format", "'teams'"),
    ({"approval_webhooks": [{"name": "chat", "url": "hooks.slack.com/x"}]}, "notify.approval_webhooks.0.url",
     "'hooks.slack.com/x'"),
    ({"version_hooks": [{"name": "hook", "type": "webhook", "url": "http://127.0.0.1:1", "unload_previous": True}]},
     "notify.version_hooks.0.unload_previous", "only vllm hooks use unload_previous"),
    ({"version_hooks": [{"name": "run", "type": "command", "command": ["x"], "token_env": "TOKEN"}]},
     "notify.version_hooks.0.token_env", "takes no token_env"),
    ({"backoff_initial_s": 10, "backoff_max_s": 1}, "notify.backoff_max_s", "invalid value 1"),
    ({"max_attempts": 0}, "notify.max_attempts", "invalid value 0"),
    ({"stale_approval_after_s": -5}, "notify.stale_approval_after_s", "invalid value -5"),
    ({"approval_webhooks": [{"name": "same", "url": "http://127.0.0.1:1"}],
      "version_hooks": [{"name": "same", "type": "webhook", "url": "http://127.0.0.1:2"}]},
     "notify.version_hooks", "'same' is used more than once"),
    ({"approval_webhooks": [{"name": "chat", "url": "http://127.0.0.1:1", "token_evn": "X"}]},
     "notify.approval_webhooks.0.token_evn", "unknown key"),
], ids=["vllm-without-url", "empty-command", "blank-argument", "unknown-type", "unknown-format", "url-without-scheme",
        "unload-on-webhook", "token-on-command", "backoff-order", "zero-attempts", "negative-stale", "duplicate-name",
        "misspelt-key"])
def test_bad_config(notify, key, text):
    with pytest.raises(ConfigError) as error:
        parse_config({"notify": notify})
    message = str(error.value)
    assert f"{key}:" in message
    assert text in message


def test_token_not_echoed_in_config_error():
    with pytest.raises(ConfigError) as error:
        parse_config({"notify": {"approval_webhooks": [{"name": "chat", "url": "http://127.0.0.1:1",
                                                        "token_env": "xoxb-1234-secret"}]}})
    assert "notify.approval_webhooks.0.token_env" in str(error.value)
    assert "xoxb-1234-secret" not in str(error.value)


def test_defaults_send_nothing():
    notify = parse_config({}).notify
    assert notify.approval_webhooks == []
    assert notify.version_hooks == []
    assert notify.ui_base_url is None


def test_daemon_approval_promotion_rollback(tmp_path, tiny_model_dir, stand_ins, caplog):
    """A real daemon: approval request, promotion with a target down, resolve, and rollback hooks."""
    from monitor.daemon import MonitorDaemon
    from retrain.bootstrap import bootstrap
    from tests.conftest import post_labelled_events, tiny_deployment_config

    alertmanager, vllm = stand_ins(), stand_ins()
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    raw = copy.deepcopy(tiny_deployment_config(tmp_path / "state", model))
    raw["retrain"]["sweep"] = {"enabled": False}
    bootstrap(parse_config(raw), log=lambda message: None)
    raw["notify"] = {
        **FAST_RETRIES,
        "ui_base_url": "http://127.0.0.1:18181",
        "approval_webhooks": [{"name": "am", "url": alertmanager.url + "/api/v2/alerts", "format": "alertmanager"}],
        "version_hooks": [
            {"name": "vllm", "type": "vllm", "url": vllm.url, "unload_previous": True},
            {"name": "down", "type": "webhook", "url": f"http://127.0.0.1:{closed_port()}/hook"},
        ],
    }
    (tmp_path / "driftloop.yaml").write_text(yaml.safe_dump(raw))
    caplog.set_level("INFO", logger="retrain.notify")
    daemon = MonitorDaemon(parse_config(raw))
    daemon.start(background=False)
    try:
        assert daemon.ready, daemon.startup_error
        post_labelled_events(daemon, 60)
        run_id = daemon.start_retrain({"reason": "test"}, actor="test")
        daemon.job_thread.join(timeout=300)
        assert daemon.store.get_run(run_id)["state"] == "pending_approval"

        [alerts] = wait_for(lambda: alertmanager.bodies())
        assert alerts[0]["labels"]["run_id"] == run_id
        assert alerts[0]["generatorURL"] == f"http://127.0.0.1:18181/ui#run={run_id}"
        assert "endsAt" not in alerts[0]

        approve_run(daemon.store, run_id, actor="dana")
        daemon.tick()
        assert daemon.store.get_run(run_id)["state"] == "active"
        assert daemon.registry.active().name == "v2"
        resolve = wait_for(lambda: alertmanager.bodies()[1:])[0]
        assert resolve[0]["labels"]["run_id"] == run_id
        assert "endsAt" in resolve[0]
        [load] = wait_for(lambda: vllm.bodies("/v1/load_lora_adapter"))
        assert load == {"lora_name": "v2", "lora_path": str(daemon.registry.get("v2").adapter_dir)}
        assert wait_for(lambda: vllm.bodies("/v1/unload_lora_adapter")) == [{"lora_name": "v1"}]

        daemon.rollback(None, actor="dana", reason="test")
        assert daemon.registry.active().name == "v1"
        wait_for(lambda: len(vllm.bodies("/v1/load_lora_adapter")) == 2)
        assert vllm.bodies("/v1/load_lora_adapter")[1]["lora_name"] == "v1"
        assert wait_for(lambda: vllm.bodies("/v1/unload_lora_adapter")[1:]) == [{"lora_name": "v2"}]

        # The target that is down failed on both version changes, and the daemon went on.
        wait_for(lambda: sample(daemon.notifier, "driftloop_notify_failures_total", target_type="webhook",
                                event="version_activated") == 2)
        failed = [entry for entry in daemon.store.audit_log() if entry["action"] == "notify_failed"]
        assert [(entry["version"], entry["detail"]["target"]) for entry in failed] == [("v2", "down"), ("v1", "down")]
        post_labelled_events(daemon, 3, offset=900)
    finally:
        daemon.stop()
