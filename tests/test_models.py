"""Backbones: the offline pretrained weights really classify; heads, checkpoints and name errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from ftlab.data.transforms import eval_transform
from ftlab.errors import UserError
from ftlab.models import build_backbone, efficientnet_lite0_state_dict


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", num_classes=1000)


def test_weight_mapping_covers_every_tensor_with_matching_shapes() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = efficientnet_lite0_state_dict(model)
    own = model.state_dict()
    assert list(mapped) == list(own)
    assert len(mapped) == 296
    assert all(mapped[k].shape == own[k].shape for k in own)
    # The mapped weights are the file's, not the random init.
    assert not torch.equal(mapped["conv_stem.weight"], own["conv_stem.weight"])


def test_pretrained_lite0_classifies_real_photos(lite0) -> None:
    """scikit-image's bundled photos: the cat is an Egyptian cat (285), the coffee an espresso (967)."""
    from PIL import Image
    from skimage import data

    net = lite0.net.eval()
    # The head was replaced for 1000 classes with fresh weights: put the pretrained one back.
    pretrained = efficientnet_lite0_state_dict(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    net.load_state_dict(pretrained)
    tf = eval_transform(lite0.data_config)
    batch = torch.stack([tf(Image.fromarray(data.chelsea())), tf(Image.fromarray(data.coffee()))])
    with torch.no_grad():
        probs = net(batch).softmax(-1)
    top5_cat = probs[0].topk(5).indices.tolist()
    assert 285 in top5_cat[:2], top5_cat  # Egyptian cat; tabby (281)/tiger cat (282) are the neighbours
    assert set(top5_cat[:3]) <= {281, 282, 285, 287}
    assert probs[1].argmax().item() == 967  # espresso
    assert probs[1].max().item() > 0.5


def test_head_is_replaced_for_the_dataset(lite0) -> None:
    b = build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", num_classes=7)
    assert b.head_name == "classifier"
    assert b.net.classifier.out_features == 7
    assert b.net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # The backbone keeps the pretrained weights.
    assert torch.equal(b.net.conv_stem.weight, lite0.net.conv_stem.weight)


@pytest.mark.parametrize(("source", "name", "head"), [("timm", "test_resnet", "fc"), ("timm", "test_vit", "head"),
                                                       ("torchvision", "resnet18", "fc"),
                                                       ("torchvision", "mobilenet_v3_small", "classifier.3")])
def test_timm_and_torchvision_backbones(source: str, name: str, head: str) -> None:
    b = build_backbone(source, name, num_classes=4, pretrained=False, weights=None)
    assert b.head_name == head
    assert b.net(torch.randn(1, 3, 64, 64) if "vit" not in name else torch.randn(1, 3, 160, 160)).shape == (1, 4)
    assert b.data_config["size"] > 0 and len(b.data_config["mean"]) == 3


@pytest.mark.parametrize(("source", "name", "hint"), [("timm", "resnet5O", "resnet50"),
                                                      ("torchvision", "resnet_18", "resnet18")])
def test_unknown_model_suggests_close_names(source: str, name: str, hint: str) -> None:
    with pytest.raises(UserError, match=f"{name}.*Did you mean:.*{hint}"):
        build_backbone(source, name, num_classes=3, pretrained=False, weights=None)


def test_unknown_torchvision_weights_lists_choices() -> None:
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_backbone("torchvision", "resnet18", num_classes=3, weights="IMAGENET1K_V9")


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "lightning"])
def test_local_checkpoint_is_loaded(tmp_path: Path, fmt: str) -> None:
    src = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.5)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif fmt == "pt":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    else:
        path = tmp_path / "w.ckpt"
        torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    b = build_backbone("timm", "test_resnet", num_classes=5, pretrained=False, checkpoint=str(path))
    assert torch.equal(b.net.conv1[0].weight if isinstance(b.net.conv1, nn.Sequential) else b.net.conv1.weight,
                       src.conv1[0].weight if isinstance(src.conv1, nn.Sequential) else src.conv1.weight)
    assert b.net.fc.out_features == 5
    assert b.weight_source.startswith("checkpoint:")


def test_checkpoint_that_does_not_fit_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, str(path))
    with pytest.raises(UserError, match="other.safetensors"):
        build_backbone("timm", "test_resnet", num_classes=5, pretrained=False, checkpoint=str(path))
    with pytest.raises(UserError, match="no such weights file"):
        build_backbone("timm", "test_resnet", num_classes=5, pretrained=False, checkpoint=str(tmp_path / "nope.pt"))


def test_pickled_code_in_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(UserError, match="refused to load"):
        build_backbone("timm", "test_resnet", num_classes=5, pretrained=False, checkpoint=str(path))
    assert not marker.exists()
