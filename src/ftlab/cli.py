"""The `ftlab` command: train, eval, predict, export, report. Arguments are Hydra-style ``key=value``."""

from __future__ import annotations

import importlib
import inspect
import runpy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftlab.errors import UserError, suggest, user_message

SOURCE_HELP = """\
RUN is a run directory (outputs/runs/<run>: its model.safetensors or adapter.safetensors, else
checkpoints/best.ckpt), a Lightning checkpoint (.ckpt), or an artifact file (adapter.safetensors /
model.safetensors with its .yaml beside it). Instead of RUN, adapter=PATH/adapter.safetensors applies an
adapter to the base model its adapter.yaml names. Class names and preprocessing come with the model."""


@dataclass
class Key:
    default: Any
    help: str
    kind: type = str


@dataclass
class Command:
    summary: str
    usage: str
    keys: dict[str, Key] = field(default_factory=dict)
    examples: tuple[str, ...] = ()


SHARED = {
    "adapter": Key(None, "adapter.safetensors to apply to its base model (instead of RUN)"),
    "batch_size": Key(None, "images per batch", int),
    "num_workers": Key("auto", "image-decoding worker processes; auto = cores - 1, at most 8\n"
                       "(on the CPU: the cores torch's threads leave free, none on 2 cores)"),
    "device": Key("auto", "auto | cpu | cuda | cuda:N"),
}

COMMANDS: dict[str, Command] = {
    "train": Command(
        "fine-tune a model (same as python -m ftlab; Hydra overrides pass through)",
        "ftlab train [group=option ...] [key=value ...]",
        examples=("ftlab train", "ftlab train method=full model.lr=5e-4", "ftlab train --help"),
    ),
    "eval": Command(
        "metrics on a split of the run's data or another ImageFolder -> JSON",
        "ftlab eval RUN [split=test|val|train] [data.root=DIR] [output=FILE] [key=value ...]",
        {
            "split": Key("test", "test | val | train, as the run split its data"),
            "data.root": Key(None, "another ImageFolder: DIR/{train,val,test}/<class>/, "
                             "DIR/<split>/<class>/\n"
                             "or DIR/<class>/; its classes must be among the model's. Text models:\n"
                             "DIR/{train,val,test}.{csv,tsv,jsonl}, DIR/<split>.csv, .txt class folders,\n"
                             "or one file"),
            "data.text_column": Key(None, "text models: the text column of data.root's files "
                                    "(default: the run's, else text)"),
            "data.label_column": Key(None, "text models: the label column of data.root's files "
                                     "(default: the run's, else label)"),
            "output": Key(None, "metrics JSON (default <RUN>/eval/<split>.json; with tta <split>_tta_hflip.json)"),
            "tta": Key(None, "test-time augmentation, image models: hflip = the mean of the logits of each\n"
                       "image and its mirror image"),
            **SHARED,
            "batch_size": Key(64, "images per batch", int),
        },
        ("ftlab eval outputs/runs/<run>", "ftlab eval outputs/runs/<run>/checkpoints/best.ckpt split=val",
         "ftlab eval outputs/runs/<run> data.root=~/more_digits", "ftlab eval outputs/runs/<run> tta=hflip"),
    ),
    "predict": Command(
        "label a folder (or one image) -> CSV: path,label,prob,top1_label,top1_prob,...",
        "ftlab predict RUN input=DIR|FILE [output=preds.csv] [top_k=3] [key=value ...]",
        {
            "input": Key(None, "an image, or a folder searched recursively for images (required).\n"
                         "Text models: a .txt file (one text per line), a .csv/.tsv/.jsonl file\n"
                         "(its text column) or a folder of .txt files (one text each)"),
            "text_column": Key(None, "text models: the column of a .csv/.tsv/.jsonl input holding the texts\n"
                               "(default: the run's data.text_column, else text)"),
            "output": Key(None, "CSV file (default <RUN>/predictions.csv)"),
            "top_k": Key(3, "labels/probabilities per image", int),
            **SHARED,
            "batch_size": Key(32, "images per batch", int),
        },
        ("ftlab predict outputs/runs/<run> input=photos/ output=preds.csv top_k=3",),
    ),
    "export": Command(
        "merge adapters and write a plain model + model.json, reloaded and checked",
        "ftlab export RUN [format=safetensors|torchscript|onnx] [output=DIR]",
        {
            "format": Key("safetensors", "safetensors | torchscript | onnx (needs pip install -e '.[onnx]');\n"
                          "text models: inputs input_ids, attention_mask, plus tokenizer/"),
            "output": Key(None, "directory (default <RUN>/export/<format>/)"),
            "adapter": SHARED["adapter"],
        },
        ("ftlab export outputs/runs/<run> format=onnx",),
    ),
    "report": Command(
        "summarise and compare runs (python -m ftlab.report; arguments pass through)",
        "ftlab report [DIR ...] [args ...]",
        examples=("ftlab report outputs",),
    ),
}


# -- help -------------------------------------------------------------------------------------------
def main_help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ftlab <command> [RUN] [key=value ...]", "",
             "Fine-tune pretrained image classifiers, then evaluate, predict and export.", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "ftlab <command> --help shows what each takes."]
    return "\n".join(lines)


def command_help(name: str) -> str:
    cmd = COMMANDS[name]
    lines = [f"usage: {cmd.usage}", "", cmd.summary[0].upper() + cmd.summary[1:] + "."]
    if cmd.keys:
        lines += ["", SOURCE_HELP, "", "keys:"]
        width = max(len(k) for k in cmd.keys) + 1
        for key, spec in cmd.keys.items():
            default = "" if spec.default is None else f" (default {spec.default})"
            text = f"{spec.help}{default}".replace("\n", "\n" + " " * (width + 4))
            lines.append(f"  {key + '=':<{width + 1}} {text}")
    if cmd.examples:
        lines += ["", "examples:", *[f"  {e}" for e in cmd.examples]]
    return "\n".join(lines)


# -- arguments --------------------------------------------------------------------------------------
def parse_args(name: str, argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(source, values) from ``RUN key=value ...``; unknown keys and bad values are user errors."""
    cmd = COMMANDS[name]
    positional = [a for a in argv if "=" not in a]
    values = {key: spec.default for key, spec in cmd.keys.items()}
    for arg in argv:
        if "=" not in arg:
            continue
        key, _, raw = arg.partition("=")
        key = key.lstrip("+")
        if key not in cmd.keys:
            hint = suggest(key, cmd.keys)
            raise UserError(f"ftlab {name}: unknown key '{key}'.{hint} Keys: {', '.join(cmd.keys)}")
        spec = cmd.keys[key]
        if raw in ("", "null", "None"):
            values[key] = spec.default
            continue
        try:
            values[key] = spec.kind(raw)
        except ValueError:
            raise UserError(f"{key}={raw}: expected {spec.kind.__name__}") from None
    if len(positional) > 1:
        raise UserError(f"ftlab {name}: one RUN expected, got {len(positional)}: {' '.join(positional)}")
    source = positional[0] if positional else None
    adapter = values.pop("adapter", None)
    if source and adapter:
        raise UserError(f"ftlab {name}: give RUN or adapter=PATH, not both")
    source = source or adapter
    if not source:
        raise UserError(f"ftlab {name}: which model? usage: {cmd.usage}")
    return source, values


# -- commands ---------------------------------------------------------------------------------------
# Each command imports its module when it runs: `ftlab --help` and `ftlab report` start without torch.
def _train(argv: list[str]) -> int:
    from ftlab.process import imports_without_collection
    from ftlab.timing import import_libraries

    with imports_without_collection():
        import_libraries("torch", "lightning")  # timed: metrics.json's phase_seconds["imports"]
        from ftlab.entry import main as train_main

    # Hydra parses sys.argv itself.
    sys.argv = [sys.argv[0], *argv]
    train_main()
    return 0


def _eval(argv: list[str]) -> int:
    from ftlab.evaluate import evaluate

    source, v = parse_args("eval", argv)
    evaluate(source, split=v["split"], data_root=v["data.root"], output=v["output"],
             batch_size=v["batch_size"], num_workers=v["num_workers"], device=v["device"],
             text_column=v["data.text_column"], label_column=v["data.label_column"], tta=v["tta"])
    return 0


def _predict(argv: list[str]) -> int:
    from ftlab.predict import predict

    source, v = parse_args("predict", argv)
    if not v["input"]:
        raise UserError("ftlab predict: input=DIR|FILE is required")
    predict(source, v["input"], output=v["output"], top_k=v["top_k"], batch_size=v["batch_size"],
            num_workers=v["num_workers"], device=v["device"], text_column=v["text_column"])
    return 0


def _export(argv: list[str]) -> int:
    from ftlab.export import export

    source, v = parse_args("export", argv)
    export(source, fmt=v["format"], output=v["output"])
    return 0


def _report(argv: list[str]) -> int:
    try:
        module = importlib.import_module("ftlab.report")
    except ModuleNotFoundError as exc:
        if exc.name not in ("ftlab.report", "ftlab"):
            raise
        if any(a in ("-h", "--help") for a in argv):
            print(command_help("report"))
        raise UserError("report: this installation has no ftlab.report module yet") from None
    entry = getattr(module, "main", None)
    old_argv = sys.argv
    sys.argv = ["ftlab report", *argv]
    try:
        if callable(entry):
            takes_argv = bool(inspect.signature(entry).parameters)
            code = entry(list(argv)) if takes_argv else entry()
        else:
            runpy.run_module("ftlab.report", run_name="__main__", alter_sys=True)
            code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old_argv
    return code if isinstance(code, int) else (0 if code is None else 1)


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "train": _train, "eval": _eval, "predict": _predict, "export": _export, "report": _report,
}


def _error_message(exc: BaseException) -> str | None:
    from ftlab.export import ExportCheckError

    if isinstance(exc, ExportCheckError):
        return str(exc)
    return user_message(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0 if args else 1
    name, rest = args[0], args[1:]
    if name not in HANDLERS:
        hint = suggest(name, HANDLERS)
        print(f"ftlab: error: unknown command '{name}'.{hint} Commands: {', '.join(HANDLERS)}",
              file=sys.stderr)
        return 1
    # train and report have their own --help (Hydra's / the report module's).
    if name not in ("train", "report") and any(a in ("-h", "--help") for a in rest):
        print(command_help(name))
        return 0
    try:
        return HANDLERS[name](rest)
    except Exception as exc:
        message = _error_message(exc)
        if message is None:
            raise
        print(f"ftlab: error: {message}", file=sys.stderr)
        return 1


def console() -> int:
    """The ``ftlab`` command (``[project.scripts]``): :func:`main` in a process of its own."""
    from ftlab.process import command_process

    with command_process():
        return main()


if __name__ == "__main__":
    sys.exit(console())
