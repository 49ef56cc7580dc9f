"""ftlab.timing: the phases a run times, and the process age its start-up figure comes from."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ftlab import timing
from ftlab.timing import Phases, process_age


def test_phases_time_and_add_up() -> None:
    phases = Phases()
    with phases("a"):
        time.sleep(0.02)
    with phases("a"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), phases("b"):  # a phase that raises is still timed
        time.sleep(0.01)
        raise RuntimeError
    assert phases.seconds["a"] >= 0.04 and 0.01 <= phases.seconds["b"] < phases.seconds["a"]
    assert list(phases.rounded()) == ["a", "b"]


def test_process_age_counts_from_the_process_start() -> None:
    code = ("import time; from ftlab.timing import process_age; a = process_age(); time.sleep(0.5); "
            "print(a, process_age())")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    wall = time.perf_counter() - started
    first, second = (float(v) for v in out)
    assert 0 <= first < second <= wall + 0.05  # clock ticks are 10 ms
    assert second - first == pytest.approx(0.5, abs=0.05)


def test_startup_is_reported_for_the_first_run_of_a_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "_first_run", True)
    monkeypatch.setattr(timing, "_import_seconds", 0.0)
    timing.import_libraries("json")  # already imported: about nothing
    first = timing.startup_seconds()
    assert 0 <= first["imports"] < 0.05
    assert first["imports"] + first["startup"] == pytest.approx(process_age(), abs=0.1)
    assert timing.startup_seconds() == {"imports": None, "startup": None}

