"""The default experiment (`make train`): its wall time, and where the training time goes.

First the exact command `make train` runs (`python -m ftlab`, defaults) in a child process, timed
from start to exit. Then the same configuration again in this process under Lightning's
SimpleProfiler, whose per-hook durations are grouped into data loading, forward (training_step:
forward, loss, metrics, logging calls), backward, optimizer (step, gradient clipping, zero_grad,
scheduler), validation, checkpoint writing, and the rest of the loop (callbacks, progress bar,
loggers). The default run trains on the digits; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, TINY_OVERRIDES, compose, parse_args, row, write_result

TINY_RUN = [*TINY_OVERRIDES, "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2", "data.num_workers=0"]


def _sum(durations: dict[str, list[float]], match: Any) -> float:
    return sum(sum(v) for k, v in durations.items() if match(k))


def breakdown(durations: dict[str, list[float]], fit_seconds: float) -> dict[str, float]:
    """Seconds per part of ``fit`` from SimpleProfiler's ``recorded_durations``."""
    step = _sum(durations, lambda k: k.endswith(".optimizer_step") and k.startswith("[LightningModule]"))
    forward = _sum(durations, lambda k: k.endswith("Strategy.training_step"))
    backward = _sum(durations, lambda k: k.endswith("Strategy.backward"))
    parts = {
        "data": _sum(durations, lambda k: k == "[_TrainingEpochLoop].train_dataloader_next"),
        "forward": forward,
        "backward": backward,
        "optimizer": step - forward - backward + _sum(
            durations, lambda k: k.endswith((".optimizer_zero_grad", ".lr_scheduler_step"))),
        "validation": _sum(durations, lambda k: k.endswith("Strategy.validation_step") or k.endswith(".val_next")),
        "checkpointing": _sum(durations, lambda k: k == "save_checkpoint"),
    }
    # Validation includes the sanity check before the first epoch, so the rest is taken from the whole fit.
    parts["other (setup, callbacks, progress bar, loggers)"] = max(0.0, fit_seconds - sum(parts.values()))
    return parts


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    extra = TINY_RUN if args.tiny else []

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftlab", *extra, f"hydra.run.dir={tmp / 'plain'}"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    plain = json.loads((tmp / "plain" / "metrics.json").read_text())

    import lightning as L
    from lightning.pytorch.profilers import SimpleProfiler

    from ftlab.train import run

    class Grab(L.Callback):
        def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.durations = {k: list(v) for k, v in trainer.profiler.recorded_durations.items()}

    grab = Grab()
    cfg = compose([*extra, "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler"], tmp / "profiled")
    assert SimpleProfiler  # the target above
    t0 = time.perf_counter()
    metrics = run(cfg, extra_callbacks=[grab])
    profiled_wall = time.perf_counter() - t0
    parts = breakdown(grab.durations, metrics["fit_seconds"])
    fit = metrics["fit_seconds"]
    shares = ", ".join(f"{k} {v:.1f} s ({100 * v / fit:.0f}%)" for k, v in parts.items())
    rows = [
        row("default run: wall time of `python -m ftlab` (s)", wall, None,
            f"{plain['method']} on {plain['model']}, {plain['epochs']} epochs: fit {plain['fit_seconds']:.1f} s, "
            f"test/acc {plain.get('test/acc', float('nan')):.4f}", args.tiny),
        row("default run: profiled fit (s)", fit, None, shares, args.tiny),
    ]
    config = {"breakdown_seconds": {k: round(v, 2) for k, v in parts.items()}, "profiled_run_seconds": round(profiled_wall, 1),
              "plain_run": {k: plain.get(k) for k in ("method", "model", "epochs", "fit_seconds", "test/acc", "peak_rss_mb")}}
    write_result("default_run", args.out, rows, config, started)


if __name__ == "__main__":
    main()
