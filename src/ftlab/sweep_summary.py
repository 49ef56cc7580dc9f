"""Hydra callback: a summary of every multirun in its sweep directory, kept current as jobs finish.

Registered in ``conf/hydra/default.yaml`` (``hydra.callbacks``). After each job it records a failure
in the job's directory (``error.txt``) and rebuilds ``summary.{csv,md,png}`` in the sweep directory;
at the end of the multirun it rebuilds once more (Optuna's ``optimization_results.yaml`` exists by
then) and prints the table and the best run by the validation metric. Rebuilding after every job
matters: Hydra's basic sweeper raises after the last job when one failed, and then never calls
``on_multirun_end``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from ftlab.errors import user_message
from ftlab.report import SELECT_METRIC, best_row, write_summary
from ftlab.runs import ERROR_FILE

log = logging.getLogger(__name__)


def _describe(exc: BaseException) -> str:
    message = user_message(exc) or f"{type(exc).__name__}: {exc}"
    return " ".join(message.split())  # one line


class SweepSummary(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.enabled:
            return
        if job_return.status == JobStatus.FAILED:
            # The job's own log has the traceback; this one line is what the summary shows.
            try:
                out = Path(config.hydra.runtime.output_dir)
                (out / ERROR_FILE).write_text(_describe(job_return._return_value) + "\n")
            except OSError as exc:
                log.warning("could not record the failure in %s: %s", ERROR_FILE, exc)
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(Path(config.hydra.sweep.dir), final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            self._write(Path(config.hydra.sweep.dir), final=True)

    @staticmethod
    def _write(sweep_dir: Path, final: bool) -> None:
        try:
            rows, text = write_summary(sweep_dir, title=f"ftlab sweep {sweep_dir.name}")
        except Exception as exc:  # a summary must never turn a finished sweep into a failure
            log.warning("could not write the sweep summary in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        if not final:
            return
        print("\n" + text, flush=True)
        best = best_row(rows)
        if best is not None:
            print(f"best by {SELECT_METRIC}: {best.get(SELECT_METRIC):.4f}  {best.label}  ({best.run.path})")
        print(f"summary: {sweep_dir / 'summary.md'}, summary.csv, summary.png", flush=True)
