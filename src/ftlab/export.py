"""`ftlab export`: a plain (adapter-free) model as safetensors, TorchScript or ONNX, plus ``model.json``.

Adapters are merged into their layers first, so the export runs exactly as fast as the plain backbone.
Every export is reloaded and must reproduce the trained model's fp32 logits (max relative error below
``MAX_REL_ERROR``); otherwise the files are removed and the export fails.

Text models take two int64 inputs, ``input_ids`` and ``attention_mask`` (batch and sequence length both
dynamic), and the export folder also holds ``tokenizer/``: the model's tokenizer files and the encoder's
``config.json`` (no weights), so the export runs without the original model folder or hub cache. They are
checked on two batches of different sequence lengths, each with padded rows.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.adapters import merge_adapters
from ftlab.adapters.common import adapter_layers
from ftlab.errors import UserError
from ftlab.inference import describe_source, is_text, load_plain_state, load_predictor
from ftlab.models import build_backbone
from ftlab.models.weights import read_state_dict

Batch = torch.Tensor | dict[str, torch.Tensor]

FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}
MAX_REL_ERROR = 1e-5
CHECK_BATCH = 4
# Text: (batch, sequence length) of the traced example and of the two check batches.
TEXT_EXAMPLE = (2, 16)
TEXT_CHECKS = ((CHECK_BATCH, 11), (3, 23))
TEXT_INPUTS = ("input_ids", "attention_mask")
TOKENIZER_DIR = "tokenizer"
ONNX_INSTALL = "install the onnx extra, pip install -e '.[onnx]' (onnx, onnxscript, onnxruntime)"


class ExportCheckError(RuntimeError):
    """The reloaded export does not reproduce the trained model."""


def max_rel_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.float(), other.float()
    return ((other - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def plain_copy(net: nn.Module) -> nn.Module:
    """A deep copy with every adapter folded into its layer; refuses to return one that still has adapters."""
    plain = copy.deepcopy(net).eval()
    merge_adapters(plain)
    left = adapter_layers(plain)
    if left:
        raise RuntimeError(f"adapters left after merging: {[name for name, _ in left][:5]}")
    return plain


class TextLogits(nn.Module):
    """``(input_ids, attention_mask) -> logits``: a text classifier with positional int64 inputs, as
    TorchScript and ONNX take them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net({"input_ids": input_ids, "attention_mask": attention_mask})


def _text_args(x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch dict, or of token ids alone (every position real)."""
    if isinstance(x, torch.Tensor):
        return x, torch.ones_like(x)
    ids = x["input_ids"]
    mask = x.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask)


def text_example(net: nn.Module, batch: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids; row i keeps a shorter real length than row i-1 (the last row 2 tokens), the rest
    is padding, so the check covers masking as well as the sequence length."""
    config = getattr(getattr(net, "encoder", None), "config", None)
    vocab = int(getattr(config, "vocab_size", 1000))
    seq_len = min(seq_len, int(getattr(config, "max_position_embeddings", seq_len) or seq_len))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    mask = torch.zeros_like(ids)
    for row in range(batch):
        mask[row, : max(2, seq_len - row * (seq_len - 2) // max(1, batch - 1))] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_onnx_available() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"format=onnx needs {' and '.join(missing)}: {ONNX_INSTALL}")


# -- writers -------------------------------------------------------------------------------------
def _write_safetensors(net: nn.Module, path: Path, example: Batch) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {}


def _write_torchscript(net: nn.Module, path: Path, example: Batch) -> dict[str, Any]:
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it remains the format C++/mobile runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        if isinstance(example, dict):  # text: traced as (input_ids, attention_mask)
            from transformers.utils import logging as hf_logging

            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The tracer reads every attribute, transformers' loss_function property too, which then warns
            # about a loss the encoder never uses.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                traced = torch.jit.trace(TextLogits(net).eval(), _text_args(example), check_trace=False)
            finally:
                hf_logging.set_verbosity(verbosity)
            torch.jit.save(traced, str(path))
            return {"input_names": list(TEXT_INPUTS), "output_name": "logits"}
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return {}


def _write_onnx(net: nn.Module, path: Path, example: Batch) -> dict[str, Any]:
    _check_onnx_available()
    from torch.export import Dim

    if isinstance(example, dict):
        # Text: int64 input_ids and attention_mask, batch and sequence length dynamic (shared by both).
        batch, sequence = Dim("batch"), Dim("sequence")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            torch.onnx.export(
                TextLogits(net).eval(), _text_args(example), str(path), dynamo=True,
                input_names=list(TEXT_INPUTS), output_names=["logits"],
                dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}), external_data=False,
                verbose=False,
            )
        return {"input_names": list(TEXT_INPUTS), "output_name": "logits",
                "dynamic_axes": {"batch": 0, "sequence": 1}}

    # torch's dynamo exporter; the batch dimension stays dynamic.
    torch.onnx.export(
        net, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: Dim("batch")},), external_data=False, verbose=False,
    )
    return {"input_name": "input", "output_name": "logits"}


WRITERS: dict[str, Callable[[nn.Module, Path, Batch], dict[str, Any]]] = {
    "safetensors": _write_safetensors,
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
}


# -- loading an export back --------------------------------------------------------------------
def load_export(
    directory: str | os.PathLike[str],
) -> tuple[Callable[[Batch], torch.Tensor], dict[str, Any]]:
    """(callable mapping an input batch to logits, model.json) for an export directory.

    Text exports take ``{"input_ids", "attention_mask"}`` (int64, as ``tokenizer/`` and
    :func:`ftlab.data.text.text_batch` make them) or token ids alone.
    """
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{directory}: no model.json (not an ftlab export)")
    meta = json.loads(meta_path.read_text())
    path = directory / meta["file"]
    fmt = meta["format"]
    if meta.get("modality") == "text":
        return _load_text_export(directory, path, meta), meta
    if fmt == "safetensors":

        net = build_backbone(meta["source"], meta["architecture"], meta["num_classes"], pretrained=False).net
        load_plain_state(net, read_state_dict(path), path)
        return net.eval(), meta
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval(), meta
    if fmt == "onnx":
        return _onnx_runner(path, meta.get("input_name", "input")), meta
    raise UserError(f"{meta_path}: unknown format {fmt!r}")


def _load_text_export(directory: Path, path: Path, meta: dict[str, Any]) -> Callable[[Batch], torch.Tensor]:
    fmt = meta["format"]
    if fmt == "safetensors":
        from ftlab.models.hf import build_hf_backbone

        # tokenizer/ holds the encoder's config.json: the architecture without the original model folder.
        net = build_hf_backbone(str(directory / meta.get("tokenizer", TOKENIZER_DIR)), meta["num_classes"],
                                pretrained=False, pooling=meta.get("pooling", "mean")).net
        load_plain_state(net, read_state_dict(path), path)
        return net.eval()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.load(str(path), map_location="cpu").eval()
        return lambda x: traced(*_text_args(x))
    if fmt == "onnx":
        run = _onnx_session(path)
        names = meta.get("input_names", list(TEXT_INPUTS))
        return lambda x: run({n: t.detach().cpu().numpy() for n, t in zip(names, _text_args(x), strict=True)})
    raise UserError(f"{directory / 'model.json'}: unknown format {fmt!r}")


def onnx_runtime_name() -> str:
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return "onnx.reference (install onnxruntime for speed)"


def _onnx_session(path: Path) -> Callable[[dict[str, Any]], torch.Tensor]:
    """feeds (input name -> numpy array) -> first output, with onnxruntime, else onnx's reference evaluator."""
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feeds: torch.from_numpy(session.run(None, feeds)[0])
    _check_onnx_available()
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return lambda feeds: torch.from_numpy(evaluator.run(None, feeds)[0])


def _onnx_runner(path: Path, input_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    run = _onnx_session(path)
    return lambda x: run({input_name: x.detach().cpu().numpy()})


# -- export --------------------------------------------------------------------------------------
def default_output(info: dict[str, Any], fmt: str) -> Path:
    home = Path(info["run_dir"]) if info.get("run_dir") else Path(info["path"]).parent
    return home / "export" / fmt


def _input_meta(info: dict[str, Any], plain: nn.Module) -> dict[str, Any]:
    """What model.json says about the input: image size and normalisation, or text tokenizer and pooling."""
    pre = info["preprocessing"]
    if is_text(pre):
        return {
            "modality": "text",
            "tokenizer": TOKENIZER_DIR,
            "tokenizer_source": pre["tokenizer"],
            "max_length": int(pre["max_length"]),
            "pooling": getattr(plain, "pooling", "mean"),
        }
    size = int(pre["size"])
    return {
        "input_size": [3, size, size],
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "interpolation": pre["interpolation"],
        "crop_pct": pre["crop_pct"],
    }


def _save_text_files(folder: Path, plain: nn.Module, preprocessing: dict[str, Any]) -> None:
    """The tokenizer files and the encoder's config.json (no weights) into ``folder``."""
    from ftlab.models.hf import load_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    load_tokenizer(str(preprocessing["tokenizer"])).save_pretrained(str(folder))
    plain.encoder.config.save_pretrained(str(folder))


def _remove(out_dir: Path, path: Path, text: bool) -> None:
    (out_dir / "model.json").unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    if text:
        shutil.rmtree(out_dir / TOKENIZER_DIR, ignore_errors=True)


def export(source: str, fmt: str = "safetensors", output: str | None = None) -> dict[str, Any]:
    """Merge, write, reload and check; returns the ``model.json`` content (plus ``output``)."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _check_onnx_available()
    trained, info = load_predictor(source)
    plain = plain_copy(trained)
    pre = info["preprocessing"]
    text = is_text(pre)
    out_dir = Path(output).expanduser() if output else default_output(info, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    meta_path = out_dir / "model.json"
    # Removed now and on any failure: a model.json left behind means the file beside it passed the check.
    meta_path.unlink(missing_ok=True)

    generator = torch.Generator().manual_seed(0)
    # Export with batch 2 and check with other batch sizes (and, for text, sequence lengths): a shape baked
    # into the export would fail the check.
    if text:
        example: Batch = text_example(plain, *TEXT_EXAMPLE, generator)
        checks: list[Batch] = [text_example(plain, b, t, generator) for b, t in TEXT_CHECKS]
    else:
        size = int(pre["size"])
        example = torch.randn(2, 3, size, size, generator=generator)
        checks = [torch.randn(CHECK_BATCH, 3, size, size, generator=generator)]
    try:
        extra = WRITERS[fmt](plain, path, example)
        if text:
            _save_text_files(out_dir / TOKENIZER_DIR, plain, pre)
    except Exception as exc:
        _remove(out_dir, path, text)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ExportCheckError(f"writing the {fmt} export failed ({type(exc).__name__}: {first})") from exc
    meta: dict[str, Any] = {
        "format": fmt,
        "file": path.name,
        "architecture": info["base_model"].get("name"),
        "source": info["base_model"].get("source"),
        "head": info.get("head"),
        "num_classes": info["num_classes"],
        "class_names": info["class_names"],
        **_input_meta(info, plain),
        **extra,
        "method": info.get("method"),
        "exported_from": str(Path(info["path"]).resolve()),
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    try:
        reloaded, _ = load_export(out_dir)
        with torch.inference_mode():
            error = max(max_rel_error(trained(x), reloaded(x)) for x in checks)
    except Exception as exc:
        _remove(out_dir, path, text)
        raise ExportCheckError(
            f"reloading the {fmt} export failed ({type(exc).__name__}: {exc}); files removed"
        ) from exc
    shapes = [tuple(x["input_ids"].shape) for x in checks if isinstance(x, dict)]
    checked = " and ".join(f"{b}x{t}" for b, t in shapes) + " token ids" if text else f"a batch of {CHECK_BATCH}"
    if not error < MAX_REL_ERROR:
        _remove(out_dir, path, text)
        raise ExportCheckError(
            f"the {fmt} export does not reproduce the trained model: max rel. error {error:.2e} "
            f"on {checked} (limit {MAX_REL_ERROR:.0e}); files removed"
        )
    meta["check"] = {
        "batch": CHECK_BATCH,
        **({"inputs": [list(s) for s in shapes]} if text else {}),
        "max_rel_error": error,
        "runtime": onnx_runtime_name() if fmt == "onnx" else f"torch {torch.__version__}",
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    meta["output"] = str(out_dir)
    meta["bytes"] = path.stat().st_size
    _print_summary(meta, describe_source(info))
    return meta


def _print_summary(meta: dict[str, Any], source: str) -> None:
    check = meta["check"]
    if meta.get("modality") == "text":
        names = "/".join(meta.get("input_names", TEXT_INPUTS))
        input_line = (f"  input: {names} (int64, batch x sequence), tokenizer {meta['tokenizer']}/ "
                      f"(max_length {meta['max_length']}, pooling {meta['pooling']}); {meta['num_classes']} classes")
        on = " and ".join(f"{b}x{t}" for b, t in check["inputs"]) + " token ids"
    else:
        input_line = (f"  input: {meta['input_size']}, {meta['interpolation']}, crop_pct {meta['crop_pct']}; "
                      f"{meta['num_classes']} classes")
        on = f"{check['batch']} inputs"
    extra_files = f" + {meta['tokenizer']}/" if meta.get("modality") == "text" else ""
    lines = [
        f"ftlab export: {meta['format']} -> {meta['output']}/{meta['file']} "
        f"({meta['bytes'] / 1e6:.2f} MB) + model.json{extra_files}",
        f"  from: {source}",
        input_line,
        f"  check: reloaded with {check['runtime']}, max rel. error {check['max_rel_error']:.1e} "
        f"on {on} (limit {MAX_REL_ERROR:.0e})",
    ]
    print("\n".join(lines))
