"""LoRA fine-tuning of a sequence classifier with a plain PyTorch loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import yaml

from monitor.errors import ConfigError, RegistryError, TrainingError
from retrain.model import (
    LABELS_FILE,
    TRAINING_RECORD_FILE,
    find_head_weight_keys,
    read_labels,
    resolve_device,
    validate_adapter_dir,
)

logger = logging.getLogger(__name__)

# The progress callback fires on the first step, every PROGRESS_INTERVAL steps and on the last step.
PROGRESS_INTERVAL = 10

# final_loss is the mean over this many last steps, which smooths single-batch noise.
FINAL_LOSS_WINDOW = 10

MAX_GRAD_NORM = 1.0


class TrainingCancelled(TrainingError):
    """Training stopped because ``should_stop()`` returned True; nothing was written."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one LoRA training run. Invalid values raise ConfigError."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    learning_rate: float = 3e-3
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int | None = None
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
                isinstance(self.target_modules, tuple)
                and len(self.target_modules) > 0
                and all(isinstance(name, str) and name for name in self.target_modules),
                "a non-empty tuple of module names",
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

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values


@dataclass
class TrainResult:
    """Summary of a finished training run. training.yaml stores the same facts."""

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


@dataclass
class _LoopOutcome:
    steps: int
    epochs_completed: int
    epoch_losses: list[float]
    final_loss: float
    step_losses: list[float] = field(repr=False, default_factory=list)


def compute_data_sha256(train: list[tuple[str, str]]) -> str:
    """Hash the training set independent of its order: sha256 over sorted "text\\tlabel" lines.

    NOTE: a text that contains a tab or a newline can collide with another split of the same line.
    """
    lines = sorted(f"{text}\t{label}" for text, label in train)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _validate_training_data(labels: list[str], train: list[tuple[str, str]]) -> None:
    if not labels:
        raise TrainingError("labels must not be empty")
    if len(set(labels)) != len(labels):
        duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
        raise TrainingError(f"labels contain duplicates: {duplicates[:5]}")
    if not train:
        raise TrainingError("training data is empty; at least one (text, label) pair is required")

    for index, example in enumerate(train):
        if (
            not isinstance(example, (tuple, list))
            or len(example) != 2
            or not isinstance(example[0], str)
            or not isinstance(example[1], str)
        ):
            raise TrainingError(f"train[{index}] must be a (text, label) pair of strings, got {example!r}")

    known = set(labels)
    unknown = [label for _, label in train if label not in known]
    if unknown:
        raise TrainingError(
            f"{len(unknown)} training examples ({len(set(unknown))} distinct labels) have labels "
            f"not in the label list; first unknown label: {unknown[0]!r}"
        )


def _linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Return the distinct last name components of the model's nn.Linear modules, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def _check_target_modules(model: torch.nn.Module, target_modules: tuple[str, ...]) -> None:
    # PEFT matches a string target when a module name equals it or ends with "." + target.
    linear_names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    matched = any(
        name == target or name.endswith(f".{target}")
        for name in linear_names
        for target in target_modules
    )
    if not matched:
        raise TrainingError(
            f"none of target_modules {list(target_modules)} matches a linear layer of the model; "
            f"linear layer names: {_linear_layer_names(model)}"
        )


def _build_model(
    base_model: str,
    labels: list[str],
    settings: TrainSettings,
    init_adapter: Path | None,
):
    """Load tokenizer and base model, then attach a new or warm-started trainable LoRA adapter."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from retrain.model import load_base_classifier

    try:
        tokenizer, model = load_base_classifier(base_model, labels)
    except OSError as error:
        raise TrainingError(f"base model {base_model!r} could not be loaded: {error}") from error

    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and settings.max_length > max_positions:
        raise TrainingError(
            f"TrainSettings.max_length {settings.max_length} exceeds the base model's "
            f"max_position_embeddings {max_positions}"
        )

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
        if adapter_config.r != settings.rank or set(adapter_config.target_modules) != set(settings.target_modules):
            logger.warning(
                "init_adapter %s has rank %s and target_modules %s; these override the settings "
                "(rank %s, target_modules %s)",
                init_adapter, adapter_config.r, sorted(adapter_config.target_modules),
                settings.rank, list(settings.target_modules),
            )
        return tokenizer, model

    _check_target_modules(model, settings.target_modules)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as error:
        # PEFT rejects targets that match a module type it cannot wrap, such as an embedding.
        raise TrainingError(
            f"LoRA could not be attached to target_modules {list(settings.target_modules)}: {error}; "
            f"linear layer names: {_linear_layer_names(model)}"
        ) from error
    return tokenizer, model


def _run_training_loop(
    model: torch.nn.Module,
    tokenizer,
    label_ids: list[int],
    texts: list[str],
    settings: TrainSettings,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    progress: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
) -> _LoopOutcome:
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
    generator = torch.Generator().manual_seed(settings.seed)
    targets = torch.tensor(label_ids, dtype=torch.long)

    if autocast_dtype is not None:
        autocast = torch.autocast(device_type=device.type, dtype=autocast_dtype)
    else:
        autocast = nullcontext()

    model.train()
    start = time.monotonic()
    step = 0
    epoch_losses: list[float] = []
    step_losses: list[float] = []
    epochs_completed = 0
    losses_since_report: list[float] = []

    for epoch in range(settings.epochs):
        if step >= total_steps:
            break
        order = torch.randperm(n_train, generator=generator)
        epoch_step_losses: list[float] = []

        for batch_start in range(0, n_train, settings.batch_size):
            if step >= total_steps:
                break
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training cancelled by should_stop() before step {step + 1} of {total_steps}")

            batch_indices = order[batch_start : batch_start + settings.batch_size]
            encoded = tokenizer(
                [texts[index] for index in batch_indices.tolist()],
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                return_tensors="pt",
            )
            encoded = {name: tensor.to(device) for name, tensor in encoded.items()}
            batch_targets = targets[batch_indices].to(device)

            with autocast:
                logits = model(**encoded).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch_targets)
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"training loss became {loss_value} at step {step} (epoch {epoch + 1}); "
                    f"lower TrainSettings.learning_rate (now {settings.learning_rate})"
                )

            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM).item()
            if not math.isfinite(grad_norm):
                raise TrainingError(
                    f"gradient norm became {grad_norm} at step {step} (epoch {epoch + 1}); "
                    f"lower TrainSettings.learning_rate (now {settings.learning_rate})"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            epoch_step_losses.append(loss_value)
            step_losses.append(loss_value)
            losses_since_report.append(loss_value)

            if progress is not None and (step == 1 or step % PROGRESS_INTERVAL == 0 or step == total_steps):
                elapsed = time.monotonic() - start
                progress(
                    {
                        "step": step,
                        "total_steps": total_steps,
                        "epoch": epoch + 1,
                        # Mean over the steps since the previous report.
                        "loss": sum(losses_since_report) / len(losses_since_report),
                        "elapsed_s": elapsed,
                        "eta_s": elapsed / step * (total_steps - step),
                    }
                )
                losses_since_report = []

        epoch_losses.append(sum(epoch_step_losses) / len(epoch_step_losses))
        if len(epoch_step_losses) == steps_per_epoch:
            epochs_completed += 1

    for parameter in trainable:
        if not torch.isfinite(parameter).all():
            raise TrainingError(f"trainable weights contain NaN or inf after step {step}; lower the learning rate")

    model.eval()
    final_window = step_losses[-FINAL_LOSS_WINDOW:]
    return _LoopOutcome(
        steps=step,
        epochs_completed=epochs_completed,
        epoch_losses=epoch_losses,
        final_loss=sum(final_window) / len(final_window),
        step_losses=step_losses,
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


def _publish_atomically(model, output_dir: Path, labels: list[str], record: dict) -> None:
    """Save into a temporary sibling directory, then rename it to ``output_dir``.

    The temporary directory is removed when saving or renaming fails.
    """
    temp_dir = output_dir.parent / f".{output_dir.name}.tmp-{secrets.token_hex(6)}"
    temp_dir.mkdir()
    try:
        _save_adapter(model, temp_dir, labels, record)
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


def train_adapter(
    base_model: str,
    labels: list[str],
    train: list[tuple[str, str]],
    output_dir: str | Path,
    settings: TrainSettings,
    *,
    init_adapter: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter and classification head on ``train`` and save it to ``output_dir``.

    ``labels`` fixes the head's label order. ``init_adapter`` warm-starts from a saved adapter
    with the same labels.json. ``progress`` receives a dict with step, total_steps, epoch, loss,
    elapsed_s and eta_s on the first step, every 10 steps and the last step. ``should_stop`` is
    polled before each step, and True raises TrainingCancelled.

    Raises TrainingError for bad data, divergence or unmatched target modules, and RegistryError
    when ``output_dir`` already exists. Nothing is left at or next to ``output_dir`` after an error.
    """
    labels = list(labels)
    output_dir = Path(output_dir)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    _validate_training_data(labels, train)
    if output_dir.exists():
        raise RegistryError(f"output directory already exists: {output_dir}; choose a new version directory")
    if init_adapter is not None:
        try:
            read_labels(init_adapter)
        except RegistryError as error:
            raise TrainingError(f"init_adapter cannot be used: {error}") from error

    device, autocast_dtype = resolve_device(settings.device)
    # NOTE: the CUDA and bf16 autocast path has not run on a GPU yet; only the CPU path is tested.
    # fp16 training would need a GradScaler, so CUDA without bf16 trains in fp32.
    if device.type != "cuda" or autocast_dtype != torch.bfloat16:
        autocast_dtype = None
    precision = "bf16" if autocast_dtype == torch.bfloat16 else "fp32"

    n_train = len(train)
    label_counts = dict(sorted(Counter(label for _, label in train).items()))
    data_sha256 = compute_data_sha256(train)
    logger.info(
        "training started: %d examples, %d labels, device %s (%s), output %s",
        n_train, len(labels), device, precision, output_dir,
    )

    previous_threads = torch.get_num_threads()
    if settings.num_threads is not None and device.type == "cpu":
        torch.set_num_threads(settings.num_threads)
    try:
        start = time.monotonic()
        # This seeds the head and LoRA initialization and dropout. Shuffling has its own generator.
        torch.manual_seed(settings.seed)
        tokenizer, model = _build_model(base_model, labels, settings, init_adapter)
        model.to(device)

        label_index = {label: index for index, label in enumerate(labels)}
        outcome = _run_training_loop(
            model,
            tokenizer,
            [label_index[label] for _, label in train],
            [text for text, _ in train],
            settings,
            device,
            autocast_dtype,
            progress,
            should_stop,
        )
        wall_seconds = time.monotonic() - start

        record = {
            "base_model": str(base_model),
            "settings": settings.to_dict(),
            "device": str(device),
            "precision": precision,
            "n_train": n_train,
            "label_counts": label_counts,
            "data_sha256": data_sha256,
            "epoch_losses": outcome.epoch_losses,
            "final_loss": outcome.final_loss,
            "steps": outcome.steps,
            "epochs_completed": outcome.epochs_completed,
            "wall_seconds": round(wall_seconds, 3),
            "init_adapter": str(init_adapter) if init_adapter is not None else None,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _publish_atomically(model, output_dir, labels, record)
    finally:
        torch.set_num_threads(previous_threads)

    logger.info(
        "training finished: %d steps in %.1f s, final loss %.4f, adapter saved to %s",
        outcome.steps, wall_seconds, outcome.final_loss, output_dir,
    )
    return TrainResult(
        adapter_dir=output_dir,
        steps=outcome.steps,
        epochs_completed=outcome.epochs_completed,
        epoch_losses=outcome.epoch_losses,
        final_loss=outcome.final_loss,
        wall_seconds=wall_seconds,
        device=str(device),
        precision=precision,
        n_train=n_train,
        label_counts=label_counts,
        data_sha256=data_sha256,
    )


def progress_reporter(log: Callable[[str], None], prefix: str) -> Callable[[dict], None]:
    """Return a ``progress`` callback that writes about ten lines per training run through ``log``."""
    last_tenth = 0

    def report(progress: dict) -> None:
        nonlocal last_tenth
        step, total = progress["step"], progress["total_steps"]
        tenth = step * 10 // max(total, 1)
        if tenth > last_tenth:
            last_tenth = tenth
            log(f"{prefix}: step {step}/{total}, loss {progress['loss']:.3f}, about {progress['eta_s']:.0f} s left")

    return report
