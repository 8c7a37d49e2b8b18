"""Promotion benchmark: approval to serving, requests during swaps and rollbacks, canary decisions on CLINC150.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/promotion.py [--quick] [--out docs/promotion.md]

Parts 1 and 2 use real processes. The script bootstraps a first adapter on a small CLINC150
slice in a temporary state folder (``retrain.bootstrap.bootstrap``), then starts ``driftloop run``
(the monitor) and ``driftloop serve`` (the model server) on free loopback ports, with
``approval: manual``. Each repetition:

1. sends LABELLED_PER_CANDIDATE texts through the server's /v1/classify and posts their labels to
   the monitor's /v1/labels;
2. runs ``driftloop retrain`` in a terminal process, which trains a candidate from the active
   version, canaries it and leaves it in ``pending_approval``;
3. starts an open-loop load of one text per request every 20 ms (50 requests/s) against
   /v1/classify, sends POST /v1/retrains/{id}/approve after LEAD_S seconds and keeps the load
   going until TAIL_S seconds after the first response from the new version;
4. does the same around POST /v1/rollback, which goes back to the first version.

Approval to serving is the time from sending the approve request to receiving the first
classify response that names the new version. The load is the continuous poll, so its
resolution is the 20 ms schedule. Rollback to serving is measured the same way. The expected
label of every response is computed afterwards with ``retrain.model.Classifier`` on each
version's adapter, one text per call as the server does.

Part 3 trains three adapters with ``retrain.trainer.train_adapter`` on CLINC150. Their
predictions go through ``retrain.canary.compare_predictions`` and ``retrain.canary.decide``
with the built-in canary defaults, in three scenarios: a clearly better candidate, a candidate
trained with the labels of one domain's intents rotated among themselves, and a production
holdout smaller than ``canary.min_production_samples``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from bench.record import CLOCK_TICKS, OtherLoad, _busy_ticks, _own_ticks, machine_facts, publish  # noqa: E402
from monitor.demo import wait_ready  # noqa: E402

logger = logging.getLogger("bench.promotion")

SECTION = "bench/promotion.py"
HOST = "127.0.0.1"
SEED = 0
TOKEN_ENV = "DRIFTLOOP_API_TOKEN"
# Targets of the benchmark.
TARGET_SERVING_S = 1.0
REQUEST_INTERVAL_S = 0.020
# Requests sent within this many seconds of the swap count as "during" it: from this long before
# the approve (or rollback) request was sent to this long after the first response from the new version.
DURING_MARGIN_S = 2.0
# A swap that shows no new version within this many seconds of the request counts as missing.
SWAP_TIMEOUT_S = 60.0
# Seconds to wait after a retrain for the server to load the waiting candidate.
PRELOAD_TIMEOUT_S = 120.0
LABEL_BATCH = 25
# Seconds an idle client connection stays open; uvicorn closes idle connections after 5 s by default.
KEEPALIVE_EXPIRY_S = 2.0
# Canary minimum sample sizes of parts 1 and 2, larger than any slice there (see benchmark_config).
UNREACHABLE_SAMPLES = 1_000_000

# CLINC150 domains. The versions of parts 1 and 2 are trained on PROMOTION_DOMAINS, whose test split
# the retrains' canaries score. The current adapter of part 3 is trained on KNOWN_DOMAINS, and part 3's
# production traffic adds NEW_DOMAINS. The broken candidate learns the intent labels of BROKEN_DOMAIN rotated.
PROMOTION_DOMAINS = ("banking",)
KNOWN_DOMAINS = ("banking", "kitchen_and_dining")
NEW_DOMAINS = ("home", "utility")
BROKEN_DOMAIN = "kitchen_and_dining"


@dataclass(frozen=True)
class RunSize:
    repetitions: int
    # Parts 1 and 2.
    bootstrap_per_label: int
    bootstrap_epochs: int
    labelled_per_candidate: int
    retrain_max_steps: int
    load_texts: int
    lead_s: float
    tail_s: float
    # Part 3: examples per intent.
    current_per_label: int
    current_epochs: int
    replay_per_label: int
    production_known_per_label: int
    production_new_per_label: int
    candidate_epochs: int
    validation_per_label: int
    holdout_known: int
    holdout_new: int
    small_holdout: int


FULL = RunSize(repetitions=5, bootstrap_per_label=10, bootstrap_epochs=2, labelled_per_candidate=250,
               retrain_max_steps=30, load_texts=300, lead_s=4.0, tail_s=6.0,
               current_per_label=20, current_epochs=3, replay_per_label=20, production_known_per_label=5,
               production_new_per_label=15, candidate_epochs=4, validation_per_label=5,
               holdout_known=100, holdout_new=150, small_holdout=20)
QUICK = RunSize(repetitions=1, bootstrap_per_label=5, bootstrap_epochs=1, labelled_per_candidate=200,
                retrain_max_steps=10, load_texts=200, lead_s=3.0, tail_s=3.0,
                current_per_label=8, current_epochs=2, replay_per_label=8, production_known_per_label=2,
                production_new_per_label=8, candidate_epochs=1, validation_per_label=2,
                holdout_known=40, holdout_new=60, small_holdout=20)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """Return a loopback port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def process_ticks(pid: int) -> int:
    """Return the user and system clock ticks of one running process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields_after_name = text[text.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of proc(5); index 0 here is field 3.
    return int(fields_after_name[11]) + int(fields_after_name[12])


class CpuMeter:
    """CPU seconds of the monitor, the server, this process and everything else between ``start`` and ``read``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start()

    def _sample(self) -> dict[str, int]:
        sample = {"busy": _busy_ticks(), "own": _own_ticks()}
        for name, pid in self.pids.items():
            sample[name] = process_ticks(pid)
        return sample

    def start(self) -> None:
        self._wall = time.monotonic()
        self._first = self._sample()

    def read(self) -> dict[str, float]:
        last = self._sample()
        seconds = {name: (last[name] - self._first[name]) / CLOCK_TICKS for name in last}
        named = sum(seconds[name] for name in self.pids) + seconds["own"]
        return {**{name: seconds[name] for name in self.pids}, "benchmark": seconds["own"],
                "other": max(seconds["busy"] - named, 0.0), "wall": time.monotonic() - self._wall}


class Processes:
    """``driftloop run`` and ``driftloop serve`` as child processes on free loopback ports."""

    def __init__(self, folder: Path, raw_config: dict, token: str) -> None:
        import yaml

        self.folder = folder
        self.monitor_port, self.server_port = free_port(), free_port()
        raw = json.loads(json.dumps(raw_config))
        raw["monitor"] = {**raw.get("monitor", {}), "host": HOST, "port": self.monitor_port}
        raw["server"] = {**raw.get("server", {}), "host": HOST, "port": self.server_port,
                         "monitor_url": f"http://{HOST}:{self.monitor_port}"}
        self.config_path = folder / "runtime.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        **{TOKEN_ENV: token})
        self.logs = {"monitor": folder / "monitor.log", "server": folder / "server.log"}
        self.children: dict[str, subprocess.Popen] = {}

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    @property
    def server_url(self) -> str:
        return f"http://{HOST}:{self.server_port}"

    def command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "monitor.cli", "--config", str(self.config_path), *arguments]

    def start(self) -> None:
        for name, command in (("monitor", "run"), ("server", "serve")):
            handle = self.logs[name].open("w")
            self.children[name] = subprocess.Popen(self.command(command), stdout=handle, stderr=subprocess.STDOUT,
                                                   env=self.env, cwd=REPOSITORY)
            handle.close()
        wait_ready(f"{self.monitor_url}/readyz", self.children["monitor"], "monitor", self.logs["monitor"])
        wait_ready(f"{self.server_url}/readyz", self.children["server"], "server", self.logs["server"])

    def pids(self) -> dict[str, int]:
        return {name: child.pid for name, child in self.children.items()}

    def stop(self) -> None:
        """Stop both children with SIGTERM (SIGKILL after 20 s) and wait for them."""
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


# ---------------------------------------------------------------- open-loop load around one swap


@dataclass
class Response:
    index: int
    text_index: int
    scheduled: float  # Unix seconds at which the request was due
    sent: float
    done: float
    status: int | None = None
    version: str | None = None
    label: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.version is not None

    @property
    def latency_ms(self) -> float:
        """Milliseconds from the scheduled send time to the response, so a late send counts against it."""
        return 1000.0 * (self.done - self.scheduled)


@dataclass
class SwapWindow:
    kind: str  # "promote" or "rollback"
    run_id: str | None
    old_version: str
    new_version: str | None = None
    action_sent: float = 0.0
    action_done: float = 0.0
    action_status: int | None = None
    action_body: dict = field(default_factory=dict)
    first_new: float | None = None
    responses: list[Response] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    audit: list[dict] = field(default_factory=list)
    server_log: list[tuple[float, str]] = field(default_factory=list)

    @property
    def to_serving_s(self) -> float | None:
        return None if self.first_new is None else self.first_new - self.action_sent

    def server_swapped_at(self) -> float | None:
        """Return the time of the server's log line that the new version is active, or None."""
        target = self.new_version or ""
        return next((stamp for stamp, message in self.server_log if message.startswith(f"version {target} is active")),
                    None)

    def old_answers_after_swap(self) -> int | None:
        """Count requests sent after the server's swap that the old version still served.

        Such a request waited in the server before a worker thread read the active model for it, so the
        count shows how far the server's queue delays the new version.
        """
        swapped = self.server_swapped_at()
        if swapped is None:
            return None
        return sum(1 for item in self.responses if item.ok and item.version == self.old_version and item.sent > swapped)

    def phase(self, response: Response) -> str:
        """Return "before", "during" or "after" for a request, by its scheduled send time."""
        if response.scheduled < self.action_sent - DURING_MARGIN_S:
            return "before"
        end = (self.first_new if self.first_new is not None else self.action_done) + DURING_MARGIN_S
        return "during" if response.scheduled <= end else "after"


async def drive_swap(window: SwapWindow, processes: Processes, token: str, texts: list[str], first_text: int,
                     lead_s: float, tail_s: float) -> None:
    """Send one classify request every REQUEST_INTERVAL_S, whatever the responses, and the swap request after ``lead_s``.

    The load stops ``tail_s`` seconds after the first response from a version other than
    ``window.old_version``, or SWAP_TIMEOUT_S after the swap request when none comes.
    Requests still in flight are awaited, so every request sent has a recorded outcome.
    """
    import httpx

    stop = asyncio.Event()
    switched = asyncio.Event()
    # Idle connections close after KEEPALIVE_EXPIRY_S, before uvicorn's 5 s keep-alive timeout, so the
    # client never sends on a connection the server is closing at that moment.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=KEEPALIVE_EXPIRY_S)

    async with httpx.AsyncClient(base_url=processes.server_url, timeout=30.0, limits=limits) as server, \
            httpx.AsyncClient(base_url=processes.monitor_url, timeout=120.0) as monitor:

        async def classify(index: int, scheduled: float) -> None:
            text_index = (first_text + index) % len(texts)
            response = Response(index, text_index, scheduled, time.time(), 0.0)
            try:
                reply = await server.post("/v1/classify", json={"texts": [texts[text_index]]})
                response.done = time.time()
                response.status = reply.status_code
                if reply.status_code == 200:
                    body = reply.json()
                    response.version = body["version"]
                    response.label = body["predictions"][0]["label"]
            except httpx.HTTPError as exc:
                response.done = time.time()
                response.error = f"{type(exc).__name__}: {exc}"
            window.responses.append(response)
            if response.ok and response.version != window.old_version:
                if window.first_new is None or response.done < window.first_new:
                    window.first_new = response.done
                switched.set()

        async def schedule() -> None:
            tasks = []
            started = time.time()
            index = 0
            while not stop.is_set():
                due = started + index * REQUEST_INTERVAL_S
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(classify(index, due)))
                index += 1
            await asyncio.gather(*tasks)

        async def act() -> None:
            await asyncio.sleep(lead_s)
            headers = {"Authorization": f"Bearer {token}"}
            body = {"by": "bench/promotion.py", "comment": "promotion benchmark"}
            path = f"/v1/retrains/{window.run_id}/approve" if window.kind == "promote" else "/v1/rollback"
            window.action_sent = time.time()
            reply = await monitor.post(path, json=body, headers=headers)
            window.action_done = time.time()
            window.action_status = reply.status_code
            try:
                window.action_body = reply.json()
            except ValueError:
                window.action_body = {"text": reply.text[:200]}
            if reply.status_code != 200:
                logger.error("%s request failed with HTTP %d: %s", window.kind, reply.status_code, window.action_body)
                stop.set()
                return
            try:
                await asyncio.wait_for(switched.wait(), timeout=max(SWAP_TIMEOUT_S - (time.time() - window.action_sent), 0.1))
            except asyncio.TimeoutError:
                logger.warning("%s: no response from a new version within %.0f s", window.kind, SWAP_TIMEOUT_S)
            await asyncio.sleep(tail_s)
            stop.set()

        await asyncio.gather(schedule(), act())
    window.responses.sort(key=lambda item: item.index)
    served = {item.version for item in window.responses if item.ok} - {window.old_version}
    window.new_version = sorted(served)[0] if len(served) == 1 else ", ".join(sorted(served)) or None


# ---------------------------------------------------------------- timestamps of the swap steps


LOG_LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}) \w+ [\w.]+: (.*)$")


def read_log(path: Path, since: float, until: float) -> list[tuple[float, str]]:
    """Return (Unix seconds, message) of the log lines of a child process written in [since, until]."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if since - 0.01 <= stamp <= until:
            lines.append((stamp, match.group(2)))
    return lines


def swap_steps(window: SwapWindow) -> list[tuple[str, float]]:
    """Return the swap's steps as (name, seconds since the request was sent), in order, from audit and logs.

    Audit timestamps come from the monitor's clock and log lines from the server's, both
    this machine's wall clock. Log lines have millisecond resolution.
    """
    def audit_time(action: str) -> float | None:
        return next((entry["timestamp"] for entry in window.audit if entry["action"] == action), None)

    target = window.new_version or ""
    loading = next((stamp for stamp, message in window.server_log if message.startswith(f"loading version {target} ")), None)
    active = window.server_swapped_at()
    if window.kind == "promote":
        marks = [("approval recorded (run_approved)", audit_time("run_approved")),
                 ("promotion started (run_promoting)", audit_time("run_promoting")),
                 ("version registered", audit_time("version_registered")),
                 ("profile installed, pointer moved (promote)", audit_time("promote"))]
    else:
        marks = [("pointer moved (rollback)", audit_time("rollback"))]
    marks += [("server starts loading", loading), ("server swapped the model", active),
              ("first response from the new version", window.first_new),
              (f"{'approve' if window.kind == 'promote' else 'rollback'} response received", window.action_done)]
    return [(name, stamp - window.action_sent) for name, stamp in marks if stamp is not None]


def server_activation(window: SwapWindow) -> tuple[str, float] | None:
    """Return where the server took the new version from and the seconds the swap took, from its log.

    The server logs "version X is active (previous: Y), from SOURCE in Z s", SOURCE being the
    preloaded candidate, memory (a replaced version kept warm) or a load.
    """
    for _, message in window.server_log:
        match = re.search(r"^version (\S+) is active \(previous: \S+\), from (.+) in ([0-9.]+) s", message)
        if match and match.group(1) == window.new_version:
            return match.group(2), float(match.group(3))
    return None


PRELOADED = re.compile(r'^driftloop_server_preloads_total\{outcome="loaded"\} ([0-9.e+]+)$', re.MULTILINE)


def preloads_done(client, server_url: str) -> float:
    """Return the server's count of candidates it loaded before approval."""
    match = PRELOADED.search(client.get(f"{server_url}/metrics").text)
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------- parts 1 and 2


def benchmark_config(size: RunSize, state: Path) -> dict:
    """Return the config of the benchmark's monitor, server and terminal retrains.

    Differences from the defaults, each for the reason given:
    - a small CLINC150 slice and short training, so candidates are cheap;
    - approval: manual, so candidates wait in pending_approval until the script approves them;
    - trigger.min_labels very high, so the monitor never starts a retrain of its own;
    - post_promotion off, so its watch cannot roll a version back in the middle of a measurement;
    - canary minimum sample sizes above any slice, so every canary is inconclusive and its run waits
      in pending_approval for the script's approval. Candidates this cheap are noisy: a trial run with
      the default gates had its first candidate rejected for six regressed test classes, although its
      test accuracy rose by 16 points. Part 3 judges the gates at their defaults;
    - a smaller shadow sample and no latency timing in the canary, which gate nothing, to save time;
    - the monitor on one torch and one BLAS thread, as in deploy/kubernetes, so that loading a reference
      profile after a swap cannot take both cores from the server.
    """
    return {
        "state_dir": str(state),
        "approval": "manual",
        "data": {"source": "clinc150", "clinc150": {"domains": list(PROMOTION_DOMAINS)},
                 "per_label_limit": size.bootstrap_per_label, "seed": SEED},
        "bootstrap": {"epochs": size.bootstrap_epochs},
        "trigger": {"min_labels": 10_000_000},
        "post_promotion": {"enabled": False},
        "canary": {"min_production_samples": UNREACHABLE_SAMPLES, "min_test_samples": UNREACHABLE_SAMPLES,
                   "shadow_sample": 50, "latency_samples": 0},
        "retrain": {"replay_per_label": 10, "sweep": {"enabled": False},
                    "training": {"epochs": 1, "max_steps": size.retrain_max_steps}},
        "resources": {"inference_threads": 1, "blas_threads": 1},
    }


class PromotionBench:
    def __init__(self, size: RunSize, folder: Path) -> None:
        self.size = size
        self.folder = folder
        self.token = secrets.token_hex(16)
        self.raw = benchmark_config(size, folder / "state")
        self.windows: list[SwapWindow] = []
        self.candidates: list[dict] = []
        self.timings: dict[str, float] = {}
        self.audit_seen = 0

    def prepare(self) -> None:
        """Bootstrap the first version, start both processes and pick the label and load texts."""
        from monitor.config import parse_config
        from retrain.bootstrap import bootstrap
        from retrain.datasets import dataset_from_config

        config = parse_config(self.raw, base_dir=self.folder, source="bench/promotion.py")
        self.config = config
        started = time.monotonic()
        bootstrap(config, log=logger.info)
        self.timings["bootstrap_s"] = time.monotonic() - started
        dataset = dataset_from_config(config)
        rng = random.Random(SEED)
        self.label_pool = list(dataset.unused_train)
        rng.shuffle(self.label_pool)
        # Load texts: the validation split, which no adapter trains on.
        self.load_texts = [text for text, _ in dataset.validation]
        rng.shuffle(self.load_texts)
        self.load_texts = self.load_texts[:self.size.load_texts]
        self.base_model = config.model.base
        self.processes = Processes(self.folder, self.raw, self.token)
        started = time.monotonic()
        self.processes.start()
        self.timings["startup_s"] = time.monotonic() - started
        logger.info("monitor on %s, server on %s", self.processes.monitor_url, self.processes.server_url)

    def label_traffic(self, client, examples: list[tuple[str, str]]) -> None:
        """Classify ``examples`` through the server, post their true labels, and wait until the monitor counts them."""
        for start in range(0, len(examples), LABEL_BATCH):
            batch = examples[start:start + LABEL_BATCH]
            reply = client.post(f"{self.processes.server_url}/v1/classify", json={"texts": [text for text, _ in batch]})
            reply.raise_for_status()
            labels = [{"id": prediction["event_id"], "label": label}
                      for prediction, (_, label) in zip(reply.json()["predictions"], batch)]
            client.post(f"{self.processes.monitor_url}/v1/labels", json={"labels": labels}).raise_for_status()
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            counted = client.get(f"{self.processes.monitor_url}/v1/status").json()["labelled_since_activation"]
            if counted >= len(examples):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the monitor counts {counted} labelled events after two minutes, expected {len(examples)}")

    def make_candidate(self, client, repetition: int) -> dict:
        """Label fresh traffic and run ``driftloop retrain``; return the run, which must wait in pending_approval."""
        count = self.size.labelled_per_candidate
        examples = self.label_pool[repetition * count:(repetition + 1) * count]
        if len(examples) < count:
            raise RuntimeError(f"only {len(examples)} unused training examples left for repetition {repetition + 1}")
        started = time.monotonic()
        self.label_traffic(client, examples)
        labelled_s = time.monotonic() - started
        log = self.folder / f"retrain-{repetition + 1}.log"
        preloaded_before = preloads_done(client, self.processes.server_url)
        started = time.monotonic()
        with log.open("w") as handle:
            completed = subprocess.run(
                self.processes.command("retrain", "--no-progress", "--reason", "promotion benchmark", "--by", "bench"),
                stdout=handle, stderr=subprocess.STDOUT, env=self.processes.env, cwd=REPOSITORY, timeout=900)
        retrain_s = time.monotonic() - started
        run = client.get(f"{self.processes.monitor_url}/v1/retrains", params={"limit": 1}).json()["runs"][0]
        if completed.returncode != 0 or run["state"] != "pending_approval":
            raise RuntimeError(f"driftloop retrain exited with {completed.returncode} and run {run['id']} is "
                               f"{run['state']}, not pending_approval; see {log}")
        # A person approves minutes after the notification at the earliest; the server loads the
        # waiting candidate meanwhile. Wait for that load, so the measured swap is the approved one.
        waited = time.monotonic()
        while preloads_done(client, self.processes.server_url) <= preloaded_before:
            if time.monotonic() - waited > PRELOAD_TIMEOUT_S:
                raise RuntimeError(f"the server did not preload run {run['id']} within {PRELOAD_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        preload_wait_s = time.monotonic() - waited
        canary = run["canary"] or {}
        record = {"run_id": run["id"], "labelled": len(examples), "label_s": labelled_s, "retrain_s": retrain_s,
                  "preload_wait_s": preload_wait_s,
                  "canary_status": canary.get("status"), "deciding_gate": canary.get("deciding_gate"),
                  "production_n": (canary.get("production") or {}).get("n"),
                  "steps": (run["training"] or {}).get("steps")}
        logger.info("candidate %d: run %s in %.0f s, canary %s", repetition + 1, run["id"], retrain_s,
                    record["canary_status"])
        self.candidates.append(record)
        return run

    def swap(self, client, kind: str, run_id: str | None, repetition: int) -> SwapWindow:
        old = client.get(f"{self.processes.server_url}/v1/version").json()["version"]
        window = SwapWindow(kind=kind, run_id=run_id, old_version=old)
        meter = CpuMeter(self.processes.pids())
        first_text = random.Random(f"{SEED}-{kind}-{repetition}").randrange(len(self.load_texts))
        asyncio.run(drive_swap(window, self.processes, self.token, self.load_texts, first_text,
                               self.size.lead_s, self.size.tail_s))
        window.cpu = meter.read()
        entries = client.get(f"{self.processes.monitor_url}/v1/audit", params={"since": self.audit_seen, "limit": 1000})
        window.audit = entries.json()["entries"]
        if window.audit:
            self.audit_seen = window.audit[-1]["id"]
        window.audit = [entry for entry in window.audit if entry["timestamp"] >= window.action_sent - 0.01]
        last = max((item.done for item in window.responses), default=time.time())
        window.server_log = read_log(self.processes.logs["server"], window.action_sent, last + 1.0)
        logger.info("%s %s -> %s: first response from %s %.3f s after the request, %d requests, %d failed",
                    kind, old, window.new_version, window.new_version, window.to_serving_s or float("nan"),
                    len(window.responses),
                    sum(not item.ok for item in window.responses))
        self.windows.append(window)
        return window

    def run(self) -> None:
        import httpx

        self.prepare()
        try:
            with httpx.Client(timeout=120.0) as client:
                self.audit_seen = client.get(f"{self.processes.monitor_url}/v1/audit",
                                             params={"limit": 1000}).json()["entries"][-1]["id"]
                for repetition in range(self.size.repetitions):
                    run = self.make_candidate(client, repetition)
                    self.swap(client, "promote", run["id"], repetition)
                    self.swap(client, "rollback", None, repetition)
        finally:
            self.processes.stop()

    def expected_labels(self) -> dict[str, list[str]]:
        """Predict every load text with each served version's adapter.

        Texts are predicted in batches first. Where a served label differs from the batched
        prediction, the text is predicted again alone, as the server does, and that label counts,
        so padding in a batch cannot make a correct response look wrong.
        """
        import torch

        from monitor.config import resolve_model_path
        from retrain.model import Classifier
        from retrain.registry import Registry
        from monitor.store import Store

        store = Store(self.config.db_url)
        registry = Registry(store, self.config.shared_path)
        served = {item.version for window in self.windows for item in window.responses if item.ok}
        expected = {}
        # The server keeps torch's default thread count, so the offline predictions use the same.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        for version in sorted(served, key=lambda name: int(name[1:])):
            classifier = Classifier.load(resolve_model_path(self.base_model), registry.get(version).adapter_dir,
                                         version, device="cpu")
            labels = [label for label, _ in classifier.predict(self.load_texts)]
            disputed = {item.text_index for window in self.windows for item in window.responses
                        if item.ok and item.version == version and item.label != labels[item.text_index]}
            for index in disputed:
                labels[index] = classifier.predict([self.load_texts[index]])[0][0]
            expected[version] = labels
            logger.info("expected labels of %s: %d texts, %d predicted again alone", version, len(labels), len(disputed))
        store.close()
        return expected


# ---------------------------------------------------------------- part 3: canary decisions


def canary_scenarios(size: RunSize, folder: Path) -> dict:
    """Train a current, a better and a broken adapter; return the three canary decisions with their inputs."""
    from monitor.config import load_config, resolve_model_path
    from retrain.canary import CanaryGates, ComparisonSettings, compare_predictions, decide
    from retrain.datasets import load_clinc150
    from retrain.jobs import training_threads
    from retrain.model import Classifier
    from retrain.trainer import settings_from_config, train_adapter

    config = load_config(None)
    base_model = resolve_model_path(config.model.base)
    clinc = load_clinc150()
    rng = random.Random(SEED)
    known = sorted(clinc.intents_of(list(KNOWN_DOMAINS)))
    new = sorted(clinc.intents_of(list(NEW_DOMAINS)))
    broken_intents = sorted(clinc.intents_of([BROKEN_DOMAIN]))
    # Rotation by one place: every intent of the broken domain is learned as its neighbour's label.
    rotation = {label: broken_intents[(position + 1) % len(broken_intents)]
                for position, label in enumerate(broken_intents)}

    def by_label(split: str) -> dict[str, list[tuple[str, str]]]:
        grouped: dict[str, list[tuple[str, str]]] = {}
        for text, label in clinc.splits[split]:
            grouped.setdefault(label, []).append((text, label))
        for examples in grouped.values():
            rng.shuffle(examples)
        return grouped

    train_split, val_split = by_label("train"), by_label("val")
    current_train = [example for label in known for example in train_split[label][:size.current_per_label]]
    # Production events come from training-split texts the current adapter never saw.
    offset = size.current_per_label
    production_train = [example for label in known
                        for example in train_split[label][offset:offset + size.production_known_per_label]]
    production_train += [example for label in new for example in train_split[label][:size.production_new_per_label]]
    # Replay starts with the current adapter's own examples; a larger replay adds training-split texts
    # that neither the current adapter nor production traffic used.
    extra = max(0, size.replay_per_label - size.current_per_label)
    start = offset + size.production_known_per_label
    replay = [example for label in known for example in train_split[label][:min(size.replay_per_label, offset)]]
    replay += [example for label in known for example in train_split[label][start:start + extra]]
    used = {text for text, _ in current_train + production_train + replay}
    unused_known = [example for label in known for example in train_split[label] if example[0] not in used]
    unused_new = [example for label in new for example in train_split[label] if example[0] not in used]
    holdout = rng.sample(unused_known, size.holdout_known) + rng.sample(unused_new, size.holdout_new)
    rng.shuffle(holdout)
    current_validation = [example for label in known for example in val_split[label][:size.validation_per_label]]
    candidate_validation = current_validation + [example for label in new
                                                 for example in val_split[label][:size.validation_per_label]]
    test = [(text, label) for text, label in clinc.splits["test"] if label in set(known)]

    def rotate(examples: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(text, rotation.get(label, label)) for text, label in examples]

    threads = config.retrain.training.num_threads or training_threads()
    settings = settings_from_config(config.retrain.training, config.model, num_threads=threads)
    plans = {
        "current": (current_train, current_validation, None, size.current_epochs),
        "better": (replay + production_train, candidate_validation, "current", size.candidate_epochs),
        "broken": (rotate(replay + production_train), rotate(candidate_validation), "current", size.candidate_epochs),
    }
    trained: dict[str, dict] = {}
    for name, (train, validation, init, epochs) in plans.items():
        started = time.monotonic()
        result = train_adapter(base_model, clinc.labels, train, folder / name, settings.replace(epochs=epochs),
                               validation=validation, init_adapter=folder / init if init else None)
        trained[name] = {"examples": len(train), "validation": len(validation), "steps": result.steps,
                         "epochs": epochs, "stop_reason": result.stop_reason, "seconds": time.monotonic() - started,
                         "warm_start": init}
        logger.info("part 3: trained %s in %.0f s (%d steps)", name, trained[name]["seconds"], result.steps)

    texts = [text for text, _ in holdout] + [text for text, _ in test]
    predictions = {}
    started = time.monotonic()
    for name in plans:
        classifier = Classifier.load(base_model, folder / name, name, device="cpu")
        labels = [label for label, _ in classifier.predict(texts)]
        predictions[name] = (labels[:len(holdout)], labels[len(holdout):])
    predict_s = time.monotonic() - started

    comparison = ComparisonSettings.from_config(config.canary)
    gates = CanaryGates.from_config(config.canary)
    holdout_gold = [label for _, label in holdout]
    test_gold = [label for _, label in test]
    small = size.small_holdout
    scenarios = {}
    for name, candidate, holdout_items in (("better", "better", len(holdout)), ("broken", "broken", len(holdout)),
                                           ("small holdout", "better", small)):
        production = compare_predictions("production_holdout", holdout_gold[:holdout_items],
                                         predictions["current"][0][:holdout_items],
                                         predictions[candidate][0][:holdout_items], comparison)
        test_slice = compare_predictions("original_test", test_gold, predictions["current"][1],
                                         predictions[candidate][1], comparison)
        scenarios[name] = decide(production, test_slice, None, gates)
    return {"trained": trained, "scenarios": scenarios, "settings": settings, "gates": gates, "comparison": comparison,
            "broken_intents": broken_intents, "rotation": rotation, "holdout": holdout, "test": test,
            "known": known, "new": new, "predict_s": predict_s, "threads": threads}


# ---------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def describe_latency(responses: list[Response]) -> str:
    values = [item.latency_ms for item in responses if item.ok]
    if not values:
        return "-"
    return f"{percentile(values, 50):.0f} / {percentile(values, 99):.0f} (n={len(values)})"


def check_predictions(window: SwapWindow, expected: dict[str, list[str]]) -> list[Response]:
    """Return the successful responses whose label differs from the offline prediction of their version."""
    return [item for item in window.responses if item.ok and expected[item.version][item.text_index] != item.label]


def render_swaps(bench: PromotionBench, expected: dict[str, list[str]]) -> list[str]:
    promotions = [window for window in bench.windows if window.kind == "promote"]
    rollbacks = [window for window in bench.windows if window.kind == "rollback"]
    return (render_serving(bench, promotions, rollbacks) + render_breakdown(promotions, rollbacks)
            + render_requests(bench, expected))


def render_serving(bench: PromotionBench, promotions: list[SwapWindow], rollbacks: list[SwapWindow]) -> list[str]:
    """Table and summary of approval to serving and rollback to serving, against the target."""
    lines = [
        "### Approval to serving",
        "",
        f"Target: the server answers with the new version at most {TARGET_SERVING_S:g} s after POST approve. "
        "Each row is one candidate: labelled traffic, `driftloop retrain` in a terminal process, and a wait until the "
        "server has loaded the waiting candidate (`server.preload_candidates` 1, the default). The wait is counted "
        "from the end of the retrain. Then come the approval and POST /v1/rollback back to the first version.",
        "",
        "| # | run | canary (retrain time) | preloaded after, s | promoted | approval to first response from it, s | "
        "approve response, s | rollback to first response from the old version, s | rollback response, s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, (candidate, promotion, rollback) in enumerate(zip(bench.candidates, promotions, rollbacks), start=1):
        lines.append(
            f"| {number} | {candidate['run_id']} | {candidate['canary_status']} ({candidate['retrain_s']:.0f} s) | "
            f"{candidate['preload_wait_s']:.1f} | {promotion.old_version} → {promotion.new_version} | {fmt(promotion.to_serving_s)} | "
            f"{promotion.action_done - promotion.action_sent:.3f} | {fmt(rollback.to_serving_s)} | "
            f"{rollback.action_done - rollback.action_sent:.3f} |")

    summary = []
    for name, windows in (("approval", promotions), ("rollback", rollbacks)):
        values = [window.to_serving_s for window in windows if window.to_serving_s is not None]
        missing = len(windows) - len(values)
        if not values:
            summary.append(f"No {name} reached the server.")
            continue
        median, worst = statistics.median(values), max(values)
        verdict = "meets" if worst <= TARGET_SERVING_S and not missing else "misses"
        summary.append(f"{name.capitalize()} to serving: median {median:.3f} s, max {worst:.3f} s over "
                       f"{len(values)} swap{'s' if len(values) != 1 else ''}" + (f" ({missing} never reached the server)" if missing else "")
                       + f"; this {verdict} the {TARGET_SERVING_S:g} s target.")
    return lines + ["", " ".join(summary), ""]


def render_requests(bench: PromotionBench, expected: dict[str, list[str]]) -> list[str]:
    """Table of the load around each swap: failures, versions, wrong labels and latency by phase."""
    size = bench.size
    lines = [
        "### Requests during swaps and rollbacks",
        "",
        f"Target: no failed request at {1 / REQUEST_INTERVAL_S:.0f} requests/s. The client sends one text per "
        f"request every {REQUEST_INTERVAL_S * 1000:.0f} ms on a fixed schedule, whatever the responses, from "
        f"{size.lead_s:g} s before the approve or rollback request to {size.tail_s:g} s after the first response "
        "from the new version. It uses asyncio with httpx, one connection per request in flight, and closes idle "
        f"connections after {KEEPALIVE_EXPIRY_S:g} s, before uvicorn's 5 s keep-alive timeout. Failed: a transport error or a status other than 200. Latency "
        f"runs from the scheduled send time to the response. Before, during and after split the requests by "
        f"scheduled send time: during is from {DURING_MARGIN_S:g} s before the approve or rollback request to "
        f"{DURING_MARGIN_S:g} s after the first response from the new version. Wrong: a response whose label "
        "differs from what `Classifier.predict` on that version's adapter returns for the text offline.",
        "",
        "| # | swap | sent | failed | responses per version | old version after the swap | wrong | "
        "latency p50 / p99 ms before | during | after | seconds | CPU s: server / monitor / other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total_sent = total_failed = total_wrong = 0
    for number, window in enumerate(bench.windows, start=1):
        failed = [item for item in window.responses if not item.ok]
        wrong = check_predictions(window, expected)
        total_sent += len(window.responses)
        total_failed += len(failed)
        total_wrong += len(wrong)
        counts = {}
        for item in window.responses:
            if item.ok:
                counts[item.version] = counts.get(item.version, 0) + 1
        versions = ", ".join(f"{name}: {count}" for name, count in sorted(counts.items()))
        phases = {name: [item for item in window.responses if window.phase(item) == name]
                  for name in ("before", "during", "after")}
        lines.append(
            f"| {(number + 1) // 2} | {window.kind} {window.old_version} → {window.new_version} | "
            f"{len(window.responses)} | {len(failed)} | {versions} | {fmt(window.old_answers_after_swap(), '{}')} | "
            f"{len(wrong)} | {describe_latency(phases['before'])} | {describe_latency(phases['during'])} | "
            f"{describe_latency(phases['after'])} | {window.cpu['wall']:.0f} | {window.cpu['server']:.1f} / "
            f"{window.cpu['monitor']:.1f} / {window.cpu['other']:.1f} |")

    lag = max((item.sent - item.scheduled for window in bench.windows for item in window.responses), default=0.0)
    errors = [f"{window.kind} {item.sent - window.action_sent:+.2f} s from the request: "
              f"{item.error or f'HTTP {item.status}'}"
              for window in bench.windows for item in window.responses if not item.ok]
    verdict = "meets" if total_failed == 0 else "misses"
    lines += [
        "",
        f"In all, {total_sent} requests were sent and {total_failed} failed, which {verdict} the target of none"
        + (f" (errors: {'; '.join(errors[:5])})" if errors else "") + f". {total_wrong} responses carried a label "
        "other than their version's offline prediction. The largest delay between a request's scheduled and actual "
        f"send time was {lag * 1000:.0f} ms. Old version after the swap counts requests sent after the server "
        "logged the swap that the old version still answered, because they waited in the server before a "
        "worker thread read the active model for them. Seconds is the window's wall time, and the CPU column counts its CPU "
        "seconds of the server, the monitor and every other process but this script.",
        "",
    ]
    return lines


def render_breakdown(promotions: list[SwapWindow], rollbacks: list[SwapWindow]) -> list[str]:
    """Table of the median time from the request to each step of the swap, from audit entries and server logs."""
    lines = [
        "### Where the time goes",
        "",
        "Median seconds from sending the request to each step, over the swaps above. The monitor's audit entries "
        "give the steps inside the promotion and the server's log lines (millisecond resolution) the model load; "
        "all are this machine's wall clock. The approve and rollback requests return only after the monitor has "
        "also loaded the reference profile of the version it activates, so their responses can come after the "
        "server's swap.",
        "",
        "| step | approval | rollback |",
        "|---|---|---|",
    ]
    steps: dict[str, dict[str, list[float]]] = {}
    order: list[str] = []
    for kind, windows in (("promote", promotions), ("rollback", rollbacks)):
        for window in windows:
            for name, seconds in swap_steps(window):
                if name not in steps:
                    order.append(name)
                    steps[name] = {"promote": [], "rollback": []}
                steps[name][kind].append(seconds)
    order.sort(key=lambda name: min(statistics.median(values) for values in steps[name].values() if values))
    for name in order:
        cells = [fmt(statistics.median(steps[name][kind])) if steps[name][kind] else "" for kind in ("promote", "rollback")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    for kind, windows in (("promotion", promotions), ("rollback", rollbacks)):
        activations = [found for window in windows if (found := server_activation(window)) is not None]
        if not activations:
            continue
        sources = sorted({source for source, _ in activations})
        seconds = [value for _, value in activations]
        lines += ["", f"Each {kind}: the server took the version from {' or '.join(sources)} "
                      f"({len(activations)} of {len(windows)}), and the swap took {min(seconds):.3f} to "
                      f"{max(seconds):.3f} s, median {statistics.median(seconds):.3f} s."]
    lines.append("")
    return lines


def describe_interval(bounds) -> str:
    return "-" if not bounds else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]"


def render_canary(part: dict, size: RunSize) -> list[str]:
    """Training budgets, slice comparisons and decisions of the three canary scenarios."""
    trained, settings, gates = part["trained"], part["settings"], part["gates"]
    lines = [
        "### Canary decisions",
        "",
        f"Current adapter: trained from scratch on {size.current_per_label} examples per intent of "
        f"{', '.join(KNOWN_DOMAINS)} ({len(part['known'])} intents, 151-label head). Production traffic adds "
        f"{', '.join(NEW_DOMAINS)} ({len(part['new'])} intents). Both candidates warm-start from the current adapter "
        f"on {size.replay_per_label} replayed examples per known intent plus labelled production events "
        f"({size.production_known_per_label} per known intent, {size.production_new_per_label} per new intent). "
        f"The broken candidate learns the same data with the labels of the {len(part['broken_intents'])} "
        f"{BROKEN_DOMAIN} intents rotated by one place among themselves (validation labels too). Training "
        f"budget: `retrain.training` defaults (learning rate {settings.learning_rate:g}, rank {settings.rank}, batch "
        f"{settings.batch_size}, torch threads {part['threads']}) with epochs set per adapter:",
        "",
        "| adapter | training examples | validation examples | epochs | steps | stop reason | seconds |",
        "|---|---|---|---|---|---|---|",
    ]

    for name, record in trained.items():
        lines.append(f"| {name} | {record['examples']} | {record['validation']} | {record['epochs']} | "
                     f"{record['steps']} | {record['stop_reason']} | {record['seconds']:.0f} |")

    test = part["test"]
    lines += [
        "",
        f"Production holdout: {size.holdout_known} known-domain and {size.holdout_new} new-domain training-split "
        f"texts that no adapter trained on (seeded sample). Test slice: the CLINC150 test split of the known "
        f"domains, {len(test)} texts. The gates are at the built-in defaults. On at least "
        f"{gates.min_production_samples} production events the gain must exceed {gates.min_production_gain:g} "
        f"with mid-p below {gates.production_alpha:g}. The lower 95% bound of the test accuracy difference must "
        f"be at least -{gates.noninferiority_margin:g}. At most {gates.max_regressed_classes} test classes "
        f"(support at least {part['comparison'].class_min_support}) may lose more than "
        f"{part['comparison'].class_regression_margin:g} of F1. The small-holdout scenario keeps the first "
        f"{size.small_holdout} events of the same holdout and the better candidate.",
        "",
        "| scenario | slice | n | accuracy current → candidate | macro-F1 current → candidate | mid-p | "
        "95% interval, accuracy diff | 95% interval, macro-F1 diff | decision | deciding gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, decision in part["scenarios"].items():
        for piece in (decision.production, decision.test):
            lines.append(
                f"| {name} | {piece.name} | {piece.n} | {piece.current_accuracy:.3f} → {piece.candidate_accuracy:.3f} | "
                f"{piece.current_macro_f1:.3f} → {piece.candidate_macro_f1:.3f} | {fmt(piece.mcnemar_midp, '{:.2g}')} | "
                f"{describe_interval(piece.accuracy_diff_ci)} | {describe_interval(piece.macro_f1_diff_ci)} | "
                f"{decision.status} | {decision.deciding_gate or '-'} |")

    lines.append("")
    for name, decision in part["scenarios"].items():
        failed = [gate for gate in decision.gates if gate["evaluated"] and not gate["passed"]]
        unevaluated = [gate["name"] for gate in decision.gates if not gate["evaluated"]]
        text = f"- {name}: {decision.status}"
        if failed:
            text += "; failed gates: " + "; ".join(f"{gate['name']} ({gate['message']})" for gate in failed)
        if unevaluated:
            text += "; not evaluated: " + ", ".join(unevaluated)
        if not failed and not unevaluated:
            text += "; every gate passed"
        lines.append(text + ".")

    broken = part["scenarios"]["broken"]
    regressed = list(broken.test.regressed_classes)
    in_domain = [label for label in regressed if label in part["broken_intents"]]
    outside = [label for label in regressed if label not in part["broken_intents"]]
    missed = [label for label in part["broken_intents"] if label not in regressed]
    lines += [
        "",
        f"Regressed test classes of the broken candidate: {len(regressed)}, of which {len(in_domain)} are "
        f"{BROKEN_DOMAIN} intents" + (f" and {len(outside)} are not ({', '.join(outside)})" if outside else "")
        + f". Named, worst first: {', '.join(regressed) or 'none'}."
        + (f" {BROKEN_DOMAIN} intents not named: {', '.join(missed)}." if missed else
           f" Every {BROKEN_DOMAIN} intent is named."),
        "",
    ]
    return lines


def render(args, size: RunSize, bench: PromotionBench, expected: dict, part: dict, elapsed_s: float,
           load_note: str) -> str:
    command = "DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/promotion.py " + " ".join(args.argv)
    lines = [
        "## Safe promotion: approval to serving, requests during swaps, canary decisions (CLINC150)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.date.today().isoformat()}; total run time {elapsed_s / 60:.1f} min "
        f"(bootstrap {bench.timings['bootstrap_s']:.0f} s, process startup {bench.timings['startup_s']:.0f} s, "
        f"part 3 predictions {part['predict_s']:.0f} s).",
        machine_facts(),
        f"- Mode: {'quick (smoke test; the figures mean little)' if args.quick else 'full'}.",
        f"- Other load: {load_note}.",
        f"- Processes: `driftloop run` and `driftloop serve` as child processes on free loopback ports, state in a "
        f"temporary folder, first version bootstrapped on {', '.join(PROMOTION_DOMAINS)} ({size.bootstrap_per_label} "
        f"examples per intent, {size.bootstrap_epochs} epochs). Config changes from the defaults, with their reasons: "
        "`approval: manual`. `trigger.min_labels` 10,000,000, so the monitor starts no retrain of its own. "
        "`post_promotion.enabled: false`, so its watch cannot roll back during a measurement. "
        f"`canary.min_production_samples` and `canary.min_test_samples` {UNREACHABLE_SAMPLES:,}, so every canary is "
        "inconclusive and each candidate waits in `pending_approval` however noisy it is (part 3 judges the gates "
        "at their defaults). `canary.shadow_sample` 50 and `canary.latency_samples` 0, which are only reported. "
        "`retrain.sweep.enabled: false`, `retrain.replay_per_label` 10 and `retrain.training` 1 epoch of at most "
        f"{size.retrain_max_steps} steps. `resources.inference_threads` and `resources.blas_threads` 1, as in "
        "deploy/kubernetes, so the monitor's work after a swap leaves the server a core. "
        f"Each candidate is a `driftloop retrain` run on {size.labelled_per_candidate} fresh labelled events sent "
        "through the server. The monitor evaluates windows at its defaults (500 events) during the load.",
        "",
    ]
    lines += render_swaps(bench, expected)
    lines += render_canary(part, size)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.repetitions} repetition and smaller training budgets, for a smoke test")
    parser.add_argument("--out", default="docs/promotion.md",
                        help=f"markdown file whose '{SECTION}' section is replaced with the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (state, logs, adapters, and the measurements in results.pickle)")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    size = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.monotonic()
    load = OtherLoad()
    folder = Path(tempfile.mkdtemp(prefix="driftloop-promotion-"))
    try:
        bench = PromotionBench(size, folder)
        bench.run()
        expected = bench.expected_labels()
        part = canary_scenarios(size, folder / "canary")
        if args.keep:
            import pickle

            measured = {"windows": bench.windows, "candidates": bench.candidates, "timings": bench.timings,
                        "expected": expected, "part3": part}
            (folder / "results.pickle").write_bytes(pickle.dumps(measured))
    finally:
        if args.keep:
            logger.info("kept %s", folder)
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    # The children were waited for, so their CPU time counts as this process's own.
    load_note = load.read().describe()
    section = render(args, size, bench, expected, part, time.monotonic() - started, load_note)
    return publish(args.out, SECTION, section)


if __name__ == "__main__":
    main()
