"""Retraining benchmark: LoRA rank sweep and training against a logistic-regression probe on CLINC150.

Run from the repository root::

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/retraining.py [--quick] [--out docs/retraining.md]

Split: the CLINC150 ``train`` split plus ``oos_train``, capped at PER_LABEL examples
per label (seeded), so all 150 intents and ``oos`` have the same count. A 10% validation
split is taken off it by ``retrain.assembly.split_validation`` (stable text hash), as a
retrain does. The test set is the CLINC150 ``test`` split plus ``oos_test``.

Baseline: scikit-learn LogisticRegression on the frozen sentence embeddings of the bundled
all-MiniLM-L6-v2 (``monitor.embedding.Embedder``). C is chosen on the validation split.

LoRA: ``retrain.sweep.sweep_ranks`` with the built-in default sweep config and the
settings a retrain job builds (``settings_from_config(config.retrain.training,
config.model, num_threads=training_threads())``, so all cores but one). Then
``train_adapter`` trains the chosen rank with the validation split for early stopping.
The saved adapter is loaded with ``retrain.model.Classifier.load`` and scored on the test set.
The test set is never used to choose anything.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

from bench.record import OtherLoad, machine_facts, publish  # noqa: E402
from monitor.config import load_config, resolve_model_path  # noqa: E402
from retrain.assembly import split_validation  # noqa: E402
from retrain.datasets import OUT_OF_SCOPE, cap_per_label, load_clinc150  # noqa: E402

logger = logging.getLogger("bench.retraining")

SECTION = "bench/retraining.py"
SEED = 0
# 40 per label is the default retrain.max_per_label cap and the demo bootstrap's per_label_limit.
PER_LABEL = 40
# Inverse regularisation strengths tried for the probe, scored by validation macro-F1.
PROBE_C_GRID = (1.0, 10.0, 100.0, 1000.0)
PROBE_MAX_ITER = 3000


@dataclass
class RunSize:
    per_label: int
    ranks: list[int] | None  # None takes the config's sweep ranks
    budget_steps: int | None  # None takes the config's sweep budget
    final_max_steps: int | None  # None lets the config's epochs and early stopping decide
    test_limit: int | None


FULL = RunSize(per_label=PER_LABEL, ranks=None, budget_steps=None, final_max_steps=None, test_limit=None)
QUICK = RunSize(per_label=4, ranks=[4, 8], budget_steps=5, final_max_steps=10, test_limit=600)


@dataclass
class Scores:
    accuracy: float
    macro_f1: float
    in_scope_accuracy: float
    oos_recall: float


def score(gold: list[str], predicted: list[str]) -> Scores:
    """Score predictions: accuracy and macro-F1 over every label in ``gold``, plus the two usual CLINC150 figures."""
    from sklearn.metrics import f1_score

    gold_array = np.array(gold)
    predicted_array = np.array(predicted)
    correct = gold_array == predicted_array
    in_scope = gold_array != OUT_OF_SCOPE
    return Scores(
        accuracy=float(correct.mean()),
        macro_f1=float(f1_score(gold, predicted, labels=sorted(set(gold)), average="macro", zero_division=0)),
        in_scope_accuracy=float(correct[in_scope].mean()) if in_scope.any() else float("nan"),
        oos_recall=float(correct[~in_scope].mean()) if (~in_scope).any() else float("nan"),
    )


def build_split(size: RunSize) -> dict:
    """Return the labels and the train, validation and test pairs of this run."""
    clinc = load_clinc150()
    validation_fraction = load_config(None).retrain.validation_fraction
    pool, _ = cap_per_label(clinc.splits["train"] + clinc.splits["oos_train"], size.per_label, SEED)
    train, validation = split_validation(pool, validation_fraction)
    test = clinc.splits["test"] + clinc.splits["oos_test"]
    if size.test_limit is not None:
        test = random.Random(SEED).sample(test, size.test_limit)
    return {"labels": clinc.labels, "train": train, "validation": validation, "test": test,
            "validation_fraction": validation_fraction}


# ---------------------------------------------------------------- baseline probe


def run_probe(split: dict) -> dict:
    """Fit the logistic-regression probe on frozen MiniLM embeddings, choosing C on the validation split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from monitor.embedding import Embedder

    started = time.monotonic()
    embedder = Embedder(resolve_model_path("minilm"))
    vectors = {}
    for name in ("train", "validation", "test"):
        vectors[name] = embedder.encode([text for text, _ in split[name]])
    embed_s = time.monotonic() - started
    gold = {name: [label for _, label in split[name]] for name in ("train", "validation", "test")}

    grid = []
    best = None
    fit_started = time.monotonic()
    for c in PROBE_C_GRID:
        probe = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER)
        probe.fit(vectors["train"], gold["train"])
        predicted = probe.predict(vectors["validation"])
        f1 = f1_score(gold["validation"], predicted, labels=sorted(set(gold["validation"])), average="macro",
                      zero_division=0)
        grid.append({"C": c, "val_macro_f1": float(f1), "iterations": int(np.max(probe.n_iter_))})
        logger.info("probe C=%g: validation macro-F1 %.4f", c, f1)
        if best is None or f1 > best[0]:
            best = (f1, c, probe)
    fit_s = time.monotonic() - fit_started
    _, chosen_c, probe = best
    test_scores = score(gold["test"], list(probe.predict(vectors["test"])))
    return {"grid": grid, "chosen_c": chosen_c, "test": test_scores, "embed_s": embed_s, "fit_s": fit_s,
            "wall_s": time.monotonic() - started, "dimension": embedder.dimension}


# ---------------------------------------------------------------- LoRA


def run_lora(split: dict, size: RunSize, threads: int | None) -> dict:
    """Sweep ranks, train the chosen rank, save it, load it with Classifier.load and score it on the test set.

    ``threads`` None takes the thread count of a retrain job: the config's, else all cores but one.
    """
    from retrain.jobs import training_threads
    from retrain.model import Classifier
    from retrain.sweep import settings_for_rank, sweep_ranks
    from retrain.trainer import progress_reporter, settings_from_config, train_adapter

    config = load_config(None)
    base_model = resolve_model_path(config.model.base)
    settings = settings_from_config(config.retrain.training, config.model, num_threads=threads or training_threads())
    ranks = size.ranks if size.ranks is not None else list(config.retrain.sweep.ranks)
    budget = size.budget_steps if size.budget_steps is not None else config.retrain.sweep.budget_steps
    if size.final_max_steps is not None:
        settings = settings.replace(max_steps=size.final_max_steps, epochs=1)

    started = time.monotonic()
    sweep = sweep_ranks(base_model, split["labels"], split["train"], split["validation"], settings, ranks,
                        budget_steps=budget, tie_tolerance=config.retrain.sweep.tie_tolerance,
                        progress=progress_reporter(logger.info, "LoRA"), run_name="bench sweep")
    sweep_s = time.monotonic() - started

    chosen = settings_for_rank(settings, sweep.chosen.rank)
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as folder:
        train_started = time.monotonic()
        result = train_adapter(base_model, split["labels"], split["train"], Path(folder) / "adapter", chosen,
                               validation=split["validation"], progress=progress_reporter(logger.info, "LoRA final training"))
        train_s = time.monotonic() - train_started

        test_started = time.monotonic()
        classifier = Classifier.load(base_model, Path(folder) / "adapter", "bench", device="cpu")
        texts = [text for text, _ in split["test"]]
        predicted = [label for label, _ in classifier.predict(texts)]
        test_s = time.monotonic() - test_started

    return {
        "settings": settings,
        "ranks": ranks,
        "budget": budget,
        "tie_tolerance": config.retrain.sweep.tie_tolerance,
        "sweep": sweep.table(),
        "chosen": chosen,
        "result": result,
        "test": score([label for _, label in split["test"]], predicted),
        "sweep_s": sweep_s,
        "train_s": train_s,
        "test_s": test_s,
        "wall_s": time.monotonic() - started,
    }


# ---------------------------------------------------------------- report


def render(args, size: RunSize, split: dict, probe: dict, lora: dict, elapsed_s: float, load_note: str) -> str:
    settings = lora["settings"]
    chosen = lora["chosen"]
    result = lora["result"]
    record = result.record
    n_oos_test = sum(label == OUT_OF_SCOPE for _, label in split["test"])
    command = "DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/retraining.py " + " ".join(args.argv)
    lines = [
        "## LoRA retraining against a frozen-embedding probe (CLINC150)",
        "",
        f"- Command: `{command.strip()}`",
        f"- Date: {datetime.date.today().isoformat()}; total run time {elapsed_s / 60:.1f} min.",
        machine_facts(),
        f"- Mode: {'quick (smoke test; the figures mean little)' if args.quick else 'full'}.",
        f"- Other load: {load_note}.",
        f"- Split: CLINC150 `train` plus `oos_train`, capped at {size.per_label} examples per label (seed {SEED}, "
        f"`retrain.datasets.cap_per_label`) over all {len(split['labels'])} labels (150 intents and `oos`). "
        f"`retrain.assembly.split_validation` holds out {split['validation_fraction']:.0%} by a stable hash of the "
        f"normalised text: {len(split['train'])} training and {len(split['validation'])} validation examples. "
        f"Test: CLINC150 `test` plus `oos_test`, {len(split['test'])} texts of which {n_oos_test} are `oos`"
        + (f" (a seeded sample of {size.test_limit})" if size.test_limit is not None else "") + ".",
        "- Metrics: accuracy and macro-F1 over every label in the test set (151 labels, `oos` counted as one class), "
        "plus the usual CLINC150 figures: accuracy on the in-scope test texts and recall on `oos`. "
        "Nothing was chosen on the test set.",
        "",
        "### Results on the test set",
        "",
        "| model | accuracy | macro-F1 | in-scope accuracy | oos recall | chosen on validation | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, scores, choice, wall in (
        ("logistic-regression probe on frozen MiniLM embeddings", probe["test"], f"C = {probe['chosen_c']:g}",
         f"{probe['wall_s']:.0f} s (embedding {probe['embed_s']:.0f} s, {len(PROBE_C_GRID)} fits {probe['fit_s']:.0f} s)"),
        (f"LoRA rank {chosen.rank} on MiniLM (driftloop)", lora["test"], f"rank {chosen.rank} by the sweep",
         f"{lora['sweep_s'] + lora['train_s']:.0f} s (sweep {lora['sweep_s']:.0f} s, training {lora['train_s']:.0f} s)"),
    ):
        lines.append(f"| {name} | {scores.accuracy:.4f} | {scores.macro_f1:.4f} | {scores.in_scope_accuracy:.4f} | "
                     f"{scores.oos_recall:.4f} | {choice} | {wall} |")
    n_oos_validation = sum(label == OUT_OF_SCOPE for _, label in split["validation"])
    lines += ["", verdict(probe["test"], lora["test"]) + " " + breakdown(probe["test"], lora["test"], n_oos_validation),
              ""]

    lines += [
        "### Probe",
        "",
        f"`sklearn.linear_model.LogisticRegression` (lbfgs, multinomial, max_iter {PROBE_MAX_ITER}) on the "
        f"{probe['dimension']}-dimensional L2-normalised embeddings of `monitor.embedding.Embedder` with the bundled "
        "all-MiniLM-L6-v2, trained on the same training examples as LoRA. Validation macro-F1 per C:",
        "",
        "| C | validation macro-F1 | lbfgs iterations |",
        "|---|---|---|",
    ]
    for row in probe["grid"]:
        mark = " (chosen)" if row["C"] == probe["chosen_c"] else ""
        lines.append(f"| {row['C']:g}{mark} | {row['val_macro_f1']:.4f} | {row['iterations']} |")

    threads = f"{settings.num_threads}" + (" (set by --threads)" if args.threads else
                                            ", as a retrain job sets it (all cores but one)")
    lines += [
        "",
        "### LoRA rank sweep",
        "",
        f"`retrain.sweep.sweep_ranks` over ranks {lora['ranks']}, {lora['budget']} optimiser steps each, tie "
        f"tolerance {lora['tie_tolerance']:g}. A retrain job builds the settings from the built-in defaults with "
        "`settings_from_config(config.retrain.training, config.model, num_threads=training_threads())`. They are "
        f"learning rate {settings.learning_rate:g}, batch {settings.batch_size}, "
        f"max_length {settings.max_length}, alpha/rank {settings.alpha / settings.rank:g}, dropout {settings.dropout:g}, "
        f"warmup ratio {settings.warmup_ratio:g}, device {settings.device} (the CPU here) and precision "
        f"{settings.precision} (fp32 on the CPU). Torch threads: {threads}. The probe's embedding and the test "
        "scoring ran on the same thread count. Validation figures are at each run's lowest validation loss. "
        "Wall seconds include loading the base model and the two validation passes of each run.",
        "",
        "| rank | validation macro-F1 | validation accuracy | validation loss | steps | wall s | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in lora["sweep"]:
        if row["error"]:
            lines.append(f"| {row['rank']} | failed: {row['error']} | | | {row['steps']} | {row['wall_seconds']:.0f} | |")
            continue
        lines.append(f"| {row['rank']} | {row['val_macro_f1']:.4f} | {row['val_accuracy']:.4f} | {row['val_loss']:.4f} | "
                     f"{row['steps']} | {row['wall_seconds']:.0f} | {'yes' if row['chosen'] else ''} |")

    lines += ["", sweep_note(lora["sweep"])]

    best = record["validation"]["best"] or {}
    epochs = record["epochs"]
    lines += [
        "",
        "### Final training at the chosen rank",
        "",
        f"`train_adapter` at rank {chosen.rank} (alpha {chosen.alpha:g}) with the validation split, "
        f"{settings.epochs} epoch{'s' if settings.epochs != 1 else ''} at most"
        + (f" and at most {settings.max_steps} steps" if settings.max_steps else "")
        + f", early stopping patience {settings.early_stopping_patience}. It ran {result.steps} of "
        f"{record['schedule']['total_steps']} scheduled steps ({result.epochs_completed} complete epochs) and "
        f"stopped with reason `{result.stop_reason}`. The best validation loss came at step "
        f"{record['validation']['best_step']}: loss {best.get('loss', float('nan')):.4f}, accuracy "
        f"{best.get('accuracy', float('nan')):.4f}, macro-F1 {best.get('macro_f1', float('nan')):.4f}. "
        f"Training wall time {result.wall_seconds:.0f} s, {result.wall_seconds / max(result.steps, 1):.2f} s per step "
        "including the validation passes.",
        "",
        "| epoch | steps | training loss | validation loss | validation accuracy | validation macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for epoch in epochs:
        lines.append(f"| {epoch['epoch']} | {epoch['steps']} | {epoch['train_loss']:.4f} | "
                     f"{epoch.get('val_loss', float('nan')):.4f} | {epoch.get('val_accuracy', float('nan')):.4f} | "
                     f"{epoch.get('val_macro_f1', float('nan')):.4f} |")
    findings = ", ".join(sorted(result.findings)) if result.findings else "none"
    lines += [
        "",
        f"Training watch findings: {findings}." + convergence_note(epochs, result.stop_reason),
        "",
        "### Wall time",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| probe: embed {len(split['train']) + len(split['validation']) + len(split['test'])} texts | {probe['embed_s']:.0f} |",
        f"| probe: {len(PROBE_C_GRID)} LogisticRegression fits | {probe['fit_s']:.0f} |",
        f"| LoRA rank sweep ({len(lora['sweep'])} runs of {lora['budget']} steps) | {lora['sweep_s']:.0f} |",
        f"| LoRA final training ({result.steps} steps, saving included) | {lora['train_s']:.0f} |",
        f"| LoRA sweep and final training | {lora['sweep_s'] + lora['train_s']:.0f} |",
        f"| LoRA test scoring ({len(split['test'])} texts, model load included) | {lora['test_s']:.0f} |",
        f"| whole benchmark | {elapsed_s:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def sweep_note(rows: list[dict]) -> str:
    """Say whether the rank the sweep chose by macro-F1 is also the rank with the lowest validation loss."""
    scored = [row for row in rows if not row["error"]]
    if not scored:
        return "Every sweep run failed."
    chosen = next(row for row in scored if row["chosen"])
    lowest = min(scored, key=lambda row: row["val_loss"])
    budget = scored[0]["steps"]
    if lowest["rank"] == chosen["rank"]:
        return f"After {budget} steps the chosen rank {chosen['rank']} also has the lowest validation loss."
    return (f"After {budget} steps the sweep's choice by validation macro-F1 (rank {chosen['rank']}, loss "
            f"{chosen['val_loss']:.4f}) is not the rank with the lowest validation loss (rank {lowest['rank']}, "
            f"loss {lowest['val_loss']:.4f}), so the two scores rank the candidates differently at this budget.")


def convergence_note(epochs: list[dict], stop_reason: str) -> str:
    """Say whether the validation loss was still falling in the last epoch of the final training."""
    losses = [epoch["val_loss"] for epoch in epochs if "val_loss" in epoch]
    if len(losses) < 2 or stop_reason != "completed" or losses[-1] >= losses[-2]:
        return ""
    return (f" The validation loss was still falling in the last epoch ({losses[-2]:.4f} to {losses[-1]:.4f}), "
            "so training ended at the epoch limit rather than at a minimum of the validation loss.")


def breakdown(probe: Scores, lora: Scores, n_oos_validation: int) -> str:
    """Split the difference between LoRA and the probe into in-scope accuracy and out-of-scope recall."""
    return (f"On the in-scope test texts LoRA differs by {100 * (lora.in_scope_accuracy - probe.in_scope_accuracy):+.1f} "
            f"points of accuracy, and on `oos` by {100 * (lora.oos_recall - probe.oos_recall):+.1f} points of recall. "
            f"The validation split, which chose C and the rank, holds only {n_oos_validation} `oos` texts, because "
            "`oos` has as many training examples as one intent.")


def verdict(probe: Scores, lora: Scores) -> str:
    """State in one sentence whether LoRA beat the probe on test accuracy and macro-F1, and by how much."""
    accuracy_gap = 100 * (lora.accuracy - probe.accuracy)
    f1_gap = 100 * (lora.macro_f1 - probe.macro_f1)
    if accuracy_gap > 0 and f1_gap > 0:
        return (f"LoRA beats the probe on this split: {accuracy_gap:+.1f} points of accuracy and {f1_gap:+.1f} "
                "points of macro-F1.")
    if accuracy_gap <= 0 and f1_gap <= 0:
        return (f"LoRA does not beat the probe on this split: it is {-accuracy_gap:.1f} points lower in accuracy "
                f"and {-f1_gap:.1f} points lower in macro-F1.")
    return (f"Mixed result: LoRA differs from the probe by {accuracy_gap:+.1f} points of accuracy and {f1_gap:+.1f} "
            "points of macro-F1.")


# ---------------------------------------------------------------- main


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"4 examples per label, ranks 4 and 8 for 5 steps, 10 final steps and "
                             f"{QUICK.test_limit} test texts, for a smoke test")
    parser.add_argument("--out", default="docs/retraining.md",
                        help=f"markdown file whose '{SECTION}' section is replaced with the results")
    parser.add_argument("--per-label", type=int, help=f"training examples per label before the validation split "
                                                      f"(default {PER_LABEL}, quick 4)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads while training (default: as a retrain job, all cores but one)")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_arguments(argv)
    size = RunSize(**vars(QUICK if args.quick else FULL))
    if args.per_label is not None:
        size.per_label = args.per_label
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from retrain.jobs import training_threads

    # The whole benchmark, embedding and test scoring included, runs on the training's thread count,
    # as a retrain job does. Two threads on two cores slow down many times when another process is busy.
    torch.set_num_threads(args.threads or load_config(None).retrain.training.num_threads or training_threads())
    started = time.monotonic()
    load = OtherLoad()
    split = build_split(size)
    logger.info("split: %d train, %d validation, %d test", len(split["train"]), len(split["validation"]),
                len(split["test"]))
    probe = run_probe(split)
    logger.info("probe: test accuracy %.4f, macro-F1 %.4f (C=%g)", probe["test"].accuracy, probe["test"].macro_f1,
                probe["chosen_c"])
    lora = run_lora(split, size, args.threads)
    logger.info("LoRA rank %d: test accuracy %.4f, macro-F1 %.4f", lora["chosen"].rank, lora["test"].accuracy,
                lora["test"].macro_f1)
    load_note = load.read().describe()
    section = render(args, size, split, probe, lora, time.monotonic() - started, load_note)
    return publish(args.out, SECTION, section)


if __name__ == "__main__":
    main()
