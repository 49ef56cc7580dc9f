"""Tests for ftlab.adapters on tiny hand-built nets and a tiny timm ViT (CPU, fp32 unless stated)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import get_same_padding
from timm.models.vision_transformer import VisionTransformer

from ftlab.adapters import (
    AdapterLayer,
    adapter_config,
    adapter_params,
    adapter_state_dict,
    apply_lora,
    apply_ssf,
    ftlab_to_peft_keys,
    load_adapter,
    mark_trainable,
    merge_adapters,
    peft_to_ftlab_keys,
    read_adapter_file,
    save_adapter,
)

R = 2
CONVS = ["stem", "conv", "down", "dilated"]  # every ungrouped conv of TinyCNN
# (in·kh·kw, out) of those convs, written out independently of the modules.
CONV_SHAPES = {"stem": (3 * 16, 8), "conv": (8 * 9, 8), "down": (8 * 9, 12), "dilated": (12 * 9, 12)}
QKV = "blocks\\.0\\.attn\\.qkv"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.fc2(F.relu(self.fc(x)))))


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 4, stride=2)  # 15x15 input: TF-"same" pads (1, 2), asymmetric
        self.bn_act = BatchNormAct2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.dilated = nn.Conv2d(12, 12, 3, padding=2, dilation=2, padding_mode="reflect")
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.classifier = nn.Linear(12, 3)
        with torch.no_grad():  # non-trivial BN statistics and affine, so eval-mode folding is really tested
            for bn in (self.bn_act, self.bn):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_act(self.stem(x))
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dilated(F.relu(self.down(x))))
        return self.classifier(self.dw(x).mean((2, 3)))


def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3
    ).eval()


def inputs(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = {MLP: (4, 6), TinyCNN: (2, 3, 15, 15), VisionTransformer: (2, 3, 16, 16)}[type(model)]
    return torch.randn(shape, generator=gen)


def perturb(model: nn.Module) -> None:
    """Make every adapter non-trivial so merging and saving are tested on real updates."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("ssf_scale", "lora_magnitude_vector")):
                p.mul_(1 + 0.2 * noise)
            else:
                p.add_(0.2 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def classes(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


# name -> (model factory, adapter application)
VARIANTS = {
    "lora": (cnn, lambda m: apply_lora(m, CONVS + ["classifier"], rank=R, dropout=0.1)),
    "gaussian": (cnn, lambda m: apply_lora(m, CONVS, rank=R, init="gaussian")),
    "rslora": (cnn, lambda m: apply_lora(m, CONVS, rank=R, rslora=True)),
    "dora": (cnn, lambda m: apply_lora(m, CONVS + ["classifier"], rank=R, dora=True)),
    "pissa": (cnn, lambda m: apply_lora(m, CONVS + ["classifier"], rank=R, init="pissa")),
    "pissa_dora": (cnn, lambda m: apply_lora(m, CONVS, rank=R, init="pissa", dora=True)),
    "mlp": (mlp, lambda m: apply_lora(m, "fc.*", rank=R)),
    "qkv": (vit, lambda m: apply_lora(m, QKV, rank=R, qkv="q,v")),
    "qkv_pissa_dora": (vit, lambda m: apply_lora(m, QKV, rank=R, qkv=("k",), init="pissa", dora=True)),
    "vit_mixed": (
        vit,
        lambda m: (
            apply_lora(m, QKV, rank=R, qkv="q,v"),
            apply_lora(m, r"blocks\.0\.mlp\.fc\d|patch_embed\.proj", rank=R, alpha=4),
            apply_ssf(m, r"norm|blocks\.0\.norm\d"),
        ),
    ),
    "ssf": (cnn, lambda m: apply_ssf(m, ["stem", "bn_act", "conv", "bn", "dilated", "dw", "classifier"])),
}


def build(variant: str) -> tuple[nn.Module, nn.Module]:
    """(plain base, adapted copy of the same base)."""
    factory, apply = VARIANTS[variant]
    base = factory()
    adapted = copy.deepcopy(base)
    apply(adapted)
    return base, adapted


# ---------------------------------------------------------------- target selection and validation


def test_regex_full_match() -> None:
    model = mlp()
    assert apply_lora(model, "fc") == ["fc"]
    assert type(model.fc2) is nn.Linear
    assert apply_lora(mlp(), "fc.*") == ["fc", "fc2"]
    assert apply_lora(mlp(), ["fc2", "classifier"]) == ["classifier", "fc2"]


def test_zero_match_lists_candidates() -> None:
    with pytest.raises(ValueError, match="no module name full-matches") as err:
        apply_lora(mlp(), "f")
    assert "fc2" in str(err.value) and "classifier" in str(err.value)
    with pytest.raises(ValueError, match="bn_act"):
        apply_ssf(cnn(), "nothing")


def test_adapter_internals_are_not_candidates() -> None:
    model = mlp()
    apply_lora(model, "fc")
    # "fc.lora_A" is an nn.Linear too, but must never be adapted or reported as "already adapted".
    assert apply_lora(model, r"fc2|fc\.lora_A") == ["fc2"]


def test_unsupported_module_is_named() -> None:
    with pytest.raises(ValueError, match=r"bn \(BatchNorm2d\)"):
        apply_lora(cnn(), ["conv", "bn"])


def test_depthwise_conv_refused_but_ssf_accepts_it() -> None:
    model = cnn()
    with pytest.raises(ValueError, match=r"groups > 1.*'dw'.*exclude"):
        apply_lora(model, ["conv", "dw"])
    assert type(model.conv) is nn.Conv2d  # refused calls leave the model untouched
    assert apply_ssf(model, "dw") == ["dw"]


def test_multihead_attention_out_proj_refused() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match="out_proj"):
        apply_lora(model, r"0\.out_proj")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": -1},
        {"rank": 2.5},
        {"alpha": 0},
        {"alpha": -1.0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"init": "xavier"},
        {"qkv": "q,x"},
        {"qkv": ""},
        {"qkv": "q,q"},
    ],
)
def test_invalid_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        apply_lora(vit(), QKV, **kwargs)


def test_qkv_needs_divisible_linear() -> None:
    with pytest.raises(ValueError, match="divisible by 3.*fc2"):
        apply_lora(mlp(), "fc2", qkv="q")  # out_features 8
    with pytest.raises(ValueError, match="conv"):
        apply_lora(cnn(), "conv", qkv="v")


def test_pissa_rank_limit() -> None:
    with pytest.raises(ValueError, match="classifier"):
        apply_lora(mlp(), "classifier", rank=4, init="pissa")  # weight is 3 x 8


def test_adapting_twice_fails() -> None:
    model = mlp()
    apply_lora(model, "fc")
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, "fc")
    with pytest.raises(ValueError, match="already"):
        apply_ssf(model, "fc")


# ---------------------------------------------------------------- initialisation and parameter counts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_unchanged_at_init(variant: str) -> None:
    base, adapted = build(variant)
    x = inputs(base)
    torch.testing.assert_close(adapted(x), base(x), rtol=1e-5, atol=1e-6)


def test_conv2dsame_branch_keeps_geometry() -> None:
    assert get_same_padding(15, 4, 2, 1) == 3  # odd total padding: the stem really pads asymmetrically
    model = cnn()
    apply_lora(model, CONVS, rank=R)
    assert type(model.stem.lora_A) is Conv2dSame
    for name in CONVS:
        layer, lora_a = model.get_submodule(name), model.get_submodule(name).lora_A
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(lora_a, attr) == getattr(layer, attr), (name, attr)
    shapes = {n: tuple(p.shape) for n, p in adapter_params(model).items()}
    assert shapes["stem.lora_A.weight"] == (R, 3, 4, 4)
    assert shapes["stem.lora_B.weight"] == (8, R, 1, 1)


def test_peft_names_and_shapes_for_linear() -> None:
    model = mlp()
    apply_lora(model, "fc", rank=R, dora=True)
    shapes = {n: tuple(p.shape) for n, p in adapter_params(model).items()}
    assert shapes == {
        "fc.lora_A.weight": (R, 6),
        "fc.lora_B.weight": (10, R),
        "fc.lora_magnitude_vector": (10,),
    }
    # The base keys are untouched, so a plain checkpoint loads into the adapted model as is.
    model.load_state_dict(mlp().state_dict(), strict=False)
    assert set(mlp().state_dict()) <= set(model.state_dict())


def test_trainable_counts_cnn() -> None:
    lora_count = sum(R * (fan_in + out) for fan_in, out in CONV_SHAPES.values())
    head = 12 * 3 + 3
    model = cnn()
    apply_lora(model, CONVS, rank=R)
    assert mark_trainable(model, extra=["classifier"]) == lora_count + head
    model = cnn()
    apply_lora(model, CONVS, rank=R, dora=True)
    assert mark_trainable(model) == lora_count + sum(out for _, out in CONV_SHAPES.values())
    model = cnn()
    apply_ssf(model, ["bn_act", "bn", "dw", "dilated"])
    assert mark_trainable(model, extra="classifier") == 2 * (8 + 8 + 12 + 12) + head


def test_trainable_counts_mlp_and_qkv() -> None:
    model = mlp()
    apply_lora(model, "fc.*", rank=R)
    assert mark_trainable(model) == R * (6 + 10) + R * (10 + 8)
    model = vit()
    apply_lora(model, QKV, rank=R, qkv="q,v")
    assert mark_trainable(model, extra=["head"]) == 2 * R * (24 + 24) + (24 * 3 + 3)
    assert sorted(adapter_params(model)) == [
        "blocks.0.attn.qkv.lora_A.q.weight",
        "blocks.0.attn.qkv.lora_A.v.weight",
        "blocks.0.attn.qkv.lora_B.q.weight",
        "blocks.0.attn.qkv.lora_B.v.weight",
    ]


def test_mark_trainable_prefixes_follow_module_paths() -> None:
    with pytest.raises(ValueError, match="classif"):
        mark_trainable(mlp(), extra=["classif"])


# ---------------------------------------------------------------- training step


@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_sgd_step_updates_only_adapters_and_head(init: str) -> None:
    model = cnn().train()
    apply_lora(model, CONVS, rank=R, init=init, dora=True)
    apply_ssf(model, ["bn_act", "bn", "dw"])
    mark_trainable(model, extra=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set(adapter_params(model)) | {"classifier.weight", "classifier.bias"}
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(model(inputs(model)), torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if init == "pissa":
        assert changed == trainable  # B != 0 at init, so even A receives a gradient in the first step
    else:
        assert changed <= trainable
        assert {f"{c}.lora_B.weight" for c in CONVS} <= changed
        assert {"classifier.weight", "bn.ssf_scale", "bn.ssf_shift", "stem.lora_magnitude_vector"} <= changed


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_matches_unmerged(variant: str) -> None:
    base, model = build(variant)
    perturb(model)
    x = inputs(model)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(expected, base(x)) > 1e-3  # the adapters really do something
        merged = merge_adapters(model)
        assert merged and not adapter_params(model)
        assert rel_err(model(x), expected) < 1e-5
    assert classes(model) == classes(base)
    assert list(model.state_dict()) == list(base.state_dict())
    assert merge_adapters(model) == []


def test_merge_ssf_on_biasless_conv_creates_bias() -> None:
    base, model = cnn(), cnn()
    apply_ssf(model, "down")
    perturb(model)
    x = inputs(model)
    expected = model(x)
    merge_adapters(model)
    assert type(model.down) is nn.Conv2d
    assert set(model.state_dict()) == set(base.state_dict()) | {"down.bias"}
    assert rel_err(model(x), expected) < 1e-5


def test_ssf_applies_before_batchnormact_activation() -> None:
    model = cnn()
    apply_ssf(model, "bn_act")
    with torch.no_grad():
        model.bn_act.ssf_shift.fill_(-100.0)
    out = model.bn_act(torch.randn(2, 8, 5, 5))
    assert torch.all(out == 0)  # the shift went in before the ReLU, which then clips everything


def test_ssf_train_mode_merge() -> None:
    model = cnn().train()
    apply_ssf(model, ["bn_act", "bn"])
    perturb(model)
    x = inputs(model)
    stats = copy.deepcopy(model.state_dict())
    expected = model(x)
    model.load_state_dict(stats)  # undo the running-stat update of that forward
    merge_adapters(model)
    assert rel_err(model(x), expected) < 1e-5


# ---------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("variant", ["dora", "pissa", "qkv_pissa_dora", "vit_mixed", "ssf"])
def test_save_load_roundtrip(variant: str, tmp_path) -> None:
    base, model = build(variant)
    head = "head" if isinstance(model, VisionTransformer) else "classifier"
    perturb(model)
    with torch.no_grad():
        model.get_submodule(head).weight.add_(0.5)
    path = tmp_path / "sub" / "adapter.safetensors"
    size = save_adapter(model, path, extra_prefixes=[head], metadata={"epoch": 3, "note": "hi"})
    assert size == path.stat().st_size > 0

    tensors, config, meta = read_adapter_file(path)
    assert meta == {"epoch": "3", "note": "hi"}
    assert config["extra_prefixes"] == [head]
    assert json.loads(json.dumps(adapter_config(model))) == {
        k: v for k, v in config.items() if k != "extra_prefixes"
    }
    if "pissa" in variant:
        pissa_layers = [n for g in config["lora"] if g["init"] == "pissa" for n in g["modules"]]
        assert pissa_layers and all(f"{n}.weight" in tensors for n in pissa_layers)

    fresh = copy.deepcopy(base)
    names = load_adapter(fresh, path)
    assert names == sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert classes(fresh) == classes(model)


def test_adapter_state_dict_contents() -> None:
    model = cnn()
    apply_lora(model, ["conv"], rank=R, init="pissa")
    state = adapter_state_dict(model, extra_prefixes=["classifier", "bn"])
    assert set(state) == {
        "conv.lora_A.weight",
        "conv.lora_B.weight",
        "conv.weight",  # PiSSA residual
        "classifier.weight",
        "classifier.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    assert state["conv.weight"].data_ptr() != model.conv.weight.data_ptr()


def test_load_strict_reports_missing_and_unexpected() -> None:
    _, model = build("dora")
    state = adapter_state_dict(model)
    config = adapter_config(model)
    partial = {k: v for k, v in state.items() if k != "conv.lora_B.weight"}
    with pytest.raises(ValueError, match=r"missing.*conv\.lora_B\.weight"):
        load_adapter(cnn(), partial, config=config)
    with pytest.raises(ValueError, match=r"unexpected.*nope\.weight"):
        load_adapter(cnn(), {**state, "nope.weight": torch.zeros(1)}, config=config)
    load_adapter(cnn(), partial, strict=False, config=config)
    with pytest.raises(ValueError, match="config"):
        load_adapter(cnn(), state)


def test_load_refuses_pickle(tmp_path) -> None:
    path = tmp_path / "adapter.pt"
    torch.save({"fc.lora_A.weight": torch.zeros(2, 6)}, path)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(mlp(), path)


def test_load_into_already_adapted_model(tmp_path) -> None:
    _, model = build("qkv")
    perturb(model)
    save_adapter(model, tmp_path / "a.safetensors")
    target = vit()
    apply_lora(target, QKV, rank=R, qkv="q,v")
    load_adapter(target, tmp_path / "a.safetensors")
    x = inputs(model)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)
    other = vit()
    apply_lora(other, QKV, rank=R, qkv="q")
    with pytest.raises(ValueError, match="different adapter"):
        load_adapter(other, tmp_path / "a.safetensors")


@pytest.mark.parametrize("adapter_name", [None, "default"])
def test_peft_key_conversion_roundtrip(adapter_name: str | None) -> None:
    _, model = build("dora")
    perturb(model)
    state = adapter_state_dict(model, extra_prefixes=["classifier"])
    peft = ftlab_to_peft_keys(state, adapter_name=adapter_name)
    assert all(k.startswith("base_model.model.") for k in peft)
    if adapter_name is None:
        assert "base_model.model.conv.lora_A.weight" in peft
        assert "base_model.model.conv.lora_magnitude_vector" in peft
    else:
        assert "base_model.model.conv.lora_A.default.weight" in peft
        assert "base_model.model.conv.lora_magnitude_vector.default.weight" in peft
    back = peft_to_ftlab_keys(peft)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)

    fresh = cnn()
    load_adapter(fresh, peft, config=adapter_config(model))
    x = inputs(model)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_peft_in_memory_keys() -> None:
    keys = {
        "base_model.model.fc.base_layer.weight": 0,
        "base_model.model.fc.lora_A.default.weight": 1,
        "base_model.model.classifier.modules_to_save.default.bias": 2,
        "base_model.model.classifier.original_module.bias": 3,
    }
    assert peft_to_ftlab_keys(keys) == {"fc.weight": 0, "fc.lora_A.weight": 1, "classifier.bias": 2}


# ---------------------------------------------------------------- dtype, copying, modes


@pytest.mark.parametrize("variant", ["dora", "pissa", "vit_mixed", "ssf"])
def test_bf16_forward_and_merge(variant: str) -> None:
    _, model = build(variant)
    perturb(model)
    x = inputs(model)
    with torch.no_grad():
        reference = model(x)
        model.to(torch.bfloat16)
        out = model(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert rel_err(out.float(), reference) < 0.1
        merge_adapters(model)
        assert rel_err(model(x.to(torch.bfloat16)).float(), reference) < 0.1


def test_autocast_backward_keeps_frozen_weights_gradient_free() -> None:
    _, model = build("vit_mixed")
    mark_trainable(model, extra=["head"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs(model)).float().square().mean()
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is None
    assert model.blocks[0].attn.qkv.lora_B.q.weight.grad is not None


def test_deepcopy_and_pickle_keep_adapters() -> None:
    _, model = build("vit_mixed")
    perturb(model)
    x = inputs(model)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert classes(clone) == classes(model)
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        merge_adapters(clone)
    assert adapter_params(model)  # the original is untouched by merging its copies


def test_dropout_only_active_in_train_mode() -> None:
    model = mlp()
    apply_lora(model, "fc", rank=R, dropout=0.5)
    perturb(model)
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        model.train()
        assert not torch.equal(model(x), model(x))


def test_ssf_on_groupnorm_and_affine_free_layernorm() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(2), nn.LayerNorm(16, elementwise_affine=False)
    )
    model = copy.deepcopy(base)
    assert apply_ssf(model, ["1", "3"]) == ["1", "3"]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="single"):
        apply_ssf(nn.Sequential(nn.LayerNorm((4, 4))), "0")
    perturb(model)
    expected = model(x)
    merge_adapters(model)
    assert type(model[3]) is nn.LayerNorm
    assert set(model.state_dict()) == set(base.state_dict()) | {"3.weight", "3.bias"}
    assert rel_err(model(x), expected) < 1e-5
