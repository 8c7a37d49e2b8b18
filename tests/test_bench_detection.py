"""Smoke test of the detection benchmark in quick mode on a small slice of CLINC150."""

import math
import re

import pytest

from tests.conftest import load_bench_script


def load_bench():
    return load_bench_script("detection")


def table_rows(document: str) -> tuple[list[str], dict[str, list[str]]]:
    """Return the header cells and the cells of each row of the results table, keyed by the first cell."""
    lines = [line for line in document.splitlines() if line.startswith("| ")]
    header_index = next(i for i, line in enumerate(lines) if line.startswith("| scenario |"))
    header = [cell.strip() for cell in lines[header_index].strip("|").split("|")]
    rows = {}
    for line in lines[header_index + 1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = cells
    return header, rows


@pytest.mark.slow
def test_quick_mode_writes_table(clinc_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFTLOOP_DATA", str(clinc_dir.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = load_bench()
    out = tmp_path / "detection.md"

    bench.main(["--quick", "--pool-limit", "600", "--stable-windows", "3", "--drift-windows", "1",
                "--out", str(out)])

    header, rows = table_rows(out.read_text())
    for scenario in bench.SCENARIOS:
        assert scenario.name in rows
    assert "CPU ms/window" in rows
    stable_overall = rows["stable"][header.index("overall")]
    match = re.fullmatch(r"([0-9.]+) \((\d+)/3\)", stable_overall)
    assert match, stable_overall
    assert math.isfinite(float(match.group(1)))
    document = out.read_text()
    assert "## Label-free accuracy estimate" in document
    assert "| stable | 3 |" in document
    assert "Label-free accuracy estimate within 3 points" in document
