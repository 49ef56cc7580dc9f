"""`trainer.channels_last` per backbone family: NCHW / NHWC training step time, and what `auto` decides.

For each family the model is built through ftlab's own ``build`` twice: with the default
``trainer.channels_last=auto`` (whose decision the row reports) and with the opposite explicit setting.
Optimizer steps (default method, random weights, one fixed random batch) alternate between the two
after warm-up. A family `auto` turns on has the target "≥ 1" (NHWC at least as fast); for one it leaves
off the ratio is reported without a target.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import TINY_OVERRIDES, compose, interleaved, parse_args, row, train_step, write_result

# family -> (overrides, image size, batch). Random weights; sizes that keep the script at about 3 minutes
# on 2 CPU cores; a ViT takes the size its position embedding was built for.
FAMILIES: dict[str, tuple[list[str], int, int]] = {
    "EfficientNet-Lite0 (default model)": (["model.pretrained=false"], 128, 8),
    "ResNet-50": (["model=resnet50", "model.pretrained=false"], 96, 8),
    "MobileNetV3-Large": (["model=timm", "model.name=mobilenetv3_large_100", "model.pretrained=false"], 128, 8),
    "ConvNeXt-Atto": (["model=timm", "model.name=convnext_atto", "model.pretrained=false"], 96, 8),
    "ViT-Tiny/16": (["model=timm", "model.name=vit_tiny_patch16_224", "model.pretrained=false"], 224, 4),
}
TINY_FAMILIES: dict[str, tuple[list[str], int, int]] = {
    "tiny ResNet": (TINY_OVERRIDES, 32, 4),
    "tiny ViT": ([*TINY_OVERRIDES, "model.name=test_vit"], 160, 2),
}


def measure(overrides: list[str], size: int, batch: int, rounds: int, run_dir: Path) -> tuple[bool, dict[str, float]]:
    """``auto``'s decision for this model, and the median step seconds with NHWC ("on") and NCHW ("off")."""
    base = [*overrides, f"data.image_size={size}", "data.num_workers=0"]
    auto_step, auto_model = train_step(compose(base, run_dir / "auto"), batch, size)
    decided = bool(auto_model.channels_last)
    other = "off" if decided else "on"
    other_step, _ = train_step(compose([*base, f"trainer.channels_last={not decided}".lower()], run_dir / other),
                               batch, size)
    steps = {"on": auto_step, "off": other_step} if decided else {"on": other_step, "off": auto_step}
    return decided, interleaved(steps, rounds=rounds, warmup=1)


def family_row(family: str, size: int, batch: int, decided: bool, t: dict[str, float], tiny: bool) -> dict:
    ratio = t["off"] / t["on"]
    if decided:
        verdict = "agrees" if ratio >= 1 else "DISAGREES: NHWC measured slower"
    else:
        verdict = "NHWC would be slower" if ratio < 1 else "NHWC would be faster here"
    detail = (f"auto: {'on' if decided else 'off'} ({verdict}); {size} px, batch {batch}: "
              f"NHWC {t['on'] * 1000:.0f} ms vs NCHW {t['off'] * 1000:.0f} ms per step")
    return row(f"channels_last: NCHW / NHWC step time, {family}", ratio, "≥ 1" if decided else None, detail, tiny)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    families = TINY_FAMILIES if args.tiny else FAMILIES
    rounds = 2 if args.tiny else 4
    rows, decisions = [], {}
    for i, (family, (overrides, size, batch)) in enumerate(families.items()):
        decided, t = measure(overrides, size, batch, rounds, tmp / str(i))
        decisions[family] = "on" if decided else "off"
        rows.append(family_row(family, size, batch, decided, t, args.tiny))
    config = {"rounds": rounds, "auto": decisions,
              "families": {f: {"overrides": o, "size": s, "batch": b} for f, (o, s, b) in families.items()}}
    write_result("channels_last", args.out, rows, config, started)


if __name__ == "__main__":
    main()
