"""`ftlab predict`: batched inference over a folder (or one file), one CSV row per readable image."""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ftlab.data.images import list_images
from ftlab.errors import UserError
from ftlab.fileio import atomic_open
from ftlab.inference import (
    describe_source,
    image_loader,
    load_predictor,
    pick_device,
    warn_unreadable,
    with_progress,
)


def csv_header(top_k: int) -> list[str]:
    ranked = [f"top{i}_{kind}" for i in range(1, top_k + 1) for kind in ("label", "prob")]
    return ["path", "label", "prob", *ranked]


def predict(
    source: str,
    input_path: str,
    output: str | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    num_workers: int | str = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Write ``path,label,prob,top1_label,top1_prob,...`` for every readable image; returns a summary."""
    if top_k < 1:
        raise UserError(f"top_k={top_k}: must be a positive integer")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be a positive integer")
    files = list_images(input_path)
    net, info = load_predictor(source)
    names = info["class_names"]
    k = min(top_k, len(names))
    home = Path(info["run_dir"]) if info.get("run_dir") else Path.cwd()
    out = Path(output).expanduser() if output else home / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    net = net.to(dev)
    loader = image_loader(files, info["preprocessing"], batch_size, num_workers)
    bad: list[tuple[str, str]] = []
    counts: Counter[str] = Counter()
    written = 0
    started = time.perf_counter()
    with atomic_open(out, "w", newline="") as handle, torch.inference_mode():
        writer = csv.writer(handle)
        writer.writerow(csv_header(k))
        for x, idx, unreadable in with_progress(loader, len(loader), "predict"):
            bad += [(files[i], err) for i, err in unreadable]
            if x is None:
                continue
            probs = net(x.to(dev)).float().softmax(dim=1).cpu()
            top_p, top_i = probs.topk(k, dim=1)
            for row, i in enumerate(idx):
                ranked = zip(top_i[row].tolist(), top_p[row].tolist(), strict=True)
                pairs = [(names[c], f"{p:.6f}") for c, p in ranked]
                writer.writerow([files[i], *pairs[0], *[v for pair in pairs for v in pair]])
                counts[pairs[0][0]] += 1
                written += 1
    seconds = time.perf_counter() - started
    warn_unreadable(bad)
    if not written:
        raise UserError(f"input={input_path}: none of the {len(files)} files could be read as an image")
    summary = {
        "source": info["path"],
        "output": str(out),
        "images": written,
        "skipped": [path for path, _ in bad],
        "top_k": k,
        "seconds": round(seconds, 2),
        "label_counts": dict(counts.most_common()),
    }
    _print_summary(summary, describe_source(info), top_k)
    return summary


def _print_summary(summary: dict[str, Any], source: str, asked_k: int) -> None:
    rate = summary["images"] / max(summary["seconds"], 1e-9)
    common = ", ".join(f"{label} {n}" for label, n in list(summary["label_counts"].items())[:5])
    lines = [
        f"ftlab predict: {summary['images']} image(s) in {summary['seconds']:.1f} s ({rate:.1f}/s)"
        + (f", {len(summary['skipped'])} skipped" if summary["skipped"] else ""),
        f"  model: {source}",
        f"  most predicted: {common}",
        f"  written to: {summary['output']}",
    ]
    if summary["top_k"] < asked_k:
        lines.append(f"  note: top_k={asked_k} capped at the model's {summary['top_k']} classes")
    print("\n".join(lines))
