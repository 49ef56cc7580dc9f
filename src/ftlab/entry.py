"""The command line: ``python -m ftlab [group=option ...] [key=value ...]`` (also ``ftlab train``).

A few lines around :func:`ftlab.train.run`: check the group choices, let Hydra compose the config and
set up the run directory, route logging (:mod:`ftlab.logs`), and turn a user mistake into one line on
stderr with exit code 1 instead of a traceback.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ftlab import logs
from ftlab.config import CONFIG_DIR, check_group_choices
from ftlab.crossval import run_folds
from ftlab.errors import RunInterrupted, UserError, user_message
from ftlab.train import run

# Exit code of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def resume_command(run_dir: str) -> str:
    """The command that resumes this run: its own overrides, in its directory, from ``last.ckpt``."""
    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.lstrip("+~").startswith(("hydra.run.dir=", "ckpt_path="))]
    words = ["python", "-m", "ftlab", *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    return " ".join(shlex.quote(w) for w in words)


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    logs.configure(verbose=bool(HydraConfig.get().verbose) if HydraConfig.initialized() else False)
    try:
        if cfg.get("tune") is not None:  # experiment=compare_tuned: many runs, one comparison
            from ftlab.compare_tuned import run_comparison

            run_comparison(cfg)
            return None
        # The mean over folds is what sweepers see for cross-validation.
        folds = cfg.data.get("folds") and cfg.data.get("fold") is None
        metrics = run_folds(cfg) if folds else run(cfg)
    except RunInterrupted as exc:
        logs.error(f"ftlab: {exc}")
        logs.error(f"ftlab: resume with: {resume_command(exc.run_dir)}")
        if _multirun():
            raise
        sys.exit(INTERRUPTED)
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        logs.error(f"ftlab: error: {message}")
        if _multirun():
            raise UserError(message) from None
        sys.exit(1)
    value = metrics.get(cfg.optimized_metric)
    return float(value) if value is not None else None


def main() -> Any:
    """Console entry point: ``python -m ftlab [overrides]``; ``-v`` is Hydra's ``hydra.verbose=true``."""
    args = sys.argv[1:]
    if any(a in ("-v", "--verbose") for a in args):
        args = [a for a in args if a not in ("-v", "--verbose")] + ["hydra.verbose=true"]
        sys.argv = [sys.argv[0], *args]
    try:
        check_group_choices(args)
    except UserError as exc:
        print(f"ftlab: error: {exc}", file=sys.stderr)
        sys.exit(1)
    return hydra_main()
