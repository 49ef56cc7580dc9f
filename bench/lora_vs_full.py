"""LoRA vs full fine-tuning: training step time and peak memory, on the default backbone and resnet50.

Step time: both models of a backbone are built in one process and their optimizer steps
(forward, loss, backward, AdamW step) alternate on the same random 224-px batch, after warm-up.
Peak memory: each (backbone, method) trains a few steps in a fresh child process; the figure is the
child's peak resident memory (what the operating system sees: weights, activations, gradients,
optimizer state, the Python runtime). Random initialisation: weights do not change the cost.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import (
    TINY_OVERRIDES,
    child_result,
    compose,
    interleaved,
    memory_after_steps,
    parse_args,
    peak_memory_detail,
    row,
    start_child,
    train_step,
    write_result,
)

# Each with its shipped LoRA targets (conf/model/<name>.yaml).
BACKBONES = {
    "efficientnet_lite0": ["model=efficientnet_lite0", "model.pretrained=false"],
    "resnet50": ["model=resnet50", "model.pretrained=false"],
}


def _overrides(backbone: str, method: str, size: int, tiny: bool) -> list[str]:
    base = TINY_OVERRIDES if tiny else BACKBONES[backbone]
    return [*base, f"method={method}", f"data.image_size={size}", "trainer.accelerator=cpu", "data.num_workers=0"]


def child(backbone: str, method: str, batch: int, size: int, steps: int, tiny: bool) -> None:
    """Train ``steps`` steps and print the peak RSS (MiB) as JSON: run in a fresh process."""
    cfg = compose(_overrides(backbone, method, size, tiny), Path(tempfile.mkdtemp(prefix="ftlab-bench-")))
    step, _ = train_step(cfg, batch, size)
    print(json.dumps(memory_after_steps(step, steps)))


def peak_rss(backbone: str, method: str, batch: int, size: int, steps: int, tiny: bool) -> dict[str, float]:
    proc = start_child(__file__, backbone, method, batch, size, steps, *(["--tiny"] if tiny else []))
    return child_result(proc, f"memory ({backbone}, {method})")


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        backbone, method, batch, size, steps = sys.argv[i + 1:i + 6]
        child(backbone, method, int(batch), int(size), int(steps), "--tiny" in sys.argv)
        return
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    size, rounds, mem_steps = (32, 2, 1) if args.tiny else (224, 4, 2)
    # Batches a 2-core CPU steps through in about a second; same batch for both methods.
    batches = {"efficientnet_lite0": 4 if args.tiny else 32, "resnet50": 4 if args.tiny else 16}
    rows, config = [], {"size": size, "batches": batches, "rounds": rounds}
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    for backbone in (["efficientnet_lite0"] if args.tiny else BACKBONES):
        batch = batches[backbone]
        steps, trainable = {}, {}
        for method in ("full", "lora"):
            cfg = compose(_overrides(backbone, method, size, args.tiny), tmp / f"{backbone}-{method}")
            steps[method], model = train_step(cfg, batch, size)
            trainable[method] = model.parameter_counts()["params_trainable"]
        t = interleaved(steps, rounds=rounds, warmup=2)
        mem = {m: peak_rss(backbone, m, batch, size, mem_steps, args.tiny) for m in ("full", "lora")}
        rows.append(row(
            f"LoRA / full step time ({backbone}, {size} px)", t["lora"] / t["full"], "≤ 0.8",
            f"batch {batch}: lora {t['lora'] * 1000:.0f} ms vs full {t['full'] * 1000:.0f} ms per step "
            f"(median of {rounds}); trainable {trainable['lora']:,} vs {trainable['full']:,}", args.tiny))
        rows.append(row(
            f"LoRA / full peak memory ({backbone}, {size} px)",
            mem["lora"]["peak_rss_mb"] / mem["full"]["peak_rss_mb"], "< 1",
            peak_memory_detail(mem, "lora", "full", mem_steps), args.tiny))
    write_result("lora_vs_full", args.out, rows, config, started)


if __name__ == "__main__":
    main()
