"""Operating figures of the sidecar next to a bare FastAPI/uvicorn echo server run the same way.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data .venv/bin/python bench/operations.py [--seconds 20] [--out docs/operations.md]

The script bootstraps a small state in a temporary folder with the bundled
all-MiniLM-L6-v2 (banking intents, a 151-label head, one epoch), then starts
``driftloop run`` as a subprocess pinned to core 0 (``os.sched_setaffinity``),
while this process, the load generator, pins itself to core 1. It measures:

- ingest: ``CONCURRENCY`` client threads post batches of 100 events to
  POST /v1/events, each event shaped as ``driftloop serve`` sends it (label,
  confidence, 151 probabilities, latency, version); events per second accepted
  and the request latency quantiles. The ``--seconds`` of load are split into
  ``ROUNDS`` rounds that alternate between the sidecar and the echo server, both
  running, so that a slow spell of a shared machine falls on both;
- resident memory (VmRSS) of the sidecar once it is ready, and after the ingest run;
- /metrics scrapes: ``SCRAPES`` sequential GETs while idle;
- /metrics scrapes while a retrain trains in the sidecar: drifted traffic with labels
  triggers a retrain (one drifted window, ten labels, no rank sweep, 1000 epochs),
  then ``SCRAPES`` GETs with a 5 s timeout while the run is ``training``;
- the drain: SIGTERM during that retrain, the exit status and the seconds to exit.

The baseline is a FastAPI app served by uvicorn on the same core, whose POST
/v1/events parses the JSON body and returns the event count, and whose GET
/metrics returns prometheus_client's default registry. The sidecar runs with
window evaluation on (windows of 500, a check every 5 s), one torch thread for
inference and one for training, ``resources.embedding_max_texts_per_s`` 20 and
``resources.evaluation_max_share`` 0.1, as in deploy/kubernetes/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from bench.record import machine_facts, publish  # noqa: E402
from monitor.demo import wait_ready  # noqa: E402

SECTION = "bench/operations.py"
HOST = "127.0.0.1"
PORTS = range(18100, 18200)
EVENTS_PER_BATCH = 100
CONCURRENCY = 4
ROUNDS = 5
SCRAPES = 100
SERVER_CORE, CLIENT_CORE = 0, 1
LONG_TEXT = ("please tell me every single detail about the transfer of money that i made yesterday evening "
             "from my savings account to the checking account of my brother who lives abroad {}")

ECHO_APP = textwrap.dedent('''
    import json, os, sys
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI()

    @app.post("/v1/events")
    async def events(request: Request):
        body = json.loads(await request.body())
        return JSONResponse({"accepted": len(body["events"]), "duplicates": 0, "rejected": []})

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''')


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"error: no free port in {PORTS.start}-{PORTS.stop - 1}")


def pinned(core: int):
    return lambda: os.sched_setaffinity(0, {core})


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(share: float) -> float:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1], "n": len(ordered)}


def event_bodies(count: int, prefix: str, labels: list[str], texts: list[str]) -> list[bytes]:
    """Build ``count`` request bodies of EVENTS_PER_BATCH events each, as driftloop serve sends them."""
    import numpy as np

    rng = np.random.default_rng(0)
    bodies = []
    for batch in range(count):
        events = []
        for position in range(EVENTS_PER_BATCH):
            number = batch * EVENTS_PER_BATCH + position
            logits = rng.normal(size=len(labels))
            logits[number % len(labels)] += 6.0
            probabilities = np.exp(logits) / np.exp(logits).sum()
            top = int(probabilities.argmax())
            events.append({"id": f"{prefix}-{number}", "timestamp": time.time(), "text": texts[number % len(texts)],
                           "label": labels[top], "confidence": float(probabilities[top]),
                           "probabilities": probabilities.tolist(), "latency_ms": 12.0, "version": "v1"})
        bodies.append(json.dumps({"events": events}).encode())
    return bodies


def load_ingest(base: str, bodies: list[bytes], seconds: float) -> dict:
    """Post ``bodies`` from CONCURRENCY threads for ``seconds``; return events/s and latency quantiles in ms."""
    import httpx

    latencies: list[float] = []
    accepted = [0]
    failures = [0]
    lock = threading.Lock()
    position = [0]
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(timeout=30.0) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if position[0] >= len(bodies):
                        return
                    body = bodies[position[0]]
                    position[0] += 1
                sent = time.perf_counter()
                response = client.post(f"{base}/v1/events", content=body, headers={"content-type": "application/json"})
                elapsed = 1000 * (time.perf_counter() - sent)
                with lock:
                    latencies.append(elapsed)
                    if response.status_code == 200:
                        accepted[0] += response.json()["accepted"]
                    else:
                        failures[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    return {"events_per_s": accepted[0] / wall, "accepted": accepted[0], "failures": failures[0],
            "wall_s": wall, "latency_ms": quantiles(latencies), "latencies": latencies}


def scrape(base: str, count: int, interval_s: float = 0.0, while_true=None) -> dict:
    """GET /metrics ``count`` times (stopping early once ``while_true`` is false); latency quantiles in ms."""
    import httpx

    latencies, timeouts = [], 0
    with httpx.Client(timeout=5.0) as client:
        for _ in range(count):
            if while_true is not None and not while_true():
                break
            sent = time.perf_counter()
            try:
                client.get(f"{base}/metrics").raise_for_status()
                latencies.append(1000 * (time.perf_counter() - sent))
            except httpx.TimeoutException:
                timeouts += 1
            time.sleep(interval_s)
    return {"latency_ms": quantiles(latencies) if latencies else None, "timeouts": timeouts}


def sidecar_config(state: Path) -> dict:
    return {
        "state_dir": str(state),
        "data": {"clinc150": {"domains": ["banking"]}, "per_label_limit": 10},
        "bootstrap": {"epochs": 1},
        "monitor": {"window_size": 500, "sample_size": 500, "check_interval_s": 5, "max_batch": 1000},
        "trigger": {"consecutive_windows": 1, "min_labels": 10, "cooldown_s": 0},
        "retrain": {"sweep": {"enabled": False},
                    "training": {"epochs": 1000, "early_stopping_patience": 1000, "num_threads": 1}},
        "resources": {"inference_threads": 1, "blas_threads": 1, "embedding_max_texts_per_s": 20,
                      "evaluation_max_share": 0.1},
    }


def bootstrap_state(state: Path) -> None:
    """Train the first adapter and build its reference profile, on every core."""
    from monitor.config import parse_config
    from retrain.bootstrap import bootstrap

    started = time.monotonic()
    bootstrap(parse_config(sidecar_config(state)), log=lambda message: print(message, flush=True))
    print(f"bootstrap took {time.monotonic() - started:.0f} s", flush=True)


def alternate_ingest(bases: dict[str, str], labels: dict[str, list[str]], seconds: float,
                     texts: list[str]) -> dict[str, dict]:
    """Load each server in turn, ROUNDS times, ``seconds / ROUNDS`` each; return the figures per server."""
    rounds: dict[str, list[dict]] = {name: [] for name in bases}
    latencies: dict[str, list[float]] = {name: [] for name in bases}
    per_round = seconds / ROUNDS
    for number in range(ROUNDS):
        for name, base in bases.items():
            time.sleep(2)  # lets the previous round's requests and window checks finish
            bodies = event_bodies(int(per_round * 200), f"{name}{number}", labels[name], texts)
            result = load_ingest(base, bodies, per_round)
            latencies[name] += result.pop("latencies")
            rounds[name].append(result)
    figures = {}
    for name, results in rounds.items():
        accepted, wall = sum(item["accepted"] for item in results), sum(item["wall_s"] for item in results)
        figures[name] = {"events_per_s": accepted / wall, "accepted": accepted, "wall_s": wall,
                         "failures": sum(item["failures"] for item in results),
                         "rounds_events_per_s": [item["events_per_s"] for item in results],
                         "latency_ms": quantiles(latencies[name])}
    return figures


def window_counts(exposition: str) -> dict[str, float]:
    """Windows evaluated, skipped and dropped, and the seconds spent evaluating, from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"evaluated": 0.0, "skipped": 0.0, "dropped": 0.0, "evaluation_s": 0.0}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "driftloop_windows_evaluated_total":
                counts["evaluated"] += sample.value
            elif sample.name == "driftloop_windows_skipped_total":
                counts["skipped"] = sample.value
            elif sample.name == "driftloop_windows_dropped_total":
                counts["dropped"] = sample.value
            elif sample.name == "driftloop_window_evaluation_seconds_sum":
                counts["evaluation_s"] = sample.value
    return counts


def run_sidecar(state: Path, seconds: float, texts: list[str], echo_base: str) -> dict:
    import httpx
    import yaml

    from monitor.config import parse_config

    raw = sidecar_config(state)
    config_path = state / "driftloop.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    port = free_port()
    base = f"http://{HOST}:{port}"
    log = (state / "sidecar.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "monitor.cli", "--config", str(config_path), "run", "--port",
                                str(port)], cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=pinned(SERVER_CORE))
    result: dict = {}
    try:
        wait_ready(f"{base}/readyz", process, "the sidecar", state / "sidecar.log", timeout_s=600)
        time.sleep(2)
        result["rss_ready_mib"] = resident_mib(process.pid)
        result["scrape_idle"] = scrape(base, SCRAPES)
        labels = httpx.get(f"{base}/v1/versions", timeout=5).json()
        active = next(version for version in labels["versions"] if version["name"] == labels["active"])
        head = json.loads((Path(active["adapter_dir"]) / "labels.json").read_text())
        echo_labels = [f"label_{i}" for i in range(len(head))]
        both = alternate_ingest({"driftloop": base, "echo": echo_base}, {"driftloop": head, "echo": echo_labels},
                                seconds, texts)
        result["ingest"], result["echo_ingest"] = both["driftloop"], both["echo"]
        result["windows"] = window_counts(httpx.get(f"{base}/metrics", timeout=10).text)
        result["rss_after_ingest_mib"] = resident_mib(process.pid)

        # Drifted, labelled traffic; labels first, so they wait for their events.
        ids = [f"long-{i}" for i in range(1000)]
        httpx.post(f"{base}/v1/labels", json={"labels": [{"id": i, "label": "transfer"} for i in ids]}, timeout=30)
        batch = [{"id": event_id, "text": LONG_TEXT.format(i), "label": "transfer", "confidence": 0.9}
                 for i, event_id in enumerate(ids)]
        httpx.post(f"{base}/v1/events", json={"events": batch[:1]}, timeout=30)
        httpx.post(f"{base}/v1/events", json={"events": batch[1:]}, timeout=30)

        def training() -> bool:
            runs = httpx.get(f"{base}/v1/retrains", timeout=10).json()["runs"]
            return bool(runs) and runs[0]["state"] == "training"

        deadline = time.monotonic() + 300
        while not training():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"error: no retrain reached training; see {state / 'sidecar.log'}")
            time.sleep(1)
        time.sleep(5)  # past data assembly, into the optimiser steps
        result["scrape_training"] = scrape(base, SCRAPES, interval_s=0.2, while_true=training)
        result["rss_training_mib"] = resident_mib(process.pid)

        sent = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        result["exit_status"] = process.wait(timeout=120)
        result["drain_s"] = time.monotonic() - sent
        from monitor.store import Store

        store = Store(parse_config(raw).db_url)
        latest = store.runs(limit=1)[0]
        result["run_state"] = f"{latest['state']} ({latest['error']})"
        store.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    return result


def start_echo() -> tuple[subprocess.Popen, str, dict]:
    """Start the echo server pinned to the sidecar's core; return it, its URL and its idle figures."""
    port = free_port()
    base = f"http://{HOST}:{port}"
    process = subprocess.Popen([sys.executable, "-c", ECHO_APP, str(port)], cwd=REPOSITORY,
                               preexec_fn=pinned(SERVER_CORE))
    try:
        wait_ready(f"{base}/readyz", process, "the echo server", timeout_s=60)
        return process, base, {"rss_ready_mib": resident_mib(process.pid), "scrape_idle": scrape(base, SCRAPES)}
    except BaseException:
        process.terminate()
        process.wait()
        raise


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}" if baseline else "n/a"


def report(sidecar: dict, echo: dict, seconds: float, machine: str) -> str:
    ingest, base_ingest = sidecar["ingest"], sidecar["echo_ingest"]
    windows = sidecar["windows"]
    round_ratios = [ours / theirs for ours, theirs in zip(ingest["rounds_events_per_s"],
                                                          base_ingest["rounds_events_per_s"])]
    idle, base_idle = sidecar["scrape_idle"]["latency_ms"], echo["scrape_idle"]["latency_ms"]
    training = sidecar["scrape_training"]
    lines = [
        "## Measured",
        "",
        machine,
        f"- Sidecar pinned to core {SERVER_CORE}, load generator to core {CLIENT_CORE}; "
        f"{CONCURRENCY} client threads, batches of {EVENTS_PER_BATCH} events, {seconds:.0f} s of ingest per "
        f"server in {ROUNDS} alternating rounds.",
        "",
        "| figure | target | driftloop | bare FastAPI echo | ratio |",
        "|---|---|---|---|---|",
        f"| ingest, events/s | ≥ 5,000 | {ingest['events_per_s']:,.0f} | {base_ingest['events_per_s']:,.0f} | "
        f"{ratio(ingest['events_per_s'], base_ingest['events_per_s'])} |",
        f"| ingest request p50, ms | | {ingest['latency_ms']['p50']:.1f} | {base_ingest['latency_ms']['p50']:.1f} | "
        f"{ratio(ingest['latency_ms']['p50'], base_ingest['latency_ms']['p50'])} |",
        f"| ingest request p99, ms | | {ingest['latency_ms']['p99']:.1f} | {base_ingest['latency_ms']['p99']:.1f} | "
        f"{ratio(ingest['latency_ms']['p99'], base_ingest['latency_ms']['p99'])} |",
        f"| resident memory when ready, MiB | ≤ 1,536 | {sidecar['rss_ready_mib']:,.0f} | {echo['rss_ready_mib']:,.0f} | "
        f"{ratio(sidecar['rss_ready_mib'], echo['rss_ready_mib'])} |",
        f"| resident memory after ingest, MiB | ≤ 1,536 | {sidecar['rss_after_ingest_mib']:,.0f} | | |",
        f"| resident memory while training, MiB | | {sidecar['rss_training_mib']:,.0f} | | |",
        f"| /metrics scrape p50, ms (idle) | | {idle['p50']:.1f} | {base_idle['p50']:.1f} | {ratio(idle['p50'], base_idle['p50'])} |",
        f"| /metrics scrape max, ms (idle) | ≤ 50 | {idle['max']:.1f} | {base_idle['max']:.1f} | {ratio(idle['max'], base_idle['max'])} |",
    ]
    if training["latency_ms"]:
        lines += [
            f"| /metrics scrape p50, ms (training) | | {training['latency_ms']['p50']:.1f} | | |",
            f"| /metrics scrape max, ms (training) | no timeout (5 s) | {training['latency_ms']['max']:.1f} "
            f"({training['latency_ms']['n']} scrapes, {training['timeouts']} timeouts) | | |",
        ]
    lines += [
        "",
        "Ingest by round, events/s: driftloop "
        + ", ".join(f"{value:,.0f}" for value in ingest["rounds_events_per_s"]) + "; echo "
        + ", ".join(f"{value:,.0f}" for value in base_ingest["rounds_events_per_s"])
        + f"; ratio per round {min(round_ratios):.2f} to {max(round_ratios):.2f}, median "
        f"{statistics.median(round_ratios):.2f}.",
        "",
        f"Windows during the ingest rounds (from /metrics): {windows['evaluated']:.0f} evaluated in "
        f"{windows['evaluation_s']:.1f} s in all, {windows['skipped']:.0f} skipped by the budgets, "
        f"{windows['dropped']:.0f} dropped because evaluation was behind.",
        "",
        f"Ingest failures: {ingest['failures']} driftloop, {base_ingest['failures']} echo. SIGTERM during the "
        f"retrain: exit status {sidecar['exit_status']} after {sidecar['drain_s']:.1f} s; the run ended "
        f"{sidecar['run_state']}.",
        "",
        "Raw figures:",
        "",
        "```json",
        json.dumps({"driftloop": sidecar, "echo": echo}, indent=1, default=str),
        "```",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of ingest load per server (default 30)")
    parser.add_argument("--out", help="markdown file whose bench/operations.py section is replaced by the results")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: needs two cores, one for the server and one for the load generator")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from retrain.datasets import load_clinc150

    texts = [text for text, _ in load_clinc150().splits["test"]]
    machine = machine_facts()  # before pinning, so it counts every core
    with tempfile.TemporaryDirectory(prefix="driftloop-ops-") as folder:
        bootstrap_state(Path(folder))
        os.sched_setaffinity(0, {CLIENT_CORE})
        echo_process, echo_base, echo = start_echo()
        try:
            sidecar = run_sidecar(Path(folder), args.seconds, texts, echo_base)
        finally:
            echo_process.terminate()
            echo_process.wait()
    body = report(sidecar, echo, args.seconds, machine)
    if args.out:
        publish(args.out, SECTION, body)
    else:
        print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
