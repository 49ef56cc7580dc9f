"""Text classification through the same configs, methods and reports as images (tiny random BERT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftlab.config import CONFIG_DIR
from ftlab.errors import UserError, user_message
from ftlab.train import build, run
from helpers import FAST_TRAINER, labelled, make_imagefolder, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    write_csv(root / "train.csv", labelled() * 2)
    write_csv(root / "test.csv", labelled(4))
    return root


def _overrides(tiny_bert: Path, root: Path, method: str, *extra: str) -> list[str]:
    return ["data=textfile", f"data.root={root}", "data.batch_size=8", "model=hf", f"model.name={tiny_bert}",
            f"method={method}", *FAST_TRAINER, *extra]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_text(compose_cfg, tiny_bert: Path, texts: Path, method: str) -> None:
    cfg = compose_cfg(_overrides(tiny_bert, texts, method))
    metrics = run(cfg)
    assert metrics["method"] == method and metrics["num_classes"] == 2
    assert metrics["split_sizes"] == {"train": 34, "val": 6, "test": 8}
    assert 0.0 <= metrics["test/acc"] <= 1.0
    out = Path(cfg.paths.output_dir)
    assert (out / ("model.safetensors" if method in ("full", "gradual") else "adapter.safetensors")).is_file()
    total, trainable = metrics["params_total"], metrics["params_trainable"]
    if method == "linear":
        assert trainable == 32 * 2 + 2  # the head on the 32-wide pooled output
    elif method in ("lora", "dora"):
        # rank 8 on query and value (32x32) of 2 layers, + DoRA's 32 magnitudes each, + the head.
        assert trainable == 2 * 2 * 8 * 64 + (2 * 2 * 32 if method == "dora" else 0) + 66
    elif method == "full":
        assert trainable == total


def test_text_defaults_come_from_the_model_method_specialisation(compose_cfg, tiny_bert: Path,
                                                                 texts: Path) -> None:
    lora = compose_cfg(_overrides(tiny_bert, texts, "lora"))
    assert lora.model.lr == 1e-3 and lora.model.targets == "auto"
    full = compose_cfg(["data=rotten_tomatoes", "model=minilm", "method=full"])
    assert full.model.lr == 5e-5
    image = compose_cfg(["method=lora"])
    assert image.model.lr == 6e-3  # the CNN default is untouched


def test_lora_targets_auto_are_the_query_and_value_projections(compose_cfg, tiny_bert: Path,
                                                                texts: Path) -> None:
    _, model, _ = build(compose_cfg(_overrides(tiny_bert, texts, "lora")))
    adapted = sorted(n.removesuffix(".lora_A.weight") for n, _ in model.net.named_parameters()
                     if n.endswith("lora_A.weight"))
    assert adapted == [f"encoder.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]


def test_linear_probe_on_text_trains_on_cached_features(compose_cfg, tiny_bert: Path, texts: Path) -> None:
    cfg = compose_cfg(_overrides(tiny_bert, texts, "linear", "trainer.max_epochs=2", "logger=none"))
    datamodule, model, trainer = build(cfg)
    assert datamodule.feature_cache is not None  # encoder_dropout=0 in conf/model_method/hf_linear.yaml
    encoder = {n: p.detach().clone() for n, p in model.net.named_parameters() if not n.startswith("head.")}
    head = model.net.head.weight.detach().clone()
    trainer.fit(model, datamodule=datamodule)
    assert len(datamodule.feature_cache.datasets["train"]) == 34  # features computed once, served from memory
    assert all(torch.equal(encoder[n], p) for n, p in model.net.named_parameters() if n in encoder)
    assert not torch.equal(head, model.net.head.weight)


def test_tensorboard_shows_the_worst_texts(compose_cfg, tiny_bert: Path, texts: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg(_overrides(tiny_bert, texts, "lora", "model.lr=1e-6"))  # barely trained: mistakes
    run(cfg)
    events = [p for p in Path(cfg.paths.output_dir).rglob("events.out.tfevents.*")]
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "images": 0})
        acc.Reload()
        tags |= set(acc.Tags().get("tensors", [])) | set(acc.Tags().get("images", []))
        if "test/worst_misclassified/text_summary" in acc.Tags().get("tensors", []):
            table = acc.Tensors("test/worst_misclassified/text_summary")[0].tensor_proto.string_val[0].decode()
            assert table.startswith("| p(pred) | true (p) | predicted | text |")
            assert any(word in table for word in ("movie", "film", "acting", "story", "plot", "actor"))
    assert "test/confusion_matrix" in tags and "test/worst_misclassified/text_summary" in tags


@pytest.mark.parametrize(("data", "model", "words"), [
    (["data=imagefolder"], ["model=hf"], "this is image data, and the model reads text"),
    (["data=textfile"], ["model=timm", "model.name=test_resnet", "model.pretrained=false"],
     "this is text data, and the model reads images"),
])
def test_mixing_text_and_images_is_one_line(compose_cfg, tiny_bert: Path, texts: Path, tmp_path: Path,
                                            data: list[str], model: list[str], words: str) -> None:
    images = make_imagefolder(tmp_path / "imgs")
    root = images if data == ["data=imagefolder"] else texts
    extra = [f"model.name={tiny_bert}"] if model == ["model=hf"] else []
    with pytest.raises(Exception) as info:
        run(compose_cfg([*data, f"data.root={root}", *model, *extra, *FAST_TRAINER]))
    message = user_message(info.value)
    assert message is not None and words in message and "\n" not in message


def test_image_only_keys_are_refused_for_text(compose_cfg, tiny_bert: Path, texts: Path) -> None:
    with pytest.raises(UserError, match=r"model.pooling: only text models"):
        from ftlab.models import build_backbone

        build_backbone("timm", "test_resnet", 3, pretrained=False, pooling="mean")


def test_metrics_json_names_the_text_run(compose_cfg, tiny_bert: Path, texts: Path) -> None:
    cfg = compose_cfg(_overrides(tiny_bert, texts, "bitfit"))
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["model"] == str(tiny_bert) and metrics["data"] == str(texts)
    assert metrics["weight_source"] == f"local: {tiny_bert.resolve()}"
