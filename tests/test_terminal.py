"""What a user sees: a quiet first run, a resume command after Ctrl-C, one line for a full disk."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftlab.checkpoints import AtomicCheckpointIO
from ftlab.errors import UserError, user_message
from ftlab.train import run
from helpers import FAST_TRAINER, ONE_THREAD_ENV, TINY_MODEL, make_imagefolder

# Lines a first run printed before ftlab quietened it (issue #14); none may come back.
NOISE = ("GPU available", "TPU available", "HPU available", "litlogger", "💡", "Trainer already configured",
         "FLOPs", "_pytree", "LeafSpec", "Loading `train_dataloader`", "project.license", "Traceback")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
            "FTLAB_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "100"}


def _args(root: Path, *extra: str) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=4", *TINY_MODEL, *FAST_TRAINER,
            "method=lora", *extra]


@pytest.mark.slow
@pytest.mark.cli
def test_a_run_prints_its_start_line_progress_and_summary_and_no_noise(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    run_dir = tmp_path / "a run dir whose name is long enough to be cut by a table" / "x"
    proc = subprocess.run([sys.executable, "-m", "ftlab", *_args(root), f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in NOISE:
        assert noise not in out, f"{noise!r} printed:\n{out}"
    start = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: lora on test_resnet")]
    assert len(start) == 1 and f"run dir {run_dir}" in start[0], proc.stderr
    assert f"run directory: {run_dir}" in proc.stdout.splitlines()  # whole, on a line of its own
    log = (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "ftlab: lora on test_resnet" in log and "] - config:\n" in log
    assert f"test/acc: {metrics['test/acc']:.4f}" in log  # the summary
    assert "GPU available" in log  # the file keeps what the console leaves out
    # The command line times its import of torch and Lightning apart from the rest of the start-up.
    phases = metrics["phase_seconds"]
    assert phases["imports"] > 0.5 and 0 <= phases["startup"] < phases["imports"]


@pytest.mark.slow
@pytest.mark.cli
def test_ctrl_c_prints_the_command_that_resumes_the_run(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=10, splits=("train", "test"))
    run_dir = tmp_path / "run"
    args = _args(root, "logger=none", "trainer.max_epochs=50", "callbacks.step_checkpoint.every_n_steps=2")
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not (run_dir / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    hint = [line for line in err.splitlines() if line.startswith("ftlab: resume with: ")]
    assert len(hint) == 1, err
    words = shlex.split(hint[0].removeprefix("ftlab: resume with: "))
    assert words[:3] == ["python", "-m", "ftlab"]
    assert words[3:] == [*args, f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    assert not (run_dir / "metrics.json").exists()

    # The printed command resumes (here with the epoch it was in as the last) and completes.
    resumed = [w if not w.startswith("trainer.max_epochs=") else "trainer.max_epochs=1" for w in words[3:]]
    done = subprocess.run([sys.executable, "-m", "ftlab", *resumed], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    assert "Restoring states from the checkpoint path at" in done.stdout + done.stderr


def _disk_full_at(monkeypatch: pytest.MonkeyPatch, failing_save: int, exc: Exception) -> list[int]:
    """torch.save as ftlab's checkpoint writer calls it, failing from the ``failing_save``-th call on."""
    calls = [0]
    real = torch.save

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls[0] += 1
        if calls[0] >= failing_save:
            f.write(b"partial")
            raise exc
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr("ftlab.checkpoints.torch.save", save)
    return calls


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 808832 vs 808728"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-zip-writer", "ENOSPC"])
def test_a_full_disk_is_one_line_and_the_old_checkpoint_is_kept(monkeypatch, tmp_path: Path, exc) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    _disk_full_at(monkeypatch, 1, exc)
    with pytest.raises(UserError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, target)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{target}: could not be written, the disk is full (")
    assert "bytes free, about 4,000 needed" in message and f"the last good checkpoint {target} is kept" in message
    assert torch.load(target, weights_only=True)["global_step"] == 1  # untouched
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_other_write_errors_are_not_called_a_full_disk(monkeypatch, tmp_path: Path) -> None:
    _disk_full_at(monkeypatch, 1, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(OSError, match="Permission denied"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "x.ckpt")


def test_disk_full_during_training_ends_the_run_in_one_line(monkeypatch, compose_cfg, one_thread,
                                                             tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    cfg = compose_cfg(_args(root, "logger=none", "trainer.max_epochs=2"))
    calls = _disk_full_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(Exception) as info:
        run(cfg)
    message = user_message(info.value)
    assert message is not None and "the disk is full" in message and "\n" not in message
    assert calls[0] == 2
    # The first save (epoch 1's best) is intact; the failed one left nothing behind.
    ckpts = sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt"], ckpts
    assert torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0


def test_dash_v_turns_on_hydra_verbose_and_the_console_keeps_the_noise(monkeypatch) -> None:
    import logging

    from ftlab import entry
    from ftlab.logs import QuietConsole

    seen = {}
    monkeypatch.setattr(entry, "hydra_main", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["ftlab", "method=lora", "-v", "seed=1"])
    entry.main()
    assert seen["argv"] == ["ftlab", "method=lora", "seed=1", "hydra.verbose=true"]

    record = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                               "GPU available: False, used: False", None, None)
    assert not QuietConsole(console=True, quiet=True).filter(record)
    assert QuietConsole(console=True, quiet=False).filter(record)  # what configure(verbose=True) installs
