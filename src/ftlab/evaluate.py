"""`ftlab eval`: metrics of a trained model on a split of its run's data or on another ImageFolder.

Text models: the run's text data module (same val split of train, same test-on-val), or other text data
with ``data.root`` (``train/val/test.{csv,tsv,jsonl}`` or ``<split>/<class>/*.txt`` folders, a lone
``<split>.csv``, ``DIR/<class>/*.txt``, or one file), tokenised with the model's own tokenizer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict
from torchmetrics.classification import MulticlassConfusionMatrix

from ftlab.data import Sample, list_classes, scan_split
from ftlab.errors import UserError
from ftlab.fileio import write_json
from ftlab.inference import (
    describe_source,
    image_loader,
    is_text,
    load_predictor,
    pick_device,
    warn_unreadable,
    with_progress,
)
from ftlab.module import classification_metrics
from ftlab.runs import run_config, run_data_root
from ftlab.tta import check_tta, hflip_warning, tta_logits

SPLITS = ("test", "val", "train")


def _check_classes(found: list[str], names: list[str], where: Path | str, what: str = "class folder(s)") -> None:
    unknown = [c for c in found if c not in names]
    if unknown:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise UserError(
            f"{where}: {what} {', '.join(unknown[:5])} are not among the model's "
            f"{len(names)} classes ({shown})"
        )


def _from_datamodule(
    dm: Any, split: str, names: list[str], preprocessing: dict[str, Any]
) -> tuple[list[Sample], str | None]:
    """Samples of ``split`` as the training run saw them (same val split of train/, same test-on-val)."""
    text = is_text(preprocessing)
    classes = dm.discover()
    if text:
        _check_classes(classes, names, dm.root, "label(s)")
    else:
        _check_classes(classes, names, dm.root / "train")
    remap = [names.index(c) for c in classes]
    dm.set_preprocessing(preprocessing)
    dm.setup("test")
    note = None
    if split == "test" and dm.test_on_val:
        what = "no test split: these are the validation texts" if text else \
            "no test/ folder: these are the validation images"
        note = f"{dm.root} has {what}"
    return [(path, remap[label]) for path, label in dm.datasets[split].samples], note


def _datamodule(cfg: Any, root: str, target: str | None) -> Any:
    """A datamodule over ``root`` with the run's own data settings (val fraction, seed, folds, bad-image
    policy), so ``split`` holds exactly the images it held in training; ``target`` overrides the class."""
    import inspect

    from hydra.utils import get_class


    settings: dict[str, Any] = {}
    if cfg is not None and "data" in cfg:
        node = cfg.data.copy()
        with open_dict(node):
            node.root = root
        try:
            settings = OmegaConf.to_container(node, resolve=True)
        except Exception as exc:
            raise UserError(f"cannot read the run's data config ({exc}); pass data.root=DIR") from None
    cls = get_class(target or settings.get("_target_") or "ftlab.data.ImageFolderDataModule")
    accepted = inspect.signature(cls.__init__).parameters if target else None
    # data.cache is dropped: only the file lists are used, so decoding every image would be wasted.
    kwargs = {k: v for k, v in settings.items()
              if k not in ("_target_", "cache") and (accepted is None or k in accepted)}
    # Only the file lists are used: no loader workers.
    return cls(**{**kwargs, "root": root, "num_workers": 0})


def eval_samples(
    info: dict[str, Any], split: str, data_root: str | None
) -> tuple[list[Sample], str, str | None]:
    """(samples labelled with the model's class indices, data description, note) for ``split``."""
    names = info["class_names"]
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    cfg = run_config(run_dir) if run_dir else None
    if data_root is None:
        if cfg is None:
            raise UserError(f"{info['path']}: not in a run directory, so no saved data; pass data.root=DIR")
        root = run_data_root(run_dir, cfg)
        # The run's own datamodule class: the built-in digits re-materialise if their folder was removed.
        samples, note = _from_datamodule(_datamodule(cfg, root, None), split, names, info["preprocessing"])
        return samples, str(root), note
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root={data_root}: no such directory")
    if (root / "train").is_dir():
        dm = _datamodule(cfg, str(root), "ftlab.data.ImageFolderDataModule")
        samples, note = _from_datamodule(dm, split, names, info["preprocessing"])
        return samples, str(root), note
    # No train/: DIR/<split>/<class>/ if present, else DIR/<class>/ holds the images.
    folder = root / split if (root / split).is_dir() else root
    classes = list_classes(folder)
    if not classes:
        raise UserError(f"data.root={data_root}: expected DIR/<class>/ or DIR/{split}/<class>/ folders")
    _check_classes(classes, names, folder)
    return scan_split(folder, {c: i for i, c in enumerate(names)}), str(folder), None


TEXT_DATAMODULE = "ftlab.data.text.TextDataModule"


def _text_settings(cfg: Any, columns: dict[str, str | None] | None) -> tuple[str, str]:
    """(text_column, label_column): those given, else the run's, else text and label."""
    def pick(key: str, default: str) -> str:
        given = (columns or {}).get(key)
        saved = OmegaConf.select(cfg, f"data.{key}", default=None) if cfg is not None else None
        return str(given or saved or default)

    return pick("text_column", "text"), pick("label_column", "label")


def _labelled_rows(root: Path, split: str, cfg: Any, columns: dict[str, str | None] | None) -> tuple[list[Any], str]:
    """Rows ``(text, label, where, problem)`` of other text data without a train split, and where they are."""
    from ftlab.data.text import FILE_FORMATS, find_split_files, read_text_file, read_text_folder
    from ftlab.data.text import list_classes as text_classes

    text_column, label_column = _text_settings(cfg, columns)
    if root.is_file():
        return read_text_file(root, text_column, label_column), str(root)
    files = find_split_files(root)
    if split in files:
        return read_text_file(files[split], text_column, label_column), str(files[split])
    folder = root / split if (root / split).is_dir() else root
    if not text_classes(folder):
        kinds = "/".join(FILE_FORMATS)
        raise UserError(
            f"data.root={root}: expected {split}.{{{kinds}}} (columns {text_column},{label_column}), "
            f"{split}/<class>/*.txt or <class>/*.txt"
        )
    return read_text_folder(folder), str(folder)


def text_eval_data(
    info: dict[str, Any], split: str, data_root: str | None, columns: dict[str, str | None] | None = None,
) -> tuple[list[Sample], list[list[int]], Any, str, str | None, list[tuple[str, str]]]:
    """(samples (text, model class index), their token ids, the collate that pads them, data description,
    note, skipped (where, why)) for ``split`` of a text model's run data or of ``data_root``.

    ``columns``: ``text_column``/``label_column`` of other data (``data_root``), instead of the run's."""
    from ftlab.text_inference import TextEncoder

    names = info["class_names"]
    pre = info["preprocessing"]
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    cfg = run_config(run_dir) if run_dir else None
    if data_root is None:
        if cfg is None:
            raise UserError(f"{info['path']}: not in a run directory, so no saved data; pass data.root=DIR")
        root = run_data_root(run_dir, cfg)
        dm = _datamodule(cfg, root, None)
    else:
        path = Path(data_root).expanduser()
        if not path.exists():
            raise UserError(f"data.root={data_root}: no such file or directory")
        from ftlab.data.text import find_split_files

        has_train = path.is_dir() and ((path / "train").is_dir() or "train" in find_split_files(path))
        if not has_train:
            rows, where = _labelled_rows(path, split, cfg, columns)
            _check_classes(sorted({label for _, label, _, _ in rows}), names, where, "label(s)")
            bad = [(w, why) for _, _, w, why in rows if why]
            samples = [(text.strip(), names.index(label)) for text, label, _, why in rows if not why]
            encoder = TextEncoder(pre)
            return samples, encoder.encode([t for t, _ in samples]), encoder.collate, where, None, bad
        dm = _datamodule(cfg, str(path), TEXT_DATAMODULE)
        dm.source = "auto"  # other data: its own layout (CSV files or class folders) decides
        dm.text_column, dm.label_column = _text_settings(cfg, columns)
        root = str(path)
    samples, note = _from_datamodule(dm, split, names, pre)
    return samples, list(dm.datasets[split].ids), dm.collate, str(root), note, []


def _confusion_table(matrix: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    return [
        {"true": name, "predicted": {other: int(matrix[i, j]) for j, other in enumerate(names)}}
        for i, name in enumerate(names)
    ]


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Accuracy, top-5 (more than 5 classes), macro F1 and loss as in training, plus per-class figures."""
    n = len(names)
    metrics = classification_metrics(n, "")
    metrics.update(logits, targets)
    values = {k: float(v) for k, v in metrics.compute().items()}
    confusion = MulticlassConfusionMatrix(n)(logits, targets).long()
    support = confusion.sum(dim=1)
    per_class = {
        name: (float(confusion[i, i]) / int(support[i]) if support[i] else None)
        for i, name in enumerate(names)
    }
    out: dict[str, Any] = {
        "num_samples": int(len(targets)),
        "accuracy": values["acc"],
        "top5_accuracy": values.get("acc_top5"),
        "macro_f1": values["f1"],
        "loss": float(torch.nn.functional.cross_entropy(logits, targets)),
        "per_class_accuracy": per_class,
        "support": {name: int(support[i]) for i, name in enumerate(names)},
        "confusion_matrix": _confusion_table(confusion, names),
    }
    if out["top5_accuracy"] is None:
        del out["top5_accuracy"]
    return out


def default_output(info: dict[str, Any], split: str, data_root: str | None, tta: str | None = None) -> Path:
    home = Path(info["run_dir"]) if info.get("run_dir") else Path.cwd()
    where = Path(data_root).expanduser().resolve() if data_root else None
    stem = f"{where.stem if where.is_file() else where.name}_{split}" if where else split
    return home / "eval" / f"{stem}{f'_tta_{tta}' if tta else ''}.json"


def evaluate(
    source: str,
    split: str = "test",
    data_root: str | None = None,
    output: str | None = None,
    batch_size: int = 64,
    num_workers: int | str = "auto",
    device: str = "auto",
    text_column: str | None = None,
    label_column: str | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``source`` (run dir, checkpoint or artifact) and write the metrics JSON; returns it.

    ``text_column``/``label_column``: text models, the columns of ``data_root``'s CSV/TSV/JSONL files
    (default: the run's ``data.text_column``/``data.label_column``, else text and label).
    ``tta="hflip"``: image models, the mean of the logits of each image and its mirror image (:mod:`ftlab.tta`).
    """
    if split not in SPLITS:
        raise UserError(f"split={split}: choose one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be a positive integer")
    tta = check_tta(tta, "tta", text=False)  # a bad value fails before the model loads
    net, info = load_predictor(source)
    tta = check_tta(tta, "tta", text=is_text(info["preprocessing"]))
    if tta and data_root is None and info.get("run_dir"):
        cfg = run_config(Path(info["run_dir"]))
        warning = hflip_warning("tta", OmegaConf.select(cfg, "data.hflip", default=None) if cfg else None)
        if warning:
            print(f"ftlab: warning: {warning}", file=sys.stderr)
    dev = pick_device(device)
    net = net.to(dev)
    started = time.perf_counter()
    if is_text(info["preprocessing"]):
        columns = {"text_column": text_column, "label_column": label_column}
        logits, targets, bad, data, note = _text_outputs(net, info, split, data_root, batch_size, dev, columns)
    else:
        logits, targets, bad, data, note = _image_outputs(net, info, split, data_root, batch_size, num_workers, dev,
                                                          tta)
    seconds = time.perf_counter() - started
    result = {
        "source": info["path"],
        "source_kind": info["kind"],
        "method": info["method"],
        "model": info["base_model"].get("name"),
        "split": split,
        "data": data,
        **({"tta": tta} if tta else {}),
        **({"note": note} if note else {}),
        **({"skipped_unreadable": [p for p, _ in bad]} if bad else {}),
        "num_classes": info["num_classes"],
        **compute_metrics(logits, targets, info["class_names"]),
        "seconds": round(seconds, 2),
    }
    out = Path(output).expanduser() if output else default_output(info, split, data_root, tta)
    write_json(out, result)
    result["output"] = str(out)
    print_eval_summary(result, describe_source(info))
    return result


def _image_outputs(
    net: torch.nn.Module, info: dict[str, Any], split: str, data_root: str | None, batch_size: int,
    num_workers: int | str, dev: torch.device, tta: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], str, str | None]:
    samples, data, note = eval_samples(info, split, data_root)
    if not samples:
        raise UserError(f"{data}: no images to evaluate")
    loader = image_loader([p for p, _ in samples], info["preprocessing"], batch_size, num_workers, dev)
    logits, targets, bad = [], [], []
    with torch.inference_mode():
        for x, idx, unreadable in with_progress(loader, len(loader), f"eval {split}"):
            bad += [(samples[i][0], err) for i, err in unreadable]
            if x is not None:
                logits.append(tta_logits(net, x.to(dev), tta).float().cpu())
                targets.append(torch.tensor([samples[i][1] for i in idx]))
    warn_unreadable(bad)
    if not logits:
        raise UserError(f"{data}: none of the {len(samples)} images could be read")
    return torch.cat(logits), torch.cat(targets), bad, data, note


def _text_outputs(
    net: torch.nn.Module, info: dict[str, Any], split: str, data_root: str | None, batch_size: int,
    dev: torch.device, columns: dict[str, str | None],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], str, str | None]:
    from ftlab.text_inference import length_batches, text_logits

    samples, ids, collate, data, note, bad = text_eval_data(info, split, data_root, columns)
    warn_unreadable(bad, "text(s)")
    if not samples:
        raise UserError(f"{data}: no usable texts to evaluate")
    batches = length_batches(ids, batch_size)
    logits = text_logits(net, ids, collate, batch_size, dev, with_progress(batches, len(batches), f"eval {split}"))
    return logits, torch.tensor([label for _, label in samples]), bad, data, note


def print_eval_summary(result: dict[str, Any], source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ftlab eval: {result['split']}", show_header=False)
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths in full: they are what one copies next
    table.add_row("model", source)
    table.add_row("data", str(result["data"]))
    table.add_row("samples", str(result["num_samples"]))
    for key in ("accuracy", "top5_accuracy", "macro_f1", "loss"):
        if key in result:
            table.add_row(key, f"{result[key]:.4f}")
    rated = [(acc, name) for name, acc in result["per_class_accuracy"].items() if acc is not None]
    worst = sorted(rated)[:3]
    table.add_row("weakest classes", ", ".join(f"{name} {acc:.3f}" for acc, name in worst))
    if result.get("note"):
        table.add_row("note", result["note"])
    table.add_row("written to", result["output"])
    Console().print(table)
