"""Cost growth: how a run's fit time and peak memory grow with the number of training images and the image size.

One method (``--method``, LoRA by default) on ``data=fashion_mnist`` with the default model
(EfficientNet-Lite0), each point a complete ``python -m ftlab`` run for one epoch in a fresh child
process; its ``fit_seconds`` and ``peak_rss_mb`` come from the run's ``metrics.json``. Points: 1,000 /
3,000 / 10,000 training images at 64 px, then 64 / 128 / 224 px at 1,000 images. Validation is fixed
at 500 images and test at 500, so a point's fit time is one training epoch plus one validation pass
over 500 images (and Lightning's two-batch sanity check). The first point runs again at the end: the
gap between its two times is the drift of the machine during the measurement. A plot of both curves
goes to ``<out>/cost_growth.png``.

    python bench/cost_growth.py                    # about 7 minutes on 2 idle cores
    python bench/cost_growth.py --method full
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, TINY_OVERRIDES, ensure_src_on_path, parse_args, row, write_result

TRAIN_IMAGES = (1000, 3000, 10000)
IMAGE_SIZES = (64, 128, 224)
BASE_SIZE = 64
FIXED = ["data=fashion_mnist", "data.val_size=500", "data.test_limit=500", "trainer.max_epochs=1"]
# At toy sizes: the tiny test network on a toy Fashion-MNIST written from random idx files.
TINY_TRAIN, TINY_SIZES = (40, 80), (32, 48)
TINY_FIXED = [*TINY_OVERRIDES, "data=fashion_mnist", "data.val_size=20", "data.test_limit=20",
              "trainer.max_epochs=1", "data.num_workers=0", "logger=none"]


def toy_fashion_mnist(folder: Path) -> Path:
    """A materialised toy Fashion-MNIST (random 28x28 images, 20 train / 4 test per class) for ``--tiny``."""
    import numpy as np

    ensure_src_on_path()
    from ftlab.data.fashion_mnist import FILES, materialize_fashion_mnist

    rng = np.random.default_rng(0)
    source = folder / "source"
    source.mkdir(parents=True)
    for split, per_class in (("train", 20), ("test", 4)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images_file, labels_file = FILES[split]
        with gzip.open(source / images_file, "wb") as f:
            f.write(np.array([0x803, len(labels), 28, 28], ">u4").tobytes() + images.tobytes())
        with gzip.open(source / labels_file, "wb") as f:
            f.write(np.array([0x801, len(labels)], ">u4").tobytes() + labels.tobytes())
    return materialize_fashion_mnist(folder / "fashion_mnist", source)


def measure(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """One run of ``python -m ftlab`` in a child process: its fit time and peak memory."""
    cmd = [sys.executable, "-m", "ftlab", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cost_growth: {' '.join(cmd[2:])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"fit_seconds": metrics["fit_seconds"], "peak_rss_mb": metrics["peak_rss_mb"],
            "train_images": metrics["split_sizes"]["train"], "test_acc": metrics.get("test/acc")}


def plot(points: list[dict[str, Any]], path: Path, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, vary, fixed_key, label in ((axes[0], "train_images", "image_size", "training images"),
                                       (axes[1], "image_size", "train_images", "image size (px)")):
        pts = sorted((p for p in points if p["series"] == vary), key=lambda p: p[vary])
        xs = [p[vary] for p in pts]
        ax.plot(xs, [p["fit_seconds"] for p in pts], "o-", color="tab:blue")
        ax.set_xlabel(label)
        ax.set_ylabel("fit time, 1 epoch (s)", color="tab:blue")
        ax.set_xticks(xs)
        mem = ax.twinx()
        mem.plot(xs, [p["peak_rss_mb"] for p in pts], "s--", color="tab:red")
        mem.set_ylabel("peak RSS (MiB)", color="tab:red")
        # Both axes from zero: growth is read as a proportion.
        ax.set_ylim(0, 1.1 * max(p["fit_seconds"] for p in pts))
        mem.set_ylim(0, 1.1 * max(p["peak_rss_mb"] for p in pts))
        fixed = f"{pts[0][fixed_key]} px" if fixed_key == "image_size" else f"{pts[0][fixed_key]:,} training images"
        ax.set_title(f"at {fixed}", fontsize=9)
    fig.suptitle(f"method={method} on data=fashion_mnist, EfficientNet-Lite0, 2 CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--method", default="lora"))
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-growth-"))
    if args.tiny:
        counts, sizes, fixed = TINY_TRAIN, TINY_SIZES, [*TINY_FIXED, f"data.root={toy_fashion_mnist(tmp / 'data')}"]
    else:
        counts, sizes, fixed = TRAIN_IMAGES, IMAGE_SIZES, FIXED
    base_n, base_px = counts[0], sizes[0]
    plan = [("train_images", n, base_px) for n in counts] + [("image_size", base_n, px) for px in sizes[1:]]
    points = []
    for i, (series, n, px) in enumerate(plan + [("repeat", base_n, base_px)]):
        overrides = [*fixed, f"method={args.method}", f"data.train_limit={n}", f"data.image_size={px}"]
        result = measure(overrides, tmp / f"point{i}")
        points.append({"series": series, "train_images": n, "image_size": px, **result, "overrides": overrides})
        print(f"[cost_growth] {n} images at {px} px: fit {result['fit_seconds']:.1f} s, "
              f"peak RSS {result['peak_rss_mb']:.0f} MiB", flush=True)
    repeat = points.pop()
    base = points[0]
    # The base point also belongs to the image-size series.
    points.append({**base, "series": "image_size"})
    rows = []
    for p in points[:-1]:
        ratio = p["fit_seconds"] / base["fit_seconds"]
        rows.append(row(f"cost growth ({args.method}): fit s, {p['train_images']:,} images at {p['image_size']} px",
                        p["fit_seconds"], None,
                        f"{ratio:.2f}× the {base_n:,}-image {base_px}-px point; peak RSS {p['peak_rss_mb']:.0f} MiB; "
                        f"{1000 * p['fit_seconds'] / p['train_images']:.1f} s per 1,000 training images", args.tiny))
    drift = repeat["fit_seconds"] / base["fit_seconds"]
    rows.append(row(f"cost growth ({args.method}): first point again at the end / first", drift, None,
                    f"{repeat['fit_seconds']:.1f} s vs {base['fit_seconds']:.1f} s (the machine's drift)", args.tiny))
    args.out.mkdir(parents=True, exist_ok=True)
    plot(points, args.out / "cost_growth.png", args.method)
    config = {"method": args.method, "fixed": fixed, "sizes": list(sizes), "train_images": list(counts),
              "points": [{k: p[k] for k in ("series", "train_images", "image_size", "fit_seconds", "peak_rss_mb")}
                         for p in points],
              "repeat_fit_seconds": repeat["fit_seconds"], "plot": "cost_growth.png"}
    write_result("cost_growth", args.out, rows, config, started)


if __name__ == "__main__":
    main()
