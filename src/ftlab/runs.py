"""Run directories: find them, read what each one left behind (metrics, overrides, errors, config).

A run directory is a folder holding ``metrics.json`` or Hydra's ``.hydra/``. A run that crashed or was
killed has ``.hydra/`` but no ``metrics.json``; it is kept (status ``failed``/``incomplete``) so a
summary never drops it silently. Cross-validation folds live inside their run's directory and are
summarised by the parent's ``metrics.json``, so the search does not descend into a run directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.errors import UserError

# Written by the sweep callback when a job raises: the exception, one line.
ERROR_FILE = "error.txt"
_JOB_NUM = re.compile(r"^(\d+)_")


@dataclass
class RunRecord:
    path: Path
    status: str  # ok | partial | failed | incomplete
    metrics: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "partial")

    @property
    def method(self) -> str:
        return str(self.metrics.get("method") or self.override_dict().get("method") or "?")

    @property
    def model(self) -> str:
        return str(self.metrics.get("model") or self.override_dict().get("model.name") or "?")

    def override_dict(self) -> dict[str, str]:
        return dict(parse_override(o) for o in self.overrides)


def parse_override(override: str) -> tuple[str, str]:
    """``+model.rank=8`` -> (``model.rank``, ``8``)."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra").is_dir()


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories at or below ``root``, in job order for sweeps (``3_…`` before ``10_…``), else by name."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith(".") or name in ("tensorboard", "checkpoints", "csv"):
                continue
            child = here / name
            if is_run_dir(child):
                found.append(child)
            else:
                keep.append(name)
        dirnames[:] = keep  # never descend into a run directory
    return sorted(found, key=_sort_key)


def _sort_key(path: Path) -> tuple[str, int, str]:
    match = _JOB_NUM.match(path.name)
    return (str(path.parent), int(match.group(1)) if match else -1, path.name)


def load_run(path: Path) -> RunRecord:
    overrides: list[str] = []
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        try:
            overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        except yaml.YAMLError:
            overrides = []
    error_file = path / ERROR_FILE
    error = error_file.read_text().strip().splitlines()[0] if error_file.is_file() else None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return RunRecord(path, "failed", overrides=overrides, error=f"unreadable metrics.json ({exc})")
        failed_folds = metrics.get("folds_failed") or []
        if failed_folds:
            error = "; ".join(f"fold {f['fold']}: {f['error']}" for f in failed_folds)
        return RunRecord(path, "partial" if failed_folds else "ok", metrics, overrides, error)
    if error:
        return RunRecord(path, "failed", overrides=overrides, error=error)
    return RunRecord(path, "incomplete", overrides=overrides, error="no metrics.json: stopped early (see its train.log) or still running")


def load_runs(root: Path) -> list[RunRecord]:
    return [load_run(p) for p in find_run_dirs(root)]


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Override keys whose value is not the same in every run (absent counts as a value), in first-seen order."""
    keys: dict[str, None] = {}
    for run in runs:
        for key in run.override_dict():
            keys.setdefault(key, None)
    dicts = [run.override_dict() for run in runs]
    return [k for k in keys if len({d.get(k) for d in dicts}) > 1]


# -- one run directory: where it is, its config, its data ------------------------------------------
def find_run_dir(path: Path) -> Path | None:
    """The run directory ``path`` is, or holds ``path`` (beside the artifacts or in ``checkpoints/``)."""
    home = path if path.is_dir() else path.parent
    if not path.is_dir() and home.name == "checkpoints":
        home = home.parent
    return home if (home / ".hydra" / "config.yaml").is_file() else None


def run_config(run_dir: Path) -> DictConfig:
    """The run's composed config, with paths pinned so it resolves outside Hydra."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    # ${cwd:} in paths.root_dir means the training process's directory, which hydra.yaml recorded.
    cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.root_dir = cwd or os.getcwd()
            cfg.paths.output_dir = str(run_dir)
    return cfg


def run_data_root(run_dir: Path, cfg: DictConfig) -> str:
    """Where the run's data was: metrics.json records the resolved path; the config is the fallback."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        data = json.loads(metrics.read_text()).get("data")
        if data:
            return str(data)
    try:
        return str(OmegaConf.select(cfg, "data.root", throw_on_missing=True))
    except Exception as exc:
        raise UserError(f"{run_dir}: cannot tell where the run's data is ({exc}); pass data.root=DIR") \
            from None
