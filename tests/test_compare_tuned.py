"""experiment=compare_tuned and seed grouping: the statistics, the recommendation lines, the key checks, and a
toy-size comparison end to end (2 methods, 2 trials, 2 seeds, 1 epoch of a few steps)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from ftlab.errors import UserError
from helpers import FAST_TRAINER, TINY_MODEL, fake_run, make_imagefolder

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=none"]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


# -- statistics ------------------------------------------------------------------------------------
def test_interval_is_students_t() -> None:
    from ftlab.seeds import interval

    stats = interval([0.90, 0.92, 0.94])
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.92) and stats["std"] == pytest.approx(0.02)
    # t(0.975, 2) = 4.3027: the half-width is 4.3027 * 0.02 / sqrt(3), much wider than a normal 1.96 would give.
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert stats["ci95_low"] == pytest.approx(0.92 - half, abs=1e-6)
    assert stats["ci95_high"] == pytest.approx(0.92 + half, abs=1e-6)
    one = interval([0.5])
    assert one["mean"] == 0.5 and one["std"] is None and one["ci95_low"] is None


def _metrics(method: str, acc: float, seconds: float, rss: float = 900.0) -> dict:
    return {"method": method, "model": "tiny", "params_total": 1000, "params_trainable": 40,
            "params_trainable_pct": 4.0, "val/acc_best": acc + 0.01, "test/acc": acc, "test/f1": acc - 0.05,
            "fit_seconds": seconds, "peak_rss_mb": rss, "artifact_bytes": 160}


def test_runs_that_differ_only_by_seed_are_one_row(tmp_path: Path) -> None:
    from ftlab.report import write_summary

    sweep = tmp_path / "sweep"
    accs = {"lora": [0.80, 0.86, 0.83], "full": [0.90, 0.91]}
    job = 0
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(sweep / f"{job}_{method}_tiny", [f"method={method}", f"seed={seed}"],
                      _metrics(method, acc, 10.0 + seed, rss=900.0 + 10 * seed))
            job += 1
    fake_run(sweep / f"{job}_full_tiny", ["method=full", "seed=2"], error="boom")  # failed: its own row
    rows, text = write_summary(sweep)
    csv_rows = _csv(sweep / "summary.csv")
    assert [r["method"] for r in csv_rows] == ["lora", "full", "full"]
    assert [r["status"] for r in csv_rows] == ["ok", "ok", "failed"]
    lora, full, failed = csv_rows
    assert lora["n"] == "3" and lora["seeds"] == "0 1 2" and full["n"] == "2" and failed["n"] == ""
    for row, values in ((lora, accs["lora"]), (full, accs["full"])):
        assert float(row["test/acc"]) == pytest.approx(statistics.fmean(values))
        assert float(row["test/acc_std"]) == pytest.approx(statistics.stdev(values))
        assert float(row["val/acc_best"]) == pytest.approx(statistics.fmean(values) + 0.01)
        assert float(row["test/acc_ci95_low"]) < float(row["test/acc"]) < float(row["test/acc_ci95_high"])
    assert float(lora["fit_seconds"]) == pytest.approx(11.0) and float(lora["peak_rss_mb"]) == 920.0
    # The seed is the only difference inside a group, and the method has its own column.
    assert lora["overrides"] == "seed=0,1,2" and full["overrides"] == "seed=0,1"
    assert "0.8300 ± 0.0300" in text and "Student's t" in text
    assert "| 3 |" in text  # n


def test_runs_with_the_same_seed_are_not_merged(tmp_path: Path) -> None:
    from ftlab.report import write_summary

    for i, acc in enumerate((0.8, 0.9)):  # the same command twice: no seed override in either
        fake_run(tmp_path / "runs" / f"run{i}", ["method=lora"], _metrics("lora", acc, 1.0))
    fake_run(tmp_path / "runs" / "run2", ["method=lora", "model.lr=0.1", "seed=1"], _metrics("lora", 0.7, 1.0))
    rows, _ = write_summary(tmp_path / "runs")
    assert [r.get("test/acc") for r in rows] == [0.8, 0.9, 0.7]
    assert all(r.get("n") is None for r in rows)


# -- the recommendation lines ------------------------------------------------------------------------
def _row(method: str, acc: float | None, pct: float, seconds: float) -> dict:
    return {"method": method, "test/acc": acc, "test/acc_std": 0.01, "n": 3, "params_trainable_pct": pct,
            "fit_seconds": seconds}


def test_recommendations_pick_the_right_rows() -> None:
    from ftlab.compare_tuned import recommend

    table = [_row("full", 0.950, 100.0, 60.0), _row("lora", 0.945, 5.6, 30.0), _row("bitfit", 0.930, 0.99, 10.0),
             _row("linear", 0.900, 0.38, 5.0), _row("ssf", None, 1.6, 1.0)]  # ssf failed: never picked
    best, small, fast = recommend(table)
    assert best.startswith("Most accurate: full (test acc 0.9500 ± 0.0100 over 3 seeds)")
    assert small.startswith("Best under 1 % trainable parameters: bitfit (")
    # lora is 0.005 below full and twice as fast; bitfit (0.02 below) and linear are too far behind.
    assert fast.startswith("Fastest within one point of the best: lora (fit 30.0 s") and "0.0050 below full" in fast

    # Nothing under 1 %, and nothing within a point but the best itself.
    table = [_row("full", 0.95, 100.0, 60.0), _row("lora", 0.93, 5.6, 30.0)]
    best, small, fast = recommend(table)
    assert small == "Best under 1 % trainable parameters: none (every method trains 1 % of the parameters or more)."
    assert fast.startswith("Fastest within one point of the best: full") and "the most accurate too" in fast
    # Exactly one point behind still counts.
    _, _, fast = recommend([_row("full", 0.95, 100.0, 60.0), _row("lora", 0.94, 5.6, 30.0)])
    assert "lora" in fast
    assert all(line.endswith("none (no method finished).") for line in recommend([_row("ssf", None, 1.6, 1.0)]))


def test_pareto_front() -> None:
    from ftlab.compare_tuned import pareto_front

    # (cost, accuracy): the 2nd is beaten by the 1st (cheaper and better), the 4th by the 3rd.
    points = [(10.0, 0.9), (20.0, 0.85), (30.0, 0.95), (40.0, 0.95), (5.0, 0.5)]
    assert pareto_front(points) == [4, 0, 2]


# -- the keys ----------------------------------------------------------------------------------------
def test_compare_tuned_composes_with_a_space_per_method(compose_cfg) -> None:
    from ftlab.compare_tuned import check_tune

    cfg = compose_cfg(["experiment=compare_tuned"])
    tune = check_tune(cfg)
    assert tune["methods"] == ["full", "linear", "bitfit", "partial", "ssf", "lora", "dora"]
    assert tune["final_epochs"] == tune["epochs"] and tune["metric"] == "val/acc_best"
    for method in tune["methods"]:
        assert {"model.lr", "model.weight_decay"} <= set(tune["space"][method])
    assert {"model.rank", "model.alpha"} <= set(tune["space"]["lora"]) and "model.unfreeze_last" in tune["space"]["partial"]
    assert cfg.hydra.mode is None or cfg.hydra.mode.name == "RUN"  # one process runs the whole comparison


@pytest.mark.parametrize(("overrides", "message"), [
    (["tune.trials=0"], "tune.trials=0: must be a positive integer"),
    (["tune.metric=test/acc"], "tune.metric='test/acc': must be a validation metric"),
    (["tune.methods=[lora,lorra]"], "tune.methods: lorra: no such method"),
    (["tune.methods=[]"], "tune.methods=[]: must be a non-empty list"),
    (["tune.methods=[lora,gradual]", "~tune.space.gradual"], "tune.space.gradual: no search space for method=gradual"),
    (["tune.space.lora.model.rank=[]"], "tune.space.lora.model.rank=[]: must list at least one choice"),
    (["tune.space.full.model.lr.low=0.0"], "tune.space.full.model.lr: low=0.0: a log scale needs low > 0"),
    (["tune.space.full.model.weight_decay.high=-1"], "low=0.0, high=-1: must be numbers with low <= high"),
    (["+tune.space.full.model.weight_decay.lo=1"], "tune.space.full.model.weight_decay: unknown key(s) lo"),
])
def test_impossible_tune_values_are_one_line_errors(compose_cfg, overrides, message) -> None:
    from ftlab.compare_tuned import check_tune

    cfg = compose_cfg(["experiment=compare_tuned", *overrides])
    with pytest.raises(UserError) as info:
        check_tune(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_key_the_method_lacks_is_named_before_anything_trains(compose_cfg, tmp_path: Path) -> None:
    from ftlab.compare_tuned import run_comparison

    cfg = compose_cfg(["experiment=compare_tuned", "tune.methods=[linear]", "+tune.space.linear.model.rnk=[4,8]",
                       "model=timm", "model.name=test_resnet", "model.pretrained=false"])
    with pytest.raises(UserError, match=r"^tune.space.linear.model.rnk: method=linear has no key model.rnk$"):
        run_comparison(cfg)
    assert not list(Path(cfg.paths.output_dir).glob("linear/trial_*"))


# -- end to end, toy size ----------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_comparison_survives_a_failing_trial(compose_cfg, tmp_path: Path, monkeypatch, one_thread) -> None:
    import ftlab.train as train
    from ftlab.compare_tuned import run_comparison

    real_run = train.run

    def flaky_run(cfg, *args, **kwargs):
        if Path(cfg.paths.output_dir).parts[-2:] == ("lora", "trial_0"):
            raise RuntimeError("out of luck")
        return real_run(cfg, *args, **kwargs)

    monkeypatch.setattr(train, "run", flaky_run)
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    cfg = compose_cfg(["experiment=compare_tuned", "tune.methods=[linear,lora]", "tune.trials=2", "tune.epochs=1",
                       "tune.seeds=2", "tune.startup_trials=1", "data=imagefolder", f"data.root={root}",
                       "data.batch_size=8", *TINY_MODEL, *FAST_TRAINER, *QUIET, "trainer.limit_train_batches=2",
                       "save_artifacts=true"])
    out = Path(cfg.paths.output_dir)
    comparison = run_comparison(cfg)

    by_method = {r["method"]: r for r in comparison["results"]}
    assert list(by_method) == ["linear", "lora"]
    lora, linear = by_method["lora"], by_method["linear"]
    assert linear["status"] == "ok" and linear["trials_ok"] == 2
    # The failing trial is recorded, and lora still got its best trial retrained with both seeds.
    assert lora["status"] == "partial" and lora["trials_ok"] == 1
    assert lora["trial_errors"] == ["trial_0: RuntimeError: out of luck"]
    assert (out / "lora" / "trial_0" / "error.txt").read_text().strip() == "RuntimeError: out of luck"
    assert lora["best_trial"] == 1 and set(lora["best_params"]) == {"model.lr", "model.weight_decay", "model.rank",
                                                                     "model.alpha"}
    for result in (linear, lora):
        method_dir = out / result["method"]
        seeds = [json.loads((method_dir / f"seed_{s}" / "metrics.json").read_text()) for s in (43, 44)]
        assert result["seeds"] == [43, 44] and result["n"] == 2
        accs = [m["test/acc"] for m in seeds]
        assert result["test/acc"] == pytest.approx(statistics.fmean(accs))
        assert result["test/acc_std"] == pytest.approx(statistics.stdev(accs))
        assert result["fit_seconds"] == pytest.approx(statistics.fmean(m["fit_seconds"] for m in seeds), abs=0.01)
        assert result["peak_rss_mb"] == max(m["peak_rss_mb"] for m in seeds)
        # The seed runs used the best trial's values, and the search never saw a test metric.
        overrides = yaml.safe_load((method_dir / "seed_44" / ".hydra" / "overrides.yaml").read_text())
        for key, value in result["best_params"].items():
            assert f"{key}={value!r}" in overrides or f"{key}={value}" in overrides
        assert "seed=44" in overrides and "trainer.max_epochs=1" in overrides
        best_trial = json.loads((method_dir / f"trial_{result['best_trial']}" / "metrics.json").read_text())
        assert result["best_val"] == pytest.approx(best_trial["val/acc_best"])
        assert "test/acc" not in best_trial  # trials run with test=false
    # Each method's search tried its own keys.
    linear_trial = yaml.safe_load((out / "linear" / "trial_0" / ".hydra" / "overrides.yaml").read_text())
    assert not any(o.startswith("model.rank=") for o in linear_trial)
    assert any(o.startswith("method=linear") for o in linear_trial)

    rows = _csv(out / "summary.csv")
    assert [r["method"] for r in rows] == ["linear", "lora"]
    assert float(rows[1]["test/acc"]) == pytest.approx(lora["test/acc"]) and rows[1]["n"] == "2"
    md = (out / "summary.md").read_text()
    assert "Most accurate: " in md and "Best under 1 % trainable parameters: " in md
    assert "Fastest within one point of the best: " in md and "trial_0: RuntimeError: out of luck" in md
    assert (out / "pareto.png").stat().st_size > 10_000
    saved = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["linear", "lora"]
    assert saved["tune"]["trials"] == 2


@pytest.mark.slow
@pytest.mark.cli
def test_a_seed_multirun_is_one_row_of_the_sweep_summary(cli, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    proc = cli("-m", "seed=1,2", "method=linear", "data=imagefolder", f"data.root={root}", "data.batch_size=8",
               *TINY_MODEL, *FAST_TRAINER, *QUIET, "save_artifacts=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(runs) == 2
    (row,) = _csv(sweep / "summary.csv")
    # One row: nothing differs between rows, so the seeds are in their own column only.
    assert row["n"] == "2" and row["seeds"] == "1 2" and row["overrides"] == ""
    for key in ("test/acc", "val/acc_best"):
        values = [r[key] for r in runs]
        assert float(row[key]) == pytest.approx(statistics.fmean(values))
        assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values))


@pytest.mark.cli
def test_the_command_line_checks_tune_keys(cli) -> None:
    proc = cli("experiment=compare_tuned", "tune.seeds=0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "ftlab: error: tune.seeds=0: must be a positive integer"


def test_each_run_measures_its_own_peak_memory() -> None:
    """Runs sharing a process (a comparison, a multirun) must not inherit an earlier run's peak."""
    from ftlab.train import _peak_rss_mb, _reset_peak_memory

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    block = b"\x01" * (300 * 2**20)  # written: 300 MB resident
    high = _peak_rss_mb()
    del block
    _reset_peak_memory()
    assert _peak_rss_mb() < high - 200
