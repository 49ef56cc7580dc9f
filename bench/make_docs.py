"""Render docs/performance.md from the benchmark results (``bench/results/<name>.json``).

The prose (what each benchmark measures and why) lives in the template below; every figure comes from
the JSON the scripts wrote. ``bench/run_all.py`` calls this at the end of a full run (every benchmark,
not ``--tiny``, none failed). By hand::

    python bench/make_docs.py                       # bench/results -> docs/performance.md
    python bench/make_docs.py --results DIR --out FILE
    python bench/make_docs.py --check               # exit 1 if docs/performance.md is out of date

Results of a ``--tiny`` run measure nothing and are reported as "no measurement recorded".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_RESULTS = HERE / "results"
DEFAULT_DOC = REPO / "docs" / "performance.md"

# Order, titles and prose of the sections; a result whose name is not here is rendered after them.
SECTIONS: dict[str, tuple[str, str]] = {
    "overhead": ("Framework overhead", """\
`bench/overhead.py`: the default experiment's model, optimizer groups, warmup-cosine schedule and
gradient clipping, trained on the same 640 pre-transformed digits held in memory, by ftlab (Lightning
Trainer, ftlab's DataModule loaders, rich progress bar, TensorBoard and learning-rate logging, metrics,
the NaN guard, step checkpoints) and by a hand-written PyTorch loop. Only training batches are timed;
the first epoch of each side is warm-up, and the two sides alternate, four times. The ratio is what ftlab's
bookkeeping costs per step."""),
    "lora_vs_full": ("LoRA vs full", """\
`bench/lora_vs_full.py`: the training step (forward, loss, backward, AdamW) of `method=lora` and
`method=full`, built in one process and alternating on the same random 224-px batch, on
EfficientNet-Lite0 and resnet50 with their shipped LoRA targets and random weights (weights do not
change the cost). Peak memory: each (backbone, method) trains two steps in a fresh child process; the
figure is the child's peak resident memory, and the detail splits off its growth over the built model
(activations, gradients, optimizer state).

Where the adapters sit decides the step time. The frozen weights skip their gradients, but backward
still runs down to the first adapted layer, and in a CNN most of the compute is in the 112- and 56-px
layers near the stem. The shipped targets therefore start at block 2 (EfficientNet-Lite0) and stage 2
(`model=resnet50`), so backward stops there; with adapters on every layer, stem included, a LoRA step
costs as much as full fine-tuning ([methods.md](methods.md#where-the-adapters-go))."""),
    "peers": ("Peers: HF peft, a bare predict loop", """\
`bench/peers.py` measures ftlab against what a user would otherwise write, both sides alternating in
one process after warm-up.

- LoRA training step vs HF peft: the default experiment's model (timm `tf_efficientnet_lite0`, 10
  classes, random weights) at its own size, 64 px, batch 32. ftlab's side is `method=lora` built through
  `ftlab.train.build` as a run builds it: the shipped targets (the 26 pointwise convs of blocks 2-6 and
  `conv_head`; no depthwise convs), r 8, alpha 16, no dropout, and the classifier head trains. peft's side
  is the same timm model under `peft.get_peft_model` with `target_modules` set to exactly the modules ftlab
  adapted and `modules_to_save` the head, the same rank, alpha and dropout, ftlab's base weights and LoRA
  matrices copied in. Before timing the script asserts equal work: the same number of trainable parameters
  on each side, peft adapting the very same modules, identical logits with non-zero adapters, and AdamW
  with the same lr, betas and weight-decay split (none on biases); BatchNorm runs in train mode on both.
  A step is zero_grad, forward, cross-entropy, backward and the AdamW step on one random batch. Memory:
  each side trains two steps in a fresh child process. The judged ratio is the training memory, the
  growth of the peak resident memory over the built model (activations, gradients, optimizer state: what
  a GPU's peak allocated memory counts); it is noisy by a few tens of MiB between runs. The process peak
  is given in its own row without a target: it also holds what each side imports (ftlab: Lightning,
  torchmetrics and Hydra, and torchmetrics in turn imports matplotlib, scipy.signal and transformers;
  peft: transformers and accelerate).
  Both sides run the same convolutions; in the adapter path ftlab multiplies the rank-r tensor by alpha/r,
  peft the full-width output of B (forward and backward).
- `ftlab predict` vs a bare loop: `ftlab.predict.predict` with the CLI's defaults (batch 32, top-3,
  `num_workers=auto`, the CSV written) over 384 generated 320x240 JPEG photos,
  against a loop over the same files in the benchmark process: PIL open and RGB, the same eval transform
  (resize, centre crop, normalise to the run's 64 px), `torch.stack`, the same network in eval mode under
  `torch.no_grad()`, softmax and top-3, batch 32. The model is what a LoRA run (`merge=false`) leaves
  behind, `adapter.safetensors` applied to the rebuilt pretrained base, adapters unmerged; it is loaded
  once for both sides, and its loading (a one-off per command) is reported apart.

Found on the way: `num_workers=auto` used to start cores - 1 image-decoding worker processes for
`predict` and `eval` whatever the device, one on 2 cores. On the CPU the network already runs on every
core torch's threads use, so that worker only took CPU time from them, and `ftlab predict` was slower
than the bare loop that decodes in-process. On the CPU `auto` now starts workers only on the cores
torch's threads leave free (none on 2 cores); on a GPU it is unchanged."""),
    "adapter_inference": ("Adapter inference", """\
`bench/adapter_inference.py`: the plain default backbone and LoRA, DoRA and SSF models of it (adapters
set to non-zero values so no branch can be skipped), each also merged, timed in eval mode without
gradients, batch 1 (latency) at 224 px, all variants alternating, each round in its own random order
(in a fixed order each merged model always ran right after its slower unmerged form). A merged model is the plain
architecture, so its ratio is 1 up to noise; the unmerged rows show what the extra branches cost at
inference. Deploy merged: `merge=true`, or `ftlab export` ([after-training.md](after-training.md#export))."""),
    "feature_cache": ("Feature cache", """\
`bench/feature_cache.py`: `method=linear` on the digits (EfficientNet-Lite0 at 64 px, batch 32), 4
epochs, with `data.cache_features=false` and `auto` alternating, two runs each, built and trained as
`python -m ftlab` does, then tested on the best checkpoint. An epoch is timed with its validation and
the checkpoints written after it; the cached run's one-off feature pass before the first epoch is
reported apart.

A cached epoch no longer runs the backbone at all: what is left is Lightning's loop over its 40 steps
(optimizer step, logging, metric and checkpoint hooks) and the two 13.7 MB checkpoints (best and last)
every epoch writes so a run can resume. That fixed cost bounds the speed-up, so the ratio moves with the
noise of the uncached epoch. Test accuracy must not change ([data.md](data.md#frozen-backbone-feature-cache))."""),
    "check_cache": ("Image-check cache", """\
`bench/check_cache.py`: the start-up cost of the upfront image check on a generated folder of 10,000 small
images (10 classes, 48-160 px, half JPEG, half PNG, dated an hour back). The data module is built from the
shipped `data=imagefolder` config and its `discover()` (scan, check, split: what a run does with its files
before the model is built) is timed at the first start, which finds no cache and decodes every image, and
at the second, which reads `<root>/.ftlab-image-check.json` and decodes none (counted), three times each;
the scan alone (`data.check_images=false`) is the floor. What is left at the second start is the walk over
the folders, one `stat` per file and reading the JSON ([data.md](data.md#the-image-check-and-its-cache))."""),
    "checkpoints": ("Checkpoint size", """\
`bench/checkpoints.py`: every method of the default experiment (EfficientNet-Lite0, digits) built as
`python -m ftlab` builds it and fitted for two batches, so its checkpoint holds real optimizer state; then
the checkpoint is saved three times (median) and loaded back as `ftlab eval` loads it. For methods whose
frozen weights are the pretrained ones, checkpoints hold only what trains, the optimizer state and a hash
of the base ([reliability.md](reliability.md)); `full` and `partial` (92 % of the weights train) stay
large. A resumable LoRA checkpoint holds the adapters plus AdamW's two moments for them, about three times
the adapter file."""),
    "data_pipeline": ("Data pipeline", """\
`bench/data_pipeline.py`: the train loader's images/s (decode and transform, a full epoch per timed
call, persistent workers already started, `data.num_workers=auto`: one worker on 2 cores) at 64 px
(`data.augment=none`, the digits default, and `basic`) and 224 px, against the images/s the default
LoRA step consumes, all alternating; and the speed-up of `data.cache=true`, whose one-off decode is
reported apart. A loader/model ratio above 1 means the model is the bottleneck: `data.cache=true` then
does not shorten training; it pays off where reading or decoding is slow
([data.md](data.md#in-memory-image-cache)). Last, the conversion of each image to a normalised tensor:
ftlab's one-step `ToNormalizedTensor` against torchvision's `ToTensor()` + `Normalize()` on the same
images, alternating, with the outputs compared bit for bit."""),
    "text": ("Text", """\
`bench/text.py`: `data=rotten_tomatoes model=minilm` (all-MiniLM-L6-v2, 22.7 M parameters; LoRA r 8,
alpha 16 on the query and value projections of all 6 layers) at batch 32, on real Rotten Tomatoes train
batches tokenised once and padded per batch, in the order ftlab's own train loader serves them
(length-grouped, seeded). Everything is built through `ftlab.train.build`.

- LoRA / full: the training step (forward, loss, backward, AdamW) of `method=lora` and `method=full`,
  alternating over the same four batches after warm-up. Peak memory: each method trains two steps in a
  fresh child process, as for images.
- Throughput, three ways on the same model, optimizer settings and batches (the same texts in the same
  order), in three rounds whose order rotates, so that each side runs first, second and last once (this
  machine drifts by several % within a minute): ftlab's own Lightning `fit` (its callbacks, TensorBoard and learning-rate
  logging, metrics, progress bar); a hand-written PyTorch loop with the same optimizer groups,
  warmup-cosine schedule and gradient clipping; and `transformers.Trainer` with HF peft's LoRA (same
  rank, alpha and targets, the same MiniLM weights with mean pooling and a linear head,
  `DataCollatorWithPadding`, on the CPU, no evaluation, saving or logging, no loader workers, the same
  torch threads; Trainer's own default optimizer). Texts/s counts the steps after the first four of each
  fit, from the end of one step to the end of the last, data loading included.

In a Transformer the adapters sit in every layer, the first one included, so backward still runs through
the whole encoder; what LoRA skips is the gradients of the frozen weights themselves and their optimizer
state.
Reference accuracies on the same split (TF-IDF + logistic regression, and a linear probe on frozen
MiniLM embeddings) come from `python -m ftlab.baselines`."""),
    "cost_growth": ("Cost growth: more images, bigger images", """\
`bench/cost_growth.py`: how fit time and peak memory grow, for `method=lora` on `data=fashion_mnist`
(EfficientNet-Lite0), one epoch per point, each point a complete `python -m ftlab` run in a fresh
process (`fit_seconds` and `peak_rss_mb` from its `metrics.json`): 1,000 / 3,000 / 10,000 training
images at 64 px, and 64 / 128 / 224 px at 1,000 images. Validation is fixed at 500 images, so a
point's fit time is one training epoch plus one validation pass. Multiply by `trainer.max_epochs` to
predict a run; `--method full` measures full fine-tuning."""),
    "default_run": ("The default experiment", """\
`bench/default_run.py`: the exact command `make train` runs (`python -m ftlab`, defaults), three
times, each timed from start to exit in a child process. Its `metrics.json` records the seconds of each
phase of the run (`phase_seconds`: the import of torch and Lightning, the rest of the start-up, checks,
data, model, trainer, fit, test, artifacts). timm's import is measured apart, in child processes that
import torch and lightning, then timm, and exit (four of them, alternating with the runs; their median).
What is left after the fit and the libraries' imports is ftlab's own time outside the fit,
`wall - fit - imports`, split by phase, for the run with the median own time; the target is at most
10 % of the fit. The command line keeps Python's cyclic garbage collector off the half a million
objects the libraries' imports leave (`ftlab.process`): off while torch and Lightning import (its full
collections there took 1.0 s of a 7 s import on this machine), and frozen before the exit, which spares
the interpreter's final collection over them (1.6–1.9 s per process). The exit counts as ftlab's own.
ftlab's modules are byte-compiled first, as an install leaves them.

Then the same configuration under Lightning's SimpleProfiler, its per-hook durations grouped into data
loading, forward (training_step: forward, loss, metrics), backward, optimizer (step, gradient clipping,
zero_grad, scheduler), validation (with the sanity check before the first epoch), checkpoint writing,
and the rest (setup, callbacks, progress bar, loggers). Profile your own runs with
`trainer.profiler=simple` (or `advanced`, `pytorch`); every run's `metrics.json` has its
`phase_seconds`."""),
    "channels_last": ("Channels-last memory layout", """\
`bench/channels_last.py`: `trainer.channels_last` stores conv weights and input batches as NHWC. It
changes the memory layout only: logits and gradients equal NCHW's up to float32 rounding
(tests/test_speed.py compares both layouts of the same network with a float64 reference); oneDNN sums
the weight gradients of large early convolutions in another order, so the rounding differs, most under
full fine-tuning of the stem. The default, `auto`, turns it on for conv nets, i.e. networks with a
`Conv2d` whose kernel is larger than its stride (ResNet, EfficientNet, MobileNet), and leaves it off
where the only convolution is a patch embedding (kernel = stride: ViT, DeiT, Swin), where there is none
(text models), and for ConvNeXt, whose CPU step ran level in both layouts when this was decided
(`ftlab.speed.NO_GAIN_FAMILIES`); the run's log says which at INFO level, and `true`/`false` force it. Per backbone
family (default method, random weights) the model is built twice through ftlab's `build`, with `auto`
and with the opposite setting, and their training steps alternate; each row gives NCHW / NHWC step time
(above 1: NHWC faster) and what `auto` chose. These are CPU figures (oneDNN). On CUDA, NHWC is the
layout cuDNN's tensor-core convolution kernels use natively, so NCHW pays transposes there; PyTorch's
[channels-last tutorial](https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html)
describes this. No GPU was measured for this page."""),
    "speed_options": ("torch.compile and the fused optimizer", """\
`bench/speed_options.py`: `trainer.compile=true` (`torch.compile` of the network in place, so
checkpoint keys and artifacts are unchanged) against the default (eager, `trainer.channels_last=auto`)
on the default experiment's model (64 px, batch 32). Each is built through ftlab's own `build`, and
their training steps alternate. The first compiled step pays the compilation and is reported apart.
The break-even row gives the number of training steps after which compiling has earned that time back:
(first compiled step − default step) / (default step − compiled step). Below that many steps (a short
run, a sweep trial) it costs time; above it, it saves time. Compile stays opt-in because of that
up-front cost; on CPU it also needs a C compiler. When the compiled step is not faster than the
default one, the row says so: compiling never pays off at that size.

The same script times the optimizer: torch's fused AdamW kernel, which ftlab uses by default where it
is safe (torch's optimizers that take `fused`, float32 weights on the CPU or a CUDA device, full
precision on one device or under DDP; `ftlab.speed.fused_optimizer_arguments`), against torch's own
default, a loop of per-tensor operations (`+model.optimizer.fused=false`), for LoRA and for full
fine-tuning: whole training steps alternating on the same batch, and the optimizer's step alone on the
same gradients. Both compute the same update up to float32 rounding (tests/test_speed.py). Mixed
precision keeps torch's default: with a gradient scaler Lightning refuses fused optimizers when
gradients are clipped."""),
}

HEADER = """\
<!-- Generated by bench/make_docs.py from {results}/*.json. Edit the template in bench/make_docs.py,
not this file. -->

# Performance

`make bench` runs the benchmark suite in `bench/` (about 17 minutes on 2 CPU cores) and prints a table
of measured ratios beside their targets; each script also runs alone (`python bench/overhead.py`).
The results land in `bench/results/<name>.json` plus `summary.md`, and
`make bench ARGS="--only overhead,lora_vs_full"` picks some. Every ratio is measured side by side in
one run (both sides alternating), because absolute times on a shared machine drift. `make test` runs
each script once at toy sizes (`--tiny`), which checks that it works but measures nothing.

This page is generated from those results: a full `make bench` (every benchmark, not `--tiny`, none
failed) rewrites it at the end; `python bench/make_docs.py` rewrites it from whatever
`bench/results/` holds.

## Results

"""

FOOTER = """\
## Found on the way

Lightning's `trainer.deterministic` (on, as `warn`, for reproducible runs) also makes torch fill every
new tensor with NaN, to catch ops that read uninitialised memory. ftlab's ops do not, so it only cost
time. ftlab turns that fill off (`ftlab.speed.keep_determinism_cheap`); seeded runs are still
bit-for-bit repeatable (tested).
"""

NO_MEASUREMENT = "No measurement recorded."


def is_tiny(result: dict[str, Any]) -> bool:
    """Whether ``result`` comes from a ``--tiny`` run: its targeted rows are not judged (``met`` null),
    or it ran the tiny test network / toy sizes."""
    rows = result.get("rows") or []
    if any(r.get("target") and r.get("met") is None for r in rows):
        return True
    return "test_resnet" in json.dumps(result) or result.get("config", {}).get("sizes") == [32]


def load_results(results_dir: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Measured results by name, and the names of toy (``--tiny``) results that were left out."""
    measured, tiny = {}, []
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"make_docs: {path}: not a results file ({exc})") from None
        name = result.get("name", path.stem)
        if not isinstance(result.get("rows"), list):
            raise SystemExit(f"make_docs: {path}: no 'rows'")
        if is_tiny(result):
            tiny.append(name)
        else:
            measured[name] = result
    return measured, tiny


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | measured | target | met |", "|---|---:|---:|---|"]
    for result in results:
        for r in result["rows"]:
            met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
            lines.append(f"| {_cell(r['metric'])} | {_fmt(r['value'])} | {_cell(r['target'] or '–')} | {met} |")
    return "\n".join(lines)


def details(result: dict[str, Any]) -> str:
    lines = [f"Measured ({result.get('seconds', 0):.0f} s, {result.get('threads', '?')} torch threads):", ""]
    for r in result["rows"]:
        target = f" (target {r['target']})" if r["target"] else ""
        lines.append(f"- {r['metric']}: **{_fmt(r['value'])}**{target}. {r['detail']}".rstrip())
    points = result.get("config", {}).get("points")
    if points:
        lines += ["", "| training images | image size | fit s (1 epoch) | s per 1,000 images | peak RSS MiB |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['train_images']:,} | {p['image_size']} px | {p['fit_seconds']:.1f} | "
                  f"{1000 * p['fit_seconds'] / p['train_images']:.1f} | {p['peak_rss_mb']:.0f} |"
                  for p in points if p["series"] == "train_images" or p["image_size"] != points[0]["image_size"]]
    plot = result.get("config", {}).get("plot")
    if plot:
        lines += ["", f"![{result['name']}](img/{plot})"]
    breakdown = result.get("config", {}).get("breakdown_seconds")
    if breakdown:
        total = sum(breakdown.values()) or 1.0
        lines += ["", "| part of `fit` | seconds | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f} % |" for k, v in breakdown.items()]
    return "\n".join(lines)


def render(results_dir: Path) -> str:
    measured, tiny = load_results(results_dir)
    try:
        shown = results_dir.resolve().relative_to(REPO)
    except ValueError:
        shown = results_dir
    names = [n for n in SECTIONS if n in measured] + sorted(n for n in measured if n not in SECTIONS)
    parts = [HEADER.format(results=shown)]
    if not measured:
        parts.append(f"{NO_MEASUREMENT} `{shown}/` holds no results of a (non-`--tiny`) benchmark run"
                     + (f" (only toy results of {', '.join(tiny)})" if tiny else "")
                     + ". Run `make bench` to measure.\n\n")
    else:
        missing = [n for n in SECTIONS if n not in measured]
        total = sum(measured[n].get("seconds", 0) for n in names) / 60
        note = f"{len(names)} benchmark(s), {total:.1f} min of measuring in all."
        if missing:
            note += f" {NO_MEASUREMENT[:-1]} for: {', '.join(missing)}."
        parts.append(summary_table([measured[n] for n in names]) + "\n\n" + note + "\n\n")
    for name, (title, prose) in SECTIONS.items():
        body = details(measured[name]) if name in measured else NO_MEASUREMENT
        parts.append(f"## {title}\n\n{prose}\n\n{body}\n\n")
    for name in names:
        if name not in SECTIONS:
            parts.append(f"## {name}\n\n{details(measured[name])}\n\n")
    parts.append(FOOTER)
    return "".join(parts)


def write_doc(results_dir: Path = DEFAULT_RESULTS, out: Path = DEFAULT_DOC) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results_dir))
    # Plots the results name (config.plot) go beside the page, under img/.
    measured, _ = load_results(results_dir)
    for result in measured.values():
        plot = result.get("config", {}).get("plot")
        if plot and (results_dir / plot).is_file():
            (out.parent / "img").mkdir(exist_ok=True)
            (out.parent / "img" / plot).write_bytes((results_dir / plot).read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="directory of <name>.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_DOC, help="the Markdown file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from what would be written")
    args = parser.parse_args(argv)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != render(args.results):
            print(f"make_docs: {args.out} is out of date: run python bench/make_docs.py", file=sys.stderr)
            return 1
        return 0
    print(f"make_docs: wrote {write_doc(args.results, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
