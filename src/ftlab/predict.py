"""`ftlab predict`: batched inference over a folder (or one file), one CSV row per readable image.

Text models read a ``.txt`` file (one text per line), a ``.csv``/``.tsv``/``.jsonl`` file (its ``text``
column) or a folder of ``.txt`` files (one text each): one row per text, ``input,text,label,prob,...``.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ftlab.data.images import list_images
from ftlab.errors import UserError
from ftlab.fileio import atomic_open
from ftlab.inference import (
    describe_source,
    image_loader,
    is_text,
    load_predictor,
    pick_device,
    warn_unreadable,
    with_progress,
)
from ftlab.runs import run_config


def csv_header(top_k: int, text: bool = False) -> list[str]:
    ranked = [f"top{i}_{kind}" for i in range(1, top_k + 1) for kind in ("label", "prob")]
    return [*(("input", "text") if text else ("path",)), "label", "prob", *ranked]


def _ranked(probs: torch.Tensor, names: list[str], k: int) -> list[list[tuple[str, str]]]:
    top_p, top_i = probs.topk(k, dim=1)
    return [[(names[c], f"{p:.6f}") for c, p in zip(top_i[row].tolist(), top_p[row].tolist(), strict=True)]
            for row in range(len(probs))]


def predict(
    source: str,
    input_path: str,
    output: str | None = None,
    top_k: int = 3,
    batch_size: int = 32,
    num_workers: int | str = "auto",
    device: str = "auto",
    text_column: str | None = None,
) -> dict[str, Any]:
    """Write ``path,label,prob,top1_label,top1_prob,...`` for every readable image (text models:
    ``input,text,label,prob,...`` for every usable text); returns a summary.

    ``text_column``: the column of a CSV/TSV/JSONL input holding the texts (default: the run's
    ``data.text_column``, else ``text``); images ignore it.
    """
    if top_k < 1:
        raise UserError(f"top_k={top_k}: must be a positive integer")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be a positive integer")
    net, info = load_predictor(source)
    names = info["class_names"]
    k = min(top_k, len(names))
    home = Path(info["run_dir"]) if info.get("run_dir") else Path.cwd()
    out = Path(output).expanduser() if output else home / "predictions.csv"
    dev = pick_device(device)
    if is_text(info["preprocessing"]):
        return _predict_texts(net, info, input_path, out, top_k, k, batch_size, dev, text_column)
    files = list_images(input_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = net.to(dev)
    loader = image_loader(files, info["preprocessing"], batch_size, num_workers, dev)
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
            for i, pairs in zip(idx, _ranked(probs, names, k), strict=True):
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


def _text_column(info: dict[str, Any], text_column: str | None) -> str:
    if text_column:
        return text_column
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    cfg = run_config(run_dir) if run_dir is not None and (run_dir / ".hydra" / "config.yaml").is_file() else None
    column = OmegaConf.select(cfg, "data.text_column", default=None) if cfg is not None else None
    return str(column) if isinstance(column, str) and column else "text"


def _predict_texts(
    net: torch.nn.Module, info: dict[str, Any], input_path: str, out: Path, top_k: int, k: int,
    batch_size: int, dev: torch.device, text_column: str | None,
) -> dict[str, Any]:
    from ftlab.text_inference import TextEncoder, length_batches, read_texts, text_logits

    items, bad = read_texts(input_path, _text_column(info, text_column))
    if not items:
        warn_unreadable(bad, "text(s)")
        raise UserError(f"input={input_path}: none of the {len(bad)} texts could be used")
    names = info["class_names"]
    started = time.perf_counter()
    encoder = TextEncoder(info["preprocessing"])
    ids = encoder.encode([text for _, text in items])
    net = net.to(dev)
    batches = length_batches(ids, batch_size)
    logits = text_logits(net, ids, encoder.collate, batch_size, dev,
                         with_progress(batches, len(batches), "predict"))
    seconds = time.perf_counter() - started
    warn_unreadable(bad, "text(s)")
    counts: Counter[str] = Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header(k, text=True))
        for (where, text), pairs in zip(items, _ranked(logits.softmax(dim=1), names, k), strict=True):
            writer.writerow([where, text, *pairs[0], *[v for pair in pairs for v in pair]])
            counts[pairs[0][0]] += 1
    summary = {
        "source": info["path"],
        "output": str(out),
        "texts": len(items),
        "skipped": [where for where, _ in bad],
        "top_k": k,
        "seconds": round(seconds, 2),
        "label_counts": dict(counts.most_common()),
    }
    _print_summary(summary, describe_source(info), top_k)
    return summary


def _print_summary(summary: dict[str, Any], source: str, asked_k: int) -> None:
    noun = "text" if "texts" in summary else "image"
    count = summary[noun + "s"]
    rate = count / max(summary["seconds"], 1e-9)
    common = ", ".join(f"{label} {n}" for label, n in list(summary["label_counts"].items())[:5])
    lines = [
        f"ftlab predict: {count} {noun}(s) in {summary['seconds']:.1f} s ({rate:.1f}/s)"
        + (f", {len(summary['skipped'])} skipped" if summary["skipped"] else ""),
        f"  model: {source}",
        f"  most predicted: {common}",
        f"  written to: {summary['output']}",
    ]
    if summary["top_k"] < asked_k:
        lines.append(f"  note: top_k={asked_k} capped at the model's {summary['top_k']} classes")
    print("\n".join(lines))
