"""`python -m ftlab`: compose the configs, fine-tune, test, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ftlab.artifacts import write_artifacts
from ftlab.callbacks import NonFiniteGuard
from ftlab.checkpoints import AtomicCheckpointIO, check_checkpoint
from ftlab.data import feature_cache
from ftlab.distributed import is_sharded, trainer_adjustments, unsharded_copy
from ftlab.errors import UserError
from ftlab.module import ClassifierModule
from ftlab.speed import SPEED_KEYS, apply_speed_options, keep_determinism_cheap
from ftlab.tb_hparams import log_hparams
from ftlab.validate import validate

log = logging.getLogger("ftlab")

# ${cwd:} works before Hydra is initialised (the multirun sweep dir is resolved that early).
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)

# conf/ sits at the repository root beside src/ (editable installs and checkouts).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_config(overrides: Sequence[str], run_dir: str | Path, root_dir: str | Path | None = None) -> DictConfig:
    """The shipped config with ``overrides``, composed as ``python -m ftlab`` does, writing into ``run_dir``.

    For programs that call :func:`run`/:func:`build` without the CLI (tests, benchmarks, notebooks).
    ``root_dir`` replaces the working directory under which ``data/`` and ``outputs/`` resolve.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically so a crash never leaves a truncated metrics file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    if not ckpt_path:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.is_file():
        hint = " (resume inside the run's directory: add hydra.run.dir=<run dir>)" if ckpt_path == "last" else ""
        raise UserError(f"ckpt_path={ckpt_path}: {path} does not exist{hint}")
    check_checkpoint(path)  # refuse pickled code with a clear message before Lightning loads it
    return str(path)


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def build(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> tuple[Any, ClassifierModule, L.Trainer]:
    """The data module, model and Trainer of one configuration, as ``python -m ftlab`` runs them.

    Seeds first, so building is reproducible. Benchmarks and tests build through here too, so they
    measure what users run.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    classes = datamodule.discover()
    model = instantiate(cfg.model, num_classes=len(classes), class_names=classes, _convert_="all")
    datamodule.set_preprocessing(model.data_config)

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:
        # Nothing to log the learning rate to (logger=none).
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    # Always on: a NaN/inf loss stops the run before it reaches the weights or a checkpoint.
    callbacks.append(NonFiniteGuard(str(output_dir / "checkpoints")))
    callbacks += list(extra_callbacks)
    # trainer.compile / trainer.channels_last are ftlab's, not Lightning Trainer arguments.
    trainer_cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                                    if k not in SPEED_KEYS})
    apply_speed_options(model, **{k: cfg.trainer.get(k, False) for k in SPEED_KEYS})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                     **trainer_adjustments(trainer_cfg))
    keep_determinism_cheap()  # after the Trainer has switched deterministic algorithms on
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    # data.cache_features: with a frozen backbone, run it once per image instead of once per epoch.
    feature_cache.attach(datamodule, model, trainer)
    return datamodule, model, trainer


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit and test one configuration; return the metrics written to ``metrics.json``."""
    validate(cfg)
    output_dir = Path(cfg.paths.output_dir)
    # Before any work: a missing or unsafe resume checkpoint is reported at once.
    ckpt_path = _resolve_ckpt(cfg.ckpt_path, output_dir)
    datamodule, model, trainer = build(cfg, extra_callbacks)
    classes = datamodule.classes

    started = time.perf_counter()
    # weights_only=True explicitly: torch's default can be flipped by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - started
    if trainer.interrupted:
        raise UserError("training was interrupted; resume with ckpt_path=last hydra.run.dir=" + str(output_dir))
    fit_metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}

    test_metrics: dict[str, Any] = {}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(model, datamodule=datamodule, ckpt_path="best" if best else None, verbose=False,
                               weights_only=True)
        test_metrics = {k: _scalar(v) for k, v in (results[0] if results else {}).items()}

    artifacts: dict[str, Any] = {}
    if trainer.is_global_zero and cfg.get("save_artifacts", True):
        source = model
        if is_sharded(trainer):
            # FSDP holds shards in memory; the best checkpoint holds the full weights.
            source = unsharded_copy(trainer, lambda: instantiate(
                cfg.model, num_classes=len(classes), class_names=classes, _convert_="all"))
        if source is not None:
            artifacts = write_artifacts(source, output_dir, datamodule.preprocessing, merge=bool(cfg.get("merge")))

    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    metrics: dict[str, Any] = {
        "method": hydra_cfg.runtime.choices.get("method") if hydra_cfg else type(model).method,
        "model": cfg.model.name,
        "data": str(datamodule.root),
        "num_classes": len(classes),
        "split_sizes": datamodule.split_sizes(),
        "test_on_val": datamodule.test_on_val,
        **model.parameter_counts(),
        "weight_source": model.weight_source,
        "val/acc_best": fit_metrics.get("val/acc_best"),
        "val/acc": fit_metrics.get("val/acc"),
        "val/f1": fit_metrics.get("val/f1"),
        **test_metrics,
        **artifacts,
        "fit_seconds": round(fit_seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        "output_dir": str(output_dir),
    }
    metrics["params_trainable_pct"] = round(100.0 * metrics["params_trainable"] / metrics["params_total"], 4)
    if trainer.is_global_zero:
        _write_json(output_dir / "metrics.json", metrics)
        # One HParams session per run in TensorBoard, with the final numbers.
        log_hparams(trainer.loggers, cfg, metrics, step=trainer.global_step)
        print_summary(metrics)
    return metrics


def print_summary(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ftlab: {metrics['method']} on {metrics['model']}", show_header=False)
    for key in (
        "data", "num_classes", "params_total", "params_trainable", "params_trainable_pct",
        "val/acc_best", "test/acc", "test/f1", "test/acc_top5", "artifact", "artifact_bytes", "fit_seconds", "peak_rss_mb", "epochs", "output_dir",
    ):
        if metrics.get(key) is not None:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and key not in ("fit_seconds", "peak_rss_mb") else str(value))
    if metrics.get("test_on_val"):
        table.add_row("note", "no test/ split: test metrics are on the validation split")
    Console(stderr=False).print(table)


def _user_error(exc: BaseException) -> str | None:
    """The one-line message for a user mistake anywhere in the exception chain, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, MissingMandatoryValue):
            key = getattr(exc, "full_key", "") or ""
            return f"{key}: a value is required (set it on the command line, e.g. {key}=...)"
        exc = exc.__cause__ or exc.__context__
    return None


def check_group_choices(argv: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Name an unknown ``group=option`` (e.g. ``method=lorra``) in one line, with the closest options."""
    from ftlab.errors import suggest

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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        if cfg.data.get("folds") and cfg.data.get("fold") is None:
            from ftlab.crossval import run_folds

            metrics = run_folds(cfg)  # the mean over folds is what sweepers see
        else:
            metrics = run(cfg)
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        print(f"ftlab: error: {message}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
            raise UserError(message) from None
        sys.exit(1)
    value = metrics.get(cfg.optimized_metric)
    return float(value) if value is not None else None


def main() -> float | None:
    """Console entry point: ``python -m ftlab [overrides]``."""
    try:
        check_group_choices(sys.argv[1:])
    except UserError as exc:
        print(f"ftlab: error: {exc}", file=sys.stderr)
        sys.exit(1)
    return _hydra_main()


if __name__ == "__main__":
    main()
