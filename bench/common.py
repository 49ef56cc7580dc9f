"""Shared by the benchmark scripts: timing, result rows, and the results JSON.

Every script measures both sides of a ratio in the same process, interleaved, so drift on a shared
machine moves both sides alike. Each writes ``<out>/<name>.json``::

    {"name": ..., "config": {...}, "seconds": wall time, "rows": [
        {"metric": ..., "value": ratio, "target": "≥ 0.95", "met": true|false|null,
         "detail": "the raw measurements behind the ratio"}]}

``python bench/<name>.py --tiny`` runs the same code at toy sizes (the smoke test in ``make test``);
its numbers mean nothing and its rows carry ``"met": null``.
"""

from __future__ import annotations

import argparse
import json
import operator
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
_OPS = {"≥": operator.ge, "≤": operator.le, ">": operator.gt, "<": operator.lt}


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script runs, measures nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for <name>.json")
    if extra:
        extra(parser)
    return parser.parse_args()


def row(metric: str, value: float, target: str | None, detail: str = "", tiny: bool = False) -> dict[str, Any]:
    """One line of the table. ``target`` is e.g. "≥ 0.95" or "≤ 0.8"; None for figures without one."""
    met = None
    if target and not tiny:
        op, bound = target.split()
        met = bool(_OPS[op](value, float(bound)))
    return {"metric": metric, "value": round(float(value), 4), "target": target, "met": met, "detail": detail}


def write_result(name: str, out: Path, rows: list[dict[str, Any]], config: dict[str, Any], started: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = {
        "name": name,
        "config": config,
        "threads": _threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    ensure_src_on_path()
    from ftlab.fileio import write_json

    write_json(path, data)
    for r in rows:
        flag = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"[{name}] {r['metric']}: {r['value']:.4g} (target {r['target'] or '-'}) {flag}  {r['detail']}")
    return path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                shuffle: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (A B C A B C ...) so that load
    from other processes falls on every side alike. ``shuffle``: each round in its own (seeded) random
    order, so that no function always runs right after the same one (a heavy call can slow the next)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns.items())
    rng = random.Random(0)
    for _ in range(rounds):
        if shuffle:
            rng.shuffle(order)
        for key, fn in order:
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (what the operating system sees)."""
    # VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child started by a big parent
    # would report the parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_after_steps(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Run ``step`` ``steps`` times: this process's peak RSS (MiB) before (the built model) and after.
    Meaningful in a fresh process (see :func:`start_child`)."""
    built = peak_rss_mb()
    for _ in range(steps):
        step()
    return {"peak_rss_mb": peak_rss_mb(), "built_mb": built}


def start_child(script: str | Path, *args: Any) -> subprocess.Popen:
    """``python <script> --child ARGS...`` in a fresh process, for figures (peak memory) that only mean
    something there; :func:`child_result` reads the JSON it prints last."""
    return subprocess.Popen([sys.executable, str(script), "--child", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_result(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: child process failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def peak_memory_detail(mem: dict[str, dict[str, float]], a: str, b: str, steps: int) -> str:
    """The raw figures behind a peak-memory ratio of ``a`` over ``b`` (results of :func:`memory_after_steps`)."""
    peak = {k: mem[k]["peak_rss_mb"] for k in (a, b)}
    grown = {k: mem[k]["peak_rss_mb"] - mem[k]["built_mb"] for k in (a, b)}
    return (f"peak RSS {a} {peak[a]:.0f} MiB vs {b} {peak[b]:.0f} MiB after {steps} steps; growth over the "
            f"built model (activations, gradients, optimizer state) {grown[a]:.0f} vs {grown[b]:.0f} MiB")


def ensure_src_on_path() -> None:
    """Run from a checkout without installing (the Makefile uses the venv, where ftlab is installed)."""
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def compose(overrides: list[str], run_dir: Path) -> Any:
    """The shipped Hydra config with ``overrides``, as ``python -m ftlab`` composes it, writing into
    ``run_dir``. Data stays where users have it (``data/`` of the checkout, or FTLAB_DATA_DIR)."""
    ensure_src_on_path()
    from ftlab.config import compose_config

    return compose_config(overrides, run_dir, root_dir=REPO)


# At toy sizes: the tiny timm network the tests use, 32 px, one short epoch.
TINY_OVERRIDES = ["model=timm", "model.name=test_resnet", "model.pretrained=false", "data.image_size=32",
                  "trainer.accelerator=cpu", "trainer.devices=1"]


def train_step(cfg: Any, batch: int, size: int) -> tuple[Callable[[], None], Any]:
    """One optimizer step (forward, loss, backward, AdamW) of the model ``cfg`` builds, on a fixed random
    batch; returns the step and the module. Built through ``ftlab.train.build``, so method, targets and
    ``trainer.channels_last``/``compile`` apply as in a run."""
    from ftlab.train import build

    _, model, _ = build(cfg)
    model.train()  # ClassifierModule.train keeps frozen norm statistics in eval mode
    optimizer = model.make_optimizer()
    x, y = random_batch(batch, size, model.hparams.num_classes)
    return optimizer_step(model, model.criterion, optimizer, x, y), model


def random_batch(batch: int, size: int, num_classes: int) -> tuple[Any, Any]:
    """``batch`` random ``size``-px RGB images and labels."""
    import torch

    return torch.randn(batch, 3, size, size), torch.randint(0, num_classes, (batch,))


def optimizer_step(model: Callable[[Any], Any], criterion: Callable[[Any, Any], Any], optimizer: Any,
                   x: Any, y: Any) -> Callable[[], None]:
    """One step on the fixed batch ``(x, y)``: zero_grad, forward, loss, backward, optimizer step."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def tiny_image_folder(root: Path) -> Path:
    """Three classes of eight random 20-px images in train/ and val/: enough for ``--tiny`` runs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(folder / f"{i}.png")
    return root
