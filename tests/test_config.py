import pytest

from monitor.config import load_config, parse_config
from monitor.errors import ConfigError


def test_shipped_configs_load():
    default = load_config("config/driftloop.yaml")
    demo = load_config("config/demo.yaml")
    assert default.approval == "manual"
    assert demo.approval == "auto"
    assert demo.data.clinc150.domains is not None
    assert len(demo.data.clinc150.domains) == 7


def test_defaults_without_file():
    config = parse_config({})
    assert config.detectors.confidence.max_drop == 0.1
    assert config.db_url.startswith("sqlite:///")


@pytest.mark.parametrize(
    "raw, key, value",
    [
        ({"monitor": {"window_size": 3}}, "monitor.window_size", "3"),
        ({"approval": "sometimes"}, "approval", "'sometimes'"),
        ({"detectors": {"alpha": 1.5}}, "detectors.alpha", "1.5"),
        ({"detectors": {"enabled": ["colour"]}}, "detectors.enabled", "colour"),
        ({"retrain": {"training": {"learning_rate": -1}}}, "retrain.training.learning_rate", "-1"),
        ({"monitor": {"windowsize": 100}}, "monitor.windowsize", "100"),
        ({"server": {"monitor_url": "localhost 18181"}}, "server.monitor_url", "'localhost 18181'"),
        ({"monitor": {"window_size": 60, "sample_size": 60}, "detectors": {"min_samples": 200}},
         "detectors.min_samples", "200"),
        ({"server": {"port": 9000}, "monitor": {"port": 9000}}, "server.port", "9000"),
        ({"detectors": {"alpha": 0.01, "calibration": {"windows": 0}, "embedding": {"permutations": 200}}},
         "detectors.embedding.permutations", "at least 800"),
        ({"detectors": {"calibration": {"windows": 0}, "vocabulary": {"null_windows": 600}}},
         "detectors.vocabulary.null_windows", "at least 8000"),
        ({"detectors": {"calibration": {"windows": 30}}}, "detectors.calibration.windows", "30"),
        ({"detectors": {"novelty": {"quantile": 1.0}}}, "detectors.novelty.quantile", "1.0"),
        ({"detectors": {"effect_floors": {"confidence": 0.1}}}, "detectors.effect_floors", "max_drop"),
        ({"detectors": {"enabled": ["novelty", "novelty"]}}, "detectors.enabled", "'novelty' is listed more than once"),
        ({"alarm": {"false_alarms_per_week": 100000}}, "alarm.false_alarms_per_week", "100000"),
        ({"detectors": {"enabled": ["domain_classifier"], "min_samples": 5, "domain_classifier": {"folds": 8}}},
         "detectors.domain_classifier.folds", "8"),
        ({"retrain": {"sweep": {"ranks": [4, 0]}}}, "retrain.sweep.ranks", "rank 0 is outside 1..512"),
        ({"retrain": {"sweep": {"ranks": []}}}, "retrain.sweep.ranks", "at least one rank"),
        ({"retrain": {"sweep": {"ranks": [8, 8]}}}, "retrain.sweep.ranks", "more than once"),
        ({"retrain": {"training": {"precision": "fp8"}}}, "retrain.training.precision", "'fp8'"),
        ({"detectors": {"seed": -1}}, "detectors.seed", "-1"),
        ({"data": {"seed": 2**32}}, "data.seed", "4294967296"),
        ({"bootstrap": {"seed": -5}}, "bootstrap.seed", "-5"),
        ({"retrain": {"training": {"seed": -2}}}, "retrain.training.seed", "-2"),
        ({"retrain": {"training": {"target_modules": []}}}, "retrain.training.target_modules", "non-empty list"),
        ({"retrain": {"training": {"max_wall_time_s": 0}}}, "retrain.training.max_wall_time_s", "0"),
        ({"retrain": {"validation_fraction": 0.6}}, "retrain.validation_fraction", "0.6"),
        ({"server": {"preload_candidates": -1}}, "server.preload_candidates", "-1"),
        ({"server": {"keep_previous_versions": 20}}, "server.keep_previous_versions", "20"),
        ({"resources": {"evaluation_max_share": 1.5}}, "resources.evaluation_max_share", "1.5"),
        ({"database": {"event_retention_s": 60}}, "database.event_retention_s", "60"),
        ({"database": {"window_retention_s": -1}}, "database.window_retention_s", "-1"),
    ],
    ids=["window-too-small", "approval-unknown", "alpha-above-one", "unknown-signal", "negative-lr", "typo-key",
         "url-without-scheme", "min-samples-above-window", "same-ports", "too-few-permutations",
         "too-few-null-windows", "calibration-too-few-windows", "novelty-quantile-one", "floor-for-confidence", "repeated-signal", "budget-above-windows",
         "folds-above-min-samples", "sweep-rank-zero", "sweep-no-ranks", "sweep-repeated-rank", "unknown-precision",
         "negative-detector-seed", "data-seed-too-large", "negative-bootstrap-seed", "negative-training-seed",
         "no-target-modules", "zero-wall-time", "validation-too-large", "negative-preload",
         "too-many-kept-versions", "evaluation-share-above-one", "retention-below-an-hour", "negative-retention"],
)
def test_invalid_value_names_key_and_value(raw, key, value):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    message = str(caught.value)
    assert key in message
    assert value in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("monitor: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_relative_paths_follow_config_file(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text("state_dir: state\n")
    config = load_config(path)
    assert config.state_path == path.parent / "state"


def test_fewer_signals_need_fewer_resamples():
    config = parse_config({"detectors": {"enabled": ["embedding", "confidence"], "alpha": 0.01,
                                         "calibration": {"windows": 0}, "embedding": {"permutations": 200}}})
    assert config.detectors.embedding.permutations == 200


def test_monitor_url_may_be_null():
    assert parse_config({"server": {"monitor_url": None}}).server.monitor_url is None


def test_optional_signals_are_off_by_default():
    enabled = parse_config({}).detectors.enabled
    assert "domain_classifier" not in enabled
    assert "label_distribution" not in enabled


def test_alpha_from_false_alarm_budget():
    config = parse_config({"alarm": {"false_alarms_per_week": 1, "windows_per_week": 2016},
                           "trigger": {"consecutive_windows": 2}})
    assert config.alpha == pytest.approx((1 / 2016) ** 0.5)
    # About windows_per_week * alpha ** K false triggers per week.
    assert 2016 * config.alpha**2 == pytest.approx(1.0)


def test_alpha_without_budget_is_detectors_alpha():
    assert parse_config({"detectors": {"alpha": 0.02}}).alpha == 0.02


def test_budget_and_alpha_together_rejected():
    with pytest.raises(ConfigError) as caught:
        parse_config({"alarm": {"false_alarms_per_week": 1}, "detectors": {"alpha": 0.01}})
    message = str(caught.value)
    assert "detectors.alpha: 0.01" in message
    assert "alarm.false_alarms_per_week" in message


def test_budget_raises_resample_minimum():
    with pytest.raises(ConfigError, match="detectors.embedding.permutations: 600 is too few"):
        parse_config({"alarm": {"false_alarms_per_week": 0.01, "windows_per_week": 10000},
                      "trigger": {"consecutive_windows": 1}, "detectors": {"calibration": {"windows": 0}}})


def test_calibration_lifts_the_resample_minimum():
    config = parse_config({"detectors": {"alpha": 0.0001, "embedding": {"permutations": 600}}})
    assert config.detectors.calibration.windows == 1000
    assert config.detectors.embedding.permutations == 600
