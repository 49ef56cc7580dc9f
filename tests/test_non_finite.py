"""A NaN/inf loss or gradient stops the run naming the step, and never reaches a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.errors import UserError
from ftlab.module import ClassifierModule
from ftlab.train import run
from helpers import FAST_TRAINER, ONE_THREAD_ENV, TINY_MODEL, make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(root: Path, *extra: str) -> list[str]:
    # 26 train images / batch 4 = 6 steps per epoch (data.drop_last: full batches only).
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=4", *TINY_MODEL, *FAST_TRAINER,
            "method=full", "logger=none", *extra]


def _finite(ckpt_path: Path) -> dict:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{ckpt_path.name} holds non-finite tensors: {bad[:5]}"
    return ckpt


def test_absurd_learning_rate_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"))
    run_dir = tmp_path / "outputs" / "runs" / "diverged"
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data")}
    # Step 1 leaves weights around 1e37 (AdamW moves each by ~lr); step 2 overflows in the forward pass.
    args = _overrides(root, "model.lr=1e37", "model.warmup_ratio=0", "callbacks.step_checkpoint.every_n_steps=1",
                      f"hydra.run.dir={run_dir}")
    proc = subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "non-finite loss (nan) at step 2 (epoch 0, batch 1)" in errors[0], errors[0]
    assert "last.ckpt is kept" in errors[0]
    assert _finite(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("poison", ["nan loss", "inf loss", "nan gradient"])
def test_non_finite_mid_run_leaves_last_and_best_checkpoints_good(
    compose_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    """Epoch 0 ends at step 6 (best.ckpt, last.ckpt), step checkpoints every 4; step 10 is poisoned."""
    original = ClassifierModule.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if self.global_step == 9:
            if poison == "nan gradient":  # the loss stays finite, one gradient does not
                self.net.fc.weight.register_hook(lambda g: g * float("nan"))
            else:
                loss = loss * float(poison.split()[0])
        return loss

    monkeypatch.setattr(ClassifierModule, "training_step", poisoned)
    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"))
    cfg = compose_cfg(_overrides(root, "trainer.max_epochs=3", "callbacks.step_checkpoint.every_n_steps=4"))
    with pytest.raises(UserError) as err:
        run(cfg)
    what = "gradient (nan)" if poison == "nan gradient" else f"loss ({poison.split()[0]})"
    assert f"non-finite {what} at step 10 (epoch 1, batch 3)" in str(err.value)
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert _finite(checkpoints / "last.ckpt")["global_step"] == 8
    assert _finite(checkpoints / "best.ckpt")["global_step"] == 6
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()
