"""Strategies through the real configs: what trains, exact counts, artifacts, gradual across resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from hydra.utils import instantiate
from safetensors.torch import load_file
from torch import nn

from ftlab.adapters import adapter_params
from ftlab.artifacts import load_artifact
from ftlab.methods.groups import backbone_groups
from ftlab.train import run
from helpers import FAST_TRAINER, TINY_MODEL

METHODS = ["full", "linear", "bitfit", "partial", "gradual", "ssf", "lora", "dora"]
LITE0 = ["model=efficientnet_lite0", "data.image_size=32"]


def _module(compose_cfg, method: str, *extra: str, model: list[str] = TINY_MODEL, num_classes: int = 3):
    cfg = compose_cfg([f"method={method}", "data=imagefolder", "data.root=/unused", *model, *extra])
    return instantiate(cfg.model, num_classes=num_classes, class_names=None, _convert_="all")


def _trainable(module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.net.named_parameters() if p.requires_grad}


def _head(module) -> int:
    return sum(p.numel() for p in module.net.get_submodule(module.head_name).parameters())


def test_linear_probe_trains_only_the_head(compose_cfg) -> None:
    m = _module(compose_cfg, "linear")
    assert set(_trainable(m)) == {"fc.weight", "fc.bias"}
    assert m.parameter_counts()["params_trainable"] == _head(m)


def test_bitfit_trains_biases_and_head(compose_cfg) -> None:
    m = _module(compose_cfg, "bitfit", model=LITE0)
    names = set(_trainable(m))
    assert names == {n for n, _ in m.net.named_parameters() if n.endswith(".bias")} | {"classifier.weight"}
    # EfficientNet convs have no bias: the shifts are the BatchNorm betas.
    assert all(".bn" in n or n.startswith(("bn", "classifier")) for n in names)


def test_partial_uses_timm_block_groups_and_regex(compose_cfg) -> None:
    m = _module(compose_cfg, "partial", "model.unfreeze_last=2", model=LITE0)
    groups = backbone_groups(m.net, "classifier")
    expected = set(groups[-1]) | set(groups[-2]) | {"classifier.weight", "classifier.bias"}
    assert set(_trainable(m)) == expected
    assert any(n.startswith("conv_head") for n in expected) and any(n.startswith("blocks.5") for n in expected)
    m = _module(compose_cfg, "partial", "model.trainable=[conv_head.weight]", model=LITE0)
    assert set(_trainable(m)) == {"conv_head.weight", "classifier.weight", "classifier.bias"}
    with pytest.raises(Exception, match="matches no parameter"):
        _module(compose_cfg, "partial", "model.trainable=[nope.*]", model=LITE0)


def _lora_expected(net: nn.Module, names: list[str], rank: int) -> int:
    total = 0
    for name in names:
        layer = net.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += rank * (layer.in_channels * kh * kw + layer.out_channels)
        else:
            total += rank * (layer.in_features + layer.out_features)
    return total


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_counts_on_the_default_backbone(compose_cfg, method: str) -> None:
    m = _module(compose_cfg, method, "model.rank=4", model=LITE0)
    adapted = sorted({n.rsplit(".lora_", 1)[0] for n in adapter_params(m.net)})
    # Default targets: the pointwise convs of blocks 2-6 and the head conv; never a depthwise conv, and
    # nothing in the high-resolution stem or blocks 0-1 (backward would have to run through them).
    assert "conv_head" in adapted and "blocks.2.0.conv_pw" in adapted and "blocks.6.0.conv_pwl" in adapted
    assert not any(n.startswith(("conv_stem", "blocks.0.", "blocks.1.")) for n in adapted)
    assert not any("conv_dw" in n for n in adapted)
    expected = _lora_expected(m.net, adapted, 4) + _head(m)
    if method == "dora":
        expected += sum(m.net.get_submodule(n).out_channels for n in adapted)
    assert m.parameter_counts()["params_trainable"] == expected


def test_ssf_counts(compose_cfg) -> None:
    m = _module(compose_cfg, "ssf", model=LITE0)
    layers = sorted({n.rsplit(".ssf_", 1)[0] for n in adapter_params(m.net)})
    assert "bn1" in layers and "blocks.6.0.bn3" in layers
    expected = sum(2 * m.net.get_submodule(n).num_features for n in layers) + _head(m)
    assert m.parameter_counts()["params_trainable"] == expected


@pytest.mark.parametrize("method", ["lora", "dora", "ssf"])
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_output_unchanged_at_initialisation(compose_cfg, method: str, init: str) -> None:
    if method == "ssf" and init == "pissa":
        pytest.skip("init is a LoRA key")
    torch.manual_seed(0)
    plain = _module(compose_cfg, "full", model=LITE0).eval()
    extra = [f"model.init={init}"] if method != "ssf" else []
    torch.manual_seed(0)
    adapted = _module(compose_cfg, method, *extra, model=LITE0).eval()
    adapted.net.classifier.load_state_dict(plain.net.classifier.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = plain(x), adapted(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-5), (ref - out).abs().max()


@pytest.mark.parametrize("method", ["linear", "bitfit", "ssf", "lora", "partial"])
def test_only_trainable_parameters_change_and_frozen_bn_stats_stay(compose_cfg, method: str) -> None:
    m = _module(compose_cfg, method, model=LITE0)
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    trainable = {f"{n}" for n, p in m.net.named_parameters() if p.requires_grad}
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = m.net.state_dict()
    params = {n for n, _ in m.net.named_parameters()}
    changed = {k for k in before if k in params and not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert all(p.grad is None for n, p in m.net.named_parameters() if n not in trainable)
    stats_moved = any(not torch.equal(before[k], after[k]) for k in before if k.endswith("running_mean"))
    # linear, bitfit and ssf keep the pretrained statistics (conf/method/*.yaml: freeze_norm_stats: true)
    assert stats_moved == (method not in ("linear", "bitfit", "ssf"))


@pytest.mark.parametrize(("override", "words"), [
    ("model.rank=0", "rank"),
    ("model.targets=[blocks.1.0.conv_dw]", "blocks.1.0.conv_dw"),
    ("model.targets=[nothing_here]", "nothing_here"),
    ("model.init=svd", "init"),
])
def test_bad_lora_keys_are_user_errors(compose_cfg, override: str, words: str) -> None:
    from ftlab.errors import user_message

    with pytest.raises(Exception) as info:  # noqa: PT011 - Hydra wraps it; the chain must hold a UserError
        _module(compose_cfg, "lora", override, model=LITE0)
    message = user_message(info.value)
    assert message is not None and words in message, message


def test_vit_fused_qkv_slices(compose_cfg) -> None:
    vit = ["model=timm", "model.name=test_vit", "model.pretrained=false", "model.targets=[blocks\\.\\d+\\.attn\\.qkv]"]
    m = _module(compose_cfg, "lora", "model.qkv=[q,v]", "model.rank=2", model=vit)
    qkv = m.net.blocks[0].attn.qkv
    d = qkv.out_features // 3
    per_block = 2 * 2 * (qkv.in_features + d)
    assert m.parameter_counts()["params_trainable"] == per_block * len(m.net.blocks) + _head(m)


def _run(compose_cfg, root: Path, method: str, *extra: str, run_dir: Path | None = None) -> dict:
    cfg = compose_cfg([f"method={method}", "data=imagefolder", f"data.root={root}", "data.batch_size=8",
                       *LITE0, *FAST_TRAINER, "logger=none", *extra], run_dir=run_dir)
    return run(cfg)


def test_lora_run_writes_adapter_and_merged_model(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    metrics = _run(compose_cfg, imagefolder, "lora", "merge=true", "model.lr=0.05")
    out = Path(metrics["output_dir"])
    adapter = out / "adapter.safetensors"
    assert metrics["artifact_bytes"] == adapter.stat().st_size
    assert json.loads((out / "metrics.json").read_text())["artifact_bytes"] == adapter.stat().st_size
    info = yaml.safe_load((out / "adapter.yaml").read_text())
    assert info["method"] == "lora" and info["class_names"] == ["cat", "dog", "fox"]
    assert info["base_model"]["source"] == "efficientnet_lite0" and info["method_config"]["rank"] == 8
    tensors = load_file(str(adapter))
    assert "conv_head.lora_A.weight" in tensors and tensors["conv_head.lora_B.weight"].shape[1:] == (8, 1, 1)
    assert "classifier.weight" in tensors and "bn2.running_mean" in tensors
    assert "conv_head.weight" not in tensors  # the frozen base is not duplicated
    # Far smaller than the whole model.
    assert adapter.stat().st_size < 0.15 * (out / "model.safetensors").stat().st_size

    # The adapter on a fresh pretrained base, and the merged plain model, reproduce the trained logits.
    from ftlab.adapters import load_adapter
    from ftlab.models import build_backbone

    trained, _ = load_artifact(out, prefer="adapter")
    merged, _ = load_artifact(out, prefer="model")
    assert type(merged.conv_stem) is timm.layers.Conv2dSame and type(merged.conv_head) is nn.Conv2d
    x = torch.randn(3, 3, 32, 32)
    fresh = build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", 3).net.eval()
    load_adapter(fresh, str(adapter))
    with torch.no_grad():
        ref = trained(x)
        assert torch.allclose(fresh(x), ref, atol=1e-6)
        assert ((merged(x) - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert metrics["merged_max_rel_error"] < 1e-5


def test_full_run_writes_whole_model(compose_cfg, imagefolder: Path) -> None:
    metrics = _run(compose_cfg, imagefolder, "full", "trainer.fast_dev_run=true")
    out = Path(metrics["output_dir"])
    assert metrics["artifact"] == "model.safetensors"
    net, info = load_artifact(out)
    assert info["num_classes"] == 3 and isinstance(net, nn.Module)


@pytest.mark.parametrize("extra", [["model.rank=16"], ["model.init=pissa", "model.rslora=true"], ["model.init=gaussian"]])
def test_lora_variants_train(compose_cfg, imagefolder: Path, extra: list[str]) -> None:
    metrics = _run(compose_cfg, imagefolder, "lora", "trainer.fast_dev_run=true", *extra)
    assert metrics["params_trainable"] < metrics["params_total"] / 5


def test_bf16_forward(compose_cfg) -> None:
    m = _module(compose_cfg, "dora", model=LITE0).to(torch.bfloat16).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gradual_schedule_survives_resume(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    """Interrupted after the frozen epoch, the resumed run trains exactly what an uninterrupted one does."""
    m = _module(compose_cfg, "gradual", "model.freeze_epochs=1", "model.unfreeze=stages", model=LITE0)
    n_groups = len(m.groups)
    assert m.stages_unfrozen(0) == 0 and m.stages_unfrozen(1) == 1 and m.stages_unfrozen(2) == 2
    assert m.stages_unfrozen(100) == n_groups

    seen: dict[str, list[set[str]]] = {}

    def record(tag: str):
        import lightning as L

        class Recorder(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if batch_idx == 0:
                    seen.setdefault(tag, []).append(
                        {n for n, p in pl_module.net.named_parameters() if p.requires_grad})
        return Recorder()

    import ftlab.train as train_mod

    original = train_mod._instantiate_all
    args = ["model.freeze_epochs=1", "model.unfreeze=stages", "trainer.max_epochs=3"]
    for tag, runs in (("straight", [args]), ("resumed", [[*args[:-1], "trainer.max_epochs=1"], [*args, "ckpt_path=last"]])):
        run_dir = tmp_path / tag
        for overrides in runs:
            def patched(node, _tag=tag):
                out = original(node)
                return out + [record(_tag)] if node is not None and "model_checkpoint" in node else out
            train_mod._instantiate_all = patched
            try:
                _run(compose_cfg, imagefolder, "gradual", *overrides, run_dir=run_dir)
            finally:
                train_mod._instantiate_all = original
    assert len(seen["straight"]) == 3 and len(seen["resumed"]) == 3
    assert seen["resumed"] == seen["straight"]
    assert seen["straight"][0] == {"classifier.weight", "classifier.bias"}
    assert seen["straight"][0] < seen["straight"][1] < seen["straight"][2]


def test_linear_probe_keeps_bn_statistics_through_a_lightning_fit(compose_cfg, imagefolder: Path) -> None:
    """Lightning toggles module modes around validation; frozen BN statistics must survive that."""
    import lightning as L

    from ftlab.data import ImageFolderDataModule

    module = _module(compose_cfg, "linear", model=LITE0)
    before = {k: v.clone() for k, v in module.net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    dm = ImageFolderDataModule(str(imagefolder), batch_size=8, num_workers=0, image_size=32, augment="none")
    dm.discover()
    dm.set_preprocessing(module.data_config)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, dm)
    after = module.net.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(module.net.classifier.weight, _module(compose_cfg, "linear", model=LITE0).net.classifier.weight)
