"""Log each run's hyper-parameters with its final metrics, so runs line up in TensorBoard's HParams tab.

Lightning logs the module's hparams when fitting starts, but without metrics (``default_hp_metric:
false``), which TensorBoard does not show as a session. This writes one session per run once the
final numbers exist. The metrics go under ``hp/`` (``hp/test/acc`` ...) so they do not add a stray
point to the training curves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Final numbers shown as HParams metric columns.
FINAL_METRICS = ("val/acc_best", "val/acc", "val/f1", "test/acc", "test/f1", "test/acc_top5", "test/loss",
                 "fit_seconds", "peak_rss_mb", "params_trainable", "params_trainable_pct", "artifact_bytes")
DATA_KEYS = ("augment", "batch_size", "image_size", "crop_pct", "hflip", "val_fraction", "folds", "fold")
TRAINER_KEYS = ("max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val")


def _plain(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "null" if value is None else str(value)


def run_hparams(cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat, TensorBoard-friendly hyper-parameters of a run: method, model keys, data and trainer knobs."""
    params: dict[str, Any] = {"method": metrics.get("method"), "model": metrics.get("model"), "seed": cfg.get("seed")}
    model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    for key, value in (model or {}).items():
        if key == "_target_":
            continue
        if key == "optimizer" and isinstance(value, dict):
            params["model.optimizer"] = str(value.get("_target_", "")).rsplit(".", 1)[-1]
            continue
        params[f"model.{key}"] = value
    for node, keys in (("data", DATA_KEYS), ("trainer", TRAINER_KEYS)):
        section = cfg.get(node) or {}
        for key in keys:
            if key in section:
                params[f"{node}.{key}"] = OmegaConf.select(cfg, f"{node}.{key}")
    return {k: _plain(v) for k, v in params.items()}


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"hp/{k}": float(metrics[k]) for k in FINAL_METRICS
            if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)}


def log_hparams(loggers: Iterable[Any], cfg: DictConfig, metrics: dict[str, Any], step: int = 0) -> None:
    """Write the HParams session to every TensorBoard logger (others are left alone)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(run_hparams(cfg, metrics), final_metrics(metrics), step=step)
            # Fitting and testing already finalised the logger; close the writer this reopened.
            logger.finalize("success")
