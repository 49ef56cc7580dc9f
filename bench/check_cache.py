"""Image-check cache: the start-up cost of the upfront image check, first start vs second start.

A generated ImageFolder of about 10,000 small images (``--images``; 10 class folders under ``train/`` and ``test/``, sizes
48-160 px, every other one a JPEG, the rest PNGs), dated an hour back (a dataset nobody is writing while a
run starts). The data module is built from the shipped ``data=imagefolder`` config (``compose`` +
``hydra.utils.instantiate``, as ``python -m ftlab`` does) and ``discover()`` is timed: the scan, the check
and the split, everything a run does with its files before the model is built. The first start finds no
cache and decodes every image; the second finds ``<root>/.ftlab-image-check.json`` and decodes none. The
pair repeats (``--rounds``; the cache removed before each first start); medians are reported, with the scan
alone (``data.check_images=false``) for the floor. Decodes are counted by wrapping the check's decode
function.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import compose, ensure_src_on_path, parse_args, row, write_result

CLASSES = 10


def make_images(root: Path, count: int) -> Path:
    """``count`` small images, JPEG and PNG alternating, in ``root/{train,test}/c0..c9`` (every fifth in test/);
    mtimes an hour back."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    old = time.time_ns() - 3600 * 10**9
    for i in range(count):
        folder = root / ("test" if (i // CLASSES) % 5 == 4 else "train") / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(48, 161, 2))
        # A smooth colour field plus noise: photo-like file sizes (a few kB), not incompressible noise.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * (255 / w), yy * (255 / h), np.full((h, w), 40.0 * (i % CLASSES) % 255)], -1)
        img = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png")
        if i % 2:
            Image.fromarray(img).save(path, quality=90)
        else:
            Image.fromarray(img).save(path)
        os.utime(path, ns=(old, old))
    return root


def _options(parser: Any) -> None:
    parser.add_argument("--images", type=int, default=10_000, help="images in the generated folder")
    parser.add_argument("--rounds", type=int, default=3, help="first/second start pairs")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _options)
    started = time.perf_counter()
    ensure_src_on_path()
    from hydra.utils import instantiate

    from ftlab.data import image_check

    count, rounds = (60, 1) if args.tiny else (args.images, args.rounds)
    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    try:
        t0 = time.perf_counter()
        root = make_images(tmp / "images", count)
        generate_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in root.rglob("*.*")) / 2**20
        print(f"[check_cache] generated {count:,} images ({size_mb:.0f} MB) in {generate_s:.0f} s", flush=True)

        decoded = [0]
        real = image_check.image_problem

        def counted(path: str) -> str | None:
            decoded[0] += 1
            return real(path)

        image_check.image_problem = counted
        cache_file = root / image_check.CACHE_NAME

        def start(*overrides: str) -> tuple[float, int]:
            cfg = compose(["data=imagefolder", f"data.root={root}", "data.num_workers=0", *overrides], tmp / "run")
            dm = instantiate(cfg.data, _convert_="all")
            decoded[0] = 0
            t = time.perf_counter()
            dm.discover()
            return time.perf_counter() - t, decoded[0]

        times: dict[str, list[float]] = {"first": [], "second": [], "scan": []}
        for _ in range(rounds):
            cache_file.unlink(missing_ok=True)
            for name, overrides in (("first", ()), ("second", ()), ("scan", ("data.check_images=false",))):
                seconds, n = start(*overrides)
                expected = {"first": count, "second": 0, "scan": 0}[name]
                if n != expected:
                    raise SystemExit(f"check_cache: the {name} start decoded {n} images, expected {expected}")
                times[name].append(seconds)
                print(f"[check_cache] {name} start: {seconds:.2f} s, {n:,} images decoded", flush=True)
        cache_mb = cache_file.stat().st_size / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        row("image check: second / first start", median["second"] / median["first"], "≤ 0.2",
            f"median data-module start (scan, check, split) over {rounds} pair(s) on {count:,} images "
            f"({size_mb:.0f} MB, JPEG and PNG, 48-160 px): first {median['first']:.2f} s (every image decoded), "
            f"second {median['second']:.2f} s (none decoded; cache file {cache_mb:.1f} MB); the scan alone "
            f"(data.check_images=false) {median['scan']:.2f} s", args.tiny),
    ]
    config = {"images": count, "rounds": rounds, "megabytes": round(size_mb, 1), "cache_megabytes": round(cache_mb, 2),
              "generate_seconds": round(generate_s, 1),
              "seconds": {k: [round(s, 3) for s in v] for k, v in times.items()}}
    write_result("check_cache", args.out, rows, config, started)


if __name__ == "__main__":
    main()
