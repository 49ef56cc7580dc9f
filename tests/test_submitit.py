"""The SLURM path, run for real on one machine: a multirun through hydra-submitit-launcher's local executor.

``hydra/launcher=submitit_local`` goes through the same launcher code as ``hydra/launcher=slurm``
(``conf/hydra/launcher/slurm.yaml``): the launcher pickles the task function and Hydra's state, submitit
starts each job in a fresh Python process, the job re-composes its config and runs, and the results are
unpickled in the launching process. Only the executor differs (local processes instead of ``sbatch``),
so no SLURM is needed. The plugin is in the ``dev`` extra.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from helpers import FAST_TRAINER, ONE_THREAD_ENV, TINY_MODEL, make_imagefolder

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.slow
@pytest.mark.cli
def test_a_two_job_multirun_through_submitits_local_executor(cli, tmp_path: Path, monkeypatch) -> None:
    for key, value in ONE_THREAD_ENV.items():  # the two jobs run at once, as two processes
        monkeypatch.setenv(key, value)
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    proc = cli("-m", "hydra/launcher=submitit_local", "data=imagefolder", f"data.root={root}", "data.batch_size=8",
               *TINY_MODEL, *FAST_TRAINER, "method=full", "logger=none", "save_artifacts=false",
               "callbacks.progress_bar=null", "callbacks.model_summary=null", "seed=1,2", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr

    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0_full_test_resnet", "1_full_test_resnet"]
    for seed, job in enumerate(jobs, start=1):
        metrics = json.loads((job / "metrics.json").read_text())
        assert isinstance(metrics["test/acc"], float) and isinstance(metrics["test/f1"], float)
        assert metrics["split_sizes"]["test"] == 18
        assert f"seed={seed}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    # Each job ran in a process submitit started: its logs and pickled result are under .submitit/.
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2

    # The sweep summary (a Hydra callback: after each job in the job's process, at the end in the launcher's).
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    # Two runs that differ only by seed are one row (mean ± std over n = 2).
    assert [(r["status"], r["n"], r["seeds"]) for r in rows] == [("ok", "2", "1 2")]
    assert (sweep / "summary.md").is_file() and (sweep / "summary.png").is_file()
    assert "summary: " in proc.stdout
