"""PEFT checkpoints hold what trains: the frozen base is left out, fingerprinted, rebuilt and checked on load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from ftlab.base_weights import BASE_KEY
from ftlab.checkpoints import check_checkpoint, tensor_bytes
from ftlab.cli import main as cli_main
from ftlab.errors import UserError
from ftlab.inference import load_predictor
from ftlab.train import run
from helpers import FAST_TRAINER, TINY_MODEL, Crash, make_base_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(root: Path, base: Path | None, *extra: str) -> list[str]:
    with_base = [f"model.checkpoint={base}"] if base else []
    return ["data=imagefolder", f"data.root={root}", "data.batch_size=8", "data.augment=none", *TINY_MODEL, *with_base,
            *FAST_TRAINER, "logger=none", "model.lr=0.01", *extra]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)




def _logits(net: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return net(x)


def test_lora_checkpoints_hold_what_trains(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    base = make_base_weights(tmp_path / "base.safetensors")
    metrics = run(compose_cfg(_overrides(imagefolder, base, "method=lora"), run_dir=tmp_path / "lora"))
    run(compose_cfg(_overrides(imagefolder, base, "method=full"), run_dir=tmp_path / "full"))
    lora_path, full_path = tmp_path / "lora/checkpoints/last.ckpt", tmp_path / "full/checkpoints/last.ckpt"
    for path in (lora_path, full_path, tmp_path / "lora/checkpoints/best.ckpt"):
        check_checkpoint(path)  # loads with weights_only=True and is a training checkpoint
    lora, full = _load(lora_path), _load(full_path)

    # Full fine-tuning is unchanged: every tensor, no base reference.
    assert BASE_KEY not in full
    record = lora[BASE_KEY]
    stored, frozen = set(lora["state_dict"]), set(record["frozen"])
    assert stored and frozen and not stored & frozen
    # Stored: the adapters, the head and the re-estimated BatchNorm statistics; left out: the pretrained weights.
    trains = {k for k in stored if "lora_" in k or k.startswith("net.fc.")}
    assert trains and all(k in trains or k.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                   "num_batches_tracked") for k in stored)
    assert all("lora_" not in k and not k.startswith("net.fc.") and "running_" not in k for k in frozen)
    assert record["checkpoint"] == str(base) and re.fullmatch("[0-9a-f]{64}", record["sha256"])
    # Together they are the whole trained model, and the trained state resumes: optimizer moments are kept.
    net, _ = load_predictor(lora_path)
    assert {f"net.{k}" for k in net.state_dict()} == stored | frozen
    assert lora["optimizer_states"] and lora["lr_schedulers"] and lora["loops"]
    moments = [s for opt in lora["optimizer_states"] for s in opt["state"].values()]
    assert len(moments) == len(trains)
    # The file is the trained state, not the backbone: much smaller than full fine-tuning's.
    frozen_bytes = tensor_bytes({k: v for k, v in full["state_dict"].items() if k in frozen})
    size = lora_path.stat().st_size
    assert size < tensor_bytes(lora) + frozen_bytes / 2, (size, frozen_bytes)
    assert size * 3 < full_path.stat().st_size, (size, full_path.stat().st_size)
    # The test stage used the PEFT best checkpoint, which predicts like the artifact.
    assert metrics["test/acc"] is not None
    by_ckpt, _ = load_predictor(tmp_path / "lora/checkpoints/best.ckpt")
    by_adapter, _ = load_predictor(tmp_path / "lora/adapter.safetensors")
    assert torch.equal(_logits(by_ckpt), _logits(by_adapter))


def test_a_base_in_no_file_keeps_checkpoints_whole(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    # model.pretrained=false without model.checkpoint: the frozen weights are a random initialisation.
    run(compose_cfg(_overrides(imagefolder, None, "method=lora", "test=false")))
    ckpt = _load(tmp_path / "run/checkpoints/last.ckpt")
    assert BASE_KEY not in ckpt and any(k.endswith("conv1.0.weight") for k in ckpt["state_dict"])


@pytest.fixture
def lora_run(compose_cfg, imagefolder: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    base = make_base_weights(tmp_path / "base.safetensors")
    args = _overrides(imagefolder, base, "method=lora", "test=false")
    run(compose_cfg(args, run_dir=tmp_path / "run"))
    GlobalHydra.instance().clear()
    return tmp_path / "run", base, args


def test_changed_base_is_a_one_line_error(compose_cfg, lora_run, tmp_path: Path, capsys) -> None:
    run_dir, base, args = lora_run
    best = run_dir / "checkpoints" / "best.ckpt"
    saved = _load(best)[BASE_KEY]["sha256"]
    load_predictor(best)  # the unchanged base loads
    make_base_weights(base, seed=1)  # someone replaced the base weights file

    assert cli_main(["eval", str(best)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftlab: error: ") and str(best) in lines[0], lines
    hashes = re.findall(r"sha256 ([0-9a-f]{64})", lines[0])
    assert len(hashes) == 2 and hashes[0] == saved and hashes[1] != saved, lines[0]
    # Resuming checks the base as well, before any training.
    with pytest.raises(UserError, match="base weights changed"):
        run(compose_cfg([*args, "ckpt_path=last"], run_dir=run_dir))


def test_a_missing_trained_tensor_is_still_an_error(lora_run, tmp_path: Path) -> None:
    run_dir, _, _ = lora_run
    ckpt = _load(run_dir / "checkpoints" / "best.ckpt")
    dropped = next(k for k in ckpt["state_dict"] if "lora_A" in k)
    del ckpt["state_dict"][dropped]
    lone = tmp_path / "broken.ckpt"
    torch.save(ckpt, lone)
    with pytest.raises(UserError, match=re.escape(dropped)):
        load_predictor(lone)
    # A base tensor claimed by the record that the model does not have is named too.
    ckpt = _load(run_dir / "checkpoints" / "best.ckpt")
    ckpt[BASE_KEY]["frozen"]["net.no.such.weight"] = "float32"
    torch.save(ckpt, lone)
    with pytest.raises(UserError, match="net.no.such.weight"):
        load_predictor(lone)


def test_a_lone_peft_checkpoint_rebuilds_its_base(lora_run, tmp_path: Path) -> None:
    run_dir, _, _ = lora_run
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", lone)
    net, info = load_predictor(lone)
    ref, _ = load_predictor(run_dir / "adapter.safetensors")
    assert info["kind"] == "checkpoint" and torch.equal(_logits(net), _logits(ref))


def test_pissa_checkpoint_stores_the_residual_it_changed(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    base = make_base_weights(tmp_path / "base.safetensors")
    run(compose_cfg(_overrides(imagefolder, base, "method=lora", "model.init=pissa", "model.targets=[layer4.*conv\\d]",
                               "test=false")))
    ckpt = _load(tmp_path / "run/checkpoints/best.ckpt")
    adapted = {k[: -len(".lora_A.weight")] for k in ckpt["state_dict"] if k.endswith(".lora_A.weight")}
    assert adapted
    # The residual W - s·B·A of each adapted layer is stored; the other pretrained weights are left out.
    assert all(f"{m}.weight" in ckpt["state_dict"] and f"{m}.weight" not in ckpt[BASE_KEY]["frozen"] for m in adapted)
    assert any(k.startswith("net.layer1.") for k in ckpt[BASE_KEY]["frozen"])
    by_ckpt, _ = load_predictor(tmp_path / "run/checkpoints/best.ckpt")
    by_adapter, _ = load_predictor(tmp_path / "run/adapter.safetensors")
    assert torch.equal(_logits(by_ckpt), _logits(by_adapter))


def test_gradual_checkpoints_are_peft_until_the_backbone_unfreezes(compose_cfg, imagefolder: Path,
                                                                    tmp_path: Path) -> None:
    base = make_base_weights(tmp_path / "base.safetensors")
    # 3 steps per epoch, a step checkpoint every 3: the crash in the second epoch (the backbone unfrozen) resumes
    # from the checkpoint that ended the frozen first one.
    args = _overrides(imagefolder, base, "method=gradual", "model.freeze_epochs=1", "test=false",
                      "callbacks.step_checkpoint.every_n_steps=3", "trainer.max_epochs=2")
    with pytest.raises(RuntimeError, match="crash"):
        run(compose_cfg(args, run_dir=tmp_path / "resumed"), extra_callbacks=[Crash(4)])
    frozen_epoch = _load(tmp_path / "resumed/checkpoints/last.ckpt")
    assert frozen_epoch["global_step"] == 3
    assert BASE_KEY in frozen_epoch and all(k.startswith("net.fc.") or "running_" in k or "num_batches" in k
                                            for k in frozen_epoch["state_dict"])
    run(compose_cfg([*args, "ckpt_path=last"], run_dir=tmp_path / "resumed"))
    run(compose_cfg(args, run_dir=tmp_path / "straight"))
    resumed, straight = (_load(tmp_path / f"{d}/checkpoints/last.ckpt") for d in ("resumed", "straight"))
    assert resumed["global_step"] == straight["global_step"] == 6
    # Once the backbone trains, checkpoints are whole; resumed from the PEFT one, training continued exactly.
    assert BASE_KEY not in resumed and BASE_KEY not in straight
    assert resumed["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_gradual_rebuilds_the_base_once_its_backbone_has_trained(tmp_path: Path) -> None:
    """The test stage may load a best.ckpt of a frozen epoch into a model whose backbone has since trained."""
    from ftlab.methods import GradualUnfreezing

    base = make_base_weights(tmp_path / "base.safetensors")
    module = GradualUnfreezing(num_classes=3, source="timm", name="test_resnet", pretrained=False,
                               checkpoint=str(base), freeze_epochs=1, unfreeze="all", epochs_per_stage=1)
    original = {k: v.clone() for k, v in module.state_dict().items()}
    best = {"state_dict": dict(original)}
    module.on_save_checkpoint(best)  # epoch 0: the head alone trains
    assert BASE_KEY in best and set(best["state_dict"]) < set(original)
    module._started_epoch = 1  # the backbone unfreezes and trains
    module.apply_schedule(1)
    with torch.no_grad():
        for param in module.net.parameters():
            param.add_(1.0)
    whole = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(whole)
    assert BASE_KEY not in whole
    module.restore_base(best, "best.ckpt")
    module.load_state_dict(best["state_dict"], strict=True)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in original.items())
