"""Checkpoint size and save time per method: PEFT checkpoints hold what trains, not the frozen base.

Each method of the default experiment (EfficientNet-Lite0 on the digits) is built and fitted as
``python -m ftlab`` does (``ftlab.train.build``) for two training batches, so the checkpoint holds real
optimizer state; then ``trainer.save_checkpoint`` writes ``last.ckpt`` three times (median time), and
``load_predictor`` reads it back as ``ftlab eval`` does (rebuilding and hashing the base for PEFT
checkpoints). ``gradual`` is measured in its frozen first epoch (after it unfreezes its checkpoints are
whole). The one-off sha256 of the frozen base, paid once per run at the first save, is reported apart.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, parse_args, row, tiny_image_folder, write_result

# (label, overrides); the shipped method configs with their default keys.
METHODS = (
    ("full", ["method=full"]),
    ("linear", ["method=linear"]),
    ("bitfit", ["method=bitfit"]),
    ("partial", ["method=partial"]),
    ("ssf", ["method=ssf"]),
    ("lora", ["method=lora"]),
    ("lora pissa", ["method=lora", "model.init=pissa"]),
    ("dora", ["method=dora"]),
    ("gradual (frozen epoch)", ["method=gradual"]),
)
LORA_TARGET_MB = 2.0  # issue #15: a default LoRA checkpoint of at most 2 MB


def _measure(cfg: Any, folder: Path) -> dict[str, Any]:
    import torch

    from ftlab.base_weights import BASE_KEY, BaseFingerprint
    from ftlab.inference import load_predictor
    from ftlab.train import build

    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule)
    path = folder / "bench.ckpt"
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.save_checkpoint(path)
        times.append(time.perf_counter() - t0)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    record = ckpt.get(BASE_KEY)
    hash_s = None
    if record is not None:
        t0 = time.perf_counter()
        BaseFingerprint()(model.state_dict(), record["frozen"])
        hash_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_predictor(path)
    load_s = time.perf_counter() - t0
    whole = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return {
        "bytes": path.stat().st_size,
        "save_s": statistics.median(times),
        "load_s": load_s,
        "hash_s": hash_s,
        "stored_tensors": len(ckpt["state_dict"]),
        "frozen_tensors": len(record["frozen"]) if record else 0,
        "model_state_bytes": whole,
        "trainable": model.parameter_counts()["params_trainable"],
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    common = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "+trainer.num_sanity_val_steps=0", "logger=none", "test=false", "save_artifacts=false",
              "data.num_workers=0", "callbacks.progress_bar=null", "callbacks.eval_report=null"]
    if args.tiny:
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        base = tmp / "base.safetensors"
        save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(base))
        common += [*TINY_OVERRIDES, f"model.checkpoint={base}", "data=imagefolder",
                   f"data.root={tiny_image_folder(tmp / 'images')}", "data.batch_size=4"]
    rows, results = [], {}
    for label, overrides in METHODS:
        folder = tmp / label.replace(" ", "_").replace("(", "").replace(")", "")
        cfg = compose([*common, *overrides], folder)
        m = _measure(cfg, folder)
        results[label] = m
        mb = m["bytes"] / 1e6
        hashed = f", base sha256 {m['hash_s']:.2f} s once per run" if m["hash_s"] is not None else ""
        detail = (f"{m['stored_tensors']} tensors stored, {m['frozen_tensors']} frozen base tensors left out; "
                  f"{m['trainable']:,} trainable params; model state {m['model_state_bytes'] / 1e6:.1f} MB; "
                  f"save {m['save_s']:.3f} s, load (eval) {m['load_s']:.2f} s{hashed}")
        target = f"≤ {LORA_TARGET_MB}" if label == "lora" else None
        rows.append(row(f"checkpoint MB: {label}", mb, target, detail, args.tiny))
        rows.append(row(f"checkpoint save s: {label}", m["save_s"], None, "", args.tiny))
    full = results["full"]["bytes"]
    lora = results["lora"]["bytes"]
    rows.append(row("checkpoint size lora / full", lora / full, None,
                    f"{lora / 1e6:.2f} MB vs {full / 1e6:.2f} MB", args.tiny))
    write_result("checkpoints", args.out, rows, {"methods": results}, started)


if __name__ == "__main__":
    main()
