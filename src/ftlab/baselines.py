"""Reference accuracies measured by ftlab on exactly the texts (or images) a run trains and tests on.

Two classical baselines, each trained on ``train``, its regularisation ``C`` chosen on ``val`` from a small
grid (ties go to the smaller ``C``), then scored once on ``test``:

- ``tfidf_logreg``: TF-IDF over word 1- and 2-grams with sublinear term frequency, then a logistic
  regression (scikit-learn).
- ``<model>_linear_probe``: the frozen encoder's pooled sentence embedding
  (``build_hf_backbone(model, ...).net.features``: mean over real tokens for ``minilm``), extracted once in
  eval mode without gradients with the model's own tokenizer and ``max_length``, standardised, then a
  logistic regression.

The texts come from the data module a run uses (``data=rotten_tomatoes``: the CSVs written under
``<data_dir>/rotten_tomatoes``), so the numbers compare directly with a run's ``test/acc``::

    python -m ftlab.baselines                         # data=rotten_tomatoes under ./data (or FTLAB_DATA_DIR)
    python -m ftlab.baselines --data-dir /data        # /data/rotten_tomatoes
    python -m ftlab.baselines --root my_texts/        # any text data folder (train.csv, ...), as data.root
    python -m ftlab.baselines --no-probe              # TF-IDF only (seconds; no model needed)

For ``data=fashion_mnist`` the baselines read raw pixels (28 x 28 grayscale, scaled to [0, 1]) of exactly the
images a run uses: the same stratified ``train_limit`` subset, ``val_size`` validation images and official
test set (``--train-limit``, ``--val-size``, ``--test-limit``, ``--subset-seed``; defaults from
``conf/data/fashion_mnist.yaml``):

- ``pixels_logreg``: logistic regression on the 784 pixels.
- ``pixels_svc``: an RBF-kernel SVC on the 784 pixels (``gamma="scale"``), the strongest classical model of the
  Fashion-MNIST authors' scikit-learn benchmark (0.897 with C=10 on all 60,000 train images).

::

    python -m ftlab.baselines data=fashion_mnist                      # the default run's subset and test set
    python -m ftlab.baselines data=fashion_mnist --train-limit 20000

The table goes to stdout and the numbers to ``--out`` (default
``<FTLAB_OUTPUT_DIR or ./outputs>/baselines/<dataset>.json``), written atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.errors import UserError

log = logging.getLogger(__name__)

DATASET = "rotten_tomatoes"
# Logistic-regression inverse regularisation strengths tried on val (ascending: ties keep the smaller).
TFIDF_C_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
PROBE_C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_PROBE_MODEL = "minilm"
IMAGE_DATASET = "fashion_mnist"
# Grids for the pixel baselines (C chosen on val as for text).
PIXEL_LOGREG_C_GRID = (0.01, 0.1, 1.0)
PIXEL_SVC_C_GRID = (1.0, 10.0, 100.0)
# data=fashion_mnist keys the pixel baselines take, defaults from conf/data/fashion_mnist.yaml.
SUBSET_KEYS = ("train_limit", "val_size", "test_limit", "subset_seed")
EMBED_BATCH = 64
SEED = 0

Split = tuple[list[str], np.ndarray]  # texts, class indices


# -- data ------------------------------------------------------------------------------------------
def load_splits(root: str | os.PathLike, rotten_tomatoes: bool = True, limit: int | None = None,
                ) -> tuple[list[str], dict[str, Split], Any]:
    """``(classes, {split: (texts, labels)}, data module)`` as ftlab's text data module reads ``root``.

    ``rotten_tomatoes``: ``root`` is the ``data=rotten_tomatoes`` folder, materialised first if needed.
    ``limit``: a seeded random ``limit`` texts of each split only (smoke checks)."""
    from ftlab.data.text import RottenTomatoesDataModule, TextDataModule

    if rotten_tomatoes:
        from ftlab.data.rotten_tomatoes import materialize_rotten_tomatoes

        materialize_rotten_tomatoes(root)
        dm = RottenTomatoesDataModule(str(root))
    else:
        dm = TextDataModule(str(root))
    classes = dm.discover()
    splits: dict[str, Split] = {}
    for split, samples in dm._splits.items():  # the very (text, class index) lists a run's loaders serve
        if limit and limit < len(samples):
            # A seeded random subset in file order (the materialised CSVs are not shuffled by class).
            keep = np.sort(np.random.default_rng(SEED).permutation(len(samples))[:limit])
            samples = [samples[i] for i in keep]
        splits[split] = ([t for t, _ in samples], np.asarray([y for _, y in samples], dtype=np.int64))
    for split, (_, y) in splits.items():
        if split == "train" and len(set(y.tolist())) < 2:
            raise UserError(f"{root}: the train split (as limited) holds fewer than two classes")
    return classes, splits, dm


# -- model selection -------------------------------------------------------------------------------
def select_c(make: Callable[[float], Any], train: tuple[Any, np.ndarray], val: tuple[Any, np.ndarray],
             grid: Sequence[float]) -> tuple[float, dict[float, float], Any]:
    """Fit ``make(C)`` on train for each C; return the C with the best val accuracy (first in the grid on a
    tie), every C's val accuracy, and the model fitted with that C."""
    best: tuple[float, float, Any] | None = None
    scores: dict[float, float] = {}
    for c in grid:
        model = make(c).fit(*train)
        acc = float(np.mean(model.predict(val[0]) == val[1]))
        scores[c] = acc
        if best is None or acc > best[1]:
            best = (c, acc, model)
    assert best is not None, "empty C grid"
    return best[0], scores, best[2]


def _scores(model: Any, x: Any, y: np.ndarray, num_classes: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    pred = model.predict(x)
    return {"acc": float(np.mean(pred == y)),
            "f1": float(f1_score(y, pred, average="macro", labels=list(range(num_classes)), zero_division=0))}


def _result(name: str, description: str, c: float, scores: dict[float, float], classifier: Any,
            splits: dict[str, tuple[Any, np.ndarray]], num_classes: int, seconds: float, **extra: Any) -> dict[str, Any]:
    test = _scores(classifier, *splits["test"], num_classes)
    return {
        "name": name,
        "description": description,
        "C": c,
        "val_acc": round(scores[c], 4),
        "test_acc": round(test["acc"], 4),
        "test_f1": round(test["f1"], 4),
        "val_acc_by_C": {str(k): round(v, 4) for k, v in scores.items()},
        **extra,
        "seconds": round(seconds, 1),
    }


# -- TF-IDF + logistic regression ------------------------------------------------------------------
def tfidf_baseline(splits: dict[str, Split], num_classes: int, grid: Sequence[float] = TFIDF_C_GRID) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = {"train": vectorizer.fit_transform(splits["train"][0])}  # vocabulary and idf from train only
    for split in ("val", "test"):
        features[split] = vectorizer.transform(splits[split][0])
    data = {s: (features[s], splits[s][1]) for s in splits}
    c, scores, model = select_c(lambda c: LogisticRegression(C=c, max_iter=2000, random_state=SEED),
                                data["train"], data["val"], grid)
    return _result("tfidf_logreg", "TF-IDF (word 1-2-grams, sublinear tf) + logistic regression", c, scores, model,
                   data, num_classes, time.perf_counter() - started, features=len(vectorizer.vocabulary_))


# -- linear probe on frozen sentence embeddings ----------------------------------------------------
def embed_texts(net: Any, tokenizer: Any, texts: Sequence[str], max_length: int,
                batch_size: int = EMBED_BATCH) -> np.ndarray:
    """``net.features`` (the pooled embedding the head would see) of every text, in eval mode, no gradients.

    Tokenised and padded as ftlab's text data module does (:func:`ftlab.data.text.encode_texts`,
    :class:`~ftlab.data.text.PadCollate`); batches hold texts of similar length (sorted), which pooling over
    the attention mask makes a matter of speed only."""
    import torch

    from ftlab.data.text import PadCollate, encode_texts, pad_token_id

    ids = encode_texts(tokenizer, texts, max_length)
    collate = PadCollate(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right") or "right")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray | None] = [None] * len(ids)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                feats = net.features(collate.pad([ids[i] for i in chunk])).float().cpu().numpy()
                for i, f in zip(chunk, feats, strict=True):
                    out[i] = f
    finally:
        net.train(was_training)
    return np.stack(out) if out else np.zeros((0, 0), np.float32)


def probe_baseline(splits: dict[str, Split], num_classes: int, model_name: str = DEFAULT_PROBE_MODEL,
                   grid: Sequence[float] = PROBE_C_GRID, batch_size: int = EMBED_BATCH) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ftlab.models.hf import build_hf_backbone, load_tokenizer

    started = time.perf_counter()
    backbone = build_hf_backbone(model_name, num_classes)
    tokenizer = load_tokenizer(model_name)
    max_length = int(backbone.data_config["max_length"])
    model_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_limit, int) and 0 < model_limit < max_length:  # as TextDataModule caps the default
        max_length = model_limit
    embed_started = time.perf_counter()
    data = {s: (embed_texts(backbone.net, tokenizer, texts, max_length, batch_size), y)
            for s, (texts, y) in splits.items()}
    embed_seconds = time.perf_counter() - embed_started
    c, scores, model = select_c(
        lambda c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=SEED)),
        data["train"], data["val"], grid)
    pooling = getattr(backbone.net, "pooling", "mean")
    return _result(f"{Path(model_name).name}_linear_probe",
                   f"linear probe: logistic regression on frozen {pooling}-pooled {model_name} embeddings",
                   c, scores, model, data, num_classes, time.perf_counter() - started,
                   model=model_name, weights=backbone.weight_source, max_length=max_length,
                   embedding_dim=int(data["train"][0].shape[1]), embed_seconds=round(embed_seconds, 1))


# -- raw pixels of an image subset (data=fashion_mnist) ----------------------------------------------
def fashion_mnist_defaults() -> dict[str, Any]:
    """``train_limit``, ``val_size``, ``test_limit``, ``subset_seed`` as conf/data/fashion_mnist.yaml sets them."""
    from omegaconf import OmegaConf

    from ftlab.config import CONFIG_DIR

    cfg = OmegaConf.load(Path(CONFIG_DIR) / "data" / f"{IMAGE_DATASET}.yaml")
    return {key: cfg[key] for key in SUBSET_KEYS}


def load_pixel_splits(root: str | os.PathLike, **subset: Any) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]], Any]:
    """``(classes, {split: (pixels (n, h*w) float32 in [0, 1], labels)}, data module)``: the very files a
    ``data=fashion_mnist`` run with these subset keys trains, validates and tests on (materialised if needed)."""
    from PIL import Image

    from ftlab.data.fashion_mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule(str(root), check_images=False, num_workers=0, **subset)
    classes = dm.discover()
    splits = {}
    for split, samples in dm._splits.items():
        pixels = np.empty((len(samples), 0), np.float32)
        rows = []
        for path, _ in samples:
            with Image.open(path) as img:
                rows.append(np.asarray(img.convert("L"), dtype=np.float32).reshape(-1) / 255.0)
        if rows:
            pixels = np.stack(rows)
        splits[split] = (pixels, np.asarray([y for _, y in samples], dtype=np.int64))
    return classes, splits, dm


def pixel_baselines(splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int,
                    logreg_grid: Sequence[float] = PIXEL_LOGREG_C_GRID,
                    svc_grid: Sequence[float] = PIXEL_SVC_C_GRID) -> list[dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    results = []
    started = time.perf_counter()
    c, scores, model = select_c(lambda c: LogisticRegression(C=c, max_iter=1000, random_state=SEED),
                                splits["train"], splits["val"], logreg_grid)
    results.append(_result("pixels_logreg", "logistic regression on raw pixels", c, scores, model, splits,
                           num_classes, time.perf_counter() - started))
    started = time.perf_counter()
    c, scores, model = select_c(lambda c: SVC(C=c, kernel="rbf", gamma="scale", random_state=SEED),
                                splits["train"], splits["val"], svc_grid)
    results.append(_result("pixels_svc", "RBF-kernel SVC on raw pixels (gamma=scale)", c, scores, model, splits,
                           num_classes, time.perf_counter() - started))
    return results


def run_pixel_baselines(root: str | os.PathLike, **subset: Any) -> dict[str, Any]:
    """Both pixel baselines on the ``data=fashion_mnist`` subset ``subset`` selects; the JSON-ready result."""
    import sklearn

    started = time.perf_counter()
    settings = {**fashion_mnist_defaults(), **{k: v for k, v in subset.items() if v is not None}}
    classes, splits, dm = load_pixel_splits(root, **settings)
    results = pixel_baselines(splits, len(classes))
    return {
        "data": str(Path(root).resolve()),
        "dataset": IMAGE_DATASET,
        "classes": classes,
        "split_sizes": {s: len(y) for s, (_, y) in splits.items()},
        "test_on_val": bool(dm.test_on_val),
        **{f"data.{k}": v for k, v in settings.items()},
        "selection": "C chosen on val (best accuracy, smaller C on ties), model trained on train only",
        "sklearn": sklearn.__version__,
        "baselines": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- the command -------------------------------------------------------------------------------------
def run_baselines(root: str | os.PathLike, rotten_tomatoes: bool = True, probe: bool = True,
                  probe_model: str = DEFAULT_PROBE_MODEL, limit: int | None = None) -> dict[str, Any]:
    """Both baselines (the probe unless ``probe=False``) on ``root``'s splits; the JSON-ready result."""
    import sklearn

    started = time.perf_counter()
    classes, splits, dm = load_splits(root, rotten_tomatoes, limit)
    results = [tfidf_baseline(splits, len(classes))]
    if probe:
        results.append(probe_baseline(splits, len(classes), probe_model))
    return {
        "data": str(Path(root).resolve()),
        "dataset": DATASET if rotten_tomatoes else Path(root).name,
        "classes": classes,
        "split_sizes": {s: len(texts) for s, (texts, _) in splits.items()},
        "test_on_val": bool(dm.test_on_val),
        "limit": limit,
        "selection": "C chosen on val (best accuracy, smaller C on ties), model trained on train only",
        "sklearn": sklearn.__version__,
        "baselines": results,
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(result: dict[str, Any]) -> str:
    sizes = result["split_sizes"]
    head = (f"{result['dataset']}: train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']}"
            + (" (test is val)" if result["test_on_val"] else ""))
    lines = [head, f"{'baseline':<34} {'C':>6} {'val acc':>8} {'test acc':>9} {'test F1':>8} {'seconds':>8}"]
    for r in result["baselines"]:
        lines.append(f"{r['name']:<34} {r['C']:>6g} {r['val_acc']:>8.4f} {r['test_acc']:>9.4f} "
                     f"{r['test_f1']:>8.4f} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def _default_out(dataset: str) -> Path:
    outputs = os.environ.get("FTLAB_OUTPUT_DIR") or "outputs"
    return Path(outputs) / "baselines" / f"{dataset}.json"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftlab.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=f"data={DATASET}", choices=[f"data={DATASET}", f"data={IMAGE_DATASET}"],
                        help=f"the dataset (data={DATASET} or data={IMAGE_DATASET}; --root for other text data)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the dataset lives (<dir>/rotten_tomatoes, <dir>/fashion_mnist); default FTLAB_DATA_DIR or ./data")
    parser.add_argument("--root", type=Path, default=None,
                        help="any text data folder ftlab reads (train.csv/.tsv/.jsonl or train/<class>/*.txt) instead")
    parser.add_argument("--out", type=Path, default=None, help="the JSON file (default outputs/baselines/<dataset>.json)")
    parser.add_argument("--no-probe", action="store_true", help="TF-IDF only, no encoder")
    parser.add_argument("--probe-model", default=DEFAULT_PROBE_MODEL,
                        help="the encoder of the linear probe (as model.name of model=minilm|hf)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random N texts of each split only (smoke checks)")
    for key in SUBSET_KEYS:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"data={IMAGE_DATASET}: data.{key} (default: conf/data/{IMAGE_DATASET}.yaml's)")
    args = parser.parse_args(argv)
    image = args.data == f"data={IMAGE_DATASET}"
    subset = {key: getattr(args, key) for key in SUBSET_KEYS}
    if image and (args.root is not None or args.limit is not None):
        parser.error(f"data={IMAGE_DATASET}: --root and --limit are for text data; use --train-limit, --test-limit")
    if not image and any(v is not None for v in subset.values()):
        parser.error(f"--train-limit, --val-size, --test-limit, --subset-seed: only with data={IMAGE_DATASET}")
    if args.root is not None and args.data_dir is not None:
        parser.error("--root and --data-dir: give one")
    if args.limit is not None and args.limit < 2:
        parser.error("--limit: at least 2")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.root is not None:
        root, rotten = args.root, False
    else:
        data_dir = args.data_dir or Path(os.environ.get("FTLAB_DATA_DIR") or "data")
        root, rotten = data_dir / DATASET, True
    if image:
        root = (args.data_dir or Path(os.environ.get("FTLAB_DATA_DIR") or "data")) / IMAGE_DATASET
    try:
        if image:
            result = run_pixel_baselines(root, **subset)
        else:
            result = run_baselines(root, rotten, probe=not args.no_probe, probe_model=args.probe_model, limit=args.limit)
    except UserError as exc:
        print(f"ftlab.baselines: {exc}", file=sys.stderr)
        return 1
    from ftlab.fileio import write_json

    out = args.out or _default_out(result["dataset"])
    write_json(out, result)
    print(table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
