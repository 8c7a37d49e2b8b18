"""The shipped Grafana dashboard queries only metrics that driftloop exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from monitor.metrics import MonitorMetrics
from retrain.emitter import EventEmitter
from retrain.server import ServerMetrics

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
METRIC_NAME = re.compile(r"\bdriftloop_[a-z0-9_]+")
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "info": ("_info",),
}


def exported_sample_names() -> set[str]:
    """Sample names of the monitor's, the server's and the emitter's registries."""
    monitor = MonitorMetrics()
    monitor.active_version.info({"version": "v1"})
    server_registry = CollectorRegistry()
    server = ServerMetrics.register(server_registry)
    server.active_version.info({"version": "v1"})
    emitter = EventEmitter(None, registry=server_registry)
    names = set()
    for registry in (monitor.registry, server_registry, emitter.registry):
        for metric in registry.collect():
            # A labelled metric has no samples until its first child is set.
            suffixes = SAMPLE_SUFFIXES.get(metric.type, ("",))
            names.update(metric.name + suffix for suffix in suffixes)
            names.update(sample.name for sample in metric.samples)
    return names


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expression) of every target in a dashboard file."""
    dashboard = json.loads(path.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            queries.append((f"variable {variable['name']}", variable["query"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']}", annotation["expr"]))
    return queries


def test_every_dashboard_metric_is_exported():
    exported = exported_sample_names()
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    for path in files:
        queries = dashboard_queries(path)
        assert queries, f"{path.name} has no queries"
        for title, expr in queries:
            names = METRIC_NAME.findall(expr)
            assert names, f"{path.name}: panel {title!r} queries no driftloop metric: {expr}"
            unknown = sorted(set(names) - exported)
            assert not unknown, f"{path.name}: panel {title!r} queries {unknown}, which driftloop does not export"


def test_panels_do_not_overlap():
    for path in sorted(DASHBOARDS.glob("*.json")):
        cells: dict[tuple[int, int], str] = {}
        for panel in json.loads(path.read_text())["panels"]:
            grid = panel["gridPos"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{path.name}: {panel['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']!r} is wider than the grid"


def test_dashboard_is_importable():
    """Each dashboard has the fields Grafana's import needs and queries through its datasource variable."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for key in ("title", "uid", "schemaVersion", "panels"):
            assert key in dashboard, f"{path.name} has no {key}"
        variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", path.name
        assert variables["datasource"]["query"] == "prometheus", path.name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name} repeats a panel id"
        sources = [panel["datasource"] for panel in dashboard["panels"] if panel["type"] != "row"]
        sources += [target["datasource"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
        sources += [annotation["datasource"] for annotation in dashboard.get("annotations", {}).get("list", [])]
        for source in sources:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, f"{path.name}: {source}"


def test_dashboard_marks_version_changes():
    dashboard = json.loads((DASHBOARDS / "driftloop.json").read_text())
    expressions = [annotation.get("expr", "") for annotation in dashboard["annotations"]["list"]]
    assert any("driftloop_active_version_info" in expr for expr in expressions)
    assert any("driftloop_server_active_version_info" in expr for expr in expressions)
