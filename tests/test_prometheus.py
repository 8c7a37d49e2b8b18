"""Metric catalog, alert rules and Alertmanager example, checked with promtool, amtool and a real Prometheus.

promtool, amtool and prometheus come from the Debian packages ``prometheus`` and
``prometheus-alertmanager``. A test that needs a missing tool is skipped, unless
DRIFTLOOP_REQUIRE_PROMETHEUS=1 (set by .ci/run) makes it fail.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import MonitorMetrics
from retrain.emitter import EventEmitter
from retrain.server import ServerMetrics
from tests.conftest import tiny_deployment_config
from tests.test_dashboards import METRIC_NAME, dashboard_queries, exported_sample_names

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "dashboards"
RULES = DASHBOARDS / "alerts.yml"
RULE_TESTS = DASHBOARDS / "alerts.test.yml"
ALERTMANAGER = DASHBOARDS / "alertmanager.yml"
RUNBOOKS = REPO / "docs" / "runbooks"
METRICS_DOC = REPO / "docs" / "metrics.md"
# Sent by retrain/notify.py to Alertmanager directly, not by a rule.
NOTIFIER_ALERTS = ("DriftloopApprovalPending",)
RUNBOOK_SECTIONS = ("## What it means", "## How to confirm", "## What to do", "## When to escalate")
# Label names whose values grow without bound (ids, texts) or that belong in info metrics (versions).
FORBIDDEN_LABELS = {"run_id", "window_id", "event_id", "id", "text", "version", "base_version", "model_version"}
# Comparison operators of PromQL; label matchers inside {} use = != =~ !~ and are skipped.
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)")


def require_tool(name: str) -> str:
    """Return the path of ``name``; skip the test when it is missing, or fail under DRIFTLOOP_REQUIRE_PROMETHEUS=1."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = (f"{name} not found on PATH; install the Debian packages prometheus and prometheus-alertmanager "
               "(.ci/run does)")
    if os.environ.get("DRIFTLOOP_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(message + "; DRIFTLOOP_REQUIRE_PROMETHEUS=1 requires it")
    pytest.skip(message)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def metric_collectors() -> list[tuple[str, MetricWrapperBase]]:
    """(process, collector) of every metric the monitor, the model server and its emitter define."""
    monitor = MonitorMetrics()
    server = ServerMetrics.register(CollectorRegistry())
    emitter = EventEmitter(None, registry=CollectorRegistry())
    found = [("monitor", value) for value in vars(monitor).values() if isinstance(value, MetricWrapperBase)]
    found += [("server", value) for value in vars(server).values() if isinstance(value, MetricWrapperBase)]
    found += [("server", value) for value in vars(emitter).values() if isinstance(value, MetricWrapperBase)]
    return found


def exposed_name(collector: MetricWrapperBase) -> str:
    # prometheus_client strips _total from a counter's name and adds _info to an info metric's.
    name = collector._name
    suffix = {"counter": "_total", "info": "_info"}.get(collector._type, "")
    return name + suffix


# Metric catalog


def test_metric_names_follow_conventions():
    for process, collector in metric_collectors():
        name = exposed_name(collector)
        assert name.startswith("driftloop_"), f"{process} metric {name} lacks the driftloop_ prefix"
        assert not re.search(r"_(ms|milliseconds|percent|minutes|hours)(_|$)", name), \
            f"{process} metric {name} is not in base units (seconds, ratios 0-1)"
        if collector._type == "counter":
            assert name.endswith("_total"), name


def test_metric_labels_are_bounded():
    for process, collector in metric_collectors():
        name = exposed_name(collector)
        labels = set(collector._labelnames)
        if collector._type == "info":
            continue
        unbounded = sorted(labels & FORBIDDEN_LABELS)
        assert not unbounded, f"{process} metric {name} has unbounded or version labels {unbounded}"


def source_metric_names() -> set[str]:
    """Exposed names of the metrics that monitor/ and retrain/ construct, found in their source."""
    constructor = re.compile(r"\b(Counter|Gauge|Histogram|Info|Enum|Summary)\(\s*\"(driftloop_[a-z0-9_]+)\"")
    names = set()
    for path in [*(REPO / "monitor").rglob("*.py"), *(REPO / "retrain").rglob("*.py")]:
        for kind, name in constructor.findall(path.read_text()):
            if kind == "Counter" and not name.endswith("_total"):
                name += "_total"
            elif kind == "Info":
                name += "_info"
            names.add(name)
    return names


def test_source_scan_finds_metrics():
    defined = {exposed_name(collector) for _, collector in metric_collectors()}
    assert defined <= source_metric_names()


def test_every_metric_is_documented():
    catalog = METRICS_DOC.read_text()
    documented = set(re.findall(r"^\| `(driftloop_[a-z0-9_]+)` \|", catalog, re.MULTILINE))
    defined = source_metric_names()
    missing = sorted(defined - documented)
    assert not missing, f"docs/metrics.md has no table row for {missing}"
    stale = sorted(documented - defined)
    assert not stale, f"docs/metrics.md documents {stale}, which driftloop does not define"


# Alert rules


def test_rules_pass_promtool_check():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120, cwd=DASHBOARDS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_each_alert_fires_and_stays_silent():
    """Each alert has a unit-test case where it fires and one where it stays silent."""
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        name = rule["alert"]
        fired = [case for case in cases if case["alertname"] == name and case.get("exp_alerts")]
        silent = [case for case in cases if case["alertname"] == name and not case.get("exp_alerts")]
        assert fired, f"no unit test in {RULE_TESTS.name} where {name} fires"
        assert silent, f"no unit test in {RULE_TESTS.name} where {name} stays silent"


def test_alerts_have_annotations_and_runbooks():
    for rule in alert_rules():
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{name} has no {key} annotation"
        assert annotations["runbook_url"] == f"RUNBOOK_BASE_URL/docs/runbooks/{name}.md", name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name


def test_every_alert_has_a_runbook_page():
    names = [rule["alert"] for rule in alert_rules()] + list(NOTIFIER_ALERTS)
    for name in names:
        page = RUNBOOKS / f"{name}.md"
        assert page.is_file(), f"no runbook {page.relative_to(REPO)}"
        text = page.read_text()
        for section in RUNBOOK_SECTIONS:
            assert section in text, f"{page.name} has no {section!r} section"
    pages = sorted(path.stem for path in RUNBOOKS.glob("*.md"))
    assert sorted(names) == pages, "every runbook page belongs to one alert"


def test_rules_use_exported_metrics():
    exported = exported_sample_names() | {"up"}
    for rule in alert_rules():
        names = set(METRIC_NAME.findall(rule["expr"]))
        if re.search(r"\bup\{", rule["expr"]):
            names.add("up")
        assert names, f"{rule['alert']} queries no metric"
        unknown = sorted(names - exported)
        assert not unknown, f"{rule['alert']} queries {unknown}, which driftloop does not export"


# Alertmanager


def test_alertmanager_config_passes_amtool():
    amtool = require_tool("amtool")
    result = subprocess.run([amtool, "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


ROUTES = [
    ("approval", {"alertname": "DriftloopApprovalPending", "severity": "warning", "service": "driftloop"}, "ml-owners"),
    ("stale-approval", {"alertname": "DriftloopApprovalPending", "severity": "critical", "service": "driftloop"},
     "ml-owners"),
    ("approval-rule", {"alertname": "DriftloopApprovalPendingTooLong", "severity": "warning", "service": "driftloop"},
     "ml-owners"),
    ("critical", {"alertname": "DriftloopSidecarDown", "severity": "critical", "service": "driftloop"}, "oncall"),
    ("warning", {"alertname": "DriftloopDriftWarning", "severity": "warning", "service": "driftloop"}, "ml-owners"),
    ("info", {"alertname": "DriftloopVersionRolledBack", "severity": "info", "service": "driftloop"},
     "driftloop-default"),
]


@pytest.mark.parametrize("labels, receiver", [case[1:] for case in ROUTES], ids=[case[0] for case in ROUTES])
def test_alertmanager_routes(labels, receiver):
    amtool = require_tool("amtool")
    command = [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"--verify.receivers={receiver}"]
    command += [f"{key}={value}" for key, value in labels.items()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


# Against a real Prometheus


def with_bool_comparisons(expr: str) -> str:
    """Add the ``bool`` modifier to every comparison of ``expr`` outside label matchers and strings.

    An alert expression such as ``rate(x[5m]) > 0`` filters every series out while all is
    well. With ``bool`` each comparison returns 0 or 1 for every pair of series its
    operands match. An empty result then means that a metric is missing or that the two
    sides of a comparison match no series, never that the alert condition is false.
    """
    out = []
    depth = 0
    quote = None
    index = 0
    while index < len(expr):
        char = expr[index]
        if quote:
            out.append(char)
            if char == "\\":
                out.append(expr[index + 1])
                index += 1
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
            out.append(char)
        elif char == "{":
            depth += 1
            out.append(char)
        elif char == "}":
            depth -= 1
            out.append(char)
        else:
            match = COMPARISON.match(expr, index) if depth == 0 else None
            if match:
                out.append(f"{match.group(1)} bool")
                index = match.end()
                continue
            out.append(char)
        index += 1
    return "".join(out)


def test_with_bool_comparisons():
    assert with_bool_comparisons('a{b!="c"} > 0 or d >= e') == 'a{b!="c"} > bool 0 or d >= bool e'
    assert with_bool_comparisons("x == 1") == "x == bool 1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check, timeout_s: float, description: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tails = "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in logs if path.exists())
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {description}\n{tails}")


def prometheus_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and every dashboard query, with the dashboard's $job set to all jobs."""
    queries = [(f"rule {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    for path in sorted(DASHBOARDS.glob("*.json")):
        for title, expr in dashboard_queries(path):
            queries.append((f"{path.name}: {title}", expr.replace("$job", ".*")))
    return queries


def scraped_metric_names(exposition: str) -> set[str]:
    """Metric names of a /metrics page as docs/metrics.md spells them (counters with _total, no _created)."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):
            continue
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def start_process(command: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
def test_queries_run_against_prometheus(tmp_path, tiny_model_dir, clinc_dir):
    """A real Prometheus scrapes a monitor and a model server, and every rule and panel query returns series.

    An expression that returns nothing, as an alert condition does while all is well, runs
    again with ``bool`` on each comparison (see with_bool_comparisons) and must return series then.
    """
    prometheus_binary = require_tool("prometheus")
    from monitor.config import parse_config
    from retrain.bootstrap import bootstrap

    monitor_port, server_port, prometheus_port = free_port(), free_port(), free_port()
    raw = tiny_deployment_config(tmp_path / "state", tiny_model_dir)
    raw["monitor"].update({"check_interval_s": 1, "port": monitor_port})
    raw["server"] = {"port": server_port, "monitor_url": f"http://127.0.0.1:{monitor_port}", "poll_interval_s": 1}
    bootstrap(parse_config(raw), log=lambda message: None)
    config_path = tmp_path / "driftloop.yaml"
    config_path.write_text(yaml.safe_dump(raw))

    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "driftloop", "static_configs": [{"targets": [f"127.0.0.1:{monitor_port}"]}]},
            {"job_name": "driftloop-server", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]},
        ],
    }))
    logs = [tmp_path / "monitor.log", tmp_path / "server.log", tmp_path / "prometheus.log"]
    monitor_url = f"http://127.0.0.1:{monitor_port}"
    server_url = f"http://127.0.0.1:{server_port}"
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"

    processes = []
    try:
        processes.append(start_process([sys.executable, "-m", "monitor.cli", "--config", str(config_path), "run"], logs[0]))
        processes.append(start_process([sys.executable, "-m", "monitor.cli", "--config", str(config_path), "serve"], logs[1]))
        wait_until(lambda: httpx.get(f"{monitor_url}/readyz", timeout=2).status_code == 200, 240, "the monitor", logs)
        wait_until(lambda: httpx.get(f"{server_url}/readyz", timeout=2).status_code == 200, 240, "the server", logs)
        # Started last, so that its storage is younger than the 5 minutes of the dashboard's
        # "unless ... offset 5m" annotations, which then return every version series.
        processes.append(start_process([
            prometheus_binary, f"--config.file={prometheus_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn",
        ], logs[2]))
        wait_until(lambda: httpx.get(f"{prometheus_url}/-/ready", timeout=2).status_code == 200, 60, "Prometheus", logs)

        def query(expr: str) -> list[dict]:
            response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
            body = response.json()
            assert body["status"] == "success", f"{expr}: {body.get('error')}"
            return body["data"]["result"]

        # Traffic starts after the first scrapes, so that the scraped counters rise under rate().
        wait_until(lambda: len(query("up == 1")) == 2, 60, "the first scrapes", logs)

        # Traffic through the server (its events reach the monitor), then events and labels posted directly.
        for batch in range(3):
            texts = [f"how much money is in my savings account {batch}-{i}" for i in range(8)]
            response = httpx.post(f"{server_url}/v1/classify", json={"texts": texts}, timeout=30)
            assert response.status_code == 200, response.text
        events = [{"id": f"prom-{i}", "text": f"please transfer {i} dollars to my checking account",
                   "label": "transfer", "confidence": 0.4 + (i % 5) / 10, "latency_ms": 10.0 + i % 7}
                  for i in range(100)]
        response = httpx.post(f"{monitor_url}/v1/events", json={"events": events}, timeout=30)
        assert response.status_code == 200, response.text
        labels = [{"id": f"prom-{i}", "label": "transfer" if i % 3 else "balance"} for i in range(100)]
        response = httpx.post(f"{monitor_url}/v1/labels", json={"labels": labels}, timeout=30)
        assert response.status_code == 200, response.text

        def windows_evaluated() -> bool:
            windows = httpx.get(f"{monitor_url}/v1/windows", timeout=5).json()["windows"]
            return sum(window["status"] == "ok" for window in windows) >= 2

        wait_until(windows_evaluated, 180, "two evaluated windows", logs)

        # Enough scrapes after the evaluation for rate() and for the last-window gauges.
        wait_until(lambda: query("driftloop_drift_statistic") and query("driftloop_estimated_accuracy")
                   and query("driftloop_window_evaluation_seconds_count > 1"), 60, "scraped drift metrics", logs)
        time.sleep(3)
        assert {series["metric"]["job"] for series in query("up == 1")} == {"driftloop", "driftloop-server"}

        for where, expr in prometheus_queries():
            variable = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
            if variable:
                # A Grafana variable query: the series must carry the label.
                result = query(variable.group(1))
                assert any(variable.group(2) in series["metric"] for series in result), f"{where}: {expr}"
                continue
            result = query(expr)
            if not result:
                result = query(with_bool_comparisons(expr))
            assert result, f"{where}: no series for {expr}"

        # Metrics registered outside MonitorMetrics (database, replicas, resources) show up here too.
        catalog = set(re.findall(r"^\| `(driftloop_[a-z0-9_]+)` \|", METRICS_DOC.read_text(), re.MULTILINE))
        for url in (monitor_url, server_url):
            for name in scraped_metric_names(httpx.get(f"{url}/metrics", timeout=5).text):
                assert name.startswith("driftloop_"), f"{url}/metrics exports {name} without the driftloop_ prefix"
                assert name in catalog, f"{url}/metrics exports {name}, which docs/metrics.md does not document"

        # Prometheus loaded the rule file and evaluates every rule without error.
        def rules_evaluated() -> bool:
            groups = httpx.get(f"{prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            # Prometheus reports the zero time of Go until a rule's first evaluation.
            return len(rules) == len(alert_rules()) and all(not rule["lastEvaluation"].startswith("0001-")
                                                            for rule in rules)

        wait_until(rules_evaluated, 30, "rule evaluation", logs)
        groups = httpx.get(f"{prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        for rule in (rule for group in groups for rule in group["rules"]):
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        firing = {alert["labels"]["alertname"] for alert in
                  httpx.get(f"{prometheus_url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]}
        assert "DriftloopSidecarDown" not in firing
        assert "DriftloopNoDataReceived" not in firing
    finally:
        for process in reversed(processes):
            stop_process(process)
