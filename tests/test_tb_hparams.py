"""TensorBoard's HParams tab as a user opens it: which columns lead, and no one-point charts.

TensorBoard lists the hparams marked ``differs`` first (each group by name) and shows the first 5 hparam and
5 metric columns until more are ticked; these tests check what ftlab writes against that behaviour. The
end-to-end check (a real run's event file) is ``test_experiments.py::test_tensorboard_gets_hparams_...``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf, open_dict, read_write

from ftlab.tb_hparams import HEADLINE, hparams_summaries, leading_keys, metric_tags, run_hparams

FINAL = {"method": "linear", "model": "tf_efficientnet_lite0", "val/acc_best": 0.9, "val/acc": 0.88,
         "test/acc": 0.87, "test/f1": 0.86, "fit_seconds": 12.5, "params_trainable": 12810,
         "params_trainable_pct": 0.38, "artifact_bytes": 51600, "peak_rss_mb": 1200.0, "epochs": 3}


def _as_tensorboard_lists_them(hparams: dict, leading: list[str]) -> list[str]:
    """The column order TensorBoard's HParams tab shows for the experiment summary ftlab writes."""
    from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

    experiment_summary = hparams_summaries(hparams, [], leading)[0]
    content = experiment_summary.value[0].metadata.plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    backend_context._sort_and_reduce_to_hparams_limit(experiment)  # what the plugin's /experiment returns
    return [h.name for h in experiment.hparam_infos]


def _as_multirun_job(cfg, sweep_dir: Path, sweep_overrides: list[str] | None, job_overrides: list[str]) -> None:
    """Make ``cfg`` look like one job of ``python -m ftlab -m <sweep_overrides>`` as Hydra records it (the
    basic sweeper saves the sweep's overrides in multirun.yaml; the Optuna sweeper does not: None)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if sweep_overrides is not None:
        multirun = OmegaConf.create({"hydra": {"overrides": {"task": sweep_overrides}}})
        OmegaConf.save(multirun, sweep_dir / "multirun.yaml")
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.overrides.task = job_overrides


def test_a_run_without_overrides_leads_with_the_headline_keys(compose_cfg) -> None:
    cfg = compose_cfg([])  # the default experiment: LoRA on EfficientNet-Lite0
    hparams = run_hparams(cfg, {**FINAL, "method": "lora"})
    leading = leading_keys(cfg, hparams)
    assert leading == ["method", "model", "model.lr", "model.rank", "model.alpha"]
    assert list(hparams)[:len(HEADLINE)] == list(HEADLINE)
    assert _as_tensorboard_lists_them(hparams, leading)[:5] == sorted(leading)
    # Null values are no columns (they were `data.fold: null` ... before); run facts are numbers.
    assert None not in hparams.values() and "null" not in hparams.values()
    assert "data.fold" not in hparams and "model.weights" not in hparams
    assert hparams["fit_seconds"] == 12.5 and hparams["params_trainable"] == 12810
    assert "epochs" not in hparams and "model.name" not in hparams  # `model` is the name already


def test_a_multirun_leads_with_the_swept_keys_not_the_fixed_ones(compose_cfg, tmp_path: Path) -> None:
    job = ["method=linear", "model.lr=0.001", "data.batch_size=8", "data.num_workers=0"]
    cfg = compose_cfg(job)
    _as_multirun_job(cfg, tmp_path / "sweep",
                     ["method=linear,bitfit", "model.lr=1e-3,3e-3", "data.batch_size=8", "data.num_workers=0"], job)
    hparams = run_hparams(cfg, FINAL)
    leading = leading_keys(cfg, hparams)
    # The swept keys, method and model, then headline keys up to the 5 columns TensorBoard shows.
    assert leading == ["method", "model.lr", "model", "model.weight_decay", "trainer.max_epochs"]
    assert list(hparams)[:2] == ["method", "model.lr"]
    shown = _as_tensorboard_lists_them(hparams, leading)[:5]
    assert {"method", "model.lr"} <= set(shown) and "data.batch_size" not in shown
    # A key set on the command line that is not a standard column still is one.
    assert hparams["data.num_workers"] == 0 and hparams["data.batch_size"] == 8


def test_an_optuna_search_leads_with_its_search_space(compose_cfg, tmp_path: Path) -> None:
    # python -m ftlab hparams_search=optuna method=lora 'model.rank=choice(4,8,16)': one trial's overrides.
    job = ["hparams_search=optuna", "method=lora", "model.rank=8", "model.lr=0.002", "model.weight_decay=0.01"]
    cfg = compose_cfg(job)
    _as_multirun_job(cfg, tmp_path / "sweep", None, job)
    hparams = run_hparams(cfg, {**FINAL, "method": "lora"})
    leading = leading_keys(cfg, hparams)
    assert set(OmegaConf.to_container(cfg.hydra.sweeper.params)) == {"model.lr", "model.weight_decay"}
    assert leading == ["method", "model.rank", "model.lr", "model.weight_decay", "model"]
    assert "hparams_search" not in hparams  # how a run was launched is no column


def test_a_cross_validation_fold_leads_with_its_fold(compose_cfg) -> None:
    cfg = compose_cfg(["data.folds=3", "method=linear"])
    with open_dict(cfg):
        cfg.data.fold = 2
    hparams = run_hparams(cfg, FINAL)
    assert hparams["data.fold"] == 2 and "data.fold" in leading_keys(cfg, hparams)


def test_metric_columns_point_at_logged_curves_and_booleans_stay_booleans() -> None:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    assert metric_tags(FINAL) == ["val/acc_best", "test/acc", "test/f1", "val/acc"]
    experiment, start, end = (plugin_data_pb2.HParamsPluginData.FromString(s.value[0].metadata.plugin_data.content)
                              for s in hparams_summaries({"method": "lora", "model.rslora": False, "seed": 1},
                                                         metric_tags(FINAL), ["method"]))
    assert [m.name.tag for m in experiment.experiment.metric_infos] == metric_tags(FINAL)
    types = {h.name: (h.type, h.differs) for h in experiment.experiment.hparam_infos}
    assert types == {"method": (api_pb2.DATA_TYPE_STRING, True), "model.rslora": (api_pb2.DATA_TYPE_BOOL, False),
                     "seed": (api_pb2.DATA_TYPE_FLOAT64, False)}
    assert start.session_start_info.hparams["model.rslora"].bool_value is False
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS

