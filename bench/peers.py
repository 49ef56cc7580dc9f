"""Peers: ftlab's LoRA training step vs HF peft's LoRA, and ``ftlab predict`` vs a bare ``torch.no_grad()`` loop.

- LoRA step: the default experiment's model (timm ``tf_efficientnet_lite0``, 10 classes) with ftlab's
  ``method=lora``, built through ``ftlab.train.build`` as a run builds it (shipped targets: the pointwise
  convs of blocks 2-6 and ``conv_head``; r 8, alpha 16, no dropout; the head trains), against the same
  timm model under ``peft.get_peft_model`` with ``target_modules`` = the very modules ftlab adapted,
  ``modules_to_save`` = the head, the same rank, alpha and dropout, the same base weights and the same
  LoRA A matrices (copied; checked by equal logits with non-zero adapters). Both have the same trainable
  parameters (asserted), BatchNorm in train mode, cross-entropy and AdamW with the same lr, betas and
  weight-decay split (asserted). The steps (zero_grad, forward, loss, backward, AdamW step) alternate on
  one random batch after warm-up. Peak memory: each side trains two steps in a fresh child process
  (peak resident memory, as ``bench/lora_vs_full.py``).
- Predict: ``ftlab.predict.predict`` (the ``ftlab predict`` CLI's defaults: batch 32, top-3, ``num_workers``
  ``auto``, CSV written) over a folder of generated JPEG photos, against a bare loop over the same
  files: PIL open + RGB, the same eval transform, ``torch.stack``, the same network in eval mode under
  ``torch.no_grad()``, softmax and top-3, batch 32, in this process. Both run the model a LoRA run leaves
  behind (adapters unmerged, as ``merge=false`` runs predict), loaded once: loading is a one-off per
  command, timed and reported apart. Alternating after warm-up.

``--tiny``: timm's tiny test network at 32 px, a few images; numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from common import (
    TINY_OVERRIDES,
    child_result,
    compose,
    interleaved,
    memory_after_steps,
    optimizer_step,
    parse_args,
    peak_memory_detail,
    random_batch,
    row,
    start_child,
    train_step,
    write_result,
)

BASE = ["method=lora", "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0"]
TOP_K = 3


def _extra_args(parser: Any) -> None:
    parser.add_argument("--size", type=int, default=None, help="step image size (default 64, the default run's)")
    parser.add_argument("--batch", type=int, default=None, help="step batch (default 32, the default run's)")
    parser.add_argument("--images", type=int, default=None, help="images to predict (default 384)")


def overrides(size: int, tiny: bool, pretrained: bool = False) -> list[str]:
    model = TINY_OVERRIDES if tiny else [f"model.pretrained={str(pretrained).lower()}"]
    return [*model, *BASE, f"data.image_size={size}"]


# -- the peft side -----------------------------------------------------------------------------------
def peer_spec(model: Any) -> dict[str, Any]:
    """What the peft model needs to match ftlab's ``model`` (a built LoRA module): JSON, for child processes."""
    from ftlab.adapters.lora import LoRALayer

    hp = model.hparams
    return {
        "name": hp.name, "num_classes": hp.num_classes, "head": model.head_name,
        "targets": sorted(n for n, m in model.net.named_modules() if isinstance(m, LoRALayer)),
        "rank": hp.rank, "alpha": hp.alpha, "dropout": hp.dropout,
        "lr": hp.lr, "weight_decay": hp.weight_decay,
        "betas": list(getattr(model.optimizer_factory, "keywords", {}).get("betas", (0.9, 0.999))),
    }


def peft_model(spec: dict[str, Any], state: dict[str, Any] | None = None) -> Any:
    """The same timm architecture under ``peft.get_peft_model``; with ``state`` (ftlab's network's state
    dict) its base weights and LoRA matrices are ftlab's."""
    import timm
    from peft import LoraConfig, get_peft_model

    net = timm.create_model(spec["name"], pretrained=False, num_classes=spec["num_classes"])
    if state is not None:
        net.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k}, strict=True)
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=spec["targets"], modules_to_save=[spec["head"]], bias="none")
    peer = get_peft_model(net, config)
    adapted = sorted(peer.base_model.targeted_module_names)
    if adapted != spec["targets"]:
        raise RuntimeError(f"peft adapted {adapted}, ftlab {spec['targets']}: not the same targets")
    if state is not None:
        copy_lora(state, peer)
    return peer


def copy_lora(state: dict[str, Any], peer: Any) -> None:
    """ftlab's ``<m>.lora_A.weight`` / ``lora_B`` into peft's ``<m>.lora_A.default.weight``."""
    import torch

    own = peer.base_model.model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if ".lora_" in key:
                module, _, rest = key.partition(".lora_")
                kind, _, attr = rest.partition(".")
                own[f"{module}.lora_{kind}.default.{attr}"].copy_(value)


def peer_optimizer(peer: Any, spec: dict[str, Any]) -> Any:
    """AdamW over peft's trainable parameters, split as ftlab splits them: no decay on 1-d tensors (biases)."""
    import torch

    params = [p for p in peer.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": spec["weight_decay"]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec["lr"], betas=tuple(spec["betas"]))


def peer_step(peer: Any, spec: dict[str, Any], x: Any, y: Any) -> tuple[Callable[[], None], Any]:
    import torch

    peer.train()
    optimizer = peer_optimizer(peer, spec)
    return optimizer_step(peer, torch.nn.CrossEntropyLoss(), optimizer, x, y), optimizer


# -- checks that both sides do the same work -----------------------------------------------------------
def trainable(module: Any) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def decay_split(optimizer: Any) -> list[tuple[Any, ...]]:
    """(class, lr, betas, weight decay, elements) per group, sorted: equal for optimizers doing the same update."""
    return sorted((type(optimizer).__name__, g["lr"], tuple(g["betas"]), g["weight_decay"],
                   sum(p.numel() for p in g["params"])) for g in optimizer.param_groups)


def check_same_function(model: Any, peer: Any, x: Any) -> float:
    """Give ftlab's adapters non-zero B matrices, copy them to peft, and compare the eval-mode logits."""
    import torch

    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    copy_lora(model.net.state_dict(), peer)
    model.eval(), peer.eval()
    with torch.no_grad():
        ours, theirs = model(x), peer(x)
    model.train(), peer.train()
    error = ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12)).item()
    if error > 1e-4:
        raise RuntimeError(f"ftlab's and peft's LoRA models compute different functions (max rel. error {error:.2e})")
    return error


# -- peak memory in a fresh process ----------------------------------------------------------------
def child(side: str, size: int, batch: int, steps: int, spec_path: str) -> None:
    """Train ``steps`` steps of ``side`` (ftlab or peft) and print the peak RSS (MiB) as JSON."""
    if side == "ftlab":
        cfg = compose(overrides(size, tiny=False), Path(tempfile.mkdtemp(prefix="ftlab-bench-")))
        step, _ = train_step(cfg, batch, size)
    else:
        spec = json.loads(Path(spec_path).read_text())
        step, _ = peer_step(peft_model(spec), spec, *random_batch(batch, size, spec["num_classes"]))
    print(json.dumps(memory_after_steps(step, steps)))


def peak_memory(size: int, batch: int, steps: int, spec_path: Path) -> dict[str, dict[str, float]]:
    """Both children at once (each measures only its own peak; nothing is timed meanwhile)."""
    procs = {side: start_child(__file__, side, size, batch, steps, spec_path) for side in ("ftlab", "peft")}
    return {side: child_result(proc, f"memory ({side})") for side, proc in procs.items()}


def lora_rows(size: int, batch: int, rounds: int, tmp: Path, tiny: bool) -> tuple[list[dict[str, Any]], dict]:
    from ftlab.train import build

    cfg = compose(overrides(size, tiny), tmp / "lora")
    _, model, _ = build(cfg)
    model.train()
    spec = peer_spec(model)
    peer = peft_model(spec, model.net.state_dict())
    x, y = random_batch(batch, size, spec["num_classes"])
    error = check_same_function(model, peer, x)
    ours = model.make_optimizer()
    theirs_step, theirs = peer_step(peer, spec, x, y)
    counts = {"ftlab": trainable(model), "peft": trainable(peer)}
    if counts["ftlab"] != counts["peft"] or decay_split(ours) != decay_split(theirs):
        raise RuntimeError(f"unequal work: trainable {counts}, optimizer groups {decay_split(ours)} vs "
                           f"{decay_split(theirs)}")
    steps = {"ftlab": optimizer_step(model, model.criterion, ours, x, y), "peft": theirs_step}
    t = interleaved(steps, rounds=rounds, warmup=2)
    mem_steps = 1 if tiny else 2
    if tiny:  # in this process: fresh children's start-up would be most of a tiny run
        mem = {k: memory_after_steps(step, mem_steps) for k, step in steps.items()}
    else:
        del steps, model, peer, ours, theirs, theirs_step
        spec_path = tmp / "peer.json"
        spec_path.write_text(json.dumps(spec))
        mem = peak_memory(size, batch, mem_steps, spec_path)
    grown = {k: max(v["peak_rss_mb"] - v["built_mb"], 1e-3) for k, v in mem.items()}
    what = (f"{spec['name']}, {size} px, batch {batch}: LoRA r {spec['rank']} alpha {spec['alpha']:g} on "
            f"{len(spec['targets'])} convs + the head, {counts['ftlab']:,} trainable on each side")
    rows = [
        row(f"peers: ftlab / peft LoRA step time ({spec['name']}, {size} px)", t["ftlab"] / t["peft"], "≤ 1.0",
            f"ftlab {t['ftlab'] * 1000:.0f} ms vs peft {t['peft'] * 1000:.0f} ms per step (median of {rounds}, "
            f"alternating); {what}; same logits (max rel. error {error:.0e})", tiny),
        # The step's own memory (activations, gradients, optimizer state): what a GPU's peak allocated memory
        # would count. The whole process's peak also holds what each side imports, shown in the next row.
        row(f"peers: ftlab / peft LoRA training memory ({spec['name']}, {size} px)",
            grown["ftlab"] / grown["peft"], "≤ 1.0",
            f"{peak_memory_detail(mem, 'ftlab', 'peft', mem_steps)}; {what}", tiny),
        row(f"peers: ftlab / peft process peak memory ({spec['name']}, {size} px)",
            mem["ftlab"]["peak_rss_mb"] / mem["peft"]["peak_rss_mb"], None,
            f"peak RSS {mem['ftlab']['peak_rss_mb']:.0f} vs {mem['peft']['peak_rss_mb']:.0f} MiB; built model "
            f"{mem['ftlab']['built_mb']:.0f} vs {mem['peft']['built_mb']:.0f} MiB: each process holds what its "
            "side imports (ftlab: Lightning, which imports torchmetrics and through it matplotlib, scipy and "
            "transformers; Hydra. peft: transformers, accelerate)", tiny),
    ]
    config = {"targets": spec["targets"], "trainable": counts["ftlab"], "step_ms": {k: round(v * 1000, 1)
                                                                                  for k, v in t.items()},
              "memory": mem}
    return rows, config


# -- predict vs a bare loop --------------------------------------------------------------------------
def photo_folder(root: Path, n: int, width: int, height: int) -> list[str]:
    """``n`` smooth random colour JPEGs (a blurred 8x6 grid of colours plus noise: decodes like a photo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), np.uint8)).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 12, (height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"{i:04d}.jpg", quality=90)
    return sorted(str(p) for p in root.glob("*.jpg"))


def trained_run(size: int, tmp: Path, tiny: bool) -> Path:
    """A run folder holding what a LoRA run writes (adapter + yaml). The tiny network has no pretrained
    weights to rebuild its base from, so there the merged model is written (and loaded) instead."""
    from ftlab.artifacts import base_rebuildable, write_artifacts
    from ftlab.train import build

    cfg = compose(overrides(size, tiny, pretrained=True), tmp / "run")
    datamodule, model, _ = build(cfg)
    write_artifacts(model, tmp / "run", datamodule.preprocessing, merge=not base_rebuildable(model.hparams))
    return tmp / "run"


def bare_predict(net: Any, transform: Any, files: list[str], batch: int) -> list[Any]:
    """Decode, transform, batch, forward, softmax and top-k: the loop a user writes without ftlab."""
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for start in range(0, len(files), batch):
            images = []
            for path in files[start:start + batch]:
                with Image.open(path) as img:
                    images.append(transform(img.convert("RGB")))
            out.append(net(torch.stack(images)).softmax(dim=1).topk(TOP_K, dim=1))
    return out


def ftlab_predict(run: Path, folder: Path, output: Path, loaded: tuple[Any, Any], n: int) -> None:
    """``ftlab predict RUN input=FOLDER`` with its CLI defaults, on the model already loaded (``loaded``)."""
    from ftlab import predict as module

    with mock.patch.object(module, "load_predictor", lambda _: loaded), contextlib.redirect_stdout(io.StringIO()):
        summary = module.predict(str(run), str(folder), output=str(output), top_k=TOP_K, batch_size=32,
                                 num_workers="auto", device="cpu")
    if summary["images"] != n:
        raise RuntimeError(f"ftlab predict wrote {summary['images']} rows for {n} images")


def predict_rows(size: int, n: int, rounds: int, tmp: Path, tiny: bool) -> tuple[list[dict[str, Any]], dict]:
    from ftlab.data.transforms import eval_transform
    from ftlab.data.workers import inference_workers
    from ftlab.inference import load_predictor

    run = trained_run(size, tmp, tiny)
    width, height = (48, 40) if tiny else (320, 240)
    files = photo_folder(tmp / "photos", n, width, height)
    loads = []
    for _ in range(1 if tiny else 3):
        t0 = time.perf_counter()
        loaded = load_predictor(run)
        loads.append(time.perf_counter() - t0)
    net, info = loaded
    transform = eval_transform(info["preprocessing"])
    sides = {"ftlab": lambda: ftlab_predict(run, tmp / "photos", tmp / "predictions.csv", loaded, n),
             "bare": lambda: bare_predict(net, transform, files, 32)}
    t = interleaved(sides, rounds=rounds, warmup=0 if tiny else 1)
    workers = inference_workers("auto", on_cpu=True)
    ips = {k: n / v for k, v in t.items()}
    pre = info["preprocessing"]
    rows = [row(
        "peers: ftlab predict / bare no_grad loop images/s", ips["ftlab"] / ips["bare"], "≥ 0.9",
        f"ftlab {ips['ftlab']:.0f} images/s vs bare loop {ips['bare']:.0f} images/s (median of {rounds}, "
        f"alternating) over {n} {width}x{height} JPEGs at {pre['size']} px (crop_pct {pre['crop_pct']}), batch 32, "
        f"top-{TOP_K}, the {info['kind']} file of a LoRA run "
        f"({'unmerged adapters' if info['kind'] == 'adapter' else 'merged'}); ftlab with num_workers=auto "
        f"({workers} decoding worker(s) here) and the CSV; loading the model, once per command, "
        f"{statistics.median(loads):.2f} s apart", tiny)]
    config = {"images": n, "image_px": [width, height], "predict_size": pre["size"],
              "seconds": {k: round(v, 3) for k, v in t.items()}, "load_seconds": round(statistics.median(loads), 3)}
    return rows, config


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        side, size, batch, steps, spec_path = sys.argv[i + 1:i + 6]
        child(side, int(size), int(batch), int(steps), spec_path)
        return
    args = parse_args(__doc__.splitlines()[0], _extra_args)
    started = time.perf_counter()
    size = args.size or (32 if args.tiny else 64)
    batch = args.batch or (4 if args.tiny else 32)
    n = args.images or (8 if args.tiny else 384)
    rounds, predict_rounds = (1, 1) if args.tiny else (10, 5)
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    step_rows, step_config = lora_rows(size, batch, rounds, tmp, args.tiny)
    print(f"  peers: LoRA step and memory ({time.perf_counter() - started:.0f} s)", flush=True)
    pred_rows, pred_config = predict_rows(size, n, predict_rounds, tmp, args.tiny)
    config = {"size": size, "batch": batch, "rounds": rounds, "predict_rounds": predict_rounds,
              "lora": step_config, "predict": pred_config}
    write_result("peers", args.out, step_rows + pred_rows, config, started)


if __name__ == "__main__":
    main()
