"""Forgetting in the demo's retrain: the original test split after one retrain, by replayed examples per label.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/demo_retrain.py [--replay 15 30] [--seeds 0 1] [--out docs/retraining.md]

``make demo`` closes its loop only when the canary passes the candidate, and the gate
that came closest to failing is non-inferiority on the original test split (the known
domains' CLINC150 test items). This script reruns the demo's retrain without its
processes, to choose ``retrain.replay_per_label`` for ``config/demo.yaml``:

1. ``config/demo.yaml`` with its first adapter (``retrain.bootstrap.bootstrap``; the
   demo's cache in ``state/cache`` is reused when it matches);
2. an in-process ``monitor.daemon.MonitorDaemon`` receives the demo's traffic, drawn by
   ``monitor.demo.Traffic`` with the demo's shares. First come ``Scenario.phase1_events``
   known-domain events, then drifted events until LABELLED events carry labels. The demo's
   trigger waits for ``trigger.min_labels``, and more labels arrive before the run reads
   them. A share ``label_fraction`` of the events gets its true label;
3. ``MonitorDaemon.start_retrain`` runs the retrain as the demo's monitor does (rank sweep,
   final training, canary), and the run's canary record is read back.

Event ids are fixed per seed, so a seed gives the same traffic, labels and canary holdout
for every replay setting. The events' probabilities are uniform: neither training nor the
canary reads them.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from bench.record import OtherLoad, machine_facts, publish  # noqa: E402

logger = logging.getLogger("bench.demo_retrain")

SECTION = "bench/demo_retrain.py"
DEMO_CONFIG = REPOSITORY / "config" / "demo.yaml"
# Labels the retrain reads. The demo's verified run at 707d34c read 1,681 (1,342 trained on, 339 held out).
LABELLED = 1700
BATCH = 100


def send_traffic(daemon, traffic, scenario, seed: int, labelled_target: int) -> dict[str, int]:
    """Post the demo's traffic and its labels to ``daemon``; return the events sent per source."""
    rng = random.Random(seed)
    labels = daemon.labels
    uniform = [1.0 / len(labels)] * len(labels)
    events, answers, sources = [], [], {"known": 0, "new": 0, "oos": 0}
    while len(answers) < labelled_target:
        phase = "stable" if len(events) < scenario.phase1_events else "drift"
        drawn = traffic.draw(phase, scenario.new_domain_share, scenario.oos_share)
        if drawn is None:
            raise SystemExit(f"error: the traffic pools ran out after {len(events)} events")
        source, text, label = drawn
        event_id = f"bench-{seed}-{len(events)}"
        events.append({"id": event_id, "text": text, "probabilities": uniform, "latency_ms": 5.0})
        sources[source] += 1
        if rng.random() < scenario.label_fraction:
            answers.append({"id": event_id, "label": label})
    for start in range(0, len(events), BATCH):
        result = daemon.ingest_events({"events": events[start:start + BATCH]})
        if result.errors:
            raise SystemExit(f"error: the daemon rejected events: {result.errors[:3]}")
    for start in range(0, len(answers), BATCH):
        daemon.ingest_labels({"labels": answers[start:start + BATCH]})
    return sources


def retrain_once(replay: int, seed: int, labelled: int, cache_dir: Path) -> dict:
    """Run the demo's retrain with ``replay`` examples per label on the traffic of ``seed``; return its figures."""
    from monitor.daemon import MonitorDaemon
    from monitor.demo import FULL, Traffic, prepare_config
    from retrain.bootstrap import bootstrap

    with tempfile.TemporaryDirectory(prefix="driftloop-demo-retrain-") as folder:
        # The monitor's own trigger stays off, so the only retrain is the one started below.
        overrides = {"state_dir": str(Path(folder) / "state"), "cache_dir": str(cache_dir),
                     "retrain": {"replay_per_label": replay}, "trigger": {"min_labels": 10_000_000}}
        config, _, _ = prepare_config(DEMO_CONFIG, False, overrides)
        bootstrap(config, log=logger.info)
        daemon = MonitorDaemon(config)
        daemon.start(background=False)
        if not daemon.ready:
            raise SystemExit(f"error: the monitor did not start: {daemon.startup_error}")
        try:
            sources = send_traffic(daemon, Traffic(config, seed), FULL, seed, labelled)
            started = time.monotonic()
            run_id = daemon.start_retrain({"reason": "bench/demo_retrain.py"})
            daemon.job_thread.join()
            wall = time.monotonic() - started
            run = daemon.store.get_run(run_id)
        finally:
            daemon.stop()
    canary = run.get("canary") or {}
    gates = {gate["name"]: gate for gate in canary.get("gates", [])}
    test, production = canary.get("test") or {}, canary.get("production") or {}
    training = run.get("training") or {}
    logger.info("replay %d, seed %d: run %s ended %s", replay, seed, run_id, run["state"])
    return {
        "replay": replay, "seed": seed, "state": run["state"], "sources": sources,
        "decision": canary.get("status"), "deciding_gate": canary.get("deciding_gate"),
        "test_diff": test.get("accuracy_diff"), "test_ci": test.get("accuracy_diff_ci"),
        "test_regressed": test.get("regressed_classes"),
        "noninferiority": gates.get("test_noninferiority", {}),
        "production_before": production.get("current_accuracy"), "production_after": production.get("candidate_accuracy"),
        "train": (training.get("data") or {}).get("train"), "steps": training.get("steps"),
        "training_s": training.get("wall_seconds"), "run_s": wall,
    }


def _points(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}"


def render(args, results: list[dict], elapsed_s: float, load: str, margin: float) -> str:
    first = results[0]["sources"]
    lines = [
        "## Forgetting in the demo's retrain",
        "",
        f"Measured with `python bench/demo_retrain.py {' '.join(args.argv)}`".rstrip() + f" on "
        f"{datetime.date.today().isoformat()}, {elapsed_s / 60:.0f} min in all.",
        "",
        machine_facts(),
        f"- Other processes during the run: {load}.",
        f"- Traffic of seed {results[0]['seed']}: {first['known']} known-domain, {first['new']} unseen-domain and "
        f"{first['oos']} out-of-scope events, {args.labelled} of them labelled. Settings of `config/demo.yaml` "
        f"except `retrain.replay_per_label`; the canary allows {margin * 100:.0f} points on the original test split.",
        "",
        "| replay per label | seed | training examples | steps | final training | test accuracy change, points "
        "| 95% interval | non-inferiority | production accuracy | decision |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for row in results:
        gate = row["noninferiority"]
        if gate.get("passed"):
            verdict = "passed"
        elif gate.get("evaluated"):
            verdict = "failed"
        else:
            verdict = "not decided"
        low, high = row["test_ci"] or (None, None)
        production = (f"{row['production_before']:.3f} -> {row['production_after']:.3f}"
                      if row["production_before"] is not None else "n/a")
        training_s = "n/a" if row["training_s"] is None else f"{row['training_s']:.0f} s"
        decision = row["decision"]
        if row["deciding_gate"]:
            decision += f" ({row['deciding_gate']})"
        lines.append(f"| {row['replay']} | {row['seed']} | {row['train']} | {row['steps']} | {training_s} "
                     f"| {_points(row['test_diff'])} | [{_points(low)}, {_points(high)}] | {verdict} "
                     f"| {production} | {decision} |")
    lines += [
        "",
        "The test accuracy change is the candidate's accuracy on the known domains' test split minus the "
        "first adapter's. Non-inferiority needs the interval's lower end above minus the margin. A candidate "
        "also learns the unseen domains and out-of-scope queries, so some known-domain items move to those "
        "classes; replayed examples of the known intents hold that back.",
    ]
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=int, nargs="+", default=[15, 30],
                        help="values of retrain.replay_per_label to compare (default 15 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="traffic seeds (default 0 1)")
    parser.add_argument("--labelled", type=int, default=LABELLED,
                        help=f"labelled events the retrain reads (default {LABELLED})")
    parser.add_argument("--cache-dir", default=str(REPOSITORY / "state" / "cache"),
                        help="bootstrap cache, shared with make demo (default state/cache)")
    parser.add_argument("--out", default="docs/retraining.md",
                        help=f"markdown file whose '{SECTION}' section is replaced with the results")
    args = parser.parse_args(argv)
    for name in ("replay", "seeds"):
        negative = [value for value in getattr(args, name) if value < 0]
        if negative:
            parser.error(f"--{name} must be at least 0, got {negative[0]}")
    if args.labelled < 1:
        parser.error(f"--labelled must be at least 1, got {args.labelled}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)

    from monitor.demo import prepare_config

    margin = prepare_config(DEMO_CONFIG, False)[0].canary.noninferiority_margin
    started = time.monotonic()
    load = OtherLoad()
    results = [retrain_once(replay, seed, args.labelled, Path(args.cache_dir))
               for seed in args.seeds for replay in args.replay]
    section = render(args, results, time.monotonic() - started, load.read().describe(), margin)
    return publish(args.out, SECTION, section)


if __name__ == "__main__":
    main()
