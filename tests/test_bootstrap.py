"""The bootstrap summary warns when the first adapter is undertrained."""

from types import SimpleNamespace

import numpy as np

from retrain.bootstrap import UNDERFIT_ACCURACY, describe_fit


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
