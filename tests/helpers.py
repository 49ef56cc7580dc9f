"""What tests share besides fixtures: tiny model/trainer overrides, toy image folders, paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image

from ftlab.config import CONFIG_DIR

REPO = Path(CONFIG_DIR).parent
# A tiny timm network (~0.5M params) keeps end-to-end tests to seconds.
TINY_MODEL = ["model=timm", "model.name=test_resnet", "model.pretrained=false", "data.image_size=32"]
FAST_TRAINER = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0"]


def make_base_weights(path: Path, seed: int = 0) -> Path:
    """The tiny network's weights in a file, for ``model.checkpoint=``: a base that can be rebuilt (as pretrained
    weights can), so PEFT runs write checkpoints without it (ftlab.base_weights)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(path))
    return path


def make_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 10,
    splits: tuple[str, ...] = ("train",),
    size: int = 20,
) -> Path:
    """Write a learnable toy dataset: each class is a distinct colour with noise."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 200
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


# For subprocesses started by tests: the same reason as `one_thread`.
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- text -------------------------------------------------------------------------------------------
WORDS = ("a an the great good fine bad awful dull movie film plot actor acting story really very not "
         "stock market fell rose today ! . ,").split()
POSITIVE = ["a great movie", "good acting", "a really fine film", "great story !", "very good plot",
            "a fine actor", "the film is great", "good good film", "great acting .", "a very fine story"]
NEGATIVE = ["a bad movie", "awful acting", "a really dull film", "bad story !", "very bad plot",
            "a dull actor", "the film is awful", "bad bad film", "dull acting .", "a very awful story"]


def make_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece vocabulary of a few words, saved as a model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True, model_max_length=64)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def labelled(n: int = 10) -> list[tuple[str, str]]:
    rows = [(t, "pos") for t in POSITIVE[:n]] + [(t, "neg") for t in NEGATIVE[:n]]
    return rows


def make_textfolder(root: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    for split in splits:
        for cls, texts in (("neg", NEGATIVE), ("pos", POSITIVE)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, text in enumerate(texts[:6] if split == "train" else texts[6:]):
                (folder / f"{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return root


def fake_run(path: Path, overrides: list[str], metrics: dict | None = None, error: str | None = None) -> Path:
    """A run directory as the report tools read it: .hydra/overrides.yaml, and metrics.json or error.txt."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (path / "error.txt").write_text(error + "\n")
    return path


class Crash(L.Callback):
    """Stop the process when optimizer step ``at`` is about to run, as a crash would (after the step
    checkpoints of the steps before it)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("crash")
