"""Ingest latency of the monitor sidecar while a LoRA training runs in the same process.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest_during_training.py [--quick] [--out docs/retraining.md]

The benchmark bootstraps a small state in a temporary folder with the bundled
all-MiniLM-L6-v2 (banking intents, a 151-label head), starts
``monitor.daemon.MonitorDaemon`` and serves ``monitor.api.create_app`` with uvicorn
on 127.0.0.1, on the first free port in 18100-18199. A client in a separate
process posts batches of 100 events to POST /v1/events at a fixed rate and
records each request's latency. Three conditions:

- idle: no training;
- training, 1 thread: ``retrain.trainer.fit`` on MiniLM in a background thread of the
  server's process, with ``TrainSettings(num_threads=1)``, the sidecar's default
  on a 2-core machine (all cores but one);
- training, all threads: the same with ``num_threads`` set to the core count.

The conditions take turns in blocks (idle, 1 thread, all threads, idle, ...), so
a change in the machine's load or in the size of the event store during the run
affects all three alike. A block during which other processes used more than
CONTENTION_MARGIN cores runs again, up to MAX_ATTEMPTS times in all.

Window evaluation is switched off (one check an hour, windows of ten million
events), so the latency is that of the ingest path alone: JSON parsing,
validation, the SQLite insert and the window sampler.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from bench.record import LoadReading, OtherLoad, machine_facts, publish  # noqa: E402

logger = logging.getLogger("bench.ingest_during_training")

SECTION = "bench/ingest_during_training.py"
HOST = "127.0.0.1"
PORTS = range(18100, 18200)
EVENTS_PER_BATCH = 100
# Requests per second the client sends; a late request is sent as soon as the previous one returns.
REQUEST_RATE = 10.0
# Training steps that must finish before the client starts, so the client runs against steady training.
TRAINING_WARMUP_STEPS = 5
TRAINING_PER_LABEL = 40
# Cores that processes other than the server and its client may use during a block before it runs again.
CONTENTION_MARGIN = 0.25
MAX_ATTEMPTS = 3


@dataclass
class Condition:
    name: str
    threads: int | None  # None: no training runs


@dataclass
class Measurement:
    condition: Condition
    latencies_ms: list[float]
    failures: int
    load: LoadReading
    client_cores: float
    training_step_s: float | None
    training_steps: int


# ---------------------------------------------------------------- client (separate process)


def run_client(port: int, seconds: float, rate: float, prefix: str, labels: int) -> None:
    """Post batches of events for ``seconds`` at ``rate`` requests per second; print the latencies as JSON."""
    import httpx

    from retrain.datasets import load_clinc150

    texts = [text for text, _ in load_clinc150().splits["test"]]
    url = f"http://{HOST}:{port}/v1/events"
    latencies = []
    failures = 0
    interval = 1.0 / rate
    with httpx.Client(timeout=30.0) as client:
        started = time.monotonic()
        next_send = started
        batch = 0
        while time.monotonic() - started < seconds:
            events = []
            for position in range(EVENTS_PER_BATCH):
                number = batch * EVENTS_PER_BATCH + position
                probabilities = [0.0] * labels
                probabilities[number % labels] = 1.0
                events.append({"id": f"{prefix}-{number}", "text": texts[number % len(texts)],
                               "probabilities": probabilities, "latency_ms": 5.0})
            body = json.dumps({"events": events})
            delay = next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            response = client.post(url, content=body, headers={"content-type": "application/json"})
            latencies.append(1000 * (time.perf_counter() - sent))
            if response.status_code != 200 or response.json().get("accepted") != EVENTS_PER_BATCH:
                failures += 1
            batch += 1
            next_send += interval
    print(json.dumps({"latencies_ms": latencies, "failures": failures}))


# ---------------------------------------------------------------- server side


def free_port() -> socket.socket:
    """Bind a listening socket on the first free port of PORTS."""
    for port in PORTS:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, port))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        return sock
    raise SystemExit(f"error: no free port in {PORTS.start}-{PORTS.stop - 1} on {HOST}; stop what uses them")


def small_config(state_dir: Path):
    from monitor.config import parse_config

    return parse_config({
        "state_dir": str(state_dir),
        "data": {"clinc150": {"domains": ["banking"]}, "per_label_limit": 10},
        "bootstrap": {"epochs": 1},
        # No window closes and no check runs during the benchmark, so only the ingest path is measured.
        "monitor": {"window_size": 10_000_000, "check_interval_s": 3600},
    })


class Trainer:
    """A ``fit`` run on MiniLM in a background thread that trains until ``stop`` is called."""

    def __init__(self, threads: int, train: list[tuple[str, str]], labels: list[str]):
        from monitor.config import load_config, resolve_model_path
        from retrain.trainer import settings_from_config

        config = load_config(None)
        self.settings = settings_from_config(config.retrain.training, config.model).replace(
            num_threads=threads, epochs=1000, device="cpu")
        self.base_model = resolve_model_path(config.model.base)
        self.train = train
        self.labels = labels
        self.stamps: list[tuple[float, int]] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-training", daemon=True)

    def _should_stop(self) -> bool:
        # fit polls this before each step, so the n-th poll marks the end of step n - 1.
        self.stamps.append((time.monotonic(), len(self.stamps)))
        return self.stopping.is_set()

    def _run(self) -> None:
        from retrain.trainer import TrainingCancelled, fit

        try:
            fit(self.base_model, self.labels, self.train, self.settings, should_stop=self._should_stop,
                run_name="bench background training")
        except TrainingCancelled:
            pass
        except BaseException as error:  # reported by the main thread
            self.error = error

    def start(self) -> None:
        self.thread.start()
        while not self.stamps or self.stamps[-1][1] < TRAINING_WARMUP_STEPS:
            if not self.thread.is_alive():
                raise SystemExit(f"error: background training stopped before step {TRAINING_WARMUP_STEPS}: {self.error}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        if self.error is not None:
            raise SystemExit(f"error: background training failed: {self.error}")

    def step_seconds(self, since: float, until: float) -> tuple[float | None, int]:
        """Return the mean step time and the step count between two ``time.monotonic()`` values."""
        inside = [(moment, step) for moment, step in self.stamps if since <= moment <= until]
        if len(inside) < 2:
            return None, 0
        (first_time, first_step), (last_time, last_step) = inside[0], inside[-1]
        if last_step == first_step:
            return None, 0
        return (last_time - first_time) / (last_step - first_step), last_step - first_step


def measure(condition: Condition, port: int, seconds: float, train: list[tuple[str, str]], labels: list[str],
            prefix: str) -> Measurement:
    """Run the client for ``seconds`` under ``condition`` and collect its latencies."""
    trainer = None
    if condition.threads is not None:
        trainer = Trainer(condition.threads, train, labels)
        trainer.start()
    load = OtherLoad()
    client_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    command = [sys.executable, str(Path(__file__).resolve()), "--client-port", str(port), "--seconds", str(seconds),
               "--id-prefix", prefix, "--labels", str(len(labels))]
    client = subprocess.run(command, capture_output=True, text=True, check=False)
    ended = time.monotonic()
    reading = load.read()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cores = (usage.ru_utime + usage.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime) / (ended - began)
    step_s, steps = (None, 0)
    if trainer is not None:
        trainer.stop()
        step_s, steps = trainer.step_seconds(began, ended)
    if client.returncode != 0:
        raise SystemExit(f"error: the client process failed with exit code {client.returncode}: {client.stderr[-2000:]}")
    output = json.loads(client.stdout.strip().splitlines()[-1])
    return Measurement(condition, output["latencies_ms"], output["failures"], reading, client_cores, step_s, steps)


def percentile(values: list[float], share: float) -> float:
    import numpy as np

    return float(np.percentile(values, 100 * share))


def render(args, blocks: list[Measurement], conditions: list[Condition], rounds: int, seconds: float,
           retried: int, elapsed_s: float, facts: dict) -> str:
    command = ("DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest_during_training.py "
               + " ".join(args.argv))
    lines = [
        "## Ingest latency while a retrain trains in the same process",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.date.today().isoformat()}; total run time {elapsed_s / 60:.1f} min.",
        machine_facts(),
        f"- Server: `monitor.api.create_app(MonitorDaemon(config))` under uvicorn {facts['uvicorn']} on "
        f"{HOST}:{facts['port']}. The state was bootstrapped in a temporary folder with the bundled "
        f"all-MiniLM-L6-v2 (banking intents, 10 per intent, one epoch, a {facts['labels']}-label head; bootstrap "
        f"took {facts['bootstrap_s']:.0f} s). Window checks are off (window size 10,000,000, one check an hour), so "
        "only the ingest path is measured: JSON parsing, validation, the SQLite insert and the window sampler.",
        f"- Client: a separate Python process with httpx {facts['httpx']} and one keep-alive connection posts "
        f"batches of {EVENTS_PER_BATCH} events (id, CLINC150 test text, a {facts['labels']}-value one-hot "
        f"`probabilities` list, latency_ms) at {REQUEST_RATE:g} requests per second "
        f"({REQUEST_RATE * EVENTS_PER_BATCH:,.0f} events/s). Latency is from sending the request to reading the "
        "whole response, on the client.",
        f"- Schedule: {rounds} round{'s' if rounds != 1 else ''} of one {seconds:g}-second block per condition, "
        "the conditions taking turns, "
        f"so {rounds * seconds:g} s of traffic per condition. A block ran again, up to {MAX_ATTEMPTS} times in all, "
        f"when processes other than the server and the client used more than {CONTENTION_MARGIN:g} cores during "
        f"it; {retried} block{'s' if retried != 1 else ''} ran again.",
        f"- Training: `retrain.trainer.fit` on MiniLM in a thread of the server process, on CLINC150 training "
        f"texts ({TRAINING_PER_LABEL} per label, batch 32, max_length 64, no validation set). Each block starts a "
        f"new `fit`, waits for {TRAINING_WARMUP_STEPS} steps, runs the client, then cancels the training through "
        "`should_stop`. `fit` calls `torch.set_num_threads`, which applies to the whole process.",
        "",
        "| condition | requests | failed | p50 (ms) | p99 (ms) | max (ms) | training step (s) | client CPU (cores) "
        "| other processes (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for condition in conditions:
        items = [item for item in blocks if item.condition is condition]
        latencies = [value for item in items for value in item.latencies_ms]
        steps = sum(item.training_steps for item in items)
        step = "-"
        if steps:
            step_s = sum(item.training_step_s * item.training_steps for item in items if item.training_steps) / steps
            step = f"{step_s:.2f} ({steps} steps)"
        client = statistics.mean(item.client_cores for item in items)
        other = statistics.mean(item.load.other_cores for item in items)
        marked = sum(contended(item) for item in items)
        note = f" ({marked} block{'s' if marked != 1 else ''} contended)" if marked else ""
        lines.append(
            f"| {condition.name} | {len(latencies)} | {sum(item.failures for item in items)} | "
            f"{statistics.median(latencies):.1f} | {percentile(latencies, 0.99):.1f} | {max(latencies):.1f} | "
            f"{step} | {client:.2f} | {other:.2f}{note} |"
        )
    lines += [
        "",
        "The CPU columns are CPU-seconds per second, averaged over the blocks: the client process's, and that of "
        "every process other than the server and the client (the machine is shared, so these show interference). "
        "The training step is the mean over the steps that ran while the client was sending.",
    ]
    return "\n".join(lines) + "\n"


def contended(item: Measurement) -> bool:
    return item.load.other_cores > CONTENTION_MARGIN


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 5-second blocks, for a smoke test")
    parser.add_argument("--out", default="docs/retraining.md",
                        help=f"markdown file whose '{SECTION}' section is replaced with the results")
    parser.add_argument("--seconds", type=float, help="seconds of client traffic per block (default 20, quick 5)")
    parser.add_argument("--rounds", type=int, help="blocks per condition, taking turns (default 3, quick 1)")
    # The benchmark starts itself with these options as its client process.
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--id-prefix", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.client_port is not None:
        run_client(args.client_port, seconds, REQUEST_RATE, args.id_prefix, args.labels)
        return None

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import httpx
    import uvicorn

    from monitor.api import create_app
    from monitor.daemon import MonitorDaemon
    from retrain.bootstrap import bootstrap
    from retrain.datasets import cap_per_label, load_clinc150

    started = time.monotonic()
    cores = len(os.sched_getaffinity(0))
    conditions = [Condition("idle", None), Condition("training, 1 thread", 1),
                  Condition(f"training, {cores} threads", cores)]
    rounds = args.rounds or (1 if args.quick else 3)
    clinc = load_clinc150()
    train, _ = cap_per_label(clinc.splits["train"] + clinc.splits["oos_train"], TRAINING_PER_LABEL, seed=0)

    with tempfile.TemporaryDirectory(prefix="driftloop-ingest-bench-") as folder:
        config = small_config(Path(folder) / "state")
        bootstrap_started = time.monotonic()
        bootstrap(config, log=logger.info)
        bootstrap_s = time.monotonic() - bootstrap_started
        daemon = MonitorDaemon(config)
        daemon.start(background=False)
        if not daemon.ready:
            raise SystemExit(f"error: the monitor daemon did not start: {daemon.startup_error}")
        sock = free_port()
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(daemon), log_level="warning"))
        server_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="bench-uvicorn",
                                         daemon=True)
        server_thread.start()
        try:
            while not server.started:
                time.sleep(0.05)
            logger.info("monitor serving on http://%s:%d", HOST, port)
            blocks: list[Measurement] = []
            retried = 0
            for round_number in range(1, rounds + 1):
                for number, condition in enumerate(conditions):
                    for attempt in range(1, MAX_ATTEMPTS + 1):
                        item = measure(condition, port, seconds, train, daemon.labels,
                                       prefix=f"r{round_number}-c{number}-a{attempt}")
                        logger.info("round %d, %s: p50 %.1f ms, p99 %.1f ms over %d requests, %d failed, other "
                                    "processes %.2f cores", round_number, condition.name,
                                    statistics.median(item.latencies_ms), percentile(item.latencies_ms, 0.99),
                                    len(item.latencies_ms), item.failures, item.load.other_cores)
                        if not contended(item) or attempt == MAX_ATTEMPTS:
                            break
                        retried += 1
                        logger.warning("other processes used %.2f cores during the block; running it again",
                                       item.load.other_cores)
                    blocks.append(item)
        finally:
            server.should_exit = True
            server_thread.join(timeout=30)
            sock.close()
            daemon.stop()
        facts = {"port": port, "labels": len(daemon.labels), "bootstrap_s": bootstrap_s,
                 "uvicorn": uvicorn.__version__, "httpx": httpx.__version__}

    section = render(args, blocks, conditions, rounds, seconds, retried, time.monotonic() - started, facts)
    return publish(args.out, SECTION, section)


if __name__ == "__main__":
    main()
