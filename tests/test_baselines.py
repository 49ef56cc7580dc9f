"""ftlab.baselines: TF-IDF + logistic regression and a frozen-encoder linear probe on a run's own text split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ftlab import baselines
from helpers import NEGATIVE, POSITIVE, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def make_rotten_tomatoes(data_dir: Path) -> Path:
    """A toy stand-in for the materialised data=rotten_tomatoes folder: the same files and columns."""
    root = data_dir / "rotten_tomatoes"
    parts = {"train": slice(0, 6), "val": slice(6, 8), "test": slice(8, 10)}
    for split, part in parts.items():
        rows = [(t, "fresh") for t in POSITIVE[part]] + [(t, "rotten") for t in NEGATIVE[part]]
        write_csv(root / f"{split}.csv", rows)
    return root


def test_tfidf_and_probe_on_the_data_modules_split(tmp_path: Path, tiny_bert: Path) -> None:
    root = make_rotten_tomatoes(tmp_path / "data")
    result = baselines.run_baselines(root, probe_model=str(tiny_bert))
    assert result["classes"] == ["fresh", "rotten"]
    assert result["split_sizes"] == {"train": 12, "val": 4, "test": 4} and not result["test_on_val"]
    tfidf, probe = result["baselines"]
    assert tfidf["name"] == "tfidf_logreg" and probe["name"] == "tiny-bert_linear_probe"
    for r in (tfidf, probe):
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["test_f1"] <= 1.0
        by_c = {float(c): acc for c, acc in r["val_acc_by_C"].items()}
        assert r["val_acc"] == max(by_c.values())
        assert r["C"] == min(c for c, acc in by_c.items() if acc == r["val_acc"])  # ties: the smaller C
    assert tfidf["test_acc"] >= 0.75  # the sentiment words are shared between the splits
    assert probe["embedding_dim"] == 32 and probe["max_length"] == 64  # the tiny model's width and limit
    json.dumps(result)  # JSON-ready as it is


def test_embeddings_do_not_depend_on_batching(tiny_bert: Path) -> None:
    from ftlab.models.hf import build_hf_backbone, load_tokenizer

    net = build_hf_backbone(str(tiny_bert), 2).net
    tokenizer = load_tokenizer(str(tiny_bert))
    texts = POSITIVE + NEGATIVE
    one = baselines.embed_texts(net, tokenizer, texts, 64, batch_size=1)
    batched = baselines.embed_texts(net, tokenizer, texts, 64, batch_size=7)
    assert one.shape == (20, 32) and net.training  # eval inside, the mode restored after
    np.testing.assert_allclose(one, batched, atol=1e-5)


def test_select_c_prefers_the_smaller_c_on_a_tie() -> None:
    class Fixed:
        def __init__(self, c: float) -> None:
            self.c = c

        def fit(self, x, y):
            return self

        def predict(self, x):
            return np.ones(len(x), int) if self.c >= 1 else np.zeros(len(x), int)

    y = np.array([1, 1, 0, 1])
    c, scores, model = baselines.select_c(Fixed, (y, y), (y, y), (0.1, 1.0, 10.0))
    assert c == 1.0 and scores == {0.1: 0.25, 1.0: 0.75, 10.0: 0.75} and model.c == 1.0


def test_command_line_writes_json_and_table(tmp_path: Path, capsys) -> None:
    make_rotten_tomatoes(tmp_path / "data")
    out = tmp_path / "out" / "rt.json"
    assert baselines.main(["data=rotten_tomatoes", "--data-dir", str(tmp_path / "data"), "--no-probe",
                           "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["baselines"]] == ["tfidf_logreg"] and result["dataset"] == "rotten_tomatoes"
    printed = capsys.readouterr().out
    assert "tfidf_logreg" in printed and "train/val/test 12/4/4" in printed and str(out) in printed
    assert not list(out.parent.glob(".*.tmp"))  # written atomically

    # Any text folder, with --limit (a seeded subset per split); a missing folder is one line, exit 1.
    other = tmp_path / "other"
    write_csv(other / "train.csv", [(t, "pos") for t in POSITIVE[:8]] + [(t, "neg") for t in NEGATIVE[:8]])
    write_csv(other / "test.csv", [(t, "pos") for t in POSITIVE[8:]] + [(t, "neg") for t in NEGATIVE[8:]])
    assert baselines.main(["--root", str(other), "--no-probe", "--limit", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "other" and result["limit"] == 5
    # No val file: 15 % of train (2 of 16) split off, stratified, as a run does; then at most 5 per split.
    assert result["split_sizes"] == {"train": 5, "val": 2, "test": 4}
    assert baselines.main(["--root", str(tmp_path / "nowhere"), "--no-probe", "--out", str(out)]) == 1
    assert "no such directory" in capsys.readouterr().err
