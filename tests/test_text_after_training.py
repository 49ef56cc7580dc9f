"""After training, for text: HF peft adapters both ways, eval, predict and export of a text run.

One small LoRA run (tiny random BERT, CSV texts, ``merge=true``) is trained once for the module; its base
weights are the tiny model's folder, so base + adapter can be rebuilt as with pretrained weights.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ftlab.adapters import (
    AdapterLayer,
    adapter_state_dict,
    apply_lora,
    ftlab_to_peft_keys,
    load_adapter,
    load_peft_adapter,
    peft_to_ftlab_keys,
    read_adapter_file,
    save_peft_adapter,
)
from ftlab.cli import main as cli_main
from ftlab.config import compose_config
from ftlab.data.text import text_batch
from ftlab.errors import UserError
from ftlab.evaluate import evaluate
from ftlab.export import export, load_export, max_rel_error
from ftlab.inference import load_predictor
from ftlab.models.hf import build_hf_backbone, load_tokenizer
from ftlab.predict import predict
from ftlab.train import run
from helpers import FAST_TRAINER, NEGATIVE, POSITIVE, labelled, make_textfolder, write_csv

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["neg", "pos"]
QV = [r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)"]
TEXTS = ["a great movie", "the film is really very awful and the plot is dull .", "bad", "good acting !"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """Train like `python -m ftlab` (LoRA, merge=true) and save .hydra/config.yaml as Hydra's main would."""
    root = tmp_path_factory.mktemp("text_after_training")
    texts = root / "texts"
    write_csv(texts / "train.csv", labelled() * 2)
    write_csv(texts / "test.csv", labelled(4))
    run_dir = root / "run"
    overrides = ["data=textfile", f"data.root={texts}", "data.batch_size=8", "model=hf", f"model.name={tiny_bert}",
                 "method=lora", "model.lr=0.05", *FAST_TRAINER, "trainer.max_epochs=3", "logger=none", "merge=true"]
    cfg = compose_config(overrides, run_dir, root_dir=root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg)
    finally:
        torch.set_num_threads(before)
        GlobalHydra.instance().clear()
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run_dir / ".hydra" / "config.yaml")
    return run_dir


def _ids(folder: Path | str, texts: list[str]) -> dict[str, torch.Tensor]:
    return text_batch(load_tokenizer(str(folder)), texts, 32)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def _hidden(encoder: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state


# -- HF peft interop --------------------------------------------------------------------------------
def test_prefix_maps_the_encoder_between_ftlab_and_peft_keys() -> None:
    ftlab = {"encoder.encoder.layer.0.attention.self.query.lora_A.weight": 1, "head.weight": 2}
    peft = ftlab_to_peft_keys(ftlab, prefix="encoder")  # "encoder" and "encoder." are the same prefix
    assert peft == {"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": 1}  # head left out
    assert peft_to_ftlab_keys(peft, prefix="encoder.") == {"encoder.encoder.layer.0.attention.self.query.lora_A.weight": 1}
    in_memory = ftlab_to_peft_keys(ftlab, adapter_name="default", prefix="encoder.")
    assert list(in_memory) == ["base_model.model.encoder.layer.0.attention.self.query.lora_A.default.weight"]
    assert list(peft_to_ftlab_keys(in_memory, prefix="encoder.")) == list(ftlab)[:1]
    assert ftlab_to_peft_keys(ftlab) == {"base_model.model." + k: v for k, v in ftlab.items()}  # no prefix: all


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_into_ftlab(tiny_bert: Path, tmp_path: Path, dora: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import BertModel

    peft_model = get_peft_model(BertModel.from_pretrained(str(tiny_bert)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=dora))
    _perturb(peft_model, 1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    x = _ids(tiny_bert, TEXTS)
    expected = _hidden(peft_model.eval(), x)
    assert (expected - _hidden(BertModel.from_pretrained(str(tiny_bert)).eval(), x)).abs().max() > 1e-3

    # The folder as peft wrote it: LoRA re-created on exactly the modules the file names.
    net = build_hf_backbone(str(tiny_bert), 2).net.eval()
    names = load_peft_adapter(net, tmp_path / "peft", prefix="encoder.")
    assert names == [f"encoder.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    torch.testing.assert_close(_hidden(net.encoder, x), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.head(net.pool(expected, x["attention_mask"])), atol=1e-5, rtol=1e-5)
    if dora:
        return
    # By hand: the keys renamed with the prefix, onto LoRA applied with the same rank and alpha.
    by_hand = build_hf_backbone(str(tiny_bert), 2).net.eval()
    apply_lora(by_hand, QV, rank=4, alpha=8)
    state = peft_to_ftlab_keys(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), prefix="encoder.")
    load_adapter(by_hand, state)
    torch.testing.assert_close(_hidden(by_hand.encoder, x), expected, atol=1e-6, rtol=1e-6)


def test_ftlab_adapter_loads_into_peft(tiny_bert: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from transformers import BertModel

    net = build_hf_backbone(str(tiny_bert), 2).net
    apply_lora(net, QV, rank=4, alpha=8)
    _perturb(net, 2)
    net.eval()
    x = _ids(tiny_bert, TEXTS)
    expected = _hidden(net.encoder, x)

    # The converted state dict into a peft model made with the same LoraConfig.
    state = ftlab_to_peft_keys(adapter_state_dict(net, extra_prefixes=["head"]), prefix="encoder.")
    assert len(state) == 8 and not any(".head." in k for k in state)
    peft_model = get_peft_model(BertModel.from_pretrained(str(tiny_bert)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    torch.testing.assert_close(_hidden(peft_model.eval(), x), expected, atol=1e-6, rtol=1e-6)

    # A peft adapter folder that PeftModel.from_pretrained loads as it is.
    save_peft_adapter(net, tmp_path / "peft", prefix="encoder.", base_model_name_or_path=str(tiny_bert))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and len(config["target_modules"]) == 4
    loaded = PeftModel.from_pretrained(BertModel.from_pretrained(str(tiny_bert)), str(tmp_path / "peft"))
    torch.testing.assert_close(_hidden(loaded.eval(), x), expected, atol=1e-6, rtol=1e-6)


def test_a_runs_adapter_file_loads_into_peft(text_run: Path, tiny_bert: Path) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import BertModel

    tensors, config, _ = read_adapter_file(text_run / "adapter.safetensors")
    group = config["lora"][0]
    peft_model = get_peft_model(BertModel.from_pretrained(str(tiny_bert)), LoraConfig(
        r=group["rank"], lora_alpha=group["alpha"], target_modules=["query", "value"]))
    assert not set_peft_model_state_dict(peft_model, ftlab_to_peft_keys(tensors, prefix="encoder.")).unexpected_keys
    net, _ = load_predictor(text_run / "adapter.safetensors")
    x = _ids(tiny_bert, TEXTS)
    torch.testing.assert_close(_hidden(peft_model.eval(), x), _hidden(net.encoder, x), atol=1e-6, rtol=1e-6)


# -- the run directory ------------------------------------------------------------------------------
def test_run_dir_describes_its_text_preprocessing(text_run: Path, tiny_bert: Path) -> None:
    for name in ("adapter.yaml", "model.yaml"):
        meta = yaml.safe_load((text_run / name).read_text())
        assert meta["preprocessing"] == {"modality": "text", "tokenizer": str(tiny_bert.resolve()), "max_length": 64}
        assert meta["base_model"]["source"] == "hf" and meta["base_model"]["pooling"] == "mean"
        assert meta["class_names"] == CLASSES
    metrics = json.loads((text_run / "metrics.json").read_text())
    assert metrics["merged_max_rel_error"] < 1e-4  # merge=true checked on the model's own example input
    net, info = load_predictor(text_run)  # model.safetensors (merged) first
    assert info["kind"] == "model" and not any(isinstance(m, AdapterLayer) for m in net.modules())
    adapted, _ = load_predictor(text_run / "adapter.safetensors")
    checkpoint, _ = load_predictor(text_run / "checkpoints" / "best.ckpt")
    x = _ids(tiny_bert, TEXTS)
    with torch.inference_mode():
        reference = checkpoint(x)
        assert max_rel_error(reference, adapted(x)) < 1e-5 and max_rel_error(reference, net(x)) < 1e-5


# -- eval -------------------------------------------------------------------------------------------
def test_eval_reproduces_the_runs_metrics(text_run: Path, tmp_path: Path) -> None:
    metrics = json.loads((text_run / "metrics.json").read_text())
    test = evaluate(str(text_run / "adapter.safetensors"))
    assert test["output"] == str(text_run / "eval" / "test.json") and test["num_samples"] == 8
    assert test["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert test["macro_f1"] == pytest.approx(metrics["test/f1"], abs=1e-6)
    assert "note" not in test and "top5_accuracy" not in test
    val = evaluate(str(text_run / "checkpoints" / "best.ckpt"), split="val", output=str(tmp_path / "v.json"))
    assert val["num_samples"] == metrics["split_sizes"]["val"]
    assert val["accuracy"] == pytest.approx(metrics["val/acc_best"], abs=1e-6)
    train = evaluate(str(text_run), split="train", output=str(tmp_path / "t.json"), batch_size=5)
    assert train["num_samples"] == metrics["split_sizes"]["train"]
    assert [row["true"] for row in train["confusion_matrix"]] == CLASSES


def test_eval_on_other_text_data(text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A folder with train/ only: the run's split settings, tested on val, and the summary says so.
    folder = evaluate(str(text_run), data_root=str(make_textfolder(tmp_path / "folder")))
    assert "no test split" in folder["note"] and Path(folder["output"]).name == "folder_test.json"
    # One file, with other column names and an unusable row (skipped, named once).
    lone = tmp_path / "more.csv"
    write_csv(lone, [(POSITIVE[0], "pos"), (NEGATIVE[0], "neg"), ("   ", "neg")], header=("body", "y"))
    capsys.readouterr()
    assert cli_main(["eval", str(text_run), f"data.root={lone}", "data.text_column=body", "data.label_column=y",
                     f"output={tmp_path / 'more.json'}"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: warning")]
    assert len(warning) == 1 and "more.csv line 4 (empty text)" in warning[0]
    result = json.loads((tmp_path / "more.json").read_text())
    assert result["num_samples"] == 2 and result["support"] == {"neg": 1, "pos": 1}
    # DIR/<split>.jsonl without a train split; labels the model does not know are named.
    jsonl = tmp_path / "j"
    jsonl.mkdir()
    (jsonl / "val.jsonl").write_text("\n".join(json.dumps({"text": t, "label": "pos"}) for t in POSITIVE[:3]))
    assert evaluate(str(text_run), split="val", data_root=str(jsonl))["num_samples"] == 3
    write_csv(tmp_path / "alien" / "test.csv", [("a film", "meh"), ("a plot", "pos")])
    with pytest.raises(UserError, match="meh"):
        evaluate(str(text_run), data_root=str(tmp_path / "alien"))


# -- predict ----------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_predict_from_txt_csv_jsonl_and_folder(text_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_bytes(b"a great movie\n\n  awful acting  \r\nbad \xff\xfe plot\nthe plot\n")
    summary = predict(str(text_run), str(lines), output=str(tmp_path / "a.csv"), top_k=5, batch_size=2)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: warning")]
    assert warnings == [f"ftlab: warning: skipped 1 unreadable text(s): {lines}:4 (not valid UTF-8)"]
    assert summary["texts"] == 3 and summary["skipped"] == [f"{lines}:4"] and summary["top_k"] == 2
    rows = _rows(tmp_path / "a.csv")
    assert list(rows[0]) == ["input", "text", "label", "prob", "top1_label", "top1_prob", "top2_label", "top2_prob"]
    assert [(r["input"], r["text"]) for r in rows] == [
        (f"{lines}:1", "a great movie"), (f"{lines}:3", "awful acting"), (f"{lines}:5", "the plot")]
    for r in rows:
        assert r["label"] == r["top1_label"] and {r["top1_label"], r["top2_label"]} == set(CLASSES)
        assert float(r["top1_prob"]) >= float(r["top2_prob"])
        assert float(r["top1_prob"]) + float(r["top2_prob"]) == pytest.approx(1, abs=1e-5)
    # The same texts give the same probabilities whatever batch they are padded in.
    table = tmp_path / "t.csv"
    write_csv(table, [("1", "a great movie"), ("2", 'the plot, "quoted"'), ("3", "awful acting")], header=("id", "text"))
    predict(str(text_run), str(table), output=str(tmp_path / "b.csv"), top_k=1)
    by_csv = {r["text"]: r["top1_prob"] for r in _rows(tmp_path / "b.csv")}
    assert by_csv["a great movie"] == rows[0]["top1_prob"] and by_csv["awful acting"] == rows[1]["top1_prob"]
    assert _rows(tmp_path / "b.csv")[1]["input"] == f"{table}:3"
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"review": "good film"}) + "\n" + json.dumps({"review": None}) + "\n")
    assert predict(str(text_run), str(jsonl), output=str(tmp_path / "c.csv"), text_column="review")["texts"] == 1
    # A folder: every .txt file below it is one text; empty and non-UTF-8 files are skipped.
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("a fine film\nwith two lines\n")
    (folder / "sub" / "two.txt").write_text("dull story")
    (folder / "empty.txt").write_text("\n")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "notes.md").write_text("not a .txt file, not read")
    capsys.readouterr()
    assert cli_main(["predict", str(text_run), f"input={folder}", "top_k=1"]) == 0  # default output
    err = capsys.readouterr().err
    assert "skipped 2 unreadable text(s)" in err and "latin1.txt (not valid UTF-8 (byte 0xe9" in err
    rows = _rows(text_run / "predictions.csv")
    assert [(r["input"], r["text"]) for r in rows] == [
        (str(folder / "one.txt"), "a fine film\nwith two lines"), (str(folder / "sub" / "two.txt"), "dull story")]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.with_suffix(".csv").write_text("id,body\n1,a film\n"), r"no column 'text' \(columns: 'id', 'body'\); pass text_column=NAME"),
    (lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG"), r"a text model reads a \.txt file"),
    (lambda p: p.with_suffix(".txt").write_text("\n  \n"), r"no texts in the file"),
    (lambda p: p.with_suffix(".txt").write_bytes(b"\xff\n"), r"none of the 1 texts could be used"),
    (lambda p: p.with_suffix(".csv").write_text("text,id\na film,1,2\n"), r"in\.csv line 2: 3 fields, the header has 2"),
    (lambda p: p.mkdir(), r"no \.txt files in the folder"),
    (lambda p: None, r"no such file or folder"),
], ids=["csv-without-text-column", "image-file", "blank-lines-only", "only-bad-texts", "csv-row-width", "empty-folder",
        "missing"])
def test_bad_predict_inputs_are_one_line_errors(text_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                make, message: str) -> None:
    make(tmp_path / "in")
    given = next((p for p in tmp_path.iterdir() if p.name.startswith("in")), tmp_path / "in")
    assert cli_main(["predict", str(text_run), f"input={given}", f"output={tmp_path / 'p.csv'}"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "p.csv").exists()


# -- export -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_text_export_reloads_with_the_same_logits(text_run: Path, tmp_path: Path, fmt: str) -> None:
    meta = export(str(text_run / "adapter.safetensors"), fmt, output=str(tmp_path))
    written = json.loads((tmp_path / "model.json").read_text())
    assert written["modality"] == "text" and written["tokenizer"] == "tokenizer" and written["pooling"] == "mean"
    assert written["max_length"] == 64 and written["class_names"] == CLASSES and "input_size" not in written
    assert written["check"]["inputs"] == [[4, 11], [3, 23]] and written["check"]["max_rel_error"] < 1e-5
    assert meta["bytes"] == (tmp_path / meta["file"]).stat().st_size
    # The export folder alone: its tokenizer (and, for safetensors, the encoder config beside it).
    trained, _ = load_predictor(text_run / "adapter.safetensors")
    reloaded, _ = load_export(tmp_path)
    x = text_batch(load_tokenizer(str(tmp_path / "tokenizer")), TEXTS, 64)
    with torch.inference_mode():
        reference = trained(x)
        assert max_rel_error(reference, reloaded(x)) < 1e-5
        # Token ids alone (every position real): the longest text, which has no padding.
        assert max_rel_error(reference[1:2], reloaded(x["input_ids"][1:2])) < 1e-5


def test_onnx_text_export_has_dynamic_token_inputs(text_run: Path, tmp_path: Path) -> None:
    import onnxruntime

    meta = export(str(text_run), "onnx", output=str(tmp_path))  # the merged model.safetensors
    assert meta["input_names"] == ["input_ids", "attention_mask"] and meta["output_name"] == "logits"
    assert meta["check"]["max_rel_error"] < 1e-5 and meta["check"]["runtime"].startswith("onnxruntime")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert all(i.type == "tensor(int64)" and i.shape == ["batch", "sequence"] for i in inputs.values())
    trained, _ = load_predictor(text_run / "adapter.safetensors")
    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    # Two batches of different sequence lengths, each with padded rows, against the unmerged torch model.
    for texts in (TEXTS, ["good", "a very fine story", "the actor"]):
        x = text_batch(tokenizer, texts, 64)
        with torch.inference_mode():
            reference = trained(x)
        out = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
        assert max_rel_error(reference, torch.from_numpy(out)) < 1e-5
