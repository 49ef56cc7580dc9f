"""Data pipeline: loader images/s (decode + transform, default workers) vs what the default model consumes,
and the speed-up of ``data.cache=true``.

Everything comes from the shipped config (digits, EfficientNet-Lite0, LoRA, batch 32, 64 px,
``data.num_workers=auto``), composed as ``python -m ftlab`` composes it. Loader: one full epoch of the
train loader per timed call, its persistent workers already started (the first, untimed epoch starts
them). Model: optimizer steps of the default method (forward, loss, backward, AdamW) on a real batch.
Every loader and the model alternate (``interleaved``), so load from other processes falls on all alike.
The cached loaders' one-off decode (in ``setup``) is reported separately.

Last, the tensor conversion every image goes through: ftlab's one-step ``ToNormalizedTensor`` against
torchvision's ``ToTensor()`` + ``Normalize()``, alternating over the same train images after the eval
resize, with their outputs compared bit for bit.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TINY_OVERRIDES, compose, interleaved, parse_args, row, tiny_image_folder, write_result


def _epoch(loader: Any) -> Any:
    def run() -> int:
        return sum(len(y) for _, y in loader)

    return run


def tensor_conversion(dm: Any, rounds: int, n: int = 256) -> dict[str, Any]:
    """Seconds per image of ``ToNormalizedTensor`` vs ``ToTensor`` + ``Normalize`` on ``dm``'s train images."""
    import torch
    from torchvision import transforms as T

    from ftlab.data.images import load_rgb
    from ftlab.data.transforms import ToNormalizedTensor, eval_geometry

    pre = dm.preprocessing
    geometry = eval_geometry(pre)
    images = [geometry(load_rgb(p)) for p, _ in dm.datasets["train"].samples[:n]]
    fused, two = ToNormalizedTensor(pre["mean"], pre["std"]), T.Compose([T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    t = interleaved({"fused": lambda: [fused(i) for i in images], "torchvision": lambda: [two(i) for i in images]},
                    rounds=rounds, warmup=1)
    return {"ratio": t["fused"] / t["torchvision"], "fused_us": 1e6 * t["fused"] / len(images),
            "torchvision_us": 1e6 * t["torchvision"] / len(images), "images": len(images), "rounds": rounds,
            "equal": all(torch.equal(fused(i), two(i)) for i in images)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    started = time.perf_counter()
    import torch
    from hydra.utils import instantiate

    from ftlab.train import build

    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    if args.tiny:
        base = [*TINY_OVERRIDES, "data=imagefolder", f"data.root={tiny_image_folder(tmp / 'images')}",
                "data.num_workers=0", "data.batch_size=4"]
        sizes, rounds, steps = [32], 1, {32: 1}
    else:
        # One step at 224 px already takes seconds on a small CPU.
        base, sizes, rounds, steps = [], [64, 224], 3, {64: 4, 224: 1}
    cfg = compose(base, tmp / "run")
    _, model, _ = build(cfg)
    default_threads = torch.get_num_threads()
    model.train()
    optimizer = model.make_optimizer()

    loaders: dict[str, Any] = {}
    datamodules: dict[str, Any] = {}
    setup_s: dict[str, float] = {}
    fns: dict[str, Any] = {}
    batch_images: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    n_train = 0
    for size in sizes:
        for augment in ("none", "basic"):
            for cache in (False, True):
                if size != sizes[0] and augment != "none":
                    continue  # 224 px: the default preset only (each epoch costs seconds there)
                key = f"{size}px {augment}{' cached' if cache else ''}"
                over = [*base, f"data.image_size={size}", f"data.augment={augment}",
                        f"data.cache={str(cache).lower()}"]
                dm = instantiate(compose(over, tmp / "run").data, _convert_="all")
                dm.discover()
                dm.set_preprocessing(model.data_config)
                t0 = time.perf_counter()
                dm.setup("fit")
                setup_s[key] = time.perf_counter() - t0
                loaders[key] = dm.train_dataloader()
                datamodules[key] = dm
                fns[f"loader {key}"] = _epoch(loaders[key])
                n_train = len(dm.datasets["train"])
                if size not in batch_images:
                    batch_images[size] = next(iter(loaders[key]))
        x, y = batch_images[size]

        # The default thread count (what training uses) and one thread: on a loaded machine torch's
        # OpenMP threads spin-wait on each other and the default can be many times slower. The ratio
        # takes the faster, so "the loader keeps up" is not flattered by a slowed-down model.
        for threads in sorted({default_threads, 1}):

            def steps_fn(x: torch.Tensor = x, y: torch.Tensor = y, n: int = steps[size],
                         th: int = threads) -> None:
                torch.set_num_threads(th)
                try:
                    for _ in range(n):
                        optimizer.zero_grad(set_to_none=True)
                        model.criterion(model(x), y).backward()
                        optimizer.step()
                finally:
                    torch.set_num_threads(default_threads)

            fns[f"model {size}px {threads}t"] = steps_fn
    num_workers = loaders[next(iter(loaders))].num_workers
    batch = len(batch_images[sizes[0]][1])
    t = interleaved(fns, rounds=rounds, warmup=1)
    ips = {k.removeprefix("loader "): n_train / v for k, v in t.items() if k.startswith("loader ")}
    by_threads = {(s, th): steps[s] * len(batch_images[s][1]) / t[f"model {s}px {th}t"]
                  for s in sizes for th in sorted({default_threads, 1})}
    model_ips = {s: max(v for (sz, _), v in by_threads.items() if sz == s) for s in sizes}

    def model_detail(s: int) -> str:
        return ", ".join(f"{by_threads[(s, th)]:.1f} with {th} thread(s)"
                         for th in sorted({default_threads, 1}))

    s0 = sizes[0]
    none, basic = ips[f"{s0}px none"], ips[f"{s0}px basic"]
    rows = [row(
        "data: loader / model images/s", min(none, basic) / model_ips[s0], "≥ 1",
        f"{s0} px, {num_workers} loader worker(s){'' if args.tiny else ' (auto)'}, batch {batch}: loader "
        f"{none:.0f} img/s with augment=none (the digits default), {basic:.0f} with basic; the default model "
        f"(LoRA step: forward, backward, AdamW) consumes {model_detail(s0)} img/s; value = the slower "
        f"preset / the faster model figure. Measured apart: in training the worker shares the CPU with the "
        f"model step",
        args.tiny)]
    speed_none = ips[f"{s0}px none cached"] / none
    speed_basic = ips[f"{s0}px basic cached"] / basic
    rows.append(row(
        "data.cache: loader speed-up", speed_none, "> 1",
        f"{s0} px, augment=none: {ips[f'{s0}px none cached']:.0f} vs {none:.0f} img/s uncached "
        f"(store holds the eval resize + crop); augment=basic: {ips[f'{s0}px basic cached']:.0f} vs "
        f"{basic:.0f} img/s = {speed_basic:.2f}x (native store, augmentation per sample); one-off decode in "
        f"setup {setup_s[f'{s0}px none cached']:.2f} s / {setup_s[f'{s0}px basic cached']:.2f} s. The loader "
        f"already outruns the model here, so on the digits the cache does not shorten training; it pays off "
        f"where reading/decoding is the bottleneck (large JPEGs, network file systems, few cores per GPU)",
        args.tiny))
    if 224 in sizes:
        c, u = ips["224px none cached"], ips["224px none"]
        rows.append(row(
            "data.cache: loader speed-up (224 px)", c / u, None,
            f"augment=none: {c:.0f} vs {u:.0f} img/s uncached; decode + resize in setup "
            f"{setup_s['224px none cached']:.2f} s", args.tiny))
        rows.append(row(
            "data: loader / model images/s (224 px)", u / model_ips[224], "≥ 1",
            f"uncached loader {u:.0f} img/s (augment=none) vs the default model at 224 px "
            f"{model_detail(224)} img/s", args.tiny))
    conversion = tensor_conversion(datamodules[f"{s0}px none"], 1 if args.tiny else 7)
    rows.append(row(
        "data: ToNormalizedTensor / ToTensor + Normalize time per image", conversion["ratio"], "< 1",
        f"{s0} px RGB, {conversion['images']} train images after the eval resize: {conversion['fused_us']:.0f} vs "
        f"{conversion['torchvision_us']:.0f} µs per image (median of {conversion['rounds']}); outputs equal bit "
        f"for bit on every image: {conversion['equal']}", args.tiny))
    config = {"data": str(dm.root),
              "train_images": n_train, "batch_size": batch, "num_workers": num_workers, "sizes": sizes,
              "rounds": rounds, "model_steps_per_call": {f"{k}px": v for k, v in steps.items()},
              "images_per_s": {k: round(v, 1) for k, v in ips.items()},
              "model_images_per_s": {f"{s}px {th} thread(s)": round(v, 1)
                                     for (s, th), v in by_threads.items()},
              "cache_setup_s": {k: round(v, 2) for k, v in setup_s.items() if "cached" in k}}
    write_result("data_pipeline", args.out, rows, config, started)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
