"""trainer.channels_last and trainer.compile: same names, same artifacts, same numbers as eager NCHW."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ftlab.inference import load_predictor
from ftlab.train import build, run
from helpers import FAST_TRAINER, TINY_MODEL


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["method=lora", "data=imagefolder", f"data.root={root}", "data.batch_size=8", *TINY_MODEL, *FAST_TRAINER,
            "logger=none", *extra]


def test_channels_last_trains_nhwc_and_matches_eager(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    _, eager, _ = build(compose_cfg(_overrides(imagefolder), tmp_path / "eager"))
    _, nhwc, _ = build(compose_cfg(_overrides(imagefolder, "trainer.channels_last=true"), tmp_path / "nhwc"))
    convs = [p for n, p in nhwc.net.named_parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert eager.state_dict().keys() == nhwc.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    eager.eval(), nhwc.eval()
    with torch.no_grad():  # same seed, same weights: only the layout differs
        torch.testing.assert_close(nhwc(x), eager(x), rtol=1e-4, atol=1e-5)

    metrics = run(compose_cfg(_overrides(imagefolder, "trainer.channels_last=true"), tmp_path / "run"))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    net, info = load_predictor(tmp_path / "run")  # artifacts are written contiguous and load as usual
    assert info["method"] == "lora"
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compile_keeps_state_dict_keys_and_artifacts(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(_overrides(imagefolder, "trainer.compile=true", "trainer.limit_train_batches=2",
                                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"))
    _, plain, _ = build(compose_cfg(_overrides(imagefolder), tmp_path / "plain"))
    metrics = run(cfg)
    assert metrics["global_steps"] == 2
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])  # nn.Module.compile, not a wrapper
    assert set(ckpt["state_dict"]) == set(plain.state_dict())
    net, info = load_predictor(Path(cfg.paths.output_dir))
    assert info["method"] == "lora"
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(2, 3, 32, 32))).all()


def test_speed_options_are_validated(compose_cfg, imagefolder: Path) -> None:
    from ftlab.errors import UserError

    with pytest.raises(UserError, match="trainer.compile"):
        run(compose_cfg(_overrides(imagefolder, "trainer.compile=yes")))


def test_deterministic_runs_skip_the_uninitialised_memory_fill(compose_cfg, imagefolder: Path) -> None:
    # trainer.deterministic=warn keeps deterministic algorithms on (seeded runs repeat exactly, see
    # test_resume.py::test_same_seed_same_metrics) without torch's NaN fill of every new tensor.
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        build(compose_cfg(_overrides(imagefolder)))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True
