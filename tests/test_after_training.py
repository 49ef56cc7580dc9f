"""After training: eval, predict and export from a run directory, a checkpoint, or base model + adapter.

One small LoRA run (tiny timm net, 1 epoch) is trained once for the module. Its frozen base weights come
from a local file (``model.checkpoint``), so base + adapter can be rebuilt, as with pretrained weights.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ftlab.adapters.common import AdapterLayer
from ftlab.cli import main as cli_main
from ftlab.config import compose_config
from ftlab.errors import UserError
from ftlab.evaluate import evaluate
from ftlab.export import FORMATS, export, load_export, max_rel_error
from ftlab.inference import load_predictor
from ftlab.models import build_backbone
from ftlab.predict import predict
from ftlab.train import run
from helpers import FAST_TRAINER, TINY_MODEL, make_imagefolder

CLASSES = ["cat", "dog", "fox"]


def _train_run(root: Path) -> Path:
    """Train like `python -m ftlab`, and save .hydra/config.yaml as Hydra's main would."""
    import timm
    from safetensors.torch import save_file

    images = make_imagefolder(root / "images", splits=("train", "test"))
    torch.manual_seed(0)
    base = root / "base.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(base))
    run_dir = root / "run"
    overrides = ["method=lora", "data=imagefolder", f"data.root={images}", "data.batch_size=8", *TINY_MODEL,
                 f"model.checkpoint={base}", "model.lr=0.05", *FAST_TRAINER, "logger=none"]
    cfg = compose_config(overrides, run_dir, root_dir=root)
    try:
        run(cfg)
    finally:
        GlobalHydra.instance().clear()
    (run_dir / ".hydra").mkdir()
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(task_cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_run(tmp_path_factory.mktemp("after_training"))


def _batch(run_dir: Path, n: int = 5) -> torch.Tensor:
    size = yaml.safe_load((run_dir / "adapter.yaml").read_text())["preprocessing"]["size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return net(x)


def test_run_dir_uses_the_adapter_and_knows_its_classes(run_dir: Path) -> None:
    net, info = load_predictor(run_dir)
    assert info["kind"] == "adapter" and info["class_names"] == CLASSES
    assert info["preprocessing"]["size"] == 32
    assert any(isinstance(m, AdapterLayer) for m in net.modules())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_reloads_with_the_same_logits(run_dir: Path, tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        with pytest.raises(UserError, match=r"pip install -e '\.\[onnx\]'"):
            export(str(run_dir), fmt, output=str(tmp_path / fmt))
        return
    meta = export(str(run_dir), fmt, output=str(tmp_path / fmt))
    written = json.loads((tmp_path / fmt / "model.json").read_text())
    assert written["format"] == fmt and written["class_names"] == CLASSES
    assert written["input_size"] == [3, 32, 32] and written["architecture"] == "test_resnet"
    pre = yaml.safe_load((run_dir / "adapter.yaml").read_text())["preprocessing"]
    assert [written[k] for k in ("mean", "std", "crop_pct")] == [pre[k] for k in ("mean", "std", "crop_pct")]
    assert written["check"]["max_rel_error"] < 1e-5
    assert meta["bytes"] == (tmp_path / fmt / meta["file"]).stat().st_size
    # Checked again here, independently, on another batch size than the export's own check.
    trained, _ = load_predictor(run_dir)
    reloaded, _ = load_export(tmp_path / fmt)
    x = _batch(run_dir, 3)
    assert max_rel_error(_logits(trained, x), _logits(reloaded, x)) < 1e-5


def test_merged_export_is_the_plain_backbone(run_dir: Path, tmp_path: Path) -> None:
    export(str(run_dir), "safetensors", output=str(tmp_path))
    exported, meta = load_export(tmp_path)
    plain = build_backbone(meta["source"], meta["architecture"], meta["num_classes"], pretrained=False).net
    assert not any(isinstance(m, AdapterLayer) for m in exported.modules())
    assert Counter(type(m) for m in exported.modules()) == Counter(type(m) for m in plain.modules())
    assert exported.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in plain.parameters())


def test_predict_skips_a_corrupt_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    shutil.copytree(run_dir.parent / "images" / "test" / "dog", folder / "a")
    shutil.copytree(run_dir.parent / "images" / "test" / "fox", folder / "b" / "c")
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    good = sorted(str(p) for p in folder.rglob("*.png"))
    out = tmp_path / "preds.csv"
    summary = predict(str(run_dir), str(folder), output=str(out), top_k=5, batch_size=4, num_workers=0)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("ftlab: warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "notes.txt" not in err
    assert summary["skipped"] == [str(folder / "b" / "broken.jpg")] and summary["top_k"] == 3
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["path"] for r in rows) == good
    assert list(rows[0]) == ["path", "label", "prob", "top1_label", "top1_prob", "top2_label", "top2_prob",
                             "top3_label", "top3_prob"]
    for r in rows:
        probs = [float(r[f"top{i}_prob"]) for i in (1, 2, 3)]
        assert r["label"] == r["top1_label"] and float(r["prob"]) == probs[0]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert {r[f"top{i}_label"] for i in (1, 2, 3)} == set(CLASSES)


def test_eval_from_run_dir_and_checkpoint_agree(run_dir: Path, tmp_path: Path) -> None:
    from_run = evaluate(str(run_dir), num_workers=0)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    # A PEFT checkpoint (the base is in a file): eval rebuilds the frozen base and checks its sha256.
    assert "ftlab_base" in torch.load(ckpt, map_location="cpu", weights_only=True)
    from_ckpt = evaluate(str(ckpt), output=str(tmp_path / "e.json"), num_workers=0)
    assert from_run["output"] == str(run_dir / "eval" / "test.json")
    assert (from_run["source_kind"], from_ckpt["source_kind"]) == ("adapter", "checkpoint")
    for key in ("num_samples", "accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"):
        assert from_run[key] == from_ckpt[key], key
    assert abs(from_run["loss"] - from_ckpt["loss"]) < 1e-5
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["accuracy"] == from_run["accuracy"] and "top5_accuracy" not in saved  # only 3 classes
    # The training run's own test stage (best checkpoint, same images) measured the same.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert abs(saved["accuracy"] - metrics["test/acc"]) < 1e-6
    assert abs(saved["macro_f1"] - metrics["test/f1"]) < 1e-6
    table = saved["confusion_matrix"]
    assert [row["true"] for row in table] == CLASSES
    assert sum(sum(row["predicted"].values()) for row in table) == saved["num_samples"] == 30
    for row in table:
        name = row["true"]
        accuracy = saved["per_class_accuracy"][name]
        assert row["predicted"][name] / saved["support"][name] == pytest.approx(accuracy)


def test_eval_on_another_folder_checks_classes(run_dir: Path, tmp_path: Path) -> None:
    subset = make_imagefolder(tmp_path / "subset", classes=("fox", "cat"), per_class=3, splits=("x",))
    subset = subset / "x"
    result = evaluate(str(run_dir), data_root=str(subset), num_workers=0)
    assert result["num_samples"] == 6 and result["support"] == {"cat": 3, "dog": 0, "fox": 3}
    assert result["per_class_accuracy"]["dog"] is None
    assert Path(result["output"]).name == "x_test.json"
    alien = make_imagefolder(tmp_path / "alien", classes=("cat", "emu"), per_class=2, splits=("test",))
    with pytest.raises(UserError, match="emu"):
        evaluate(str(run_dir), data_root=str(alien), num_workers=0)


def test_adapter_on_base_predicts_like_the_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    by_adapter, info = load_predictor(run_dir / "adapter.safetensors")
    by_ckpt, _ = load_predictor(run_dir / "checkpoints" / "best.ckpt")
    assert info["kind"] == "adapter"
    x = _batch(run_dir, 8)
    ref = _logits(by_ckpt, x)
    assert max_rel_error(ref, _logits(by_adapter, x)) < 1e-5
    folder = run_dir.parent / "images" / "test"
    outputs = []
    adapter = f"adapter={run_dir / 'adapter.safetensors'}"
    for source, name in ((adapter, "a.csv"), (str(run_dir / "checkpoints" / "best.ckpt"), "c.csv")):
        args = ["predict", source, f"input={folder}", f"output={tmp_path / name}", "num_workers=0"]
        assert cli_main(args) == 0
        outputs.append([(r["path"], r["label"]) for r in csv.DictReader((tmp_path / name).open())])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 30
    # predict and eval agree: the labels predicted for the test images are the confusion matrix's columns.
    assert cli_main(["eval", adapter, f"output={tmp_path / 'e.json'}", "num_workers=0"]) == 0
    table = json.loads((tmp_path / "e.json").read_text())["confusion_matrix"]
    columns = {c: sum(row["predicted"][c] for row in table) for c in CLASSES}
    assert columns == {c: Counter(label for _, label in outputs[0])[c] for c in CLASSES}


def test_lone_checkpoint_carries_class_and_preprocessing(run_dir: Path, tmp_path: Path) -> None:
    lone = tmp_path / "elsewhere" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", lone)
    net, info = load_predictor(lone)
    ref, ref_info = load_predictor(run_dir / "checkpoints" / "best.ckpt")
    assert info["run_dir"] is None and info["target"] == "ftlab.methods.lora.LoRA"
    assert info["preprocessing"] == ref_info["preprocessing"] and info["class_names"] == CLASSES
    x = _batch(run_dir, 2)
    assert torch.equal(_logits(net, x), _logits(ref, x))
    # Without the ftlab entry, a checkpoint outside its run cannot say which class it needs.
    ckpt = torch.load(lone, map_location="cpu", weights_only=True)
    del ckpt["ftlab"]
    torch.save(ckpt, lone)
    with pytest.raises(UserError, match="cannot tell which ftlab method"):
        load_predictor(lone)


def test_cli_errors_are_one_line(run_dir: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    assert cli_main(["eval", str(run_dir), "splt=val"]) == 1
    assert cli_main(["predict", str(run_dir)]) == 1
    assert cli_main(["export", str(run_dir / "nothing_here")]) == 1
    monkeypatch.setitem(sys.modules, "ftlab.report", None)  # as if the module did not exist
    assert cli_main(["report", "outputs"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("ftlab: error: ") for line in lines), lines
    assert "Did you mean: split?" in lines[0] and "input=" in lines[1] and "nothing_here" in lines[2]
    assert "ftlab.report" in lines[3]


def test_cli_report_delegates_to_the_module(monkeypatch) -> None:
    seen = []
    fake = types.ModuleType("ftlab.report")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "ftlab.report", fake)
    assert cli_main(["report", "outputs", "--sort", "acc"]) == 3
    assert seen == [["outputs", "--sort", "acc"]]


@pytest.mark.cli
def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("ftlab")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ftlab.cli"]
    procs = [subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)
             for args in (["--help"], ["export", "--help"])]
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    for name in ("train", "eval", "predict", "export", "report"):
        assert f"\n  {name} " in procs[0].stdout
    assert "usage: ftlab export RUN" in procs[1].stdout and "format=" in procs[1].stdout
