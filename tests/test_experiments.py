"""Experiments: sweep summaries, the report tool, Optuna search, cross-validation, TensorBoard comparison."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ftlab.errors import UserError
from helpers import FAST_TRAINER, TINY_MODEL, fake_run, make_imagefolder

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]


def _tiny(root: Path, *extra: str) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=8", *TINY_MODEL, *FAST_TRAINER, *QUIET, *extra]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _sweep_dir(outputs: Path) -> Path:
    sweeps = sorted((outputs / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


# -- sweeps through the real command line --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.cli
def test_two_method_multirun_writes_the_summary(cli, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=8, splits=("train", "test"))
    proc = cli("-m", "method=full,linear", *_tiny(root, "logger=none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _sweep_dir(tmp_path / "outputs")
    rows = _csv(sweep / "summary.csv")
    assert [r["method"] for r in rows] == ["full", "linear"]
    assert all(r["status"] == "ok" and r["model"] == "test_resnet" for r in rows)
    for row in rows:
        saved = json.loads((Path(row["path"]) / "metrics.json").read_text())
        assert float(row["test/acc"]) == pytest.approx(saved["test/acc"])
        assert int(row["params_trainable"]) == saved["params_trainable"]
        assert float(row["fit_seconds"]) > 0 and float(row["peak_rss_mb"]) > 0 and int(row["artifact_bytes"]) > 0
    full, linear = rows
    assert int(full["params_trainable"]) > 100 * int(linear["params_trainable"])
    assert float(full["params_trainable_pct"]) == pytest.approx(100.0)
    # Only the method differs, and it has its own column.
    assert full["overrides"] == linear["overrides"] == ""
    md = (sweep / "summary.md").read_text()
    assert "| 1 | 0_full_test_resnet | full |" in md and "| 2 | 1_linear_test_resnet | linear |" in md
    assert "Best by val/acc_best" in md
    width, height = _png_size(sweep / "summary.png")
    assert width >= 1000 and height >= 400
    assert "summary: " in proc.stdout


@pytest.mark.slow
@pytest.mark.cli
def test_optuna_search_survives_a_failing_trial_and_saves_the_best(cli, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=8, splits=("train", "test"))
    # With the preset's sampler seed (42) the draws are fixed: trial 0 gets label smoothing 0.0, trials 1
    # and 2 get the impossible 1.5 and fail in validation, which must not end the search.
    proc = cli("hparams_search=optuna", "hydra.sweeper.n_trials=3", "method=linear",
               "model.label_smoothing=choice(0.0,1.5)", *_tiny(root, "logger=none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = _sweep_dir(tmp_path / "outputs")
    rows = _csv(sweep / "summary.csv")
    assert len(rows) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert ok and failed and len(ok) + len(failed) == 3
    assert all("model.label_smoothing=1.5" in r["error"] for r in failed)
    assert all("model.lr=" in r["overrides"] and "model.weight_decay=" in r["overrides"] for r in rows)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"model.lr", "model.weight_decay", "model.label_smoothing"}
    assert result["best_params"]["model.label_smoothing"] == 0.0
    # The objective is the validation metric, never a test metric.
    best_val = max(float(r["val/acc_best"]) for r in ok)
    assert result["best_value"] == pytest.approx(best_val)
    assert "Best parameters" in proc.stdout + proc.stderr
    assert "Optuna best" in (sweep / "summary.md").read_text()


# -- the report tool -------------------------------------------------------------------------------
def _metrics(method: str, acc: float, trainable: int, seconds: float, **extra: object) -> dict:
    return {"method": method, "model": "tiny", "params_total": 1000, "params_trainable": trainable,
            "params_trainable_pct": 100.0 * trainable / 1000, "val/acc_best": acc + 0.01, "test/acc": acc,
            "test/f1": acc - 0.05, "fit_seconds": seconds, "peak_rss_mb": 900.0, "artifact_bytes": 4 * trainable,
            **extra}


def test_report_lists_broken_runs_and_rebuilds_the_summary(tmp_path: Path, capsys) -> None:
    from ftlab.report import main

    sweep = tmp_path / "sweep"
    fake_run(sweep / "0_full_tiny", ["method=full", "model.lr=0.01", "data=imagefolder"],
              _metrics("full", 0.90, 1000, 30.0))
    fake_run(sweep / "1_lora_tiny", ["method=lora", "model.lr=0.1", "data=imagefolder"],
              _metrics("lora", 0.95, 40, 20.0, **{"test/acc_std": 0.01, "folds": 3}))
    fake_run(sweep / "2_lora_tiny", ["method=lora", "model.lr=-1", "data=imagefolder"],
              error="model.lr=-1: must be > 0")
    fake_run(sweep / "3_ssf_tiny", ["method=ssf", "model.lr=0.1", "data=imagefolder"])  # killed: nothing written
    broken = fake_run(sweep / "10_bitfit_tiny", ["method=bitfit", "model.lr=0.1", "data=imagefolder"])
    (broken / "metrics.json").write_text('{"method": "bitf')
    (sweep / "0_full_tiny" / "tensorboard").mkdir()  # not a run

    assert main([str(sweep)]) == 0
    rows = _csv(sweep / "summary.csv")
    # Job order, not string order (10 after 3); every run is a row, whatever became of it.
    assert [r["run"] for r in rows] == ["0_full_tiny", "1_lora_tiny", "2_lora_tiny", "3_ssf_tiny", "10_bitfit_tiny"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "incomplete", "failed"]
    assert rows[2]["error"] == "model.lr=-1: must be > 0"
    assert "no metrics.json" in rows[3]["error"] and "unreadable metrics.json" in rows[4]["error"]
    # data=imagefolder is common to all runs; model.lr differs.
    assert [r["overrides"] for r in rows] == ["model.lr=0.01", "model.lr=0.1", "model.lr=-1", "model.lr=0.1",
                                             "model.lr=0.1"]
    md = (sweep / "summary.md").read_text()
    assert "0.9500 ± 0.0100" in md
    assert "3 of 5 runs have no results" in md and "2_lora_tiny (failed: model.lr=-1: must be > 0)" in md
    assert "**1_lora_tiny**" in md  # best by val/acc_best
    assert _png_size(sweep / "summary.png")[0] >= 1000
    assert "3_ssf_tiny" in capsys.readouterr().out


def test_report_on_a_folder_without_runs_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from ftlab.report import main

    assert main([str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.strip() == f"ftlab: error: {tmp_path / 'missing'}: no such directory"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "no run directories" in capsys.readouterr().err

    # Several folders make one table; the output folder must then be named.
    for name, acc in (("a", 0.8), ("b", 0.9)):
        fake_run(tmp_path / name / "run", ["method=full"], _metrics("full", acc, 1000, 1.0))
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "--out" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")]) == 0
    assert [r["test/acc"] for r in _csv(tmp_path / "both" / "summary.csv")] == ["0.8", "0.9"]


# -- cross-validation ------------------------------------------------------------------------------
def test_stratified_folds_partition_the_pool_by_class() -> None:
    from ftlab.data.folds import stratified_fold

    pool = [(f"img{i:02d}.png", i % 3) for i in range(36)]
    vals = [stratified_fold(pool, 3, k, seed=7)[1] for k in range(3)]
    assert sorted(s for v in vals for s in v) == sorted(pool)  # disjoint, and together everything
    assert all(sorted(y for _, y in v) == [0] * 4 + [1] * 4 + [2] * 4 for v in vals)
    train, val = stratified_fold(list(reversed(pool)), 3, 1, seed=7)
    assert val == vals[1] and set(train) == set(pool) - set(val)  # input order does not matter
    with pytest.raises(UserError, match="class '2' has 2 image"):
        stratified_fold(pool[:8], 3, 0, seed=7)


def test_three_fold_cross_validation(compose_cfg, tmp_path: Path) -> None:
    from ftlab.crossval import run_folds
    from ftlab.report import write_summary

    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    cfg = compose_cfg(_tiny(root, "method=linear", "data.folds=3", "logger=none", "save_artifacts=false"))
    parent = Path(cfg.paths.output_dir)
    metrics = run_folds(cfg)
    folds = [json.loads((parent / f"fold_{i}" / "metrics.json").read_text()) for i in range(3)]
    # Train+val (18 images) pooled: each fold validates on a different third, tests on the same test/.
    assert [f["split_sizes"] for f in folds] == [{"train": 12, "val": 6, "test": 18}] * 3
    for i in range(3):
        assert "data.fold=" + str(i) in (parent / f"fold_{i}" / ".hydra" / "overrides.yaml").read_text()
    saved = json.loads((parent / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["folds"] == 3 and saved["folds_completed"] == [0, 1, 2] and saved["folds_failed"] == []
    for key in ("val/acc_best", "test/acc", "test/f1"):
        values = [f[key] for f in folds]
        assert saved[key] == pytest.approx(statistics.fmean(values))
        assert saved[f"{key}_std"] == pytest.approx(statistics.stdev(values))
        assert [f[key] for f in saved["fold_metrics"]] == values
    assert saved["fit_seconds"] == pytest.approx(sum(f["fit_seconds"] for f in folds), abs=0.05)
    rows, text = write_summary(parent)
    assert len(rows) == 1 and "±" in text  # the folds are one row, not four


def test_a_failing_fold_is_reported_with_its_number(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    import ftlab.crossval as crossval

    def fake_run(cfg):
        if cfg.data.fold == 1:
            raise FloatingPointError("loss is nan")
        return {"method": "linear", "model": "m", "val/acc_best": 0.5 + cfg.data.fold / 10, "test/acc": 0.5,
                "fit_seconds": 1.0, "peak_rss_mb": 10.0, "params_trainable": 1, "params_total": 2}

    monkeypatch.setattr(crossval, "run", fake_run)
    root = make_imagefolder(tmp_path / "imgs", per_class=3)
    cfg = compose_cfg(_tiny(root, "data.folds=3"))
    with pytest.raises(RuntimeError, match=r"1 of 3 folds failed \(fold 1: FloatingPointError: loss is nan\)"):
        crossval.run_folds(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert saved["folds_completed"] == [0, 2] and saved["folds_failed"][0]["fold"] == 1
    assert saved["val/acc_best"] == pytest.approx(0.6)


# -- TensorBoard -----------------------------------------------------------------------------------
def test_tensorboard_gets_hparams_confusion_matrix_and_worst_images(compose_cfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from ftlab.train import run

    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    cfg = compose_cfg(_tiny(root, "method=linear", "model.lr=0.003", "model.head_dropout=0.2",
                            "save_artifacts=false"))
    metrics = run(cfg)
    acc = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"test/confusion_matrix", "test/per_class_accuracy", "test/worst_misclassified"} <= set(tags["images"])
    assert {"test_per_class/acc_cat", "test_per_class/acc_dog", "test_per_class/acc_fox"} <= set(tags["scalars"])
    # No copies of the final numbers: each would be a chart of one point in the Scalars/Time Series tabs.
    assert not [t for t in tags["scalars"] if t.startswith("hp/")]

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["method"].string_value == "linear"
    assert hparams["model.lr"].number_value == pytest.approx(0.003)
    assert hparams["model.head_dropout"].number_value == pytest.approx(0.2)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    # The metric columns are the curves training logged; the HParams table shows their last value.
    columns = [m.name.tag for m in experiment.metric_infos]
    assert columns[:3] == ["val/acc_best", "test/acc", "test/f1"]
    for tag in columns:
        assert acc.Scalars(tag)[-1].value == pytest.approx(metrics[tag])
    # Numbers without a curve are hparam columns; null values are left out.
    assert hparams["fit_seconds"].number_value == pytest.approx(metrics["fit_seconds"])
    assert hparams["params_trainable"].number_value == metrics["params_trainable"]
    assert "data.fold" not in hparams and "model.weights" not in hparams
    # The keys set on the command line lead: TensorBoard lists the hparams marked `differs` first.
    names = [h.name for h in experiment.hparam_infos]
    leading = [h.name for h in experiment.hparam_infos if h.differs]
    assert {"method", "model", "model.lr", "model.head_dropout"} <= set(leading)
    assert names[: len(leading)] == leading and "data.augment" not in leading

    # The confusion matrix is drawn from every test image: 18 of them.
    image = acc.Images("test/confusion_matrix")[-1]
    assert image.width > 200 and image.height > 200


# -- regularisation knob ---------------------------------------------------------------------------
def test_head_dropout_replaces_the_backbones_own() -> None:
    import torch
    from torch import nn

    from ftlab.models.head_dropout import set_head_dropout
    from ftlab.module import ClassifierModule

    module = ClassifierModule(num_classes=3, source="timm", name="test_resnet", pretrained=False, head_dropout=0.5)
    assert module.net.drop_rate == 0.0
    seen: list[torch.Tensor] = []
    module.net.fc.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(8, 3, 32, 32)
    module.eval()
    module(x)
    module.net.fc.train()  # the backbone stays in eval mode: only the head's dropout differs
    module(x)
    plain, dropped = seen
    live = plain != 0
    kept = dropped[live] != 0
    assert 0.35 < 1 - kept.float().mean().item() < 0.65
    assert torch.allclose(dropped[live][kept], 2 * plain[live][kept])  # inverted dropout: scaled by 1/(1-p)
    module.net.fc.eval()
    module(x)
    assert torch.equal(seen[-1], plain)

    # torchvision style: Sequential(Dropout, Linear). The sibling dropout is switched off, not stacked.
    net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 2)))
    assert set_head_dropout(net, "1.1", 0.1) == ["1.0"] and net[1][0].p == 0.0


def test_compare_and_search_presets_compose(compose_cfg) -> None:
    cfg = compose_cfg(["experiment=compare"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.method.split(",") == ["full", "linear", "bitfit", "partial", "ssf", "lora", "dora"]
    for preset, sampler in (("optuna", "TPESampler"), ("random", "RandomSampler")):
        cfg = compose_cfg([f"hparams_search={preset}"])
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.hydra.sweeper.sampler._target_.endswith(sampler)
        assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc_best"
        assert cfg.hydra.sweeper.max_failure_rate == 1.0
        assert {"model.lr", "model.weight_decay"} <= set(cfg.hydra.sweeper.params)
