"""Crash and resume, determinism, and checkpoint files that are never half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftlab.checkpoints import AtomicCheckpointIO
from ftlab.train import run
from helpers import FAST_TRAINER, ONE_THREAD_ENV, TINY_MODEL, make_base_weights, make_imagefolder

# 26 train images / batch 4 = 6 full batches, so 6 steps per epoch (data.drop_last drops the short 7th); a step
# checkpoint every 5 steps never falls on an epoch end before step 30, so the first one is mid-epoch.
STEPS_PER_EPOCH, EPOCHS, EVERY = 6, 3, 5
pytestmark = pytest.mark.usefixtures("one_thread")
VOLATILE = {"fit_seconds", "phase_seconds", "peak_rss_mb", "output_dir", "best_checkpoint", "data"}


def _overrides(root: Path, *extra: str, method: str = "full") -> list[str]:
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=4", *TINY_MODEL, *FAST_TRAINER,
            f"method={method}", "model.lr=0.01", "logger=none", f"trainer.max_epochs={EPOCHS}",
            f"callbacks.step_checkpoint.every_n_steps={EVERY}", *extra]


def _kill_after_first_step_checkpoint(args: list[str], run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while not last.exists():
            assert proc.poll() is None, f"run ended before a step checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no step checkpoint within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up, like an OOM kill or a lost node
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(compose_cfg, tmp_path: Path, method: str) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"))
    # LoRA on a base in a file (as pretrained weights are): its checkpoints hold only what trains.
    peft = [f"model.checkpoint={make_base_weights(tmp_path / 'base.safetensors')}"] if method == "lora" else []
    args = _overrides(root, "data.augment=none", *peft, method=method)
    crashed = tmp_path / "crashed"
    _kill_after_first_step_checkpoint(args, crashed, tmp_path)

    assert not (crashed / "metrics.json").exists()  # only a completed run writes metrics
    ckpt = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    killed_at = ckpt["global_step"]
    assert killed_at % EVERY == 0 and killed_at % STEPS_PER_EPOCH != 0, killed_at  # mid-epoch

    resumed = run(compose_cfg([*args, "ckpt_path=last"], run_dir=crashed))
    straight = run(compose_cfg(args, run_dir=tmp_path / "straight"))

    assert resumed["global_steps"] == straight["global_steps"] == EPOCHS * STEPS_PER_EPOCH
    assert resumed["epochs"] == straight["epochs"] == EPOCHS
    assert json.loads((crashed / "metrics.json").read_text())["global_steps"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("val/acc_best", "test/acc"):
        assert resumed[key] >= 0.6 and abs(resumed[key] - straight[key]) <= 0.15, (key, resumed, straight)
    # The resumed epoch continued the same shuffle where it stopped (no batch repeated or lost), with the
    # optimizer and schedule restored: the final weights are those of the uninterrupted run.
    final = {
        name: torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for name in ("crashed", "straight")
    }
    assert final["crashed"]["state_dict"].keys() == final["straight"]["state_dict"].keys()
    for key, value in final["straight"]["state_dict"].items():
        if value.is_floating_point():
            resumed_value = final["crashed"]["state_dict"][key]
            torch.testing.assert_close(resumed_value, value, rtol=1e-4, atol=1e-5, msg=key)
    if method == "lora":
        # Resumed from a checkpoint without the base (the kill left one), on the same base, bit for bit.
        assert "ftlab_base" in ckpt and "ftlab_base" in final["crashed"]
        assert final["crashed"]["ftlab_base"] == final["straight"]["ftlab_base"] == ckpt["ftlab_base"]
        assert not any(k in ckpt["ftlab_base"]["frozen"] for k in final["straight"]["state_dict"])
        for key, value in final["straight"]["state_dict"].items():
            assert torch.equal(final["crashed"]["state_dict"][key], value), key


def test_same_seed_same_metrics(compose_cfg, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=8, splits=("train", "test"))
    # Augmentation on (random crops and flips) so the seeded random streams are exercised too.
    args = _overrides(root, "trainer.max_epochs=2", "data.augment=basic")
    for name, seed in (("a", 42), ("b", 42), ("other_seed", 7)):
        run(compose_cfg([*args, f"seed={seed}"], run_dir=tmp_path / name))
    a, b, other = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b", "other_seed"))
    stable = {k: v for k, v in a.items() if k not in VOLATILE}
    assert stable == {k: v for k, v in b.items() if k not in VOLATILE}
    assert a["global_steps"] > 0 and a["test/loss"] == b["test/loss"]
    assert other["test/loss"] != a["test/loss"]  # the seed matters: the equality above is not vacuous


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    def dies_halfway(obj: object, f) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["global_step"] == 1
