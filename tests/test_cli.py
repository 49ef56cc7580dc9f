"""The real command line: user mistakes end in one line on stderr and exit code 1, nothing damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_imagefolder

pytestmark = pytest.mark.cli


def _one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_missing_data_root(cli) -> None:
    line = _one_error_line(cli("data=imagefolder", "data.root=/no/such/dir"))
    assert "/no/such/dir" in line


def test_data_root_not_given(cli) -> None:
    line = _one_error_line(cli("data=imagefolder"))
    assert "data.root" in line


def test_empty_class_folder_and_bad_image(cli, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=4)
    (root / "train" / "emu").mkdir()
    assert "emu" in _one_error_line(cli("data=imagefolder", f"data.root={root}"))
    (root / "train" / "emu").rmdir()
    (root / "train" / "cat" / "oops.png").write_bytes(b"\x89PNG garbage")
    assert "oops.png" in _one_error_line(cli("data=imagefolder", f"data.root={root}"))


@pytest.mark.parametrize(("args", "culprit"), [
    (["method=lorra"], "method=lorra"),
    (["model=resnet"], "model=resnet"),
    (["model=timm", "model.name=resnet5O", "model.pretrained=false"], "resnet50"),
    (["model.lr=-1"], "model.lr=-1"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0"),
    (["data.batch_size=0"], "data.batch_size=0"),
])
def test_bad_choices_and_impossible_numbers(cli, args: list[str], culprit: str) -> None:
    assert culprit in _one_error_line(cli(*args))


def test_error_leaves_existing_run_untouched(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "runs" / "earlier"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"test/acc": 0.99}))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"12345")
    _one_error_line(cli(f"hydra.run.dir={run_dir}", "model.lr=0"))
    assert json.loads((run_dir / "metrics.json").read_text()) == {"test/acc": 0.99}
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"12345"


@pytest.mark.slow
def test_cli_trains_on_user_folder(cli, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "imgs", per_class=6, splits=("train", "test"))
    proc = cli("data=imagefolder", f"data.root={root}", "model=timm", "model.name=test_resnet",
               "model.pretrained=false", "data.image_size=32", "trainer.max_epochs=1", "data.num_workers=0",
               "method=full", "model.lr=0.0005")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_full_test_resnet")
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and metrics["test/acc"] is not None
    assert (runs[0] / ".hydra" / "config.yaml").is_file()
