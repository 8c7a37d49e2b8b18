"""LoRA fine-tuning of a sequence classifier with a plain PyTorch loop.

One run trains a LoRA adapter and the classification head with AdamW and a
linear schedule with warmup. With a validation set it evaluates before training
and after each epoch, stops early when the validation loss has not improved for
``early_stopping_patience`` evaluations, and keeps the weights of the best
evaluation. ``retrain.watch`` checks the losses as they come. The adapter is
published by an atomic rename together with its lineage record
(``training.yaml``), so a half-written adapter is never visible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import yaml

from monitor.errors import ConfigError, RegistryError, TrainingError
from retrain.assembly import examples_sha256
from retrain.model import (
    LABELS_FILE,
    TRAINING_RECORD_FILE,
    find_head_weight_keys,
    read_labels,
    resolve_device,
    validate_adapter_dir,
)
from retrain.resources import (
    PRECISIONS,
    autocast,
    check_cuda_memory,
    estimate_training_bytes,
    free_cuda_memory,
    resolve_precision,
)
from retrain.watch import TrainingWatch

logger = logging.getLogger(__name__)

# The progress callback fires on the first step, every PROGRESS_INTERVAL steps, the last step and after each evaluation.
PROGRESS_INTERVAL = 10

# final_loss is the mean over this many last steps, which smooths single-batch noise.
FINAL_LOSS_WINDOW = 10

MAX_GRAD_NORM = 1.0
# A validation loss must fall by more than this to count as an improvement for early stopping.
EARLY_STOPPING_MIN_DELTA = 1e-4
EVAL_BATCH_SIZE = 64


class RankDoesNotFit(TrainingError):
    """The LoRA rank exceeds the width of a target layer; the sweep skips such a rank."""


class TrainingCancelled(TrainingError):
    """Training stopped because ``should_stop()`` returned True; nothing was written."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one LoRA training run. Invalid values raise ConfigError.

    ``target_modules`` None takes PEFT's default modules for the model's architecture.
    ``max_wall_time_s`` ends training early, keeping the best weights so far.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    learning_rate: float = 3e-3
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
    max_wall_time_s: float | None = None
    early_stopping_patience: int = 2
    precision: str = "auto"
    gradient_checkpointing: bool = False
    num_threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        # A list from YAML or JSON config becomes a tuple so the settings stay hashable.
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

        checks = [
            ("rank", _is_int(self.rank) and self.rank >= 1, "an integer >= 1"),
            ("alpha", _is_number(self.alpha) and self.alpha > 0, "a number > 0"),
            ("dropout", _is_number(self.dropout) and 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            (
                "target_modules",
                self.target_modules is None
                or (
                    isinstance(self.target_modules, tuple)
                    and len(self.target_modules) > 0
                    and all(isinstance(name, str) and name for name in self.target_modules)
                ),
                "None or a non-empty tuple of module names",
            ),
            ("learning_rate", _is_number(self.learning_rate) and self.learning_rate > 0, "a finite number > 0"),
            ("epochs", _is_int(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            ("batch_size", _is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            ("max_length", _is_int(self.max_length) and 2 <= self.max_length <= 8192, "an integer in [2, 8192]"),
            ("warmup_ratio", _is_number(self.warmup_ratio) and 0.0 <= self.warmup_ratio <= 1.0, "a number in [0, 1]"),
            ("weight_decay", _is_number(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
            (
                "max_steps",
                self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
                "None or an integer >= 1",
            ),
            (
                "max_wall_time_s",
                self.max_wall_time_s is None or (_is_number(self.max_wall_time_s) and self.max_wall_time_s > 0),
                "None or a number > 0",
            ),
            (
                "early_stopping_patience",
                _is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1,
                "an integer >= 1",
            ),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("gradient_checkpointing", isinstance(self.gradient_checkpointing, bool), "true or false"),
            (
                "num_threads",
                self.num_threads is None or (_is_int(self.num_threads) and self.num_threads >= 1),
                "None or an integer >= 1",
            ),
            (
                "device",
                isinstance(self.device, str)
                and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
                "'auto', 'cpu', 'cuda' or 'cuda:N'",
            ),
        ]
        for name, valid, allowed in checks:
            if not valid:
                raise ConfigError(
                    f"TrainSettings.{name} must be {allowed}, got {getattr(self, name)!r}"
                )

    def replace(self, **changes) -> TrainSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return values


@dataclass
class EvalMetrics:
    loss: float
    accuracy: float
    macro_f1: float
    n: int

    def to_dict(self) -> dict:
        return {"loss": round(self.loss, 6), "accuracy": round(self.accuracy, 6),
                "macro_f1": round(self.macro_f1, 6), "n": self.n}


@dataclass
class FitOutcome:
    """A trained model in memory and everything that happened while training it."""

    model: torch.nn.Module = field(repr=False)
    steps: int
    total_steps: int
    warmup_steps: int
    epochs_completed: int
    epochs: list[dict]
    final_loss: float
    stop_reason: str
    target_modules: list[str]
    rank: int
    precision: str
    device: str
    best: EvalMetrics | None
    best_step: int | None
    initial: EvalMetrics | None
    findings: dict[str, dict]
    wall_seconds: float
    step_losses: list[float] = field(repr=False, default_factory=list)

    @property
    def epoch_losses(self) -> list[float]:
        return [epoch["train_loss"] for epoch in self.epochs]


@dataclass
class TrainResult:
    """Summary of a finished training run. training.yaml stores the same facts and more."""

    adapter_dir: Path
    steps: int
    epochs_completed: int
    epoch_losses: list[float]
    final_loss: float
    wall_seconds: float
    device: str
    precision: str
    n_train: int
    label_counts: dict[str, int]
    data_sha256: str
    stop_reason: str = "completed"
    validation: dict | None = None
    findings: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict, repr=False)


def settings_from_config(training, model, *, num_threads: int | None = None) -> TrainSettings:
    """Build TrainSettings from a config's training section and its model section.

    ``num_threads`` applies when the training section leaves ``num_threads`` unset.
    """
    values = training.model_dump()
    values["target_modules"] = tuple(values["target_modules"]) if values["target_modules"] is not None else None
    if values["num_threads"] is None:
        values["num_threads"] = num_threads
    return TrainSettings(**values, max_length=model.max_length, device=model.device)


def compute_data_sha256(train: list[tuple[str, str]]) -> str:
    """Hash the training set independent of its order (see ``retrain.assembly.examples_sha256``)."""
    return examples_sha256(train)


def _validate_training_data(labels: list[str], train: list[tuple[str, str]], name: str = "training") -> None:
    if not labels:
        raise TrainingError("labels must not be empty")
    if len(set(labels)) != len(labels):
        duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
        raise TrainingError(f"labels contain duplicates: {duplicates[:5]}")
    if not train and name == "training":
        raise TrainingError("training data is empty; at least one (text, label) pair is required")

    for index, example in enumerate(train):
        if (
            not isinstance(example, (tuple, list))
            or len(example) != 2
            or not isinstance(example[0], str)
            or not isinstance(example[1], str)
        ):
            raise TrainingError(f"{name} example {index} must be a (text, label) pair of strings, got {example!r}")

    known = set(labels)
    unknown = [label for _, label in train if label not in known]
    if unknown:
        raise TrainingError(
            f"{len(unknown)} {name} examples ({len(set(unknown))} distinct labels) have labels "
            f"not in the label list; first unknown label: {unknown[0]!r}"
        )


def _adaptable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Return the model's layers LoRA can wrap (nn.Linear and GPT-2's Conv1D), by full name."""
    from transformers.pytorch_utils import Conv1D

    return {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))}


def _layer_names(model: torch.nn.Module) -> list[str]:
    """Return the distinct last name components of the layers LoRA can wrap, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name in _adaptable_layers(model)})


def resolve_target_modules(model: torch.nn.Module, settings: TrainSettings) -> list[str]:
    """Return the LoRA target modules: the settings' list, else PEFT's default for the architecture.

    Raises TrainingError, listing the model's candidate layer names, when the architecture has
    no default, when no layer matches, or when ``settings.rank`` exceeds a matched layer's width.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(model.config, "model_type", None)
    if settings.target_modules is not None:
        targets = list(settings.target_modules)
    else:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if not targets:
            raise TrainingError(
                f"PEFT has no default LoRA target modules for model type {model_type!r}; set target_modules "
                f"in the training config to some of the model's layer names: {_layer_names(model)}"
            )
    # PEFT matches a string target when a module name equals it or ends with "." + target.
    matched = {
        name: module
        for name, module in _adaptable_layers(model).items()
        if any(name == target or name.endswith(f".{target}") for target in targets)
    }
    if not matched:
        raise TrainingError(
            f"none of target_modules {targets} matches a linear layer of the model; "
            f"linear layer names: {_layer_names(model)}"
        )
    for name, module in matched.items():
        weight = module.weight
        width = min(weight.shape)
        if settings.rank > width:
            raise RankDoesNotFit(
                f"rank {settings.rank} does not fit the model: target layer {name!r} has weight shape "
                f"{tuple(weight.shape)}, so rank must be at most {width}"
            )
    return targets


def _pooler_modules(model: torch.nn.Module) -> list[str] | None:
    """Return ``["pooler"]`` when the classifier reads a pooler layer, which then trains with the head.

    BERT-style classifiers put the [CLS] vector through a dense pooler before the head. A
    sentence-embedding checkpoint such as all-MiniLM-L6-v2 was trained with mean pooling, so its
    pooler was never tuned for this. Frozen, it held the LoRA adapter below a logistic-regression
    probe on CLINC150 (docs/retraining.md).
    """
    has_pooler = any(name.rsplit(".", 1)[-1] == "pooler" for name, _ in model.named_modules())
    return ["pooler"] if has_pooler else None


def _build_model(base_model: str, labels: list[str], settings: TrainSettings, init_adapter: Path | None):
    """Load tokenizer and base model, then attach a new or warm-started trainable LoRA adapter.

    Returns (tokenizer, model, target_modules, rank).
    """
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    from retrain.model import load_base_classifier

    try:
        tokenizer, model = load_base_classifier(base_model, labels)
    except (OSError, ValueError) as error:
        raise TrainingError(f"base model {base_model!r} could not be loaded: {error}") from error

    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and settings.max_length > max_positions:
        raise TrainingError(
            f"TrainSettings.max_length {settings.max_length} exceeds the base model's "
            f"max_position_embeddings {max_positions}"
        )
    # The key-value cache serves generation; training never reads it.
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if settings.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainingError(f"base model {base_model!r} does not support gradient checkpointing; turn it off")
        # Non-reentrant checkpointing needs no gradient on the inputs, so frozen embeddings stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if init_adapter is not None:
        try:
            adapter_labels = validate_adapter_dir(init_adapter)
        except RegistryError as error:
            raise TrainingError(f"init_adapter cannot be used: {error}") from error
        if adapter_labels != labels:
            raise TrainingError(
                f"init_adapter {init_adapter} has {len(adapter_labels)} labels in labels.json that differ "
                f"from the {len(labels)} requested labels; warm start needs the same labels in the same order"
            )
        try:
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise TrainingError(f"init_adapter {init_adapter} could not be loaded: {error}") from error
        adapter_config = model.peft_config["default"]
        configured = settings.target_modules
        if adapter_config.r != settings.rank or (configured is not None and set(configured) != set(adapter_config.target_modules)):
            logger.warning(
                "warm start from %s keeps its rank %d and target_modules %s; the configured rank %d and "
                "target_modules %s do not apply (turn warm_start off to use them)",
                init_adapter, adapter_config.r, sorted(adapter_config.target_modules), settings.rank,
                list(configured) if configured is not None else "(architecture default)",
            )
        return tokenizer, model, sorted(adapter_config.target_modules), adapter_config.r

    targets = resolve_target_modules(model, settings)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=_pooler_modules(model),
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as error:
        # PEFT rejects targets that match a module type it cannot wrap, such as an embedding.
        raise TrainingError(
            f"LoRA could not be attached to target_modules {targets}: {error}; "
            f"linear layer names: {_layer_names(model)}"
        ) from error
    return tokenizer, model, targets, settings.rank


def _encode(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: tensor.to(device) for name, tensor in encoded.items()}


def evaluate(model: torch.nn.Module, tokenizer, texts: list[str], label_ids: list[int], *, max_length: int,
             device: torch.device, precision: str = "fp32", batch_size: int = EVAL_BATCH_SIZE) -> EvalMetrics:
    """Return mean cross-entropy, accuracy and macro-F1 over the classes present in ``label_ids``."""
    from sklearn.metrics import f1_score

    was_training = model.training
    model.eval()
    total_loss = 0.0
    predictions: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            encoded = _encode(tokenizer, texts[start : start + batch_size], max_length, device)
            targets = torch.tensor(label_ids[start : start + batch_size], dtype=torch.long, device=device)
            with autocast(device, precision):
                logits = model(**encoded).logits
            total_loss += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
            predictions.extend(logits.argmax(dim=-1).tolist())
    if was_training:
        model.train()
    correct = sum(int(p == t) for p, t in zip(predictions, label_ids))
    macro_f1 = f1_score(label_ids, predictions, labels=sorted(set(label_ids)), average="macro", zero_division=0)
    return EvalMetrics(loss=total_loss / len(texts), accuracy=correct / len(texts), macro_f1=float(macro_f1), n=len(texts))


class _BestWeights:
    """A copy of the trainable tensors at the best validation loss so far."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None

    def save(self, model: torch.nn.Module) -> None:
        self.tensors = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}

    def restore(self, model: torch.nn.Module) -> None:
        if self.tensors is None:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.tensors:
                    parameter.copy_(self.tensors[name])


def _train(model, tokenizer, label_ids: list[int], texts: list[str], validation: tuple[list[str], list[int]] | None,
           settings: TrainSettings, device: torch.device, precision: str, watch: TrainingWatch,
           progress: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None,
           deadline: float | None) -> dict:
    """Run the optimisation loop; return its counts, losses, evaluations and stop reason."""
    from transformers import get_linear_schedule_with_warmup

    n_train = len(texts)
    steps_per_epoch = math.ceil(n_train / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    warmup_steps = int(settings.warmup_ratio * total_steps)

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    # fp16 needs loss scaling; bf16 has fp32's exponent range and does not.
    # NOTE: the CUDA paths (bf16 autocast, fp16 with GradScaler) have not run on a GPU here;
    # bench/gpu_retrain.sh is the check to run on one.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    generator = torch.Generator().manual_seed(settings.seed)
    targets = torch.tensor(label_ids, dtype=torch.long)

    start = time.monotonic()
    step = 0
    epochs: list[dict] = []
    step_losses: list[float] = []
    since_report: list[float] = []
    since_eval: list[float] = []
    best = _BestWeights()
    best_metrics: EvalMetrics | None = None
    best_step: int | None = None
    initial: EvalMetrics | None = None
    bad_evaluations = 0
    stop_reason = "completed"

    def run_evaluation() -> EvalMetrics:
        nonlocal best_metrics, best_step, bad_evaluations
        metrics = evaluate(model, tokenizer, validation[0], validation[1], max_length=settings.max_length,
                           device=device, precision=precision)
        train_loss = sum(since_eval) / len(since_eval) if since_eval else None
        since_eval.clear()
        overfitting = watch.on_evaluation(step, train_loss, metrics.loss, after_warmup=step > warmup_steps)
        if best_metrics is None or metrics.loss < best_metrics.loss - EARLY_STOPPING_MIN_DELTA:
            best_metrics, best_step, bad_evaluations = metrics, step, 0
            best.save(model)
        elif step > 0:
            bad_evaluations += 1
        if progress is not None and step > 0:
            progress({"step": step, "total_steps": total_steps, "epoch": len(epochs) + 1,
                      "val_loss": metrics.loss, "val_macro_f1": metrics.macro_f1, "overfitting": overfitting,
                      "elapsed_s": time.monotonic() - start,
                      "eta_s": (time.monotonic() - start) / step * (total_steps - step)})
        return metrics

    if validation is not None:
        initial = run_evaluation()

    model.train()
    for epoch in range(1, settings.epochs + 1):
        if step >= total_steps or stop_reason != "completed":
            break
        order = torch.randperm(n_train, generator=generator)
        epoch_losses: list[float] = []
        for batch_start in range(0, n_train, settings.batch_size):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training cancelled before step {step + 1} of {total_steps}")
            if deadline is not None and time.monotonic() >= deadline:
                stop_reason = "max_wall_time_s"
                logger.warning("training stopped at step %d of %d: the wall-time limit was reached", step, total_steps)
                break

            batch_indices = order[batch_start : batch_start + settings.batch_size]
            encoded = _encode(tokenizer, [texts[index] for index in batch_indices.tolist()], settings.max_length, device)
            with autocast(device, precision):
                logits = model(**encoded).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch_indices].to(device))
            step += 1
            loss_value = loss.item()
            watch.on_step(step, epoch, loss_value)

            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                # The scaler skips a step whose gradients overflowed and lowers its scale.
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM).item()
                if not math.isfinite(grad_norm):
                    raise TrainingError(
                        f"gradient norm became {grad_norm} at step {step} (epoch {epoch}); "
                        f"lower the learning rate (now {settings.learning_rate})"
                    )
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            epoch_losses.append(loss_value)
            step_losses.append(loss_value)
            since_report.append(loss_value)
            since_eval.append(loss_value)
            if progress is not None and (step == 1 or step % PROGRESS_INTERVAL == 0 or step == total_steps):
                elapsed = time.monotonic() - start
                progress({"step": step, "total_steps": total_steps, "epoch": epoch,
                          # Mean over the steps since the previous report.
                          "loss": sum(since_report) / len(since_report),
                          "elapsed_s": elapsed, "eta_s": elapsed / step * (total_steps - step)})
                since_report = []

        if not epoch_losses:
            break
        record = {"epoch": epoch, "steps": step, "train_loss": round(sum(epoch_losses) / len(epoch_losses), 6),
                  "complete": len(epoch_losses) == steps_per_epoch}
        if validation is not None:
            metrics = run_evaluation()
            record.update({"val_loss": round(metrics.loss, 6), "val_accuracy": round(metrics.accuracy, 6),
                           "val_macro_f1": round(metrics.macro_f1, 6)})
            if bad_evaluations >= settings.early_stopping_patience and stop_reason == "completed" and step < total_steps:
                stop_reason = "early_stopping"
                logger.info("early stopping after epoch %d: validation loss has not improved for %d evaluations",
                            epoch, bad_evaluations)
        epochs.append(record)
    if stop_reason == "completed" and step < steps_per_epoch * settings.epochs:
        stop_reason = "max_steps"

    for parameter in trainable:
        if not torch.isfinite(parameter).all():
            raise TrainingError(f"trainable weights contain NaN or inf after step {step}; lower the learning rate")
    if best_step is not None and best_step != step:
        best.restore(model)
    model.eval()
    final_window = step_losses[-FINAL_LOSS_WINDOW:]
    return {
        "steps": step,
        "total_steps": total_steps,
        "warmup_steps": warmup_steps,
        "epochs": epochs,
        "epochs_completed": sum(1 for epoch in epochs if epoch["complete"]),
        "final_loss": sum(final_window) / len(final_window) if final_window else float("nan"),
        "stop_reason": stop_reason,
        "best": best_metrics,
        "best_step": best_step,
        "initial": initial,
        "step_losses": step_losses,
    }


def fit(
    base_model: str,
    labels: list[str],
    train: list[tuple[str, str]],
    settings: TrainSettings,
    *,
    validation: list[tuple[str, str]] | None = None,
    init_adapter: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    deadline: float | None = None,
    run_name: str = "training",
) -> FitOutcome:
    """Train a LoRA adapter and head in memory; see ``train_adapter`` for the arguments.

    ``deadline`` is a ``time.monotonic()`` value; together with ``settings.max_wall_time_s``
    the earlier of the two ends training.
    """
    labels = list(labels)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    _validate_training_data(labels, train)
    if validation:
        _validate_training_data(labels, validation, name="validation")
    start = time.monotonic()
    if settings.max_wall_time_s is not None:
        own = start + settings.max_wall_time_s
        deadline = own if deadline is None else min(deadline, own)

    device, _ = resolve_device(settings.device)
    precision = resolve_precision(device, settings.precision)
    previous_threads = torch.get_num_threads()
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    try:
        # This seeds the head and LoRA initialization and dropout. Shuffling has its own generator.
        torch.manual_seed(settings.seed)
        tokenizer, model, targets, rank = _build_model(base_model, labels, settings, init_adapter)
        if device.type == "cuda":
            estimate = estimate_training_bytes(model, batch_size=settings.batch_size, max_length=settings.max_length,
                                               precision=precision, gradient_checkpointing=settings.gradient_checkpointing)
            check_cuda_memory(estimate, free_cuda_memory(device), device)
        model.to(device)
        label_index = {label: index for index, label in enumerate(labels)}
        watch = TrainingWatch(len(labels), settings.learning_rate, targets, run=run_name)
        encoded_validation = None
        if validation:
            encoded_validation = ([text for text, _ in validation], [label_index[label] for _, label in validation])
        loop = _train(model, tokenizer, [label_index[label] for _, label in train], [text for text, _ in train], encoded_validation,
                      settings, device, precision, watch, progress, should_stop, deadline)
    finally:
        torch.set_num_threads(previous_threads)
    if loop["steps"] == 0:
        raise TrainingError("the wall-time limit was reached before the first training step; raise max_wall_time_s")
    return FitOutcome(
        model=model,
        steps=loop["steps"],
        total_steps=loop["total_steps"],
        warmup_steps=loop["warmup_steps"],
        epochs_completed=loop["epochs_completed"],
        epochs=loop["epochs"],
        final_loss=loop["final_loss"],
        stop_reason=loop["stop_reason"],
        target_modules=list(targets),
        rank=rank,
        precision=precision,
        device=str(device),
        best=loop["best"],
        best_step=loop["best_step"],
        initial=loop["initial"],
        findings=watch.finish(),
        wall_seconds=time.monotonic() - start,
        step_losses=loop["step_losses"],
    )


def _save_adapter(model, target_dir: Path, labels: list[str], record: dict) -> None:
    """Write adapter weights (LoRA and head), labels.json and training.yaml into ``target_dir``."""
    model.save_pretrained(str(target_dir))
    (target_dir / LABELS_FILE).write_text(json.dumps(labels, ensure_ascii=False, indent=1), encoding="utf-8")
    (target_dir / TRAINING_RECORD_FILE).write_text(
        yaml.safe_dump(record, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    if not find_head_weight_keys(target_dir):
        raise TrainingError(f"saved adapter in {target_dir} contains no classification head weights")


def temporary_sibling(output_dir: Path) -> Path:
    """Return the name of a temporary directory beside ``output_dir``; ``clean_temporary_siblings`` finds it."""
    return output_dir.parent / f".{output_dir.name}.tmp-{secrets.token_hex(6)}"


def clean_temporary_siblings(folder: Path) -> list[Path]:
    """Remove temporary output directories left in ``folder`` by a process that died while saving."""
    removed = []
    for path in Path(folder).glob(".*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _publish_atomically(model, output_dir: Path, labels: list[str], record: dict,
                        write_extras: Callable[[Path], None] | None = None) -> None:
    """Save into a temporary sibling directory, then rename it to ``output_dir``.

    ``write_extras`` adds files to the temporary directory before the rename. The temporary
    directory is removed when saving or renaming fails.
    """
    temp_dir = temporary_sibling(output_dir)
    temp_dir.mkdir()
    try:
        _save_adapter(model, temp_dir, labels, record)
        if write_extras is not None:
            write_extras(temp_dir)
        # os.rename replaces an existing empty directory on POSIX, so check again right before it.
        # NOTE: a directory created between this check and the rename is still replaced if it is empty.
        if output_dir.exists():
            raise RegistryError(f"output directory already exists: {output_dir}")
        try:
            os.rename(temp_dir, output_dir)
        except OSError as error:
            raise RegistryError(f"could not move adapter into {output_dir}: {error}") from error
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("driftloop", "torch", "transformers", "peft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def lineage_record(base_model: str, settings: TrainSettings, outcome: FitOutcome, train: list[tuple[str, str]],
                   validation: list[tuple[str, str]] | None, init_adapter: Path | None, extra: dict | None) -> dict:
    """Build the training.yaml content: everything needed to understand and repeat the run."""
    effective = settings.to_dict()
    effective.update({"rank": outcome.rank, "target_modules": outcome.target_modules})
    record = {
        "base_model": str(base_model),
        "settings": effective,
        "schedule": {"optimizer": "AdamW", "scheduler": "linear with warmup", "warmup_steps": outcome.warmup_steps,
                     "total_steps": outcome.total_steps, "max_grad_norm": MAX_GRAD_NORM},
        "device": outcome.device,
        "precision": outcome.precision,
        "n_train": len(train),
        "n_validation": len(validation or []),
        "label_counts": dict(sorted(Counter(label for _, label in train).items())),
        "data_sha256": examples_sha256(train),
        "validation_sha256": examples_sha256(validation or []),
        "epochs": outcome.epochs,
        "epoch_losses": outcome.epoch_losses,
        "final_loss": outcome.final_loss,
        "steps": outcome.steps,
        "epochs_completed": outcome.epochs_completed,
        "stop_reason": outcome.stop_reason,
        "validation": {
            "before_training": outcome.initial.to_dict() if outcome.initial else None,
            "best": outcome.best.to_dict() if outcome.best else None,
            "best_step": outcome.best_step,
        },
        "findings": outcome.findings,
        "wall_seconds": round(outcome.wall_seconds, 3),
        "init_adapter": str(init_adapter) if init_adapter is not None else None,
        "libraries": _library_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record.update(extra or {})
    return record


def train_adapter(
    base_model: str,
    labels: list[str],
    train: list[tuple[str, str]],
    output_dir: str | Path,
    settings: TrainSettings,
    *,
    validation: list[tuple[str, str]] | None = None,
    init_adapter: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    deadline: float | None = None,
    lineage: dict | None = None,
    write_extras: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter and classification head on ``train`` and save it to ``output_dir``.

    ``labels`` fixes the head's label order. ``validation`` enables evaluation, early stopping
    and the return of the best weights. ``init_adapter`` warm-starts from a saved adapter with
    the same labels.json; its rank and target modules then apply. ``progress`` receives dicts
    with step, total_steps, epoch, loss (or val_loss after an evaluation), elapsed_s and eta_s.
    ``should_stop`` is polled before each step, and True raises TrainingCancelled. ``lineage``
    entries are added to training.yaml, and ``write_extras`` writes more files into the
    adapter directory before it becomes visible.

    Raises TrainingError for bad data, divergence, unmatched target modules or a rank that
    does not fit, and RegistryError when ``output_dir`` already exists. Nothing is left at or
    next to ``output_dir`` after an error.
    """
    output_dir = Path(output_dir)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    if output_dir.exists():
        raise RegistryError(f"output directory already exists: {output_dir}; choose a new version directory")
    if init_adapter is not None:
        try:
            read_labels(init_adapter)
        except RegistryError as error:
            raise TrainingError(f"init_adapter cannot be used: {error}") from error

    logger.info("training started: %d examples, %d validation, %d labels, output %s",
                len(train), len(validation or []), len(labels), output_dir)
    outcome = fit(base_model, labels, train, settings, validation=validation, init_adapter=init_adapter,
                  progress=progress, should_stop=should_stop, deadline=deadline, run_name=f"training {output_dir.name}")
    record = lineage_record(base_model, settings, outcome, train, validation, init_adapter, lineage)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _publish_atomically(outcome.model, output_dir, list(labels), record, write_extras)
    logger.info(
        "training finished: %d steps in %.1f s (%s), final loss %.4f, adapter saved to %s",
        outcome.steps, outcome.wall_seconds, outcome.stop_reason, outcome.final_loss, output_dir,
    )
    return TrainResult(
        adapter_dir=output_dir,
        steps=outcome.steps,
        epochs_completed=outcome.epochs_completed,
        epoch_losses=outcome.epoch_losses,
        final_loss=outcome.final_loss,
        wall_seconds=outcome.wall_seconds,
        device=outcome.device,
        precision=outcome.precision,
        n_train=len(train),
        label_counts=record["label_counts"],
        data_sha256=record["data_sha256"],
        stop_reason=outcome.stop_reason,
        validation=record["validation"],
        findings=outcome.findings,
        record=record,
    )


def progress_reporter(log: Callable[[str], None], prefix: str) -> Callable[[dict], None]:
    """Return a ``progress`` callback that writes about ten lines per training run through ``log``.

    A new ``phase`` in the progress dict (the job's sweep runs and final run) starts a new count.
    """
    last_tenth = 0
    last_key = None

    def report(progress: dict) -> None:
        nonlocal last_tenth, last_key
        if "loss" not in progress:
            return
        step, total = progress["step"], progress["total_steps"]
        key = (progress.get("phase"), total)
        if key != last_key or step < last_tenth * total // 10:
            last_key, last_tenth = key, 0
        tenth = step * 10 // max(total, 1)
        if tenth > last_tenth:
            last_tenth = tenth
            phase = f" {progress['phase']}" if progress.get("phase") else ""
            log(f"{prefix}{phase}: step {step}/{total}, loss {progress['loss']:.3f}, about {progress['eta_s']:.0f} s left")

    return report
