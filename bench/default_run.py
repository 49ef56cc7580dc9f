"""The default experiment (`make train`): its wall time, where it goes around the fit, and inside it.

First the exact command `make train` runs (`python -m ftlab`, defaults) in a child process, timed
from start to exit. Its ``metrics.json`` holds the seconds of each phase of the run
(``phase_seconds``, :mod:`ftlab.timing`): the import of torch and Lightning (timed by the run itself),
the rest of the start-up (interpreter, Hydra, ftlab's modules), checks, data, model, trainer, fit, test,
artifacts. timm's import is measured apart, in children that import torch and lightning, then timm, and
exit (alternating with three runs), so the time around the fit splits into the libraries' imports and
ftlab's own, as issue #15 defines it: ``ftlab's own = wall - fit - (import torch, lightning, timm)``.
The exit counts as ftlab's: the CLI decides how its process ends (:mod:`ftlab.process`); the bare
children's exit, after the same ``gc.freeze()``, is shown beside it. The children import as the CLI does
(torch and Lightning with the cyclic garbage collector off). ftlab's modules are byte-compiled
first (as an install does), so no child compiles them.

Then the same configuration again in this process under Lightning's SimpleProfiler, whose per-hook
durations are grouped into data loading, forward (training_step: forward, loss, metrics, logging
calls), backward, optimizer (step, gradient clipping, zero_grad, scheduler), validation, checkpoint
writing, and the rest of the loop (callbacks, progress bar, loggers). The default run trains on the
digits; nothing is downloaded.
"""

from __future__ import annotations

import json
import statistics
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


# A child that imports what every run imports before ftlab's own code matters, as ftlab's CLI does (torch and
# Lightning with the collector off, then frozen; timm later, with the collector on), and exits as the CLI
# does (gc.freeze first): it prints the seconds since it started after torch + lightning, and after timm
# (ftlab.timing.process_age).
LIBRARIES = ("import gc; gc.disable(); from ftlab.timing import process_age; import torch, lightning; "
             "a = process_age(); gc.freeze(); gc.enable(); import timm; print(a, process_age()); gc.freeze()")


def library_seconds() -> dict[str, float]:
    """One child: its import of torch + lightning, of timm, and the rest of its life (its exit)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", LIBRARIES], cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after_lightning, after_timm = (float(v) for v in out.stdout.split())
    return {"torch+lightning": after_lightning, "timm": after_timm - after_lightning, "exit": wall - after_timm}


def outside_fit(wall: float, phases: dict[str, float], libraries: dict[str, float]) -> dict[str, float]:
    """ftlab's own seconds outside ``fit``, per part; they add up to wall - fit - the libraries' imports (torch
    and Lightning as the run itself timed them, ``phase_seconds["imports"]``; timm's in the children)."""
    inside = {k: v for k, v in phases.items() if k not in ("imports", "startup")}
    return {
        "start-up beyond the imports (interpreter, Hydra, ftlab's modules, config)": phases["startup"],
        "checks": inside.get("checks", 0.0),
        "data (list, materialise, check)": inside.get("data", 0.0),
        "model build beyond timm's import": inside.get("model", 0.0) - libraries["timm"],
        "trainer": inside.get("trainer", 0.0),
        "test": inside.get("test", 0.0),
        "artifacts": inside.get("artifacts", 0.0),
        "summary, TensorBoard hparams, exit (the libraries' teardown included)":
            wall - phases["imports"] - phases["startup"] - sum(inside.values()),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    extra = TINY_RUN if args.tiny else []
    # What an install leaves (pip byte-compiles); where PYTHONDONTWRITEBYTECODE is set, every child would
    # otherwise compile ftlab's sources at its start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "ftlab")], check=True)

    # Library children and default runs alternate (L R L R L R L); each run is split with the libraries'
    # median, and the run whose own time is the median of the runs is reported.
    runs = 1 if args.tiny else 3
    lib_runs, plain_runs = [library_seconds()], []
    for i in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ftlab", *extra, f"hydra.run.dir={tmp / f'plain{i}'}"], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall_i = time.perf_counter() - t0
        plain_runs.append((wall_i, json.loads((tmp / f"plain{i}" / "metrics.json").read_text())))
        lib_runs.append(library_seconds())
    if len(lib_runs) < 3:
        lib_runs.append(library_seconds())
    libraries = {k: statistics.median(r[k] for r in lib_runs) for k in lib_runs[0]}
    splits = sorted(((sum(outside_fit(w, m["phase_seconds"], libraries).values()), w, m) for w, m in plain_runs),
                    key=lambda t: t[0])
    _, wall, plain = splits[(len(splits) - 1) // 2]
    own = outside_fit(wall, plain["phase_seconds"], libraries)
    fit_plain = plain["phase_seconds"]["fit"]
    own_total = sum(own.values())
    own_all = [round(t[0], 2) for t in splits]

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
    imports = plain["phase_seconds"]["imports"]
    lib_total = imports + libraries["timm"]
    rows = [
        row("default run: wall time of `python -m ftlab` (s)", wall, None,
            f"{plain['method']} on {plain['model']}, {plain['epochs']} epochs: fit {plain['fit_seconds']:.1f} s, "
            f"test/acc {plain.get('test/acc', float('nan')):.4f}", args.tiny),
        row("default run: ftlab's own time outside fit / fit", own_total / fit_plain, "≤ 0.1",
            f"wall {wall:.1f} s = fit {fit_plain:.1f} + the libraries' imports {lib_total:.1f} (torch+lightning "
            f"{imports:.2f} in the run, timm {libraries['timm']:.2f}) + ftlab's own {own_total:.2f}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in own.items())
            + f" (a bare child imports torch+lightning in {libraries['torch+lightning']:.2f} s and takes "
            f"{libraries['exit']:.2f} s to exit)"
            + f" (own time of the {len(own_all)} runs: {', '.join(map(str, own_all))} s; the median shown)",
            args.tiny),
        row("default run: profiled fit (s)", fit, None, shares, args.tiny),
    ]
    config = {"breakdown_seconds": {k: round(v, 2) for k, v in parts.items()}, "profiled_run_seconds": round(profiled_wall, 1),
              "outside_fit_seconds": {k: round(v, 3) for k, v in own.items()},
              "library_seconds": {k: round(v, 3) for k, v in libraries.items()},
              "phase_seconds": plain["phase_seconds"], "wall_seconds": round(wall, 2),
              "plain_run": {k: plain.get(k) for k in ("method", "model", "epochs", "fit_seconds", "test/acc", "peak_rss_mb")}}
    write_result("default_run", args.out, rows, config, started)


if __name__ == "__main__":
    main()
