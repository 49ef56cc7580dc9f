"""Smoke test of the benchmark suite: every script runs at toy sizes and writes its table rows.

The figures at toy sizes mean nothing (and are not judged: ``met`` is null); ``make bench`` measures.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
from run_all import BENCHMARKS  # noqa: E402


@pytest.mark.slow
def test_every_benchmark_runs_tiny(tmp_path: Path, digits_dir: Path) -> None:
    env = {**os.environ, "FTLAB_DATA_DIR": str(digits_dir.parent)}
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    for name in BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["name"] == name and result["rows"], name
        for r in result["rows"]:
            assert math.isfinite(r["value"]) and r["value"] >= 0, (name, r)
            assert r["met"] is None  # toy sizes are never judged against targets
            assert r["metric"] in summary and r["metric"] in proc.stdout


def test_row_judges_targets() -> None:
    from common import row

    assert row("x", 0.96, "≥ 0.95")["met"] is True
    assert row("x", 0.94, "≥ 0.95")["met"] is False
    assert row("x", 0.7, "≤ 0.8")["met"] is True
    assert row("x", 1.0, "< 1")["met"] is False
    assert row("x", 1.0, None)["met"] is None
    assert row("x", 0.5, "≥ 0.95", tiny=True)["met"] is None


def test_unknown_benchmark_is_named(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--only", "overhed", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "--only overhed: no such benchmark" in proc.stderr
