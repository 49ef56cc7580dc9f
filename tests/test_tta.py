"""Test-time augmentation: test_tta in a run and `ftlab eval RUN tta=hflip` only average logits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ftlab import evaluate as evaluate_module
from ftlab.cli import main as cli_main
from ftlab.errors import UserError
from ftlab.inference import image_loader, load_predictor
from ftlab.module import ClassifierModule
from ftlab.train import run
from ftlab.tta import check_tta, run_tta, tta_logits
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hflip_logits_are_exactly_the_mean_of_the_two_passes() -> None:
    torch.manual_seed(0)
    net = ClassifierModule(num_classes=3, source="timm", name="test_resnet", pretrained=False).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain, mirrored = net(x), net(torch.flip(x, dims=(-1,)))
        assert torch.equal(tta_logits(net, x, "hflip"), (plain + mirrored) / 2)
        assert torch.equal(tta_logits(net, x, None), plain)
    assert not torch.allclose(plain, mirrored)  # the flip changes something: the mean is not vacuous


class CheckTestLogits(L.Callback):
    """Every test batch's logits are the mean of the model's outputs on the batch and on its mirror."""

    def __init__(self) -> None:
        self.batches = 0

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          *args: Any) -> None:
        x, _ = batch
        with torch.no_grad():
            plain, mirrored = pl_module(x), pl_module(torch.flip(x, dims=(-1,)))
        assert torch.equal(outputs, (plain + mirrored) / 2)
        assert not torch.equal(outputs, plain)
        self.batches += 1


@pytest.fixture
def tta_run(compose_cfg, imagefolder: Path, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    check = CheckTestLogits()
    cfg = compose_cfg(["method=full", "data=imagefolder", f"data.root={imagefolder}", "data.batch_size=8",
                       "data.hflip=false", *TINY_MODEL, *FAST_TRAINER, "logger=none", "model.lr=0.01",
                       "test_tta=hflip"])
    metrics = run(cfg, extra_callbacks=[check])
    assert check.batches > 0
    # .hydra/config.yaml, as Hydra's main saves it: `ftlab eval` reads the run's data settings from it.
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), tmp_path / "run/.hydra/config.yaml")
    return tmp_path / "run", metrics


def test_eval_tta_averages_logits_and_writes_its_own_json(tta_run, monkeypatch, capsys) -> None:
    run_dir, metrics = tta_run
    captured: dict[str, torch.Tensor] = {}
    compute = evaluate_module.compute_metrics

    def spy(logits: torch.Tensor, targets: torch.Tensor, names: list[str]) -> dict[str, Any]:
        captured["tta" if "tta" in captured.get("next", "") else "plain"] = logits
        return compute(logits, targets, names)

    monkeypatch.setattr(evaluate_module, "compute_metrics", spy)
    plain = evaluate_module.evaluate(str(run_dir), num_workers=0)
    assert "warning" not in capsys.readouterr().err
    captured["next"] = "tta"  # type: ignore[assignment]
    flipped = evaluate_module.evaluate(str(run_dir), num_workers=0, tta="hflip")
    # The run's data says hflip=false: a warning, the evaluation still runs.
    assert "tta=hflip: the run's data has data.hflip=false" in capsys.readouterr().err
    assert flipped["tta"] == "hflip" and "tta" not in plain
    assert Path(flipped["output"]).name == "test_tta_hflip.json" and Path(plain["output"]).name == "test.json"
    # The same metric the run's test stage computed with test_tta=hflip.
    assert flipped["accuracy"] == pytest.approx(metrics["test/acc"])
    # Exactly the mean of the model's logits on the images and on their mirror images.
    net, info = load_predictor(str(run_dir))
    samples, _, _ = evaluate_module.eval_samples(info, "test", None)
    outs, mirrored = [], []
    with torch.no_grad():
        for x, _, _ in image_loader([p for p, _ in samples], info["preprocessing"], 64, 0):
            outs.append(net(x))
            mirrored.append(net(torch.flip(x, dims=(-1,))))
    expected = (torch.cat(outs) + torch.cat(mirrored)) / 2
    torch.testing.assert_close(captured["tta"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(captured["plain"], torch.cat(outs), rtol=0, atol=1e-6)


def test_bad_values_and_text_models_are_one_line_errors(compose_cfg, tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match=r"^test_tta='vflip': must be null or hflip"):
        validate(compose_cfg(["test_tta=vflip"]))
    with pytest.raises(UserError, match=r"^tta='vflip': must be null or one of hflip"):
        check_tta("vflip", "tta", text=False)
    with pytest.raises(UserError, match=r"^tta=hflip: text models have no horizontal flip"):
        check_tta("hflip", "tta", text=True)
    with pytest.raises(UserError, match=r"^test_tta=hflip: text models have no horizontal flip"):
        run(compose_cfg(["model=minilm", "data=rotten_tomatoes", "test_tta=hflip"]))
    assert cli_main(["eval", str(tmp_path), "tta=vflip"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tta='vflip'" in err


def test_digits_warn_that_mirrored_digits_are_other_digits(compose_cfg, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ftlab.tta"):
        assert run_tta(compose_cfg(["test_tta=hflip"])) == "hflip"
    assert "data.hflip=false" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftlab.tta"):
        assert run_tta(compose_cfg(["data=imagefolder", "data.root=/x", "test_tta=hflip"])) == "hflip"
        assert run_tta(compose_cfg([])) is None
    assert not caplog.text
