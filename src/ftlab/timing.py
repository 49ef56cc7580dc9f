"""Where a run's wall time goes: named phases, summed, and how long the process ran before the run began.

:func:`ftlab.train.run` times its phases (checks, data, model, trainer, fit, test, artifacts) with a
:class:`Phases` and writes them to ``metrics.json`` as ``phase_seconds``; ``startup`` is the time from the
process start to the run (interpreter, library imports, Hydra's composition), recorded for the first run of
a process only (a multirun's later jobs start in a process that is already up). ``make bench``
(``bench/default_run.py``) reads them to split the default run's wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

_first_run = True


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


def startup_seconds() -> float | None:
    """:func:`process_age` for the first run of this process; None for later ones and where unknown."""
    global _first_run
    if not _first_run:
        return None
    _first_run = False
    age = process_age()
    return None if age is None else round(age, 3)
