"""The demo-retrain benchmark's arguments and table, without training (the benchmark itself takes minutes per row)."""

from types import SimpleNamespace

import pytest

from tests.conftest import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("demo_retrain")


@pytest.mark.parametrize("argv, message", [
    (["--replay", "15", "-1"], "--replay must be at least 0, got -1"),
    (["--seeds", "-2"], "--seeds must be at least 0, got -2"),
    (["--labelled", "0"], "--labelled must be at least 1, got 0"),
])
def test_bad_argument_names_option(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_arguments(argv)
    assert message in capsys.readouterr().err


def row(replay, passed, evaluated, low):
    return {
        "replay": replay, "seed": 0, "state": "active", "sources": {"known": 1400, "new": 1500, "oos": 250},
        "decision": "passed" if passed else "inconclusive", "deciding_gate": None if passed else "test_noninferiority",
        "test_diff": -0.004, "test_ci": [low, 0.002], "test_regressed": [],
        "noninferiority": {"passed": passed, "evaluated": evaluated},
        "production_before": 0.47, "production_after": 0.89,
        "train": 3666, "steps": 575, "training_s": 174.6, "run_s": 250.0,
    }


def test_table_names_each_verdict(bench):
    args = SimpleNamespace(argv=["--replay", "15", "30"], labelled=1700)
    rows = [row(15, False, False, -0.0225), row(30, True, True, -0.0095), row(30, False, True, -0.03)]
    section = bench.render(args, rows, elapsed_s=600, load="none", margin=0.02)
    table = [line for line in section.splitlines() if line.startswith("| 15 ") or line.startswith("| 30 ")]
    assert len(table) == 3
    assert "| -0.4 | [-2.2, +0.2] | not decided | 0.470 -> 0.890 | inconclusive (test_noninferiority) |" in table[0]
    assert table[1].endswith("| passed | 0.470 -> 0.890 | passed |")
    assert "| failed |" in table[2]
    assert "1400 known-domain, 1500 unseen-domain and 250 out-of-scope events, 1700 of them labelled" in section
    assert "allows 2 points" in section
