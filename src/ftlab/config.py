"""The shipped Hydra configs: where they live, composing them outside the CLI, checking group choices."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.errors import UserError, suggest

# conf/ sits at the repository root beside src/ (editable installs and checkouts).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# ${cwd:} works before Hydra is initialised (the multirun sweep dir is resolved that early).
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)


def compose_config(overrides: Sequence[str], run_dir: str | Path, root_dir: str | Path | None = None) -> DictConfig:
    """The shipped config with ``overrides``, composed as ``python -m ftlab`` does, writing into ``run_dir``.

    For programs that call :func:`ftlab.train.run`/:func:`ftlab.train.build` without the CLI (tests,
    benchmarks, notebooks). ``root_dir`` replaces the working directory under which ``data/`` and
    ``outputs/`` resolve.
    """
    run_dir = Path(run_dir)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra.run.dir={run_dir}", *overrides],
                      return_hydra_config=True)
    with open_dict(cfg):
        if root_dir is not None:
            cfg.paths.root_dir = str(root_dir)
        cfg.paths.output_dir = str(run_dir)
        cfg.hydra.runtime.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def check_group_choices(argv: Sequence[str], config_dir: str = CONFIG_DIR) -> None:
    """Name an unknown ``group=option`` (e.g. ``method=lorra``) in one line, with the closest options."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = Path(config_dir) / key
        # hydra/... groups also get options from plugins (hydra/launcher=submitit_slurm): Hydra checks those.
        if not sep or "." in key or not group_dir.is_dir() or key == "hydra" or key.startswith("hydra/"):
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for choice in value.split(","):
            if choice and choice != "null" and choice not in options and not choice.startswith(("range(", "choice(", "interval(")):
                raise UserError(f"{key}={choice}: no such option. Options: {', '.join(options)}.{suggest(choice, options)}")
