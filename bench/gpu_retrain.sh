#!/usr/bin/env bash
# Time one bf16 LoRA retrain of the bundled all-MiniLM-L6-v2 on a CUDA GPU.
#
# Usage, from the repository root:
#   DRIFTLOOP_DATA=/path/to/data HF_HUB_OFFLINE=1 bench/gpu_retrain.sh [--cpu-check]
#
# The run calls retrain.trainer.fit with precision "bf16" and device "cuda" on
# the CLINC150 train split plus oos_train (15,100 texts, 151 labels). It trains
# for EPOCHS epochs at batch 32 and max_length 64, and the CLINC150 val split
# plus oos_val is the validation set. It prints the median step time, the
# throughput in training examples per second and the validation accuracy.
# Two epochs are about 950 steps; the run should take well under 5 minutes on
# a data-centre GPU, but this has not been measured.
#
# It needs a CUDA build of torch in the environment (the Makefile installs the
# CPU build) and a GPU with bf16 support. It exits with status 2 and a message
# when CUDA is not available.
#
# --cpu-check runs the same code on the CPU in fp32 for 5 steps without a
# validation set, to check the script on a machine without a GPU. Its figures
# are CPU figures.
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
MODE="cuda"
if [[ "${1:-}" == "--cpu-check" ]]; then
    MODE="cpu-check"
elif [[ $# -gt 0 ]]; then
    echo "error: unknown option '$1'; the only option is --cpu-check" >&2
    exit 64
fi

if [[ ! -x "$PYTHON" ]]; then
    echo "error: Python not found at $PYTHON; run 'make install' or set PYTHON to the project's interpreter" >&2
    exit 2
fi

if [[ "$MODE" == "cuda" ]]; then
    if ! "$PYTHON" - <<'EOF'
import sys
import torch

if not torch.cuda.is_available():
    print(f"error: CUDA is not available (torch {torch.__version__}, built for CUDA "
          f"{torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU and a CUDA build of torch, "
          "or pass --cpu-check to check the script on the CPU", file=sys.stderr)
    sys.exit(2)
if not torch.cuda.is_bf16_supported():
    print(f"error: {torch.cuda.get_device_name(0)} does not support bf16; this benchmark times bf16 training",
          file=sys.stderr)
    sys.exit(2)
EOF
    then
        exit 2
    fi
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
BENCH_MODE="$MODE" "$PYTHON" - <<'EOF'
import logging
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.getcwd())
warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

import torch

from monitor.config import load_config, resolve_model_path
from retrain.datasets import load_clinc150
from retrain.trainer import fit, settings_from_config

EPOCHS = 2
# Steps at the start that are not counted: CUDA context, kernel selection and allocator warm-up.
WARMUP_STEPS = 10

cpu_check = os.environ["BENCH_MODE"] == "cpu-check"
config = load_config(None)
clinc = load_clinc150()
train = clinc.splits["train"] + clinc.splits["oos_train"]
validation = None if cpu_check else clinc.splits["val"] + clinc.splits["oos_val"]
settings = settings_from_config(config.retrain.training, config.model).replace(
    epochs=EPOCHS, device="cpu" if cpu_check else "cuda", precision="fp32" if cpu_check else "bf16",
    max_steps=WARMUP_STEPS + 5 if cpu_check else None)

stamps = []


def should_stop() -> bool:
    # fit polls this before each step, so consecutive polls bracket one step.
    stamps.append(time.perf_counter())
    return False


device = "CPU (--cpu-check)" if cpu_check else torch.cuda.get_device_name(0)
print(f"device: {device}; torch {torch.__version__}; {len(train)} training texts, batch {settings.batch_size}, "
      f"max_length {settings.max_length}, precision {settings.precision}")
started = time.perf_counter()
outcome = fit(resolve_model_path(config.model.base), clinc.labels, train, settings, validation=validation,
              should_stop=should_stop, run_name="gpu benchmark")
wall = time.perf_counter() - started
steps = [later - earlier for earlier, later in zip(stamps, stamps[1:])][WARMUP_STEPS:]
median = statistics.median(steps)
print(f"steps: {outcome.steps} ({outcome.stop_reason}), precision {outcome.precision}, device {outcome.device}")
print(f"median step time after {WARMUP_STEPS} warm-up steps: {1000 * median:.1f} ms "
      f"(the step that ends an epoch includes its validation pass)")
print(f"throughput: {settings.batch_size / median:.0f} training examples/s at the median step")
print(f"wall time of fit: {wall:.1f} s, model load and validation passes included")
if outcome.best is not None:
    print(f"validation: accuracy {outcome.best.accuracy:.4f}, macro-F1 {outcome.best.macro_f1:.4f} "
          f"at step {outcome.best_step}")
if not cpu_check:
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF
