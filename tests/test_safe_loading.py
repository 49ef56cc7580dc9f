"""No path in ftlab unpickles arbitrary objects from a user-supplied file."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.errors import UserError, user_message
from ftlab.train import run
from helpers import FAST_TRAINER, ONE_THREAD_ENV, TINY_MODEL, make_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src" / "ftlab"


class _Payload:
    """Unpickling this touches ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> Path:
    # Everything a Lightning checkpoint has, so only the payload can be the reason for refusing it.
    torch.save({"state_dict": {"net.fc.weight": torch.zeros(3, 8)}, "global_step": 5, "epoch": 0, "loops": {},
                "hyper_parameters": {"lr": 0.1, "note": _Payload(marker)}}, path)
    return path


def test_resume_checkpoint_with_code_is_refused_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _plant(tmp_path / "evil.ckpt", marker)
    # Even with torch's weights_only default switched off, ftlab must not unpickle it.
    env = {**os.environ, **ONE_THREAD_ENV, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"),
           "FTLAB_DATA_DIR": str(tmp_path / "data"), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "ftlab", f"ckpt_path={evil}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"ckpt_path={evil}: refused to load" in errors[0]
    assert not marker.exists()
    # The planted file is a real exploit: a plain unpickle runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_weights_with_code_are_refused_by_a_real_run(compose_cfg, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = make_imagefolder(tmp_path / "imgs", per_class=3)
    for name in ("evil.pt", "evil.ckpt"):
        evil = _plant(tmp_path / name, marker)
        cfg = compose_cfg(["data=imagefolder", f"data.root={root}", *TINY_MODEL, *FAST_TRAINER,
                           f"model.checkpoint={evil}"])
        with pytest.raises(Exception) as err:  # noqa: B017 - Hydra wraps it; the CLI digs it out the same way
            run(cfg)
        assert f"{name}: refused to load" in (user_message(err.value) or ""), err.value
        assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_checkpoint_that_is_not_a_training_checkpoint(compose_cfg, tmp_path: Path) -> None:
    plain = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(UserError, match="not a Lightning training checkpoint"):
        run(compose_cfg([f"ckpt_path={plain}"]))


def _call_name(node: ast.Call) -> str:
    parts = []
    func = node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str) -> object:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
    return "<missing>"


def test_source_never_loads_with_full_pickle() -> None:
    """A static guard over all of src/ftlab (including modules added later)."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{path.relative_to(SRC)}:{node.lineno} {name}"
            loads_torch = name.endswith(("torch.load", "load_from_checkpoint"))
            if loads_torch and _keyword(node, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load",
                          "yaml.unsafe_load", "cloudpickle.load", "cloudpickle.loads"):
                problems.append(where)
            elif name == "yaml.load" and "Safe" not in str(_keyword(node, "Loader")):
                problems.append(f"{where} without a safe Loader")
            elif name.endswith("np.load") and _keyword(node, "allow_pickle") is True:
                problems.append(f"{where} with allow_pickle=True")
    assert not problems, problems
