"""``driftloop demo``: close the loop on CLINC150 with real processes on loopback.

The first adapter is trained on some CLINC150 domains (its head contains
every intent and ``oos``). The demo starts ``driftloop serve`` and ``driftloop run``
as subprocesses and replays traffic through the server:

* phase 1: in-distribution queries (training-split examples of the known
  domains that the bootstrap left out, so never trained on);
* phase 2: a share of the traffic moves to the unseen domains (their training
  split) and to out-of-scope queries.

Delayed labels are posted for a fraction of the events. Every text is sent
once, so examples answered after the swap were never trained on. The canary
judges on production events held out by id and on the original test split.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from monitor.config import Config, parse_config
from retrain.datasets import load_clinc150


@dataclass(frozen=True)
class Scenario:
    phase1_events: int
    post_swap_events: int
    max_phase2_events: int
    new_domain_share: float
    oos_share: float
    label_fraction: float
    events_per_second: float
    batch_size: int = 16
    label_delay_batches: int = 3
    timeout_s: float = 1500.0
    seed: int = 0
    # Traffic rate while a retrain runs, as a share of events_per_second. The
    # replay pools are finite, and the recovery after the swap needs texts
    # that were never sent. A retrain with its rank sweep takes 5 to 10 minutes
    # on 2 cores, which at a quarter of the rate used up the unseen-domain pool.
    rate_during_retrain: float = 0.1
    # Domains of the drifted traffic; None means every domain the first adapter did not learn.
    new_domains: tuple[str, ...] | None = None


FULL = Scenario(phase1_events=1000, post_swap_events=1000, max_phase2_events=5000, new_domain_share=0.6,
                oos_share=0.1, label_fraction=0.5, events_per_second=25.0)
QUICK = Scenario(phase1_events=400, post_swap_events=400, max_phase2_events=3000, new_domain_share=0.6,
                 oos_share=0.1, label_fraction=0.8, events_per_second=30.0, timeout_s=420.0)

# Settings that make --quick fit in a few minutes on 2 CPU cores.
QUICK_OVERRIDES = {
    "data": {"per_label_limit": 15},
    "bootstrap": {"epochs": 5, "learning_rate": 0.005},
    "monitor": {"window_size": 100, "sample_size": 100, "check_interval_s": 2.0},
    "trigger": {"min_labels": 700},
    "retrain": {"replay_per_label": 8, "max_per_label": 20, "training": {"epochs": 5},
                "sweep": {"ranks": [4, 8], "budget_steps": 20}},
    "canary": {"min_production_samples": 20, "shadow_sample": 100},
}


@dataclass
class Sent:
    phase: str
    source: str  # "known" | "new" | "oos"
    text: str
    label: str
    sent_at: float
    event_id: str = ""
    version: str = ""
    predicted: str = ""
    confidence: float = 0.0


@dataclass
class Timeline:
    start: float = field(default_factory=time.time)

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {message}", flush=True)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_config(config_path: str | Path, quick: bool, overrides: dict | None = None) -> tuple[Config, dict, Path]:
    """Return the validated demo config, its raw mapping with free ports, and its folder."""
    path = Path(config_path).resolve()
    raw = yaml.safe_load(path.read_text()) or {}
    if quick:
        raw = _merge(raw, QUICK_OVERRIDES)
    if overrides:
        raw = _merge(raw, overrides)
    monitor_port, server_port = _free_port(), _free_port()
    raw = _merge(raw, {
        "monitor": {"host": "127.0.0.1", "port": monitor_port},
        "server": {"host": "127.0.0.1", "port": server_port, "monitor_url": f"http://127.0.0.1:{monitor_port}"},
        "approval": raw.get("approval", "auto"),
    })
    config = parse_config(raw, base_dir=path.parent, source=str(path))
    return config, raw, path.parent


def wait_ready(url: str, process: subprocess.Popen, name: str, log: Path | None = None,
               timeout_s: float = 300.0) -> None:
    """Poll ``url`` until it returns 200; raise RuntimeError when ``process`` exits or time runs out."""
    see = f"; see {log}" if log is not None else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before it was ready{see}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} was not ready after {timeout_s:.0f} s{see}")


def _start(command: str, runtime_config: Path, log: Path) -> subprocess.Popen:
    handle = log.open("w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "monitor.cli", "--config", str(runtime_config), command],
                            stdout=handle, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Traffic:
    """Pools of never-repeated texts for each traffic source."""

    def __init__(self, config: Config, seed: int, new_domains: tuple[str, ...] | None = None):
        from retrain.datasets import dataset_from_config

        clinc = load_clinc150()
        dataset = dataset_from_config(config)
        known_domains = config.data.clinc150.domains or list(clinc.domains)
        self.new_domains = list(new_domains) if new_domains else [name for name in clinc.domains if name not in known_domains]
        new_intents = clinc.intents_of(self.new_domains) if self.new_domains else set()
        rng = random.Random(seed)
        self.pools = {
            "known": list(dataset.unused_train),
            "new": [example for example in clinc.splits["train"] if example[1] in new_intents],
            "oos": list(clinc.splits["oos_train"]) + list(clinc.splits["oos_val"]),
        }
        for pool in self.pools.values():
            rng.shuffle(pool)
        self.rng = rng

    def draw(self, phase: str, new_share: float, oos_share: float) -> tuple[str, str, str] | None:
        roll = self.rng.random()
        source = "known"
        if phase == "drift":
            if roll < new_share:
                source = "new"
            elif roll < new_share + oos_share:
                source = "oos"
            if not self.pools[source]:
                source = "known"
        if not self.pools[source]:
            return None
        text, label = self.pools[source].pop()
        return source, text, label


class DemoRun:
    def __init__(self, config: Config, scenario: Scenario, monitor_url: str, server_url: str, timeline: Timeline):
        self.config = config
        self.scenario = scenario
        self.monitor = httpx.Client(base_url=monitor_url, timeout=30.0)
        self.server = httpx.Client(base_url=server_url, timeout=60.0)
        self.timeline = timeline
        self.traffic = Traffic(config, scenario.seed, scenario.new_domains)
        self.sent: list[Sent] = []
        self.label_queue: list[list[dict]] = []
        self.audit_seen = 0
        self.events: dict[str, float] = {}
        self.first_version: str | None = None
        self.promoted_version: str | None = None
        self.promoted_at: float | None = None
        self.swap_seen_at_event: int | None = None
        self.run_id: str | None = None
        self.suppressed_windows = 0
        self.labels_wait = False
        self.run_ended = False
        self.windows_seen: set[str] = set()
        self.rng = random.Random(scenario.seed + 1)

    def send_batch(self, phase: str) -> bool:
        batch = []
        for _ in range(self.scenario.batch_size):
            drawn = self.traffic.draw(phase, self.scenario.new_domain_share, self.scenario.oos_share)
            if drawn is None:
                break
            batch.append(Sent(phase, drawn[0], drawn[1], drawn[2], time.time()))
        if not batch:
            return False
        response = self.server.post("/v1/classify", json={"texts": [item.text for item in batch]})
        response.raise_for_status()
        body = response.json()
        labels = []
        for item, prediction in zip(batch, body["predictions"]):
            item.event_id = prediction["event_id"]
            item.version = body["version"]
            item.predicted = prediction["label"]
            item.confidence = prediction["probability"]
            if self.rng.random() < self.scenario.label_fraction:
                labels.append({"id": item.event_id, "label": item.label})
        self.sent.extend(batch)
        if self.first_version is None:
            self.first_version = body["version"]
        if self.promoted_version and body["version"] == self.promoted_version and self.swap_seen_at_event is None:
            self.swap_seen_at_event = len(self.sent)
            self.timeline.say(f"server answers with {body['version']} (first response from the new version)")
        self.label_queue.append(labels)
        self._post_due_labels()
        return True

    def _post_due_labels(self, flush: bool = False) -> None:
        # Labels arrive a few batches late, as delayed ground truth does. A label can
        # still arrive before its event, which the server sends in the background. The monitor
        # keeps such a label until the event arrives.
        while self.label_queue and (flush or len(self.label_queue) > self.scenario.label_delay_batches):
            labels = self.label_queue.pop(0)
            if not labels:
                continue
            response = self.monitor.post("/v1/labels", json={"labels": labels})
            if response.status_code != 200:
                rejected = response.json().get("rejected") or [response.json()]
                self.timeline.say(f"the monitor rejected {len(rejected)} labels, first: {rejected[0]}")

    def poll_timeline(self) -> None:
        entries = self.monitor.get("/v1/audit", params={"since": self.audit_seen}).json()["entries"]
        for entry in entries:
            self.audit_seen = entry["id"]
            self._describe(entry)
        if self.promoted_version is not None:
            self._describe_new_windows()

    def _describe_new_windows(self) -> None:
        """Print every window of the promoted version, drifted or not, to show the recovery."""
        windows = self.monitor.get("/v1/windows", params={"limit": 20}).json()["windows"]
        for window in sorted(windows, key=lambda w: w["ended_at"]):
            if window.get("version") != self.promoted_version or window["window_id"] in self.windows_seen:
                continue
            self.windows_seen.add(window["window_id"])
            if window["drifted"]:
                continue  # already printed from the audit log
            self.timeline.say(f"window {window['window_id']} ({self.promoted_version}): no drift "
                              f"(mean confidence {window['mean_confidence']:.2f}, {window['n_events']} events)")

    def _describe(self, entry: dict) -> None:
        action, detail = entry["action"], entry["detail"]
        self.events.setdefault(action, entry["timestamp"])
        if action == "window_drifted":
            # Once a retrain waits for labels or runs, further drifted windows add
            # nothing new to the story: count them and print the count later.
            waiting = self.labels_wait or (self.run_id is not None and self.promoted_version is None)
            if waiting:
                self.suppressed_windows += 1
            else:
                tokens = detail.get("explanation", {}).get("new_frequent_tokens", [])[:5]
                new_tokens = f"; new tokens: {', '.join(str(token) for token in tokens)}" if tokens else ""
                self.timeline.say(f"drift in window {detail['window_id']}: {', '.join(detail['signals'])} "
                                  f"(mean confidence {detail['mean_confidence']:.2f}, {detail['n_events']} events"
                                  f"{new_tokens})")
        elif action == "labels_needed":
            self.labels_wait = True
            self.timeline.say(f"drift persists, retrain waits for labels: {detail['message']}")
        elif action == "retrain_triggered":
            self._report_suppressed("while waiting for labels")
            self.labels_wait = False
            self.run_id = entry["run_id"]
            self.timeline.say(f"retrain {entry['run_id']} triggered: {detail.get('reason')}, "
                              f"{detail.get('labelled')} labelled events")
        elif action.startswith("run_") or action.startswith("canary_"):
            self.timeline.say(f"run {entry['run_id']}: {action.replace('_', ' ')}")
            if action in ("run_failed", "run_rejected_by_gate", "run_rejected"):
                self.run_ended = True
        elif action == "promote":
            self._report_suppressed("while the run was in progress")
            self.promoted_version = entry["version"]
            self.promoted_at = entry["timestamp"]
            self.timeline.say(f"promoted {entry['version']} (was {detail.get('previous')}) by {entry['actor']}")
        elif action == "rollback":
            self.timeline.say(f"rolled back to {entry['version']}")

    def _report_suppressed(self, when: str) -> None:
        if self.suppressed_windows:
            self.timeline.say(f"{self.suppressed_windows} more drifted windows {when}")
            self.suppressed_windows = 0

    def pace(self, started: float, sent_in_phase: int, rate_factor: float = 1.0) -> None:
        target = started + sent_in_phase / (self.scenario.events_per_second * rate_factor)
        delay = target - time.time()
        if delay > 0:
            time.sleep(delay)

    def run(self) -> bool:
        scenario = self.scenario
        deadline = time.time() + scenario.timeout_s
        self.timeline.say(f"phase 1: {scenario.phase1_events} in-distribution events at about "
                          f"{scenario.events_per_second:.0f} events/s, {scenario.label_fraction:.0%} labelled later")
        started, count, last_poll = time.time(), 0, 0.0
        while count < scenario.phase1_events and self.send_batch("stable"):
            count += scenario.batch_size
            self.pace(started, count)
            if time.time() - last_poll > 2.0:
                self.poll_timeline()
                last_poll = time.time()
        self.phase2_start = len(self.sent)
        self.phase2_started_at = time.time()
        self.timeline.say(f"phase 2: {scenario.new_domain_share:.0%} of traffic from unseen domains "
                          f"({', '.join(self.traffic.new_domains)}), {scenario.oos_share:.0%} out-of-scope")
        started, count, rate_factor = time.time(), 0, 1.0
        while time.time() < deadline:
            if not self.send_batch("drift"):
                self.timeline.say("traffic pools exhausted")
                break
            count += scenario.batch_size
            if self.swap_seen_at_event is not None:
                if len(self.sent) - self.swap_seen_at_event >= scenario.post_swap_events:
                    break
            elif count >= scenario.max_phase2_events and self.run_id is None:
                self.timeline.say(f"no retrain after {count} drifted events; stopping")
                break
            retraining = self.run_id is not None and self.promoted_version is None and not self.run_ended
            wanted = scenario.rate_during_retrain if retraining else 1.0
            if wanted != rate_factor:
                # Restart the pacing clock at the new rate.
                started, count, rate_factor = time.time(), 0, wanted
            self.pace(started, count, rate_factor)
            if time.time() - last_poll > 2.0:
                self.poll_timeline()
                last_poll = time.time()
        self._post_due_labels(flush=True)
        # Let the monitor evaluate the last closed windows.
        time.sleep(self.config.monitor.check_interval_s * 2 + 3)
        self.poll_timeline()
        return self.promoted_version is not None and self.swap_seen_at_event is not None


def _accuracy(items: list[Sent]) -> tuple[float | None, float | None, int]:
    if not items:
        return None, None, 0
    accuracy = sum(item.predicted == item.label for item in items) / len(items)
    confidence = sum(item.confidence for item in items) / len(items)
    return accuracy, confidence, len(items)


def summarize(demo: DemoRun) -> dict:
    drifted = [item for item in demo.sent if item.phase == "drift"]
    before = [item for item in drifted if item.version == demo.first_version]
    after = [item for item in drifted if demo.promoted_version and item.version == demo.promoted_version]
    windows = demo.monitor.get("/v1/windows", params={"limit": 1000}).json()["windows"]
    windows.sort(key=lambda window: window["ended_at"])
    first_drift = next((w for w in windows if w["drifted"] and w["ended_at"] >= demo.phase2_started_at), None)
    events_to_detection = None
    if first_drift is not None:
        events_to_detection = sum(1 for item in drifted if item.sent_at <= first_drift["ended_at"])
    stable_windows = [w for w in windows if w["status"] == "ok" and w["ended_at"] < demo.phase2_started_at]
    after_windows = [w for w in windows if demo.promoted_version and w.get("version") == demo.promoted_version and w["status"] == "ok"]
    run = demo.monitor.get(f"/v1/retrains/{demo.run_id}").json() if demo.run_id else {}
    watch = demo.monitor.get("/v1/status").json().get("post_promotion_watch")
    return {
        "watch": watch,
        "before": _accuracy(before),
        "after": _accuracy(after),
        "new_before": _accuracy([i for i in before if i.source == "new"]),
        "new_after": _accuracy([i for i in after if i.source == "new"]),
        "known_before": _accuracy([i for i in before if i.source == "known"]),
        "known_after": _accuracy([i for i in after if i.source == "known"]),
        "events_to_detection": events_to_detection,
        "stable_windows": len(stable_windows),
        "stable_windows_drifted": sum(1 for w in stable_windows if w["drifted"]),
        "after_windows": len(after_windows),
        "after_windows_drifted": sum(1 for w in after_windows if w["drifted"]),
        "run": run,
        "trigger_to_promotion_s": (demo.events.get("promote", 0) - demo.events.get("retrain_triggered", 0))
        if "promote" in demo.events and "retrain_triggered" in demo.events else None,
        "first_version": demo.first_version,
        "promoted_version": demo.promoted_version,
    }


def _fmt(value, pattern="{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def _interval(bounds) -> str:
    return "-" if not bounds else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def print_summary(summary: dict) -> None:
    run = summary["run"] or {}
    training = run.get("training") or {}
    canary = run.get("canary") or {}
    rows = [
        ("", f"before swap ({summary['first_version']})", f"after swap ({summary['promoted_version'] or '-'})"),
        ("accuracy, drifted traffic", _fmt(summary["before"][0]), _fmt(summary["after"][0])),
        ("mean confidence, drifted traffic", _fmt(summary["before"][1]), _fmt(summary["after"][1])),
        ("accuracy, unseen-domain queries", _fmt(summary["new_before"][0]), _fmt(summary["new_after"][0])),
        ("accuracy, known-domain queries", _fmt(summary["known_before"][0]), _fmt(summary["known_after"][0])),
        ("events answered", str(summary["before"][2]), str(summary["after"][2])),
    ]
    width = max(len(row[0]) for row in rows)
    print("\nSummary")
    for row in rows:
        print(f"  {row[0]:<{width}}  {row[1]:>24}  {row[2]:>24}")
    print(f"  stable windows flagged as drift: {summary['stable_windows_drifted']} of {summary['stable_windows']}")
    print(f"  drifted events until detection: {_fmt(summary['events_to_detection'], '{}')}")
    print(f"  windows after the swap flagged as drift: {summary['after_windows_drifted']} of {summary['after_windows']}")
    print(f"  retraining wall time: {_fmt(training.get('total_seconds'), '{:.0f} s')}, of which final training "
          f"{_fmt(training.get('wall_seconds'), '{:.0f} s')} ({training.get('steps', '-')} steps on "
          f"{training.get('device', '-')}, {training.get('stop_reason', '-')})")
    print(f"  retraining data: {training.get('data', {})}")
    for row in training.get("sweep") or []:
        score = "failed: " + row["error"] if row.get("error") else f"validation macro-F1 {row['val_macro_f1']:.3f}"
        print(f"  rank sweep: rank {row['rank']:>2} ({row['start']}), {row['steps']} steps, {score}"
              + ("  <- chosen" if row.get("chosen") else ""))
    best = (training.get("validation") or {}).get("best") or {}
    if best:
        print(f"  candidate on the validation holdout: loss {best['loss']:.3f}, accuracy {best['accuracy']:.3f}, "
              f"macro-F1 {best['macro_f1']:.3f}")
    print(f"  trigger to promotion: {_fmt(summary['trigger_to_promotion_s'], '{:.0f} s')}")
    for name in ("production", "test"):
        part = canary.get(name)
        if part:
            print(f"  canary {part['name']} (n={part['n']}): accuracy {part['current_accuracy']:.3f} -> "
                  f"{part['candidate_accuracy']:.3f}, macro-F1 {part['current_macro_f1']:.3f} -> "
                  f"{part['candidate_macro_f1']:.3f}, McNemar p={_fmt(part.get('mcnemar_p'), '{:.2g}')}, "
                  f"mid-p={_fmt(part.get('mcnemar_midp'), '{:.2g}')}")
            if part.get("accuracy_diff_ci"):
                print(f"    95% bootstrap intervals of the difference: accuracy {_interval(part['accuracy_diff_ci'])}, "
                      f"macro-F1 {_interval(part['macro_f1_diff_ci'])}; "
                      f"regressed classes: {', '.join(part.get('regressed_classes') or []) or 'none'}")
    if canary.get("shadow"):
        shadow = canary["shadow"]
        print(f"  canary shadow on {shadow['n']} live inputs: agreement {shadow['agreement']:.3f}, "
              f"mean confidence {shadow['current_mean_confidence']:.3f} -> {shadow['candidate_mean_confidence']:.3f}")
        flips = ", ".join(f"{flip['current']} -> {flip['candidate']} ({flip['count']})"
                          for flip in (shadow.get("flips") or [])[:3])
        if flips:
            print(f"    most frequent label changes: {flips}")
    latency = canary.get("latency") or {}
    if latency.get("n"):
        print(f"  canary latency of single-text predictions (n={latency['n']}): p50 {latency['current_p50_ms']:.1f} -> "
              f"{latency['candidate_p50_ms']:.1f} ms, p99 {latency['current_p99_ms']:.1f} -> "
              f"{latency['candidate_p99_ms']:.1f} ms")
    deciding = f" ({canary['deciding_gate']})" if canary.get("deciding_gate") else ""
    print(f"  canary decision: {canary.get('status', '-')}{deciding}")
    watch = summary.get("watch")
    if watch:
        observed = (watch.get("result") or {}).get("observed") or {}
        baseline = watch.get("baseline") or {}
        print(f"  post-promotion watch of {watch['version']}: {watch['status']} after {observed.get('events', 0)} events; "
              f"mean confidence {_fmt(baseline.get('mean_confidence'))} ({watch['previous']}, last windows) -> "
              f"{_fmt(observed.get('mean_confidence'))}, accuracy estimate {_fmt(baseline.get('accuracy_estimate'))} -> "
              f"{_fmt(observed.get('accuracy_estimate'))}")


def run_demo(config_path: str | Path, *, quick: bool = False, keep_state: bool = False,
             overrides: dict | None = None, scenario: Scenario | None = None) -> int:
    from retrain.bootstrap import bootstrap

    timeline = Timeline()
    config, raw, _ = prepare_config(config_path, quick, overrides)
    scenario = scenario or (QUICK if quick else FULL)
    state = config.state_path
    if state.exists() and not keep_state:
        timeline.say(f"removing the previous demo state in {state} (the bootstrap cache is kept)")
        for child in state.iterdir():
            if child.resolve() != config.cache_path.resolve():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    state.mkdir(parents=True, exist_ok=True)

    timeline.say("bootstrap: first adapter and reference profile")
    bootstrap(config, log=timeline.say)

    runtime = state / "runtime.yaml"
    raw = dict(raw, state_dir=str(state.resolve()), cache_dir=str(config.cache_path.resolve()))
    runtime.write_text(yaml.safe_dump(raw))
    logs = {"monitor": state / "monitor.log", "server": state / "server.log"}
    timeline.say(f"starting `driftloop run` on {config.server.monitor_url} and `driftloop serve` on "
                 f"http://127.0.0.1:{config.server.port} (logs in {state})")
    monitor = _start("run", runtime, logs["monitor"])
    server = _start("serve", runtime, logs["server"])
    try:
        wait_ready(f"{config.server.monitor_url}/readyz", monitor, "monitor", logs["monitor"])
        wait_ready(f"http://127.0.0.1:{config.server.port}/readyz", server, "server", logs["server"])
        timeline.say("monitor and server are ready")
        demo = DemoRun(config, scenario, config.server.monitor_url, f"http://127.0.0.1:{config.server.port}", timeline)
        closed = demo.run()
        summary = summarize(demo)
        print_summary(summary)
        (state / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    finally:
        _stop(server)
        _stop(monitor)
    total = time.time() - timeline.start
    if closed:
        print(f"\nThe loop closed in {total:.0f} s: drift detected, retrained, canaried, promoted and swapped.")
        return 0
    print(f"\nThe loop did not close within {total:.0f} s; see {logs['monitor']} and {logs['server']}.")
    return 1
