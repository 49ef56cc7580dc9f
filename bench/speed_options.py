"""`trainer.channels_last=true` and `trainer.compile=true` vs eager NCHW: training step time.

The default experiment's model (method, backbone) is built once per option through ftlab's own
``build`` (so the options are applied exactly as in a run) and optimizer steps on the same random
batch alternate between the variants after warm-up. Compilation happens in the warm-up steps and is
reported separately: it is paid once per run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import TINY_OVERRIDES, compose, interleaved, parse_args, row, train_step, write_result

VARIANTS = {"eager": [], "channels_last": ["trainer.channels_last=true"], "compile": ["trainer.compile=true"]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    # The default experiment's size; compiling again for 224 px would double the minutes spent compiling.
    sizes = [32] if args.tiny else [64]
    batch, rounds = (4, 2) if args.tiny else (32, 5)
    rows, compile_seconds = [], {}
    # Compiling takes minutes even for a toy network; tests/test_speed.py checks trainer.compile itself.
    variants = {k: v for k, v in VARIANTS.items() if not (args.tiny and k == "compile")}
    for size in sizes:
        steps = {}
        for name, extra in variants.items():
            base = TINY_OVERRIDES if args.tiny else ["model.pretrained=false"]
            cfg = compose([*base, *extra, f"data.image_size={size}", "data.num_workers=0"], tmp / f"{name}-{size}")
            steps[name], _ = train_step(cfg, batch, size)
            t0 = time.perf_counter()
            steps[name]()  # the first step compiles
            compile_seconds[f"{name} {size}px"] = round(time.perf_counter() - t0, 1)
        t = interleaved(steps, rounds=rounds, warmup=1)
        for name in [v for v in variants if v != "eager"]:
            detail = (f"{size} px, batch {batch}: {t[name] * 1000:.0f} ms vs eager {t['eager'] * 1000:.0f} ms per step"
                      + (f"; first step (compiling) {compile_seconds[f'compile {size}px']:.0f} s"
                         if name == "compile" else ""))
            rows.append(row(f"trainer.{name}=true: eager / option step time ({size} px)", t["eager"] / t[name],
                            None, detail, args.tiny))
    write_result("speed_options", args.out, rows, {"batch": batch, "sizes": sizes, "rounds": rounds,
                                                   "first_step_seconds": compile_seconds}, started)


if __name__ == "__main__":
    main()
