"""Inference cost of adapters: unmerged LoRA / DoRA / SSF models and their merged forms vs the plain backbone.

One process builds the plain default backbone and each adapted model (adapters initialised to non-zero
values so no branch can be skipped), merges a copy of each, and times eval-mode forwards without
gradients, all variants alternating, batch 1 (latency) at 224 px. Each round runs the variants in its own
seeded random order: in a fixed order each merged model always ran right after its heavier unmerged form.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, interleaved, parse_args, row, write_result

METHODS = ("lora", "dora", "ssf")


def _net(method: str, size: int, tiny: bool, run_dir: Path) -> Any:
    import torch

    from ftlab.train import build

    base = TINY_OVERRIDES if tiny else ["model.pretrained=false"]
    cfg = compose([*base, f"method={method}", f"data.image_size={size}", "data.num_workers=0"], run_dir)
    _, model, _ = build(cfg)
    with torch.no_grad():  # a trained adapter is non-zero (LoRA's B starts at zero)
        for name, p in model.net.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.01)
    return model.net.eval()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    import torch

    from ftlab.adapters.merge import merge_adapters

    size, batch, rounds, calls = (32, 1, 3, 2) if args.tiny else (224, 1, 15, 10)
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    nets = {"plain": _net("full", size, args.tiny, tmp / "plain")}
    for method in METHODS:
        nets[method] = _net(method, size, args.tiny, tmp / method)
        merged = copy.deepcopy(nets[method])
        merge_adapters(merged)
        nets[f"{method} merged"] = merged
    x = torch.randn(batch, 3, size, size)

    def forward(net: Any) -> Any:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(calls):
                    net(x)
        return run

    t = interleaved({k: forward(v) for k, v in nets.items()}, rounds=rounds, warmup=2, shuffle=True)
    ms = {k: v / calls * 1000 for k, v in t.items()}
    rows = []
    for method in METHODS:
        for key, target in ((f"{method} merged", "≤ 1.02"), (method, None)):
            rows.append(row(f"{key} / plain latency", ms[key] / ms["plain"], target,
                            f"{ms[key]:.2f} ms vs {ms['plain']:.2f} ms per image (batch {batch}, {size} px)", args.tiny))
    write_result("adapter_inference", args.out, rows, {"size": size, "batch": batch, "rounds": rounds,
                                                       "forwards_per_round": calls}, started)


if __name__ == "__main__":
    main()
