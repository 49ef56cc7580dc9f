"""Class imbalance on the digits: plain training vs ``data.sampler=balanced`` vs ``model.class_weights=auto``.

Writes an imbalanced cut of the digits as an image folder (``<data dir>/digits_imbalanced``): classes 5-9 keep
10 % of their train images (seeded, at least one each), classes 0-4 keep all; val and test are the digits' own
balanced splits, so test/acc and macro-F1 (``test/f1``) weigh every class alike. Then it runs the default
experiment (``python -m ftlab``, LoRA on EfficientNet-Lite0) on it three times, each in a child process
(the exact commands are printed), and prints test/acc and test/f1 per variant. ``--write-only`` just writes
the folder; ``--tiny`` runs the tiny test network for one short epoch (numbers mean nothing).

    python bench/imbalance.py                  # ~3 default runs; writes outputs/bench/imbalance.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RARE = ("5", "6", "7", "8", "9")
KEEP = 0.10
SEED = 0
# The digits' own settings (conf/data/digits.yaml) for data=imagefolder.
AS_DIGITS = ["data.image_size=64", "data.crop_pct=1.0", "data.augment=none", "data.hflip=false"]
VARIANTS = {
    "plain": [],
    "data.sampler=balanced": ["data.sampler=balanced"],
    "model.class_weights=auto": ["model.class_weights=auto"],
}
TINY = ["model=timm", "model.name=test_resnet", "model.pretrained=false", "data.image_size=32",
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "data.num_workers=0", "logger=none"]


def data_dir() -> Path:
    return Path(os.environ.get("FTLAB_DATA_DIR", REPO / "data"))


def write_imbalanced(target: Path, source: Path, rare: tuple[str, ...] = RARE, keep: float = KEEP,
                     seed: int = SEED) -> dict[str, int]:
    """Copy the digits tree ``source`` to ``target``, the ``rare`` classes of train cut to ``keep`` (seeded);
    returns the train images per class."""
    if target.exists():
        shutil.rmtree(target)
    rng = random.Random(seed)
    counts = {}
    for split in ("train", "val", "test"):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.png"))
            if split == "train" and folder.name in rare:
                files = sorted(rng.sample(files, max(1, round(keep * len(files)))))
            out = target / split / folder.name
            out.mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, out / f.name)
            if split == "train":
                counts[folder.name] = len(files)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test network, one short epoch")
    parser.add_argument("--write-only", action="store_true", help="write the imbalanced folder and stop")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench", help="directory for imbalance.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from ftlab.data import materialize_digits

    source = materialize_digits(data_dir() / "digits")
    target = data_dir() / "digits_imbalanced"
    counts = write_imbalanced(target, source)
    print(f"{target}: train images per class {counts}; val and test as the digits'")
    if args.write_only:
        return
    results = {}
    runs = Path(args.out) / "imbalance_runs"
    for name, extra in VARIANTS.items():
        overrides = ["data=imagefolder", f"data.root={target}", *AS_DIGITS, *extra, *(TINY if args.tiny else [])]
        command = [sys.executable, "-m", "ftlab", *overrides]
        run_dir = runs / name.replace("=", "_")
        shown = "python -m ftlab " + " ".join(shlex.quote(o) for o in overrides)
        print(f"[{name}] {shown}", flush=True)
        started = time.perf_counter()
        subprocess.run([*command, f"hydra.run.dir={run_dir}"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[name] = {"command": shown, "test/acc": metrics.get("test/acc"), "test/f1": metrics.get("test/f1"),
                         "val/acc_best": metrics.get("val/acc_best"), "seconds": round(time.perf_counter() - started)}
        print(f"[{name}] test/acc {results[name]['test/acc']:.4f}  test/f1 (macro) {results[name]['test/f1']:.4f}",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "imbalance.json").write_text(json.dumps({"train_counts": counts, "tiny": args.tiny,
                                                         "results": results}, indent=2) + "\n")
    print("| variant | test/acc | test macro-F1 |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['test/acc']:.4f} | {r['test/f1']:.4f} |")


if __name__ == "__main__":
    main()
