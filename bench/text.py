"""Text: LoRA vs full on MiniLM, and ftlab's text training vs a bare PyTorch loop and vs transformers.Trainer.

Everything runs ``data=rotten_tomatoes model=minilm`` (all-MiniLM-L6-v2, LoRA r 8 / alpha 16 on the
query and value projections) at batch 32 on real Rotten Tomatoes train batches, tokenised once and
padded per batch, in the order ftlab's own train loader serves them (length-grouped, seeded).

- LoRA / full: the training step (forward, loss, backward, AdamW) of ``method=lora`` and ``method=full``,
  both built through ``ftlab.train.build``, alternating over the same few batches after warm-up. Peak
  memory: each method trains two steps in a fresh child process (its peak resident memory, as
  ``bench/lora_vs_full.py``).
- Throughput, three ways on the same model, optimizer settings and batches (same texts, same order), in
  three rounds whose order rotates (each side runs first, second and last once): ftlab (a real Lightning
  ``fit`` with ftlab's callbacks, logger and progress bar, as ``bench/overhead.py`` does for images); a
  hand-written PyTorch loop over the same model, optimizer
  groups, warmup-cosine schedule and gradient clipping; and ``transformers.Trainer`` with HF peft's
  LoRA (same rank, alpha, targets and encoder weights, mean pooling and a linear head,
  ``DataCollatorWithPadding``, CPU, no evaluation, saving or logging, 0 loader workers, the same torch
  threads). Texts/s counts the steps after the first few (warm-up) of each fit, from the end of one step
  to the end of the last, data loading included.

``--tiny``: a random 2-layer BERT (hidden 32) with MiniLM's tokenizer, a handful of steps, and memory
measured in this process (fresh children would take most of a tiny run to start).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    child_result,
    compose,
    interleaved,
    memory_after_steps,
    parse_args,
    peak_memory_detail,
    row,
    start_child,
    write_result,
)

BASE = ["data=rotten_tomatoes", "data.batch_size=32", "data.num_workers=0", "trainer.accelerator=cpu",
        "trainer.devices=1"]
MODEL = ["model=minilm"]


def _extra_args(parser: Any) -> None:
    parser.add_argument("--steps", type=int, default=None, help="steps per throughput fit (default 24; tiny 4)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (default 3; tiny 1)")
    parser.add_argument("--step-rounds", type=int, default=None, help="LoRA/full step-time rounds (default 6; tiny 2)")


def tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's own tokenizer, saved as a model folder (offline)."""
    import torch
    from transformers import BertConfig, BertModel

    from ftlab.models.hf import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=512)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def model_overrides(tiny_dir: Path | None) -> list[str]:
    return ["model=hf", f"model.name={tiny_dir}"] if tiny_dir else MODEL


def train_batches(datamodule: Any, n: int) -> list[Any]:
    """The first ``n`` batches of ftlab's own train loader (its epoch-0 order), as a run sees them."""
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def text_step(model: Any, batches: list[Any]) -> Callable[[], None]:
    """One optimizer step (forward, loss, backward, AdamW) of ``model`` (built by ``ftlab.train.build``) on
    the next of ``batches``, cycling: ``train_step`` of bench/common.py on real text batches."""
    model.train()
    optimizer = model.make_optimizer()
    state = {"i": 0}

    def step() -> None:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        model.criterion(model(x), y).backward()
        optimizer.step()

    return step


# -- peak memory in a fresh process ------------------------------------------------------------------
def measure_memory(method: str, steps: int, tiny_dir: str | None) -> dict[str, float]:
    """Build ``method``, train ``steps`` steps on real batches: this process's peak RSS (MiB) after building
    and after training. Meaningful in a fresh process (``--child``)."""
    from ftlab.train import build

    overrides = [*BASE, *model_overrides(Path(tiny_dir) if tiny_dir else None), f"method={method}"]
    cfg = compose(overrides, Path(tempfile.mkdtemp(prefix="ftlab-bench-")))
    datamodule, model, _ = build(cfg)
    return memory_after_steps(text_step(model, train_batches(datamodule, steps)), steps)


def start_peak_rss(methods: tuple[str, ...], steps: int, tiny_dir: Path | None) -> dict[str, subprocess.Popen]:
    """One child per method, run at once (each measures only its own peak)."""
    return {m: start_child(__file__, m, steps, tiny_dir or "") for m in methods}


def collect_peak_rss(procs: dict[str, subprocess.Popen]) -> dict[str, dict[str, float]]:
    return {method: child_result(proc, f"memory ({method})") for method, proc in procs.items()}


# -- throughput: ftlab, a bare loop, transformers.Trainer ----------------------------------------------
def _texts_per_second(ends: list[float], sizes: list[int], warmup: int) -> float:
    """Texts/s from the end of step ``warmup`` to the end of the last step."""
    if len(ends) <= warmup:
        raise RuntimeError(f"only {len(ends)} steps ran; need more than the {warmup} warm-up steps")
    return sum(sizes[warmup:]) / (ends[-1] - ends[warmup - 1])


def ftlab_fit(cfg: Any, warmup: int) -> float:
    import lightning as L

    from ftlab.train import build

    ends: list[float] = []
    sizes: list[int] = []

    class StepTimer(L.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            ends.append(time.perf_counter())
            sizes.append(len(batch[1]))

    datamodule, model, trainer = build(cfg, extra_callbacks=[StepTimer()])
    trainer.fit(model, datamodule=datamodule)
    return _texts_per_second(ends, sizes, warmup)


def prepare(cfg: Any) -> tuple[Any, Any, list[int]]:
    """ftlab's data module and model for ``cfg`` (seeded: the model ftlab's own fit builds), and the
    epoch-0 order of its train sampler (the batches ``fit`` serves)."""
    from ftlab.train import build

    datamodule, model, _ = build(cfg)
    datamodule.setup("fit")
    sampler = datamodule.train_dataloader().sampler
    sampler.set_epoch(0)
    return datamodule, model, list(sampler)


def bare_fit(cfg: Any, datamodule: Any, model: Any, order: list[int], steps: int, warmup: int) -> float:
    """The same model, optimizer groups, schedule, clipping and batches in a plain PyTorch loop."""
    import torch
    from torch.utils.data import DataLoader

    from ftlab.module import warmup_cosine

    optimizer = model.make_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, cfg.model.warmup_ratio))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.trainer.gradient_clip_val
    loader = DataLoader(datamodule.datasets["train"], batch_size=cfg.data.batch_size, sampler=order,
                        collate_fn=datamodule.collate)
    model.train()
    ends, sizes = [], []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss = model.criterion(model.net(x), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        ends.append(time.perf_counter())
        sizes.append(len(y))
    return _texts_per_second(ends, sizes, warmup)


def hf_model_path(cfg: Any) -> str:
    from ftlab.models.hf import resolve_name

    return resolve_name(cfg.model.name)[0]


def trainer_fit(cfg: Any, datamodule: Any, order: list[int], steps: int, warmup: int,
                out_dir: Path) -> tuple[float, dict[str, Any]]:
    """transformers.Trainer + peft LoRA on the same encoder weights, texts and batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import (
        AutoModel,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    dataset = datamodule.datasets["train"]
    texts = [dataset.samples[i][0] for i in order[:steps * cfg.data.batch_size]]
    labels = [dataset.samples[i][1] for i in order[:steps * cfg.data.batch_size]]
    path = hf_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    max_length = datamodule.preprocessing["max_length"]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_token_type_ids=False)
    if encoded["input_ids"] != [dataset.ids[i] for i in order[:len(texts)]]:
        raise RuntimeError("transformers' tokens differ from ftlab's: the sides would not train on the same input")
    features = [{"input_ids": ids, "attention_mask": mask, "label": y}
                for ids, mask, y in zip(encoded["input_ids"], encoded["attention_mask"], labels, strict=True)]

    class MeanPoolClassifier(nn.Module):
        """What a transformers user writes for ftlab's model: encoder, mean over real tokens, Linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
            self.head = nn.Linear(self.encoder.config.hidden_size, len(datamodule.classes))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            logits = self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels, label_smoothing=cfg.model.label_smoothing)
            return out

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.model.rank, lora_alpha=cfg.model.alpha, lora_dropout=cfg.model.dropout,
                      target_modules=["query", "value"], modules_to_save=["head"], bias="none")
    model = get_peft_model(MeanPoolClassifier(), lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    threads = torch.get_num_threads()
    sequential = {"train_sampling_strategy": "sequential"}  # the features are already in ftlab's batch order
    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        sequential = {}  # older transformers: SequentialTrainer below

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=cfg.data.batch_size, max_steps=steps,
        learning_rate=cfg.model.lr, weight_decay=cfg.model.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=cfg.model.warmup_ratio, max_grad_norm=cfg.trainer.gradient_clip_val or 0.0,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False,
        seed=cfg.seed, **sequential,
    )
    trainer_cls = Trainer if sequential else SequentialTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=features,
                          data_collator=DataCollatorWithPadding(tokenizer), callbacks=[StepTimer()])
    trainer.train()
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"transformers changed torch's threads from {threads} to {torch.get_num_threads()}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise RuntimeError(f"transformers.Trainer ran on {device}, not the CPU")
    sizes = [cfg.data.batch_size] * len(ends)
    optim = str(getattr(args.optim, "value", args.optim))
    return _texts_per_second(ends, sizes, warmup), {"trainable": trainable, "optim": optim}


def padded_tokens(datamodule: Any, order: list[int], batch: int, steps: int) -> tuple[float, float]:
    """Mean padded length of the first ``steps`` batches of ``order``, and the share of it that is padding."""
    ids = datamodule.datasets["train"].ids
    widths, real = [], 0
    for s in range(steps):
        lengths = [len(ids[i]) for i in order[s * batch:(s + 1) * batch]]
        widths.append(max(lengths))
        real += sum(lengths)
    total = sum(w * batch for w in widths)
    return statistics.mean(widths), 1 - real / total


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        method, steps, tiny_dir = sys.argv[i + 1:i + 4]
        print(json.dumps(measure_memory(method, int(steps), tiny_dir or None)))
        return
    args = parse_args(__doc__.splitlines()[0], _extra_args)
    started = time.perf_counter()

    def phase(what: str) -> None:
        print(f"  text: {what} ({time.perf_counter() - started:.0f} s)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="ftlab-bench-"))
    if args.tiny:
        import torch

        # The smoke test runs beside other tests (make test: 2 workers on 2 cores); two spinning OpenMP
        # threads per process there make tiny steps ~10x slower. Every side runs on the same thread count.
        torch.set_num_threads(1)
    tiny_dir = tiny_model(tmp / "tiny-bert") if args.tiny else None
    steps = args.steps or (4 if args.tiny else 24)
    if steps < 2:
        sys.exit("text: --steps must be at least 2 (the first is warm-up)")
    rounds = args.rounds or (1 if args.tiny else 3)
    warmup = 1 if args.tiny else min(4, steps - 1)
    step_rounds, step_warmup, mem_steps, n_batches = (2, 1, 1, 2) if args.tiny else (6, 2, 2, 4)
    step_rounds = args.step_rounds or step_rounds
    base = [*BASE, *model_overrides(tiny_dir)]
    name = "tiny random BERT" if args.tiny else "MiniLM-L6"
    config: dict[str, Any] = {"model": str(tiny_dir) if tiny_dir else "minilm", "tiny": args.tiny, "steps": steps,
                              "warmup_steps": warmup, "rounds": rounds, "step_rounds": step_rounds,
                              "overrides": base}
    rows = []

    # LoRA / full: step time alternating in this process, peak memory in fresh ones.
    from ftlab.train import build

    fns, trainable, batches = {}, {}, None
    for method in ("full", "lora"):
        datamodule, model, _ = build(compose([*base, f"method={method}"], tmp / f"step-{method}"))
        batches = batches or train_batches(datamodule, n_batches)  # the same batches for both
        fns[method] = text_step(model, batches)
        trainable[method] = model.parameter_counts()["params_trainable"]
    phase("built full and lora")
    t = interleaved(fns, rounds=step_rounds, warmup=step_warmup)
    phase("step times")
    widths = "/".join(str(x["input_ids"].shape[1]) for x, _ in batches)
    rows.append(row(
        f"text LoRA / full step time ({name}, batch 32)", t["lora"] / t["full"], "≤ 0.8",
        f"lora {t['lora'] * 1000:.0f} ms vs full {t['full'] * 1000:.0f} ms per step (median of {step_rounds}, "
        f"Rotten Tomatoes batches padded to {widths} tokens); trainable {trainable['lora']:,} vs "
        f"{trainable['full']:,}", args.tiny))
    del fns
    if args.tiny:  # in this process: the children's start-up would be most of a tiny run
        mem = {m: measure_memory(m, mem_steps, str(tiny_dir)) for m in ("full", "lora")}
    else:  # nothing is timed while the children run
        mem = collect_peak_rss(start_peak_rss(("full", "lora"), mem_steps, tiny_dir))
    phase("peak memory")
    rows.append(row(
        f"text LoRA / full peak memory ({name}, batch 32)", mem["lora"]["peak_rss_mb"] / mem["full"]["peak_rss_mb"],
        "< 1", peak_memory_detail(mem, "lora", "full", mem_steps), args.tiny))

    # Throughput: ftlab, bare loop, transformers.Trainer, alternating.
    fit = [*base, "method=lora", "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}",
           "trainer.limit_val_batches=1", "test=false"]
    speeds: dict[str, list[float]] = {"ftlab": [], "bare": [], "trainer": []}
    info: dict[str, Any] = {}
    # Each round runs the three sides in a rotated order, so that no side always runs first or last in a
    # round (this machine drifts by several % over a minute; a fixed order would put that on one side).
    sides = ("ftlab", "bare", "trainer")
    for r in range(rounds):
        cfg = compose(fit, tmp / f"fit-{r}")
        datamodule, model, order = prepare(cfg)  # the bare loop's model; the batch order of all three
        for side in sides[r % 3:] + sides[:r % 3]:
            if side == "ftlab":
                speeds["ftlab"].append(ftlab_fit(cfg, warmup))
            elif side == "bare":
                speeds["bare"].append(bare_fit(cfg, datamodule, model, order, steps, warmup))
            else:
                ips, info = trainer_fit(cfg, datamodule, order, steps, warmup, tmp / f"hf-{r}")
                speeds["trainer"].append(ips)
            phase(f"round {r + 1}: {side} {speeds[side][-1]:.1f} texts/s")
        del model
    ips = {k: statistics.median(v) for k, v in speeds.items()}
    width, padding = padded_tokens(datamodule, order, cfg.data.batch_size, steps)
    timed = (steps - warmup) * cfg.data.batch_size
    common = (f"LoRA r {cfg.model.rank} on {name}, batch {cfg.data.batch_size}, {timed} texts timed after "
              f"{warmup} warm-up steps (mean padded length {width:.0f} tokens, {100 * padding:.0f} % padding), "
              f"median of {rounds} fits each")
    rows.append(row(
        "text training overhead: ftlab / bare loop texts/s", ips["ftlab"] / ips["bare"], "≥ 0.95",
        f"ftlab {ips['ftlab']:.1f} texts/s vs bare loop {ips['bare']:.1f} texts/s; {common}", args.tiny))
    rows.append(row(
        "text training: ftlab / transformers.Trainer + peft texts/s", ips["ftlab"] / ips["trainer"], "≥ 1.0",
        f"ftlab {ips['ftlab']:.1f} texts/s vs Trainer {ips['trainer']:.1f} texts/s (peft LoRA, "
        f"{info.get('trainable', 0):,} trainable vs ftlab's {trainable['lora']:,}, optim {info.get('optim')}); "
        f"{common}", args.tiny))
    config["texts_per_second"] = {k: [round(v, 2) for v in vs] for k, vs in speeds.items()}
    config["mean_padded_tokens"] = round(width, 1)
    write_result("text", args.out, rows, config, started)


if __name__ == "__main__":
    main()
