"""Where a run's wall time goes: named phases, summed, and how long the process ran before the run began.

:func:`ftlab.train.run` times its phases (checks, data, model, trainer, fit, test, artifacts) with a
:class:`Phases` and writes them to ``metrics.json`` as ``phase_seconds``, after the two parts of the time
from the process start to the run: ``imports``, importing torch and Lightning (the command line times it,
:func:`import_libraries`), and ``startup``, the rest (interpreter, Hydra's composition, ftlab's modules).
Both are recorded for the first run of a process only (a multirun's later jobs start in a process that is
already up). ``make bench`` (``bench/default_run.py``) reads them to split the default run's wall time.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

_first_run = True
_import_seconds = 0.0


class Phases:
    """Seconds per named phase; a phase timed twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def process_age() -> float | None:
    """Seconds since this process started (Linux: its start time in ``/proc/self/stat``), else None."""
    try:
        with open("/proc/self/stat") as fh:
            # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def import_libraries(*names: str) -> None:
    """Import ``names`` now, adding the seconds it took to the start-up's ``imports`` part (about nothing
    when they are imported already)."""
    global _import_seconds
    started = time.perf_counter()
    for name in names:
        importlib.import_module(name)
    _import_seconds += time.perf_counter() - started


def startup_seconds() -> dict[str, float | None]:
    """For the first run of this process: ``imports`` (:func:`import_libraries`) and ``startup``, the rest
    of :func:`process_age`; None for later runs and where the age is unknown."""
    global _first_run
    age = process_age() if _first_run else None
    _first_run = False
    if age is None:
        return {"imports": None, "startup": None}
    return {"imports": round(_import_seconds, 3), "startup": round(age - _import_seconds, 3)}
