"""Text models after training: their tokenizer, texts to label (lines, CSV/TSV/JSONL columns, folders of
``.txt`` files) and length-sorted batches. ``ftlab eval``/``predict``/``export`` use it when a model's
preprocessing is ``{"modality": "text", "tokenizer": ..., "max_length": ...}``.

Texts that cannot be used (empty, not UTF-8) are returned as ``(where, why)`` pairs, never raised, so the
caller skips them and names them all in one warning, as unreadable images are.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.data.text import (
    FILE_FORMATS,
    TEXT_SUFFIX,
    PadCollate,
    decode_utf8,
    encode_texts,
    pad_token_id,
    text_problem,
)
from ftlab.errors import UserError

# (where, text): where = a file, or file:line for a line/record of a bigger file.
Item = tuple[str, str]
Bad = tuple[str, str]
INPUT_KINDS = "a .txt file (one text per line), a .csv/.tsv/.jsonl file (a text column) or a folder of .txt files"


# -- the model's tokenizer -----------------------------------------------------------------------
class TextEncoder:
    """The tokenizer a text model was trained with, truncating and padding exactly as training did."""

    def __init__(self, preprocessing: dict[str, Any], tokenizer: Any = None) -> None:
        from ftlab.models.hf import load_tokenizer

        self.name = str(preprocessing["tokenizer"])
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.name)
        max_length = int(preprocessing.get("max_length") or 128)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < max_length:
            max_length = limit
        self.max_length = max_length
        side = getattr(self.tokenizer, "padding_side", "right") or "right"
        self.collate = PadCollate(pad_token_id(self.tokenizer), side)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_texts(self.tokenizer, texts, self.max_length)


def length_batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``ids`` in batches of similar length (least padding); every index exactly once."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def text_logits(
    net: nn.Module,
    ids: Sequence[Sequence[int]],
    collate: PadCollate,
    batch_size: int,
    device: torch.device,
    batches: Iterator[list[int]] | None = None,
) -> torch.Tensor:
    """fp32 cpu logits of every token sequence, in the order of ``ids`` (batched by length)."""
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for chunk in batches if batches is not None else length_batches(ids, batch_size):
            x = {k: v.to(device) for k, v in collate.pad([ids[i] for i in chunk]).items()}
            logits = net(x).float().cpu()
            if out is None:
                out = torch.empty(len(ids), logits.shape[1])
            out[chunk] = logits
    return out if out is not None else torch.empty(0, 0)


# -- texts to label -------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _lines(path: Path) -> tuple[list[Item], list[Bad]]:
    items: list[Item] = []
    bad: list[Bad] = []
    for n, line in enumerate(decode_utf8(_read_bytes(path)).split("\n"), start=1):
        text = line.strip()
        if not text:  # blank lines separate nothing: skipped silently
            continue
        problem = text_problem(text)
        if problem:
            bad.append((f"{path}:{n}", problem))
        else:
            items.append((f"{path}:{n}", text))
    return items, bad


def _missing_column(where: str, key: str, columns: Sequence[str]) -> UserError:
    shown = ", ".join(repr(c) for c in columns) or "none"
    return UserError(f"{where}: no column {key!r} (columns: {shown}); pass text_column=NAME")


def _delimited(path: Path, text_column: str) -> tuple[list[Item], list[Bad]]:
    delimiter = FILE_FORMATS[path.suffix.lower().lstrip(".")]
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(decode_utf8(_read_bytes(path)), newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header line with a {text_column!r} column)") from None
    except csv.Error as exc:
        raise UserError(f"{path} line 1: {exc}") from None
    if text_column not in header:
        raise _missing_column(str(path), text_column, header)
    col = header.index(text_column)
    items: list[Item] = []
    bad: list[Bad] = []
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
        if not record:
            continue
        if len(record) != len(header):
            hint = " (an unquoted comma in the text? quote the field)" if delimiter == "," else ""
            raise UserError(f"{path} line {start}: {len(record)} fields, the header has {len(header)}{hint}")
        text = record[col]
        problem = text_problem(text)
        if problem:
            bad.append((f"{path}:{start}", problem))
        else:
            items.append((f"{path}:{start}", text.strip()))
    return items, bad


def _jsonl(path: Path, text_column: str) -> tuple[list[Item], list[Bad]]:
    items: list[Item] = []
    bad: list[Bad] = []
    for n, line in enumerate(decode_utf8(_read_bytes(path)).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} line {n}: expected a JSON object with a {text_column!r} key")
        if text_column not in obj:
            raise _missing_column(f"{path} line {n}", text_column, list(obj))
        text = obj[text_column]
        problem = text_problem(text)
        if problem:
            bad.append((f"{path}:{n}", problem))
        else:
            items.append((f"{path}:{n}", text.strip()))
    return items, bad


def _folder(root: Path) -> tuple[list[Item], list[Bad]]:
    files = sorted(
        os.path.join(dp, f)
        for dp, dirs, fs in os.walk(root, followlinks=True)
        for f in fs
        if f.lower().endswith(TEXT_SUFFIX) and not f.startswith(".")
    )
    if not files:
        raise UserError(f"input={root}: no {TEXT_SUFFIX} files in the folder (a text model reads one text per file)")
    items: list[Item] = []
    bad: list[Bad] = []
    for f in files:
        try:
            text = Path(f).read_bytes().decode("utf-8-sig").strip()
            problem = text_problem(text)
        except UnicodeDecodeError as exc:
            text, problem = "", f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        except OSError as exc:
            text, problem = "", f"cannot read ({exc.strerror or exc})"
        if problem:
            bad.append((f, problem))
        else:
            items.append((f, text))
    return items, bad


def read_texts(input_path: str | os.PathLike[str], text_column: str = "text") -> tuple[list[Item], list[Bad]]:
    """``([(where, text)], [(where, why skipped)])`` from ``input_path``: a ``.txt`` file (one text per
    line, blank lines skipped), a ``.csv``/``.tsv``/``.jsonl`` file (its ``text_column``; other columns
    are ignored) or a folder (every ``*.txt`` file below it is one text)."""
    path = Path(input_path).expanduser()
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise UserError(f"input={input_path}: no such file or folder")
    suffix = path.suffix.lower().lstrip(".")
    if suffix == TEXT_SUFFIX.lstrip("."):
        items, bad = _lines(path)
    elif suffix == "jsonl":
        items, bad = _jsonl(path, text_column)
    elif suffix in FILE_FORMATS:
        items, bad = _delimited(path, text_column)
    else:
        raise UserError(f"input={input_path}: a text model reads {INPUT_KINDS}")
    if not items and not bad:
        raise UserError(f"input={input_path}: no texts in the file")
    return items, bad
