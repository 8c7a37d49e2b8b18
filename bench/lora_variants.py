"""Train one LoRA variant on the split of bench/retraining.py and print its test scores.

A companion to bench/retraining.py for trying settings outside the defaults: rank, epochs,
target modules and learning rate. It skips the sweep and the probe, trains with early
stopping on the same validation split, and prints one line beginning with ``RESULT``.

    DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_variants.py \\
        --rank 8 --epochs 8 --targets query,key,value,intermediate.dense,output.dense --lr 0.003
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.retraining as retraining_bench  # noqa: E402
from monitor.config import load_config, resolve_model_path  # noqa: E402

logger = logging.getLogger("bench.lora_variants")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--targets", default="default",
                        help="comma-separated module names, or 'default' for PEFT's mapping")
    parser.add_argument("--lr", type=float, default=None, help="learning rate; default: the config's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from retrain.model import Classifier
    from retrain.sweep import settings_for_rank
    from retrain.trainer import progress_reporter, settings_from_config, train_adapter

    split = retraining_bench.build_split(retraining_bench.FULL)
    config = load_config(None)
    base_model = resolve_model_path(config.model.base)
    settings = settings_for_rank(
        settings_from_config(config.retrain.training, config.model, num_threads=args.threads), args.rank)
    changes = {"epochs": args.epochs}
    if args.lr is not None:
        changes["learning_rate"] = args.lr
    if args.targets != "default":
        changes["target_modules"] = tuple(args.targets.split(","))
    settings = settings.replace(**changes)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="driftloop-variant-") as folder:
        result = train_adapter(base_model, split["labels"], split["train"], Path(folder) / "adapter", settings,
                               validation=split["validation"], progress=progress_reporter(logger.info, "variant"))
        classifier = Classifier.load(base_model, Path(folder) / "adapter", "variant", device="cpu")
        predicted = [label for label, _ in classifier.predict([text for text, _ in split["test"]])]
    scores = retraining_bench.score([label for _, label in split["test"]], predicted)
    print(f"RESULT rank={args.rank} epochs={args.epochs} targets={args.targets} lr={settings.learning_rate} "
          f"accuracy={scores.accuracy:.4f} macro_f1={scores.macro_f1:.4f} "
          f"in_scope_accuracy={scores.in_scope_accuracy:.4f} oos_recall={scores.oos_recall:.4f} "
          f"stop={result.stop_reason} epochs_completed={result.epochs_completed} "
          f"train_s={result.wall_seconds:.0f} total_s={time.monotonic() - started:.0f}", flush=True)


if __name__ == "__main__":
    main()
