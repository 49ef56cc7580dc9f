"""`ftlab export`: a plain (adapter-free) model as safetensors, TorchScript or ONNX, plus ``model.json``.

Adapters are merged into their layers first, so the export runs exactly as fast as the plain backbone.
Every export is reloaded and must reproduce the trained model's fp32 logits (max relative error below
``MAX_REL_ERROR``); otherwise the files are removed and the export fails.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.adapters import merge_adapters
from ftlab.adapters.common import adapter_layers
from ftlab.errors import UserError
from ftlab.inference import describe_source, load_plain_state, load_predictor
from ftlab.models import build_backbone
from ftlab.models.weights import read_state_dict

FORMATS = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}
MAX_REL_ERROR = 1e-5
CHECK_BATCH = 4
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


def _check_onnx_available() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"format=onnx needs {' and '.join(missing)}: {ONNX_INSTALL}")


# -- writers -------------------------------------------------------------------------------------
def _write_safetensors(net: nn.Module, path: Path, example: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {}


def _write_torchscript(net: nn.Module, path: Path, example: torch.Tensor) -> dict[str, Any]:
    with warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated; it remains the format C++/mobile runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path))
    return {}


def _write_onnx(net: nn.Module, path: Path, example: torch.Tensor) -> dict[str, Any]:
    _check_onnx_available()
    from torch.export import Dim

    # torch's dynamo exporter; the batch dimension stays dynamic.
    torch.onnx.export(
        net, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: Dim("batch")},), external_data=False, verbose=False,
    )
    return {"input_name": "input", "output_name": "logits"}


WRITERS: dict[str, Callable[[nn.Module, Path, torch.Tensor], dict[str, Any]]] = {
    "safetensors": _write_safetensors,
    "torchscript": _write_torchscript,
    "onnx": _write_onnx,
}


# -- loading an export back --------------------------------------------------------------------
def load_export(
    directory: str | os.PathLike[str],
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """(callable mapping an input batch to logits, model.json) for an export directory."""
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.is_file():
        raise UserError(f"{directory}: no model.json (not an ftlab export)")
    meta = json.loads(meta_path.read_text())
    path = directory / meta["file"]
    fmt = meta["format"]
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


def onnx_runtime_name() -> str:
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return "onnx.reference (install onnxruntime for speed)"


def _onnx_runner(path: Path, input_name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy()})[0])
    _check_onnx_available()
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    return lambda x: torch.from_numpy(evaluator.run(None, {input_name: x.detach().cpu().numpy()})[0])


# -- export --------------------------------------------------------------------------------------
def default_output(info: dict[str, Any], fmt: str) -> Path:
    home = Path(info["run_dir"]) if info.get("run_dir") else Path(info["path"]).parent
    return home / "export" / fmt


def export(source: str, fmt: str = "safetensors", output: str | None = None) -> dict[str, Any]:
    """Merge, write, reload and check; returns the ``model.json`` content (plus ``output``)."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _check_onnx_available()
    trained, info = load_predictor(source)
    plain = plain_copy(trained)
    pre = info["preprocessing"]
    size = int(pre["size"])
    out_dir = Path(output).expanduser() if output else default_output(info, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FORMATS[fmt]
    meta_path = out_dir / "model.json"
    # Removed now and on any failure: a model.json left behind means the file beside it passed the check.
    meta_path.unlink(missing_ok=True)

    generator = torch.Generator().manual_seed(0)
    # Export with batch 2 and check with another batch size: a batch size baked into the export would fail.
    example = torch.randn(2, 3, size, size, generator=generator)
    try:
        extra = WRITERS[fmt](plain, path, example)
    except Exception as exc:
        path.unlink(missing_ok=True)
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
        "input_size": [3, size, size],
        "mean": list(pre["mean"]),
        "std": list(pre["std"]),
        "interpolation": pre["interpolation"],
        "crop_pct": pre["crop_pct"],
        **extra,
        "method": info.get("method"),
        "exported_from": str(Path(info["path"]).resolve()),
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    batch = torch.randn(CHECK_BATCH, 3, size, size, generator=generator)
    try:
        reloaded, _ = load_export(out_dir)
        with torch.inference_mode():
            reference = trained(batch)
            error = max_rel_error(reference, reloaded(batch))
    except Exception as exc:
        meta_path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise ExportCheckError(
            f"reloading the {fmt} export failed ({type(exc).__name__}: {exc}); files removed"
        ) from exc
    if not error < MAX_REL_ERROR:
        meta_path.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise ExportCheckError(
            f"the {fmt} export does not reproduce the trained model: max rel. error {error:.2e} "
            f"on a batch of {CHECK_BATCH} (limit {MAX_REL_ERROR:.0e}); files removed"
        )
    meta["check"] = {
        "batch": CHECK_BATCH,
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
    lines = [
        f"ftlab export: {meta['format']} -> {meta['output']}/{meta['file']} "
        f"({meta['bytes'] / 1e6:.2f} MB) + model.json",
        f"  from: {source}",
        f"  input: {meta['input_size']}, {meta['interpolation']}, crop_pct {meta['crop_pct']}; "
        f"{meta['num_classes']} classes",
        f"  check: reloaded with {check['runtime']}, max rel. error {check['max_rel_error']:.1e} "
        f"on {check['batch']} inputs (limit {MAX_REL_ERROR:.0e})",
    ]
    print("\n".join(lines))
