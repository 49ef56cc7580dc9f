"""DDP under Hydra (one directory per job, multirun that neither hangs nor skips testing), FSDP, SLURM."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import open_dict, read_write

from ftlab.config import check_group_choices
from ftlab.distributed import DistributedJobs, block_policy, child_command, trainer_adjustments
from helpers import ONE_THREAD_ENV, TINY_MODEL, make_imagefolder


@pytest.mark.slow
@pytest.mark.cli
def test_multirun_of_two_ddp_jobs_trains_and_tests_each_in_its_own_directory(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=9, splits=("train", "test"))
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data")}
    args = ["-m", "data=imagefolder", f"data.root={root}", "data.batch_size=4", *TINY_MODEL, "trainer=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.num_workers=0",
            "method=full", "logger=none", "seed=1,2"]
    # A hang (lightning-hydra-template#393) shows up as this timeout.
    proc = subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Each job started its own rank 1, and the children created no directories of their own.
    assert proc.stderr.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2, proc.stderr[-4000:]
    assert not (tmp_path / "outputs" / "runs").exists()
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0_full_test_resnet", "1_full_test_resnet"]

    train_images = 27 - 4  # 4 split off for validation
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        # Each rank takes half the images: ceil(23 / 2) = 12 per rank, batches of 4.
        assert metrics["global_steps"] == math.ceil(math.ceil(train_images / 2) / 4) == 3
        assert metrics["split_sizes"]["test"] == 27 and metrics["test/acc"] is not None
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "checkpoints" / "best.ckpt").is_file()

    # Testing under DDP scores every test image exactly once: the same number one process gets.
    import lightning as L

    from ftlab.data import ImageFolderDataModule
    from ftlab.module import ClassifierModule

    job = jobs[0]
    ckpt = torch.load(job / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    module = ClassifierModule(**{k: v for k, v in hp.items() if k != "optimizer"})
    module.load_state_dict(ckpt["state_dict"])
    dm = ImageFolderDataModule(str(root), batch_size=5, num_workers=0, image_size=32, seed=1)
    dm.discover()
    dm.set_preprocessing(module.data_config)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (single,) = trainer.test(module, datamodule=dm, verbose=False)
    ddp = json.loads((job / "metrics.json").read_text())
    assert ddp["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    assert ddp["test/f1"] == pytest.approx(single["test/f1"], abs=1e-6)


def _hydra_cfg(compose_cfg, mode: RunMode, out: Path, task: list[str]):
    cfg = compose_cfg(["method=full"])
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = mode
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.overrides.task = task
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_multirun_children_rerun_their_own_job(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "multirun" / "1_full_resnet"
    _hydra_cfg(compose_cfg, RunMode.MULTIRUN, out, ["seed=2", "method=full"])
    monkeypatch.setattr(sys, "argv", ["ftlab", "-m", "--config-dir", "/extra/conf", "seed=1,2", "method=full",
                                      "hydra.sweep.dir=/sweeps"])
    command, cwd = child_command(local_rank=1)
    tail = command[command.index("--config-dir"):]
    assert tail == ["--config-dir", "/extra/conf", "seed=2", "method=full", f'hydra.run.dir="{out}"',
                    "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]
    assert "-m" not in tail and cwd == os.getcwd()


def test_single_run_children_join_the_run_directory(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "runs" / "r"
    _hydra_cfg(compose_cfg, RunMode.RUN, out, ["model.lr=0.1"])
    monkeypatch.setattr(sys, "argv", ["ftlab", "model.lr=0.1", "trainer=ddp"])
    command, _ = child_command(local_rank=1)
    assert command[-5:] == ["model.lr=0.1", "trainer=ddp", f'hydra.run.dir="{out}"',
                            "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null"]


def test_jobs_forget_the_rendezvous_lightning_set_up(monkeypatch) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    jobs = DistributedJobs()
    jobs.on_job_start(config=None)
    from lightning.pytorch.strategies.launchers import subprocess_script

    assert subprocess_script._hydra_subprocess_cmd is child_command
    monkeypatch.setenv("MASTER_PORT", "12910")  # what Lightning's launcher does for its children
    monkeypatch.setenv("LOCAL_RANK", "0")
    jobs.on_job_end(config=None)
    assert "MASTER_PORT" not in os.environ and "LOCAL_RANK" not in os.environ


def test_sync_batchnorm_is_dropped_on_cpu_only(compose_cfg) -> None:
    cpu = compose_cfg(["trainer=ddp", "trainer.accelerator=cpu"]).trainer
    assert cpu.sync_batchnorm and trainer_adjustments(cpu) == {"sync_batchnorm": False}
    gpu = compose_cfg(["trainer=ddp", "trainer.accelerator=gpu"]).trainer
    assert trainer_adjustments(gpu) == {}


def test_fsdp_preset_builds_a_strategy_that_shards_per_block(compose_cfg) -> None:
    import timm
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_cfg(["trainer=fsdp"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "full"
    vit = timm.create_model("test_vit", pretrained=False)
    units = [name for name, m in vit.named_modules() if block_policy(m, recurse=False, nonwrapped_numel=0)]
    assert units == [f"blocks.{i}" for i in range(len(vit.blocks))]
    assert block_policy(vit, recurse=True, nonwrapped_numel=0)


def test_slurm_launcher_config_composes_when_the_plugin_is_installed(compose_cfg) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    check_group_choices(["hydra/launcher=submitit_slurm", "hydra/launcher=slurm"])  # plugin options pass
    cfg = compose_cfg(["hydra/launcher=slurm", "trainer.num_nodes=2", "hydra.launcher.tasks_per_node=4",
                       "trainer.devices=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.gpus_per_node == 4 and launcher.timeout_min > 0
