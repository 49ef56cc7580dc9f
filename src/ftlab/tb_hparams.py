"""Log each run's hyper-parameters with its final metrics, so runs line up in TensorBoard's HParams tab.

Lightning logs the module's hparams when fitting starts, but without metrics (``default_hp_metric:
false``), which TensorBoard does not show as a session. This writes one session per run once the
final numbers exist, as the three summaries of TensorBoard's hparams plugin (experiment, session start,
session end), written here rather than by ``TensorBoardLogger.log_hyperparams`` for two reasons:

* **Columns.** TensorBoard (checked with 2.21) lists the hparams with ``differs`` set first, each group
  sorted by name, and the HParams tab shows only the first 5 of them (and the first 5 metrics, in the
  summary's order) until the user ticks more; the hparams' order in the summary is ignored. With several
  runs in one logdir, the columns are those of one run's experiment summary (the first found). So the keys a user varies are the ones marked
  ``differs``: the keys swept in a multirun (comma lists, ``range``/``choice``/``interval``, the
  sweeper's ``params``), or on a single run the keys overridden on its command line; then ``method``
  and ``model``, topped up from :data:`HEADLINE` to at least 5. Everything else follows, and keys whose
  value is null are left out.
* **No one-point charts.** The metric columns point at scalars training already logs (``val/acc_best``,
  ``test/acc``, ...; the table shows their last value), not at copies that would each be a chart of
  one point in the Scalars and Time Series tabs. Run facts with no curve of their own (fit_seconds,
  params_trainable, artifact_bytes, ...) are hparam columns instead, numbers that sort, filter and plot
  in the table, parallel-coordinates and scatter views like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Metric columns, in this order (TensorBoard shows the first 5): scalar tags the run logs during training.
METRIC_TAGS = ("val/acc_best", "test/acc", "test/f1", "val/acc", "test/acc_top5", "val/f1", "test/loss")
# Numbers about the run that have no curve: hparam columns (see the module docstring).
RUN_FACTS = ("fit_seconds", "params_trainable", "params_trainable_pct", "artifact_bytes", "peak_rss_mb")
# The keys a user most often varies, in order of interest: fill the leading columns when few keys varied.
HEADLINE = ("method", "model", "model.lr", "model.rank", "model.alpha", "model.weight_decay", "trainer.max_epochs",
            "data.batch_size", "seed")
# TensorBoard's HParams table shows this many hparam columns until more are ticked.
SHOWN = 5
DATA_KEYS = ("augment", "batch_size", "image_size", "crop_pct", "hflip", "val_fraction", "folds", "fold")
TRAINER_KEYS = ("max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val")
# Override keys shown under another name: `model=timm` and `model.name=x` both change the `model` column.
ALIASES = {"model.name": "model"}
# Overrides that change where and how a run is logged or resumed, not what it trains: never columns.
NOT_HPARAMS = ("logger", "paths", "hparams_search", "ckpt_path", "optimized_metric", "task_name")


def _plain(value: Any) -> bool | int | float | str | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return str(value)


def _hydra(cfg: DictConfig) -> DictConfig | None:
    """The run's Hydra config: ``cfg.hydra`` when composed with it, else the live HydraConfig, else None."""
    if "hydra" in cfg:
        return cfg.hydra
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _override_keys(overrides: Sequence[str], sweeps_only: bool = False) -> list[str]:
    """Config keys set by command-line ``overrides`` (``+``/``++`` stripped, deletions skipped); with
    ``sweeps_only``, only those with several values (``a,b``, ``range(...)``, ``choice(...)``, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for text in overrides:
        try:
            (override,) = OverridesParser.create().parse_overrides([str(text)])
        except Exception:  # accepted by Hydra's launcher but not parsed here: skip it
            continue
        if not override.is_delete() and (override.is_sweep_override() or not sweeps_only):
            keys.append(override.key_or_group)
    return keys


def _swept_keys(hydra_cfg: DictConfig, overridden: list[str]) -> list[str]:
    """The keys a multirun sweeps: those with several values in the sweep's own overrides (which Hydra's
    basic sweeper saves in ``<sweep dir>/multirun.yaml``; where that file is missing, as under the Optuna
    sweeper, all of the job's ``overridden`` keys) and the sweeper's ``params`` (the Optuna presets' search
    space). Empty for a single run."""
    if str(OmegaConf.select(hydra_cfg, "mode", default=None)) != "RunMode.MULTIRUN":
        return []
    try:
        sweep = OmegaConf.load(Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml")
        keys = _override_keys(list(sweep.hydra.overrides.task), sweeps_only=True)
    except Exception:  # not written by this sweeper, or not readable
        keys = list(overridden)
    return keys + [str(k) for k in (OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {})]


def varied_keys(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """``(varied, overridden)``: the keys this run varies (swept in its multirun, else overridden on its
    command line, plus ``data.fold`` for a cross-validation fold) and all keys its command line set."""
    hydra_cfg = _hydra(cfg)
    overridden: list[str] = []
    swept: list[str] = []
    if hydra_cfg is not None:
        overridden = _override_keys(list(OmegaConf.select(hydra_cfg, "overrides.task", default=None) or []))
        swept = _swept_keys(hydra_cfg, overridden)
    varied = swept or list(overridden)
    if OmegaConf.select(cfg, "data.fold", default=None) is not None:
        varied.append("data.fold")
    return _columns(varied), _columns(overridden)


def _dedupe(keys: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def _columns(keys: Iterable[str]) -> list[str]:
    return _dedupe(ALIASES.get(k, k) for k in keys if k.split(".", 1)[0] not in NOT_HPARAMS)


def _value(cfg: DictConfig, key: str) -> Any:
    """``key``'s value in ``cfg``, or for a config group (``data=imagefolder``) the option chosen."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # an interpolation that does not resolve here
        return None
    if value is None or isinstance(value, DictConfig):
        hydra_cfg = _hydra(cfg)
        choice = OmegaConf.select(hydra_cfg, f"runtime.choices.{key}", default=None) if hydra_cfg is not None else None
        value = choice if choice is not None else value
    return value


def run_hparams(cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat, TensorBoard-friendly hyper-parameters of a run, the keys a user varies first.

    Method, model keys, data and trainer knobs, every key set on the command line, and the run facts of
    :data:`RUN_FACTS`; null values are dropped. Order: :func:`varied_keys`, :data:`HEADLINE`, the other
    overridden keys, the rest, the run facts.
    """
    params: dict[str, Any] = {"method": metrics.get("method"), "model": metrics.get("model"), "seed": cfg.get("seed")}
    model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    for key, value in (model or {}).items():
        if key == "_target_" or f"model.{key}" in ALIASES:
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

    varied, overridden = varied_keys(cfg)
    for key in _dedupe([*varied, *overridden]):
        if key in params:
            continue
        # Set on the command line but not logged above: data.num_workers, a callback's setting, a group.
        params[key] = _value(cfg, key)
    for key in RUN_FACTS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            params[key] = value

    params = {k: _plain(v) for k, v in params.items()}
    order = _dedupe([*varied, *HEADLINE, *overridden, *params])
    return {k: params[k] for k in order if params.get(k) is not None}


def leading_keys(cfg: DictConfig, hparams: dict[str, Any]) -> list[str]:
    """The hparams marked ``differs`` (TensorBoard's leading columns): the varied keys, method and model,
    then :data:`HEADLINE` keys until there are :data:`SHOWN`."""
    varied, _ = varied_keys(cfg)
    lead = [k for k in _dedupe([*varied, "method", "model"]) if k in hparams]
    for key in HEADLINE:
        if len(lead) >= SHOWN:
            break
        if key in hparams and key not in lead:
            lead.append(key)
    return lead


def metric_tags(metrics: dict[str, Any]) -> list[str]:
    """The metric columns: the tags of :data:`METRIC_TAGS` this run produced."""
    return [k for k in METRIC_TAGS
            if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)]


def hparams_summaries(hparams: dict[str, Any], metrics: Sequence[str], leading: Iterable[str] = (),
                      start_time: float | None = None) -> list[Any]:
    """The hparams plugin's experiment, session-start and session-end summaries, in that order.

    Like ``torch.utils.tensorboard.summary.hparams``, plus ``differs`` on the ``leading`` keys and
    booleans kept as booleans (torch writes them as numbers).
    """
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
        data.version = metadata.PLUGIN_DATA_VERSION
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
        return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])

    leading = set(leading)
    now = time.time()
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=now if start_time is None else start_time)
    infos = []
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
            kind = api_pb2.DATA_TYPE_BOOL
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = float(value)
            kind = api_pb2.DATA_TYPE_FLOAT64
        else:
            start.hparams[name].string_value = str(value)
            kind = api_pb2.DATA_TYPE_STRING
        infos.append(api_pb2.HParamInfo(name=name, type=kind, differs=name in leading))
    experiment = api_pb2.Experiment(
        hparam_infos=infos, metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics])
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=now)
    return [summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
            summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
            summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))]


def log_hparams(loggers: Iterable[Any], cfg: DictConfig, metrics: dict[str, Any], step: int = 0) -> None:
    """Write the HParams session to every TensorBoard logger (others are left alone)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    hparams = run_hparams(cfg, metrics)
    fit_seconds = metrics.get("fit_seconds")
    start = time.time() - fit_seconds if isinstance(fit_seconds, (int, float)) else None
    summaries = hparams_summaries(hparams, metric_tags(metrics), leading_keys(cfg, hparams), start_time=start)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment._get_file_writer()
            for summary in summaries:
                writer.add_summary(summary, step)
            # Fitting and testing already finalised the logger; close the writer this reopened.
            logger.finalize("success")
