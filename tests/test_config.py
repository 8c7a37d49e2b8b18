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
    ],
    ids=["window-too-small", "approval-unknown", "alpha-above-one", "unknown-signal", "negative-lr", "typo-key"],
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
