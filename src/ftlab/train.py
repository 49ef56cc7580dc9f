"""Build one configuration (data, model, Trainer), fit it, test it, write ``metrics.json``.

The library side of ``python -m ftlab``; the command line itself is :mod:`ftlab.entry`.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ftlab import logs
from ftlab.artifacts import write_artifacts
from ftlab.callbacks import NonFiniteGuard
from ftlab.checkpoints import AtomicCheckpointIO, resolve_ckpt_path
from ftlab.data import feature_cache
from ftlab.data.imbalance import resolve_class_weights
from ftlab.data.mixup import build_mixup
from ftlab.distributed import is_sharded, trainer_adjustments, unsharded_copy
from ftlab.errors import RunInterrupted
from ftlab.fileio import write_json
from ftlab.module import ClassifierModule
from ftlab.speed import SPEED_KEYS, apply_speed_options, keep_determinism_cheap
from ftlab.tb_hparams import log_hparams
from ftlab.timing import Phases, startup_seconds
from ftlab.tta import run_tta
from ftlab.validate import validate

log = logging.getLogger(__name__)


def _reset_peak_memory() -> None:
    """Start this run's peak-memory count now, so runs sharing a process (a multirun, a cross-validation,
    ``experiment=compare_tuned``) each report their own peak. Linux resets the peak RSS through
    ``/proc/self/clear_refs``; elsewhere the peak stays the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss_mb() -> float:
    """Peak resident memory since :func:`_reset_peak_memory` (Linux ``VmHWM``), else the process's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_gpu_mb() -> float | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return None


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def model_arguments(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What the model's config lacks: the classes, and ``model.class_weights`` resolved (``auto``: inverse class
    frequency of the train split), so the checkpoints' hyper-parameters record the weights that were used."""
    classes = datamodule.discover()
    out: dict[str, Any] = {"num_classes": len(classes), "class_names": classes}
    weights = OmegaConf.select(cfg, "model.class_weights", default=None)
    if weights is not None:
        weights = OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights
        out["class_weights"] = resolve_class_weights(weights, datamodule.train_labels(), classes)
    return out


def build(
    cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = (), phases: Phases | None = None
) -> tuple[Any, ClassifierModule, L.Trainer]:
    """The data module, model and Trainer of one configuration, as ``python -m ftlab`` runs them.

    Seeds first, so building is reproducible. Benchmarks and tests build through here too, so they
    measure what users run. ``phases`` times the data, model and trainer parts.
    """
    phases = phases or Phases()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    with phases("data"):  # listing, materialising and checking the images or texts
        datamodule = instantiate(cfg.data, _convert_="all")
        classes = datamodule.discover()
    with phases("model"):
        model = instantiate(cfg.model, **model_arguments(cfg, datamodule), _convert_="all")
        # data.mixup / data.cutmix: the module mixes its training batches (ftlab.data.mixup).
        model.mixup = build_mixup(datamodule, len(classes), float(model.hparams.get("label_smoothing") or 0.0))
        datamodule.set_preprocessing(model.data_config)
    with phases("trainer"):
        trainer = _build_trainer(cfg, model, datamodule, extra_callbacks, output_dir)
    return datamodule, model, trainer


def _build_trainer(
    cfg: DictConfig, model: ClassifierModule, datamodule: Any, extra_callbacks: Sequence[L.Callback], output_dir: Path
) -> L.Trainer:
    """The Trainer with the configured callbacks and loggers; applies ``trainer.compile``/``channels_last``."""
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
    apply_speed_options(model, **{k: cfg.trainer[k] for k in SPEED_KEYS if k in cfg.trainer})
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                     **trainer_adjustments(trainer_cfg))
    keep_determinism_cheap()  # after the Trainer has switched deterministic algorithms on
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    # data.cache_features: with a frozen backbone, run it once per image instead of once per epoch.
    feature_cache.attach(datamodule, model, trainer)
    return trainer


def run(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Fit and test one configuration; return the metrics written to ``metrics.json``."""
    startup = startup_seconds()
    phases = Phases()
    with phases("checks"):
        validate(cfg)
        _reset_peak_memory()
        output_dir = Path(cfg.paths.output_dir)
        # Before any work: a missing or unsafe resume checkpoint is reported at once.
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
        test_tta = run_tta(cfg)
    datamodule, model, trainer = build(cfg, extra_callbacks, phases)
    classes = datamodule.classes
    method = _method_name(model)
    if trainer.is_global_zero:
        counts = model.parameter_counts()
        sizes = datamodule.split_sizes()
        log.info("ftlab: %s on %s, %s of %s parameters train; data %s (train/val/test %s/%s/%s); run dir %s",
                 method, cfg.model.name, f"{counts['params_trainable']:,}", f"{counts['params_total']:,}",
                 datamodule.root, sizes["train"], sizes["val"], sizes["test"], output_dir)
        logs.file_only("config:\n" + OmegaConf.to_yaml(cfg, resolve=False))

    # weights_only=True explicitly: torch's default can be flipped by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    try:
        with phases("fit"):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        # Lightning answers Ctrl-C by shutting down and calling sys.exit(1).
        if trainer.interrupted:
            raise RunInterrupted(str(output_dir)) from None
        raise
    fit_seconds = phases.seconds["fit"]
    if trainer.interrupted:
        raise RunInterrupted(str(output_dir))
    fit_metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}

    test_metrics: dict[str, Any] = {}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        model.test_tta = test_tta  # test_tta=hflip: the test stage averages the logits of image and mirror
        with phases("test"):
            results = trainer.test(model, datamodule=datamodule, ckpt_path="best" if best else None,
                                   verbose=False, weights_only=True)
        test_metrics = {k: _scalar(v) for k, v in (results[0] if results else {}).items()}

    artifacts: dict[str, Any] = {}
    if trainer.is_global_zero and cfg.get("save_artifacts", True):
        source = model
        if is_sharded(trainer):
            # FSDP holds shards in memory; the best checkpoint holds the full weights.
            source = unsharded_copy(trainer, lambda: instantiate(
                cfg.model, **model_arguments(cfg, datamodule), _convert_="all"))
        if source is not None:
            with phases("artifacts"):
                artifacts = write_artifacts(source, output_dir, datamodule.preprocessing, merge=bool(cfg.get("merge")))

    metrics: dict[str, Any] = {
        "method": method,
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
        "peak_gpu_mb": _peak_gpu_mb(),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        "output_dir": str(output_dir),
    }
    metrics["params_trainable_pct"] = round(100.0 * metrics["params_trainable"] / metrics["params_total"], 4)
    # Seconds per phase of this run so far (ftlab.timing); imports + startup: process start to run, first run only.
    metrics["phase_seconds"] = {**startup, **phases.rounded()}
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", metrics)
        # One HParams session per run in TensorBoard, with the final numbers.
        log_hparams(trainer.loggers, cfg, metrics, step=trainer.global_step)
        print_summary(metrics)
    return metrics


def _method_name(model: ClassifierModule) -> str:
    """The ``method=`` choice of this run (its config name), else the strategy class's own name."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return type(model).method


SUMMARY_KEYS = ("data", "num_classes", "params_total", "params_trainable", "params_trainable_pct", "val/acc_best",
                "test/acc", "test/f1", "test/acc_top5", "artifact", "artifact_bytes", "fit_seconds", "peak_rss_mb",
                "epochs")


def print_summary(metrics: dict[str, Any]) -> None:
    """The run's result as a table, then the whole run directory on a line of its own (to copy)."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    for key in SUMMARY_KEYS:
        value = metrics.get(key)
        if value is not None:
            plain = isinstance(value, float) and key not in ("fit_seconds", "peak_rss_mb")
            rows.append((key, f"{value:.4f}" if plain else str(value)))
    if metrics.get("test_on_val"):
        rows.append(("note", "no test/ split: test metrics are on the validation split"))
    table = Table(title=f"ftlab: {metrics['method']} on {metrics['model']}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console = Console(stderr=False)
    console.print(table)
    console.print(f"run directory: {metrics['output_dir']}", soft_wrap=True, highlight=False)
    logs.file_only("summary:\n" + "\n".join(f"  {k}: {v}" for k, v in rows) + f"\n  output_dir: {metrics['output_dir']}")
