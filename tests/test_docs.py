"""Every command shown in README.md and docs/*.md is checked against the code, so the docs cannot drift.

Commands come from fenced shell blocks (```bash, ```sh, ```shell or plain; ``\\`` continuations joined,
``# comments`` and leading ``VAR=value`` assignments dropped) and from inline code spans that start with
a command. Checked:

- ``python -m ftlab ...``, ``ftlab train ...``, ``make train/compare ARGS=...``: the overrides are composed
  with the real configs (``compose_config``) and validated (``ftlab.validate.validate``). Multirun lines
  (``-m``, or a config that sets ``hydra.mode: MULTIRUN``) are expanded: each value of every sweep
  (``a,b,c``, ``choice()``, ``range()``, ``interval()`` ends, and the sweeper's configured params) is
  composed at least once.
- ``ftlab eval|predict|export ...``: the command exists and ``ftlab.cli.parse_args`` accepts its keys.
- ``ftlab report ...`` / ``python -m ftlab.report ...``: its options exist.
- ``make <target>``: the target is in the Makefile (``make bench ARGS="--only ..."``: the benchmarks exist).
- ``python bench/<script>.py``: the script exists; ``pip install -e '.[extra]'``: the extra exists.
- Relative links between the documents point at existing files and headings.

Composing is cheap; nothing trains. A failure names the document and line.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ftlab.config import check_group_choices, compose_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell"}
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Values a reader replaces with their own: paths, shell variables, <placeholders>.
USER_VALUE = re.compile(r"/path/to/|<[^>]*>|\$\{?\w+|^~")
# hydra/launcher=<choice> needs its plugin installed; a line that picks an absent one is skipped.
LAUNCHER_PLUGINS = {
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "rq": "hydra_plugins.hydra_rq_launcher",
    "ray_local": "hydra_plugins.hydra_ray_launcher",
    "ray_aws": "hydra_plugins.hydra_ray_launcher",
}


# -- extracting commands ----------------------------------------------------------------------------
def _is_command(tokens: list[str]) -> bool:
    tokens = _strip_env(tokens)
    if len(tokens) < 2:
        return False
    first = tokens[0]
    if Path(first).name in ("python", "python3"):
        return tokens[1:3] in (["-m", "ftlab"], ["-m", "ftlab.report"]) or tokens[1].endswith(".py")
    return first in ("ftlab", "make") or tokens[:2] == ["pip", "install"]


def _strip_env(tokens: list[str]) -> list[str]:
    i = 0
    while i < len(tokens) and ENV_ASSIGNMENT.match(tokens[i]):
        i += 1
    return tokens[i:]


def _split(text: str) -> list[str] | None:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # not shell (unbalanced quotes in prose)
        return None


def extract_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, command text) of every command in ``path``: fenced shell blocks and inline spans."""
    fence = None  # (marker, language) while inside a fenced block
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = (match.group(1), match.group(2).lower())
            continue
        if fence is not None:
            if line.strip().startswith(fence[0]) and not line.strip().strip(fence[0][0]):
                fence = None
                continue
            if fence[1] not in SHELL_LANGS:
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.strip()[:-1].rstrip() + " "
                continue
            text, pending = pending + line.strip(), ""
            tokens = _split(text)
            if tokens and _is_command(tokens):
                yield start, text.strip()
            continue
        for span in INLINE_CODE.findall(line):
            tokens = _split(span)
            if tokens and _is_command(tokens):
                yield number, span.strip()


def _cases() -> list:
    cases = []
    for path in DOCS:
        seen: dict[int, int] = {}
        for number, text in extract_commands(path):
            seen[number] = seen.get(number, 0) + 1
            suffix = f"#{seen[number]}" if seen[number] > 1 else ""
            name = path.relative_to(REPO).as_posix()
            cases.append(pytest.param(name, number, text, id=f"{name}:{number}{suffix}"))
    return cases


CASES = _cases()


# -- composing overrides ----------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, braces and parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def sweep_values(value: str) -> list[str] | None:
    """The values a Hydra sweep override stands for (some of them for continuous ranges), else None."""
    value = value.strip()
    call = re.fullmatch(r"(\w+)\((.*)\)", value)
    if call:
        fn, args = call.group(1), _split_top(call.group(2))
        if fn == "tag":
            return sweep_values(args[-1])
        if fn == "choice":
            return args
        if fn == "interval":
            return args[:2]
        if fn == "range":
            nums = [float(a) for a in args]
            if all(n.is_integer() for n in nums):
                return [str(v) for v in range(*(int(n) for n in nums))]
            return [args[0]]
        return None
    if value[:1] in "[{'\"" or "," not in value:
        return None
    return _split_top(value)


# Override tuple -> composed config, or the exception it raised: many lines share overrides.
_OUTCOMES: dict[tuple[str, ...], Any] = {}


def compose_and_validate(overrides: tuple[str, ...], run_dir: Path, user_keys: set[str]) -> Any:
    """Compose ``overrides`` and run ``validate`` (when ftlab has it).

    A validation error about a key whose value is the reader's own (a path to their data) is not the
    doc's fault: composition does not touch paths, validation might."""
    cfg = compose_config(list(overrides), run_dir)
    try:
        from ftlab.validate import validate
    except ImportError:
        return cfg
    try:
        validate(cfg)
    except Exception as exc:
        if not any(key in str(exc) for key in user_keys):
            raise
    return cfg


def _compose_checked(overrides: tuple[str, ...], run_dir: Path, user_keys: set[str], where: str) -> Any:
    if overrides not in _OUTCOMES:
        try:
            _OUTCOMES[overrides] = compose_and_validate(overrides, run_dir, user_keys)
        except Exception as exc:
            _OUTCOMES[overrides] = exc
    outcome = _OUTCOMES[overrides]
    if isinstance(outcome, BaseException):
        pytest.fail(f"{where}: overrides {list(overrides)} do not compose or validate: "
                    f"{type(outcome).__name__}: {outcome}")
    return outcome


def check_train(args: list[str], run_dir: Path, where: str) -> int:
    """Compose the overrides of a training command (every value of every sweep); returns #configs."""
    flags = [a for a in args if a.startswith("-")]
    for flag in flags:
        if flag not in ("-m", "--multirun"):
            pytest.fail(f"{where}: unsupported flag {flag} (only -m/--multirun are checked)")
    multirun = bool(flags)
    overrides = [a for a in args if not a.startswith("-")]
    for o in overrides:
        if "=" not in o:
            pytest.fail(f"{where}: {o!r} is not a key=value override")
        key, _, value = o.partition("=")
        if key == "hydra/launcher" and value in LAUNCHER_PLUGINS:
            pytest.importorskip(LAUNCHER_PLUGINS[value], reason=f"{where}: hydra/launcher={value} plugin not installed")
    try:
        check_group_choices(overrides)
    except Exception as exc:
        pytest.fail(f"{where}: {exc}")

    user_keys = {o.partition("=")[0].lstrip("+~") for o in overrides if USER_VALUE.search(o.partition("=")[2])}
    sweeps = {i: sweep_values(o.partition("=")[2]) for i, o in enumerate(overrides)}
    sweeps = {i: v for i, v in sweeps.items() if v}

    def variant(choice: dict[int, str]) -> list[str]:
        return [f"{o.partition('=')[0]}={choice[i]}" if i in choice else o for i, o in enumerate(overrides)]

    first = variant({i: v[0] for i, v in sweeps.items()})
    cfg = _compose_checked(tuple(first), run_dir, user_keys, where)
    multirun = multirun or str(cfg.hydra.mode).endswith("MULTIRUN")
    if sweeps and not multirun:
        pytest.fail(f"{where}: {[overrides[i] for i in sweeps]} sweep(s) without -m/--multirun")
    if not multirun:
        return 1
    # The sweeper's own params (experiment=compare's method list, the Optuna search space), unless the
    # command line sets that key.
    given = {o.partition("=")[0].lstrip("+") for o in overrides}
    params = cfg.hydra.sweeper.get("params") or {}
    extra = {k: sweep_values(str(v)) or [str(v)] for k, v in params.items() if k not in given}
    keys = [("arg", i) for i in sweeps] + [("param", k) for k in extra]
    values = [sweeps[i] for i in sweeps] + [extra[k] for k in extra]
    if not keys:
        return 1
    # Every value of every sweep at least once (not the full product: composing costs ~0.2 s each).
    combos = [tuple(v[n % len(v)] for v in values) for n in range(max(len(v) for v in values))]
    for combo in combos:
        choice = {ref: value for (kind, ref), value in zip(keys, combo, strict=True) if kind == "arg"}
        added = [f"{ref}={value}" for (kind, ref), value in zip(keys, combo, strict=True) if kind == "param"]
        _compose_checked(tuple(variant(choice) + added), run_dir, user_keys, where)
    return len(combos)


# -- the other commands -----------------------------------------------------------------------------
def check_ftlab_command(name: str, args: list[str], where: str) -> None:
    from ftlab import cli

    if name not in cli.COMMANDS:
        pytest.fail(f"{where}: ftlab {name}: no such command (commands: {', '.join(cli.COMMANDS)})")
    args = [a for a in args if a not in ("-h", "--help")]
    if name in ("eval", "predict", "export") and args:
        try:
            cli.parse_args(name, args)
        except Exception as exc:
            pytest.fail(f"{where}: ftlab {name} {' '.join(args)}: {exc}")
    if name == "report":
        check_report(args, where)


def check_report(args: list[str], where: str) -> None:
    from ftlab import report

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        report.main(["--help"])
    for arg in args:
        if arg.startswith("-") and arg.split("=")[0] not in out.getvalue():
            pytest.fail(f"{where}: ftlab report: no option {arg.split('=')[0]}")


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def check_make(tokens: list[str], run_dir: Path, where: str) -> None:
    targets = [t for t in tokens[1:] if "=" not in t and not t.startswith("-")]
    variables = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
    known = makefile_targets()
    for target in targets:
        if target not in known:
            pytest.fail(f"{where}: make {target}: no such target in the Makefile ({', '.join(sorted(known))})")
    args = shlex.split(variables.get("ARGS", ""))
    if targets[:1] == ["train"]:
        check_train(args, run_dir, where)
    elif targets[:1] == ["compare"]:
        check_train(["experiment=compare", *args], run_dir, where)
    elif targets[:1] == ["bench"] and "--only" in args:
        sys.path.insert(0, str(REPO / "bench"))
        try:
            from run_all import BENCHMARKS
        finally:
            sys.path.remove(str(REPO / "bench"))
        names = args[args.index("--only") + 1].split(",")
        unknown = [n for n in names if n not in BENCHMARKS]
        assert not unknown, f"{where}: make bench --only {','.join(unknown)}: no such benchmark ({', '.join(BENCHMARKS)})"


def check_pip(tokens: list[str], where: str) -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))
    for token in tokens:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", token)
        if match:
            missing = set(match.group(1).split(",")) - extras
            assert not missing, f"{where}: pip extra(s) {missing} not in pyproject.toml ({', '.join(sorted(extras))})"


# -- the tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "line", "command"), CASES)
def test_doc_command(doc: str, line: int, command: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    where = f"{doc}:{line}: `{command}`"
    tokens = _strip_env(shlex.split(command, comments=True))
    run_dir = tmp_path_factory.getbasetemp() / "docs_run"
    first = tokens[0]
    if Path(first).name in ("python", "python3"):
        if tokens[1:3] == ["-m", "ftlab"]:
            check_train(tokens[3:], run_dir, where)
        elif tokens[1:3] == ["-m", "ftlab.report"]:
            check_report(tokens[3:], where)
        else:
            script = REPO / tokens[1]
            assert script.is_file(), f"{where}: {tokens[1]} does not exist"
    elif first == "ftlab":
        name, args = tokens[1], tokens[2:]
        if name in ("-h", "--help", "help"):
            return
        if name == "train":
            if "--help" not in args and "-h" not in args:
                check_train(args, run_dir, where)
            return
        check_ftlab_command(name, args, where)
    elif first == "make":
        check_make(tokens, run_dir, where)
    elif first == "pip":
        check_pip(tokens, where)


def test_docs_show_the_two_commands() -> None:
    """The quick start's two commands, in a fenced block of the README (CI and a hook rely on them)."""
    commands = [text for _, text in extract_commands(REPO / "README.md")]
    assert any(c.startswith("make train") for c in commands)
    assert any(c.startswith("make test") for c in commands)
    assert len(CASES) >= 40, f"only {len(CASES)} commands found in the docs: is the extraction broken?"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _without_code(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_doc_links(doc: Path) -> None:
    text = _without_code(doc.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to {target}: {path} does not exist"
        if anchor and path.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", _without_code(path.read_text()), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{doc.name}: link to {target}: no such heading"


def test_performance_doc_is_generated(tmp_path: Path) -> None:
    """docs/performance.md comes from bench/make_docs.py: every benchmark has a section there, and without
    measured results the page says so instead of showing numbers."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import make_docs
        from run_all import BENCHMARKS
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert set(make_docs.SECTIONS) == set(BENCHMARKS)
    assert (REPO / "docs" / "performance.md").read_text().startswith("<!-- Generated by bench/make_docs.py")

    empty = make_docs.render(tmp_path)
    results = empty.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert make_docs.NO_MEASUREMENT in results and "|" not in results
    assert empty.count(make_docs.NO_MEASUREMENT) == len(BENCHMARKS) + 1

    row = {"metric": "LoRA / full step time", "value": 0.4812, "target": "≤ 0.8", "met": True,
           "detail": "1589 ms vs 3322 ms"}
    result = {"name": "lora_vs_full", "config": {}, "threads": 2, "seconds": 60.0, "rows": [row]}
    (tmp_path / "lora_vs_full.json").write_text(json.dumps(result))
    measured = make_docs.render(tmp_path)
    assert "| LoRA / full step time | 0.481 | ≤ 0.8 | yes |" in measured and "1589 ms vs 3322 ms" in measured
    tiny = {**row, "met": None}  # a --tiny result: not judged, so not shown
    (tmp_path / "lora_vs_full.json").write_text(json.dumps({**result, "rows": [tiny]}))
    toy = make_docs.render(tmp_path)
    assert "0.481" not in toy and "only toy results of lora_vs_full" in toy
