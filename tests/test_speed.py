"""trainer.channels_last and trainer.compile: same names, same artifacts, same numbers as eager NCHW."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pytest
import timm
import torch

from ftlab.errors import UserError
from ftlab.inference import load_predictor
from ftlab.speed import is_conv_net, resolve_channels_last
from ftlab.train import build, run
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["method=lora", "data=imagefolder", f"data.root={root}", "data.batch_size=8", *TINY_MODEL, *FAST_TRAINER,
            "logger=none", *extra]


def test_channels_last_trains_nhwc_and_matches_eager(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    _, eager, _ = build(compose_cfg(_overrides(imagefolder, "trainer.channels_last=false"), tmp_path / "eager"))
    assert not eager.channels_last
    _, nhwc, _ = build(compose_cfg(_overrides(imagefolder, "trainer.channels_last=true"), tmp_path / "nhwc"))
    convs = [p for n, p in nhwc.net.named_parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert eager.state_dict().keys() == nhwc.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    eager.eval(), nhwc.eval()
    with torch.no_grad():  # same seed, same weights: only the layout differs
        torch.testing.assert_close(nhwc(x), eager(x), rtol=1e-4, atol=1e-5)

    metrics = run(compose_cfg(_overrides(imagefolder, "trainer.channels_last=true"), tmp_path / "run"))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    net, info = load_predictor(tmp_path / "run")  # artifacts are written contiguous and load as usual
    assert info["method"] == "lora"
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compile_keeps_state_dict_keys_and_artifacts(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(_overrides(imagefolder, "trainer.compile=true", "trainer.limit_train_batches=2",
                                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"))
    _, plain, _ = build(compose_cfg(_overrides(imagefolder), tmp_path / "plain"))
    metrics = run(cfg)
    assert metrics["global_steps"] == 2
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # nn.Module.compile, not a wrapper
    assert set(ckpt["state_dict"]) == set(plain.state_dict())
    net, info = load_predictor(Path(cfg.paths.output_dir))
    assert info["method"] == "lora"
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(2, 3, 32, 32))).all()


def test_speed_options_are_validated(compose_cfg, imagefolder: Path) -> None:
    with pytest.raises(UserError, match="trainer.compile"):
        run(compose_cfg(_overrides(imagefolder, "trainer.compile=yes")))


@pytest.mark.parametrize("value", ["maybe", "1", "[true]"])
def test_channels_last_takes_auto_true_or_false(compose_cfg, imagefolder: Path, value: str) -> None:
    for good in ("auto", "true", "false"):
        validate(compose_cfg(_overrides(imagefolder, f"trainer.channels_last={good}")))
    with pytest.raises(UserError) as err:
        validate(compose_cfg(_overrides(imagefolder, f"trainer.channels_last={value}")))
    assert str(err.value).startswith("trainer.channels_last=") and "auto, true or false" in str(err.value)
    assert "\n" not in str(err.value)


# -- trainer.channels_last=auto: on for conv nets, off for patch embeddings and text ------------------
@pytest.mark.parametrize(("name", "conv", "auto"), [("test_resnet", True, True), ("test_efficientnet", True, True),
                                                    ("test_convnext", True, False), ("test_vit", False, False)])
def test_auto_channels_last_follows_the_architecture(name: str, conv: bool, auto: bool) -> None:
    # ConvNeXt is a conv net, but one measured no faster in NHWC (speed.NO_GAIN_FAMILIES): auto leaves it off.
    net = timm.create_model(name, pretrained=False)
    assert is_conv_net(net) is conv
    assert resolve_channels_last("auto", net) is auto
    assert resolve_channels_last(True, net) is True and resolve_channels_last(False, net) is False


def test_auto_channels_last_is_off_for_text_models(tiny_bert: Path) -> None:
    from ftlab.models.hf import build_hf_backbone

    assert not is_conv_net(build_hf_backbone(str(tiny_bert), num_classes=2).net)


def test_auto_is_the_default_and_says_what_it_chose(compose_cfg, imagefolder: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ftlab.speed"):
        _, cnn, _ = build(compose_cfg(_overrides(imagefolder), tmp_path / "cnn"))
    assert cnn.channels_last and "trainer.channels_last=auto: on" in caplog.text
    caplog.clear()
    # LoRA on the ViT's patch embedding (targets: auto) adds a 1x1 conv: still no sliding convolution.
    with caplog.at_level(logging.INFO, logger="ftlab.speed"):
        vit_cfg = ["method=lora", "data=imagefolder", f"data.root={imagefolder}", "model=timm", "model.name=test_vit",
                   "model.pretrained=false", "data.image_size=160", *FAST_TRAINER, "logger=none"]
        _, vit, _ = build(compose_cfg(vit_cfg, tmp_path / "vit"))
    assert any("patch_embed" in n and "lora" in n for n, _ in vit.net.named_parameters())
    assert not vit.channels_last and "trainer.channels_last=auto: off" in caplog.text


def _forward_backward(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode logits and the gradients of every trainable parameter (one flat float64 vector)."""
    model.train()
    torch.manual_seed(0)  # the same dropout / drop-path masks in every run
    logits = model(x)
    model.criterion(logits, y).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
    return logits.double(), torch.cat(grads).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_default_model_gives_the_same_logits_and_gradients_in_either_layout(compose_cfg, imagefolder: Path,
                                                                              tmp_path: Path, method: str) -> None:
    """Results "never change beyond float noise": a training forward and backward of the default model
    (EfficientNet-Lite0, same seed so same weights) in NCHW and NHWC, each against the same network in
    float64. Both layouts are float32 roundings of that result; they differ only in the summation order
    of the convolutions' weight gradients."""
    base = [f"method={method}", "data=imagefolder", f"data.root={imagefolder}", "model.pretrained=false",
            "data.image_size=64", *FAST_TRAINER, "logger=none"]
    models = {on: build(compose_cfg([*base, f"trainer.channels_last={on}".lower()], tmp_path / str(on)))[1]
              for on in (False, True)}
    assert models[True].channels_last and not models[False].channels_last
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    exact = _forward_backward(copy.deepcopy(models[False]).double(), x.double(), y)
    for on, model in models.items():
        logits, grads = _forward_backward(model, x, y)
        assert grads.shape == exact[1].shape and exact[1].norm() > 0
        assert _rel(logits, exact[0]) < 1e-4, on
        assert _rel(grads, exact[1]) < 3e-2, on


def test_fused_optimizer_is_the_default_where_safe(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    from ftlab.speed import fused_optimizer_arguments

    _, model, trainer = build(compose_cfg(_overrides(imagefolder), tmp_path / "a"))
    model.trainer = trainer
    assert model.make_optimizer().defaults["fused"] is True
    # Opted out in the config, or set either way: torch's own choice.
    _, plain, _ = build(compose_cfg(_overrides(imagefolder, "+model.optimizer.fused=false"), tmp_path / "b"))
    assert not plain.make_optimizer().defaults["fused"]
    _, foreach, _ = build(compose_cfg(_overrides(imagefolder, "+model.optimizer.foreach=true"), tmp_path / "c"))
    assert not foreach.make_optimizer().defaults["fused"]
    groups = model.param_groups()
    factory = model.optimizer_factory
    cpu = SingleDeviceStrategy(device=torch.device("cpu"))
    assert fused_optimizer_arguments(factory, groups, SimpleNamespace(precision="32-true", strategy=cpu))
    # A gradient scaler with clipping, FSDP shards, half-precision weights, other optimizers: not fused.
    assert not fused_optimizer_arguments(factory, groups, SimpleNamespace(precision="16-mixed", strategy=cpu))
    assert not fused_optimizer_arguments(factory, groups, SimpleNamespace(precision="32-true",
                                                                          strategy=FSDPStrategy.__new__(FSDPStrategy)))
    half = [{**g, "params": [p.detach().half() for p in g["params"]]} for g in groups]
    assert not fused_optimizer_arguments(factory, half)
    assert not fused_optimizer_arguments(lambda params, **kw: None, groups)


def test_fused_and_unfused_adamw_take_the_same_steps() -> None:
    """From the same weights and gradients, the fused kernel's updates equal torch's default loop up to float32
    rounding, over several steps (weight decay, bias correction and the moments included)."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=3)
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05, fused=True)
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.05, foreach=True)
    for _ in range(5):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    moved = max(float((p - q0).detach().abs().max()) for p, q0 in zip(params, net.parameters(), strict=True))
    assert moved > 1e-2  # the steps did change the weights
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
