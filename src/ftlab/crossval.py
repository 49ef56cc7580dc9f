"""K-fold cross-validation: ``python -m ftlab data.folds=K``.

The run directory gets one sub-directory per fold (``fold_0/`` ...), each a complete run (checkpoints,
TensorBoard, artifact, ``metrics.json``, ``.hydra/`` with ``data.fold=i`` so a fold can be re-run alone).
Fold ``i`` trains on the other folds of train+val pooled and validates on fold ``i``
(:func:`ftlab.data.folds.stratified_fold`); the test split is the same for every fold. The parent
``metrics.json`` holds the mean and sample standard deviation (``<metric>_std``) of every val/test
metric over the folds, and the per-fold values. A fold that fails is recorded with its number and
the remaining folds still run; the run then ends with an error naming the failed folds.
"""

from __future__ import annotations

import copy
import logging
import statistics
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.errors import UserError, user_message
from ftlab.fileio import write_json
from ftlab.train import run

log = logging.getLogger(__name__)

# Copied from the first completed fold: they are the same in every fold.
SHARED_KEYS = ("method", "model", "data", "num_classes", "params_total", "params_trainable",
               "params_trainable_pct", "weight_source", "test_on_val", "artifact", "artifact_bytes")


def fold_config(cfg: DictConfig, fold: int, fold_dir: Path) -> DictConfig:
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.data.fold = fold
        fold_cfg.paths.output_dir = str(fold_dir)
    return fold_cfg


def _save_fold_hydra(fold_cfg: DictConfig, fold: int, fold_dir: Path) -> None:
    """``fold_i/.hydra/``: the fold's config and overrides, so ``python -m ftlab <overrides>`` re-runs it."""
    hydra_dir = fold_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(fold_cfg, hydra_dir / "config.yaml")
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("data.fold=")] + [f"data.fold={fold}"]
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")


def _one_line(exc: BaseException) -> str:
    return " ".join((user_message(exc) or f"{type(exc).__name__}: {exc}").split())


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of every numeric ``val/*`` and ``test/*`` metric."""
    out: dict[str, Any] = {}
    keys = dict.fromkeys(k for r in results for k in r if k.startswith(("val/", "test/")))
    for key in keys:
        values = [float(r[key]) for r in results if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def run_folds(cfg: DictConfig) -> dict[str, Any]:
    """Run every fold of ``cfg.data.folds``; write and return the parent's ``metrics.json``."""
    folds = cfg.data.folds
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise UserError(f"data.folds={folds!r}: must be null or an integer >= 2")
    if cfg.data.get("fold") is not None:
        raise UserError(f"data.fold={cfg.data.fold}: runs one fold alone; drop it to cross-validate all {folds}")
    parent = Path(cfg.paths.output_dir)
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    for fold in range(folds):
        fold_dir = parent / f"fold_{fold}"
        fold_cfg = fold_config(cfg, fold, fold_dir)
        _save_fold_hydra(fold_cfg, fold, fold_dir)
        log.info("cross-validation: fold %d of %d in %s", fold, folds, fold_dir)
        try:
            metrics = run(fold_cfg)
        except Exception as exc:  # record it with the fold number; the other folds still run
            message = _one_line(exc)
            if isinstance(exc, UserError):
                log.error("fold %d of %d failed: %s", fold, folds, message)
            else:
                log.exception("fold %d of %d failed", fold, folds)
            failed.append({"fold": fold, "error": message, "output_dir": str(fold_dir)})
            errors.append(exc)
            continue
        results.append({"fold": fold, **metrics})

    if not results:
        summary = "; ".join(f"fold {f['fold']}: {f['error']}" for f in failed)
        if all(isinstance(e, UserError) for e in errors):
            raise UserError(f"cross-validation: every fold failed ({summary})")
        raise RuntimeError(f"cross-validation: every fold failed ({summary})") from errors[0]

    first = results[0]
    parent_metrics: dict[str, Any] = {
        **{k: first.get(k) for k in SHARED_KEYS if k in first},
        "folds": folds,
        "folds_completed": [r["fold"] for r in results],
        "folds_failed": failed,
        **aggregate(results),
        "fit_seconds": round(sum(r.get("fit_seconds") or 0.0 for r in results), 2),
        "peak_rss_mb": max(r.get("peak_rss_mb") or 0.0 for r in results),
        "epochs": first.get("epochs"),
        "fold_metrics": [
            {k: v for k, v in r.items() if k == "fold" or k.startswith(("val/", "test/"))
             or k in ("split_sizes", "fit_seconds", "epochs", "output_dir")}
            for r in results
        ],
        "output_dir": str(parent),
    }
    write_json(parent / "metrics.json", parent_metrics)
    _print_folds(parent_metrics)
    if failed:
        summary = "; ".join(f"fold {f['fold']}: {f['error']}" for f in failed)
        message = (f"cross-validation: {len(failed)} of {folds} folds failed ({summary}); "
                   f"metrics.json averages folds {', '.join(str(r['fold']) for r in results)}")
        if all(isinstance(e, UserError) for e in errors):
            raise UserError(message)
        raise RuntimeError(message) from errors[0]
    return parent_metrics


def _print_folds(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in ("val/acc_best", "test/acc", "test/f1", "test/acc_top5") if k in metrics]
    table = Table(title=f"ftlab: {metrics.get('method')} on {metrics.get('model')}, "
                        f"{metrics['folds']}-fold cross-validation")
    table.add_column("fold", no_wrap=True)
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for fold in metrics["fold_metrics"]:
        table.add_row(str(fold["fold"]), *(f"{fold.get(k, float('nan')):.4f}" for k in keys))
    for failure in metrics["folds_failed"]:
        table.add_row(str(failure["fold"]), *(["failed"] * len(keys)))

    def mean_std(key: str) -> str:
        std = metrics.get(f"{key}_std")
        return f"{metrics[key]:.4f} ± {std:.4f}" if std is not None else f"{metrics[key]:.4f}"

    table.add_row("mean ± std", *(mean_std(k) for k in keys))
    Console().print(table)
    print(f"metrics: {Path(metrics['output_dir']) / 'metrics.json'}")
