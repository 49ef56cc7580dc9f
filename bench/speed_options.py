"""`trainer.compile=true` vs the default (eager, `trainer.channels_last=auto`): step time and break-even.

The default experiment's model (method, backbone) is built once per option through ftlab's own
``build`` (so the options are applied exactly as in a run) and optimizer steps on the same random
batch alternate between the variants after warm-up. Compilation happens in the first step and is
reported separately: a run pays it once. From how many steps on it pays off:
(first compiled step - default step) / (default step - compiled step).
``trainer.channels_last`` per backbone family is bench/channels_last.py.

The fused optimizer (ftlab's default where it is safe, :func:`ftlab.speed.fused_optimizer_arguments`)
against torch's default (``+model.optimizer.fused=false``), per method (LoRA, full fine-tuning): whole
training steps on the same batch, alternating, and the optimizer's step alone on the same gradients.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, interleaved, parse_args, row, train_step, write_result

VARIANTS = {"default": [], "compile": ["trainer.compile=true"]}


def break_even_steps(first_compiled: float, default_step: float, compiled_step: float) -> float:
    """Training steps after which compiling has saved its compilation time; inf if it never does."""
    saved = default_step - compiled_step
    return (first_compiled - default_step) / saved if saved > 0 else math.inf


def first_steps(variants: dict[str, list[str]], base: list[str], size: int, batch: int, tmp: Path) -> tuple[dict, dict]:
    """Each variant's step function and the seconds of its first call (the compiling one, for compile)."""
    steps, first = {}, {}
    for name, extra in variants.items():
        cfg = compose([*base, *extra, f"data.image_size={size}", "data.num_workers=0"], tmp / f"{name}-{size}")
        steps[name], _ = train_step(cfg, batch, size)
        t0 = time.perf_counter()
        steps[name]()
        first[name] = time.perf_counter() - t0
    return steps, first


def compile_rows(size: int, batch: int, t: dict[str, float], first: dict[str, float]) -> list[dict]:
    detail = (f"{size} px, batch {batch}: {t['compile'] * 1000:.0f} ms vs default {t['default'] * 1000:.0f} ms "
              f"per step; first step (compiling, inductor caches off) {first['compile']:.0f} s")
    rows = [row(f"trainer.compile=true: default / compiled step time ({size} px)", t["default"] / t["compile"],
                None, detail)]
    steps = break_even_steps(first["compile"], t["default"], t["compile"])
    if not math.isfinite(steps):
        rows[0]["detail"] += "; never pays off (the compiled step is not faster)"
    else:
        rows.append(row(f"trainer.compile=true: steps to pay off the compilation ({size} px)", steps, None,
                        f"(first compiled step {first['compile']:.0f} s - default step {t['default']:.3f} s) / "
                        f"(default step - compiled step {t['compile']:.3f} s)"))
    return rows


def optimizer_alone(model: Any, fused: bool) -> Callable[[], None]:
    """One optimizer step over a copy of ``model``'s trainable weights with fixed random gradients."""
    import torch

    groups = model.param_groups()
    copies = []
    for g in groups:
        params = [torch.nn.Parameter(p.detach().clone()) for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        copies.append({**g, "params": params})
    optimizer = model.optimizer_factory(copies, fused=fused)
    return optimizer.step


def fused_rows(method: str, base: list[str], size: int, batch: int, rounds: int, tmp: Path, tiny: bool) -> list[dict]:
    steps, models = {}, {}
    for name, extra in (("fused", []), ("unfused", ["+model.optimizer.fused=false"])):
        cfg = compose([*base, f"method={method}", *extra, f"data.image_size={size}", "data.num_workers=0"],
                      tmp / f"{method}-{name}")
        steps[name], models[name] = train_step(cfg, batch, size)
    t = interleaved(steps, rounds=rounds, warmup=2)
    alone = interleaved({k: optimizer_alone(models["fused"], k == "fused") for k in ("fused", "unfused")},
                        rounds=rounds * 10, warmup=3)
    trainable = sum(p.numel() for p in models["fused"].parameters() if p.requires_grad)
    return [
        row(f"fused optimizer ({method}): torch's default / fused training step time", t["unfused"] / t["fused"],
            None, f"{size} px, batch {batch}, {trainable:,} trainable: {t['fused'] * 1000:.0f} ms fused vs "
            f"{t['unfused'] * 1000:.0f} ms per step (median of {rounds}, alternating)", tiny),
        row(f"fused optimizer ({method}): torch's default / fused AdamW step alone", alone["unfused"] / alone["fused"],
            "> 1.0", f"{alone['fused'] * 1000:.2f} ms fused vs {alone['unfused'] * 1000:.2f} ms per optimizer step "
            f"(median of {rounds * 10}, alternating)", tiny),
    ]


def main() -> None:
    # A cold compile, as a machine's first run pays it: inductor's on-disk caches (under /tmp) would otherwise
    # hand this benchmark the kernels of its previous run.
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    # The default experiment's size; compiling again for 224 px would double the minutes spent compiling.
    size = 32 if args.tiny else 64
    batch, rounds = (4, 2) if args.tiny else (32, 5)
    # Compiling takes minutes even for a toy network; tests/test_speed.py checks trainer.compile itself.
    variants = {k: v for k, v in VARIANTS.items() if not (args.tiny and k == "compile")}
    base = TINY_OVERRIDES if args.tiny else ["model.pretrained=false"]
    steps, first = first_steps(variants, base, size, batch, tmp)
    t = interleaved(steps, rounds=rounds, warmup=1)
    if args.tiny:
        rows = [row(f"default step time, seconds ({size} px)", t["default"], None, "no compile at toy sizes", True)]
    else:
        rows = compile_rows(size, batch, t, first)
    for method in ("lora", "full"):
        rows += fused_rows(method, base, size, batch, rounds, tmp, args.tiny)
    write_result("speed_options", args.out, rows, {"batch": batch, "sizes": [size], "rounds": rounds,
                                                   "first_step_seconds": {k: round(v, 1) for k, v in first.items()}},
                 started)


if __name__ == "__main__":
    main()
