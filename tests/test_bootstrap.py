"""The bootstrap summary, and the profiles rebuilt when their settings change."""

from types import SimpleNamespace

import numpy as np

from monitor.config import parse_config
from monitor.profiles import profile_settings, stale_settings
from monitor.reference import ReferenceProfile
from retrain.bootstrap import UNDERFIT_ACCURACY, bootstrap, describe_fit
from tests.conftest import started_daemon, tiny_deployment_config


def profile(accuracy, confidence=0.8):
    return SimpleNamespace(meta={"validation_accuracy": accuracy}, val_confidences=np.full(10, confidence))


def test_fit_summary_for_trained_adapter():
    summary = describe_fit(profile(0.93))
    assert summary == "validation accuracy 0.930, mean confidence 0.80"


def test_fit_summary_warns_when_undertrained():
    summary = describe_fit(profile(UNDERFIT_ACCURACY - 0.2, confidence=0.05))
    assert "WARNING: the adapter looks undertrained" in summary
    assert "bootstrap.epochs" in summary
    assert "driftloop bootstrap --force" in summary


def test_fit_summary_without_validation_labels():
    summary = describe_fit(profile(None))
    assert summary == "mean validation confidence 0.80 (no validation labels)"


def test_stale_settings_lists_each_change():
    config = parse_config({"detectors": {"seed": 3}})
    built = SimpleNamespace(meta={"settings": {**profile_settings(config), "detectors.seed": 0}}, max_length=64)
    assert stale_settings(built, config) == ["detectors.seed: built with 0, config has 3"]


def test_stale_settings_of_profile_without_settings():
    config = parse_config({"embedding": {"model": "/models/other"}, "detectors": {"seed": 9}})
    legacy = SimpleNamespace(meta={"embedding_model": "all-MiniLM-L6-v2", "seed": 5}, max_length=config.model.max_length)
    changed = stale_settings(legacy, config)
    assert "embedding.model: built with 'all-MiniLM-L6-v2', config has '/models/other'" in changed
    assert "detectors.seed: built with 5, config has 9" in changed
    assert len(changed) == 2


def test_cached_and_active_profiles_follow_settings(tmp_path, tiny_model_dir, clinc_dir, caplog):
    """A bootstrap from the cache and a daemon start both rebuild a profile made with another seed."""
    raw = tiny_deployment_config(tmp_path / "first", tiny_model_dir)
    raw["cache_dir"] = str(tmp_path / "cache")
    bootstrap(parse_config(raw), log=lambda message: None)

    raw["state_dir"] = str(tmp_path / "second")
    raw["detectors"]["seed"] = 7
    messages = []
    version = bootstrap(parse_config(raw), log=messages.append)
    assert any(message.startswith("bootstrap: using cached adapter") for message in messages)
    assert any("detectors.seed: built with 0, config has 7" in message for message in messages)
    registry_profile = tmp_path / "second" / "profiles" / version.name
    assert ReferenceProfile.load(registry_profile).meta["settings"]["detectors.seed"] == 7

    raw["detectors"]["seed"] = 8
    daemon = started_daemon(parse_config(raw))
    try:
        assert "detectors.seed: built with 7, config has 8" in caplog.text
        assert ReferenceProfile.load(registry_profile).meta["settings"]["detectors.seed"] == 8
    finally:
        daemon.stop()
