"""Shared fixtures: tiny generated ImageFolder trees, composed real configs, the CLI in a subprocess.

Constants and plain functions the tests import live in ``helpers.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ftlab.config import compose_config
from helpers import make_imagefolder, make_tiny_bert


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "images", splits=("train", "test"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ftlab.data import materialize_digits

    return materialize_digits(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the shipped configs with overrides, as the CLI would, writing into tmp_path."""

    def _compose(overrides: list[str], run_dir: Path | None = None) -> DictConfig:
        return compose_config(overrides, run_dir or tmp_path / "run", root_dir=tmp_path)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m ftlab`` in a subprocess with outputs under tmp_path."""

    def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, "FTLAB_OUTPUT_DIR": str(tmp_path / "outputs"), "FTLAB_DATA_DIR": str(tmp_path / "data")}
        return subprocess.run(
            [sys.executable, "-m", "ftlab", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for this test (restored after). On a shared, oversubscribed machine torch's
    OpenMP threads spin-wait on each other and tiny-network steps get ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (hidden 32) with a tiny WordPiece vocabulary, saved as a model folder."""
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")
