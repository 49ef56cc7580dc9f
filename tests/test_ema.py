"""callbacks=ema: the averaged weights are validated, tested and saved; PEFT, feature cache and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ftlab.callbacks.ema import EMA, ema_update
from ftlab.errors import UserError
from ftlab.train import run
from ftlab.validate import validate
from helpers import FAST_TRAINER, TINY_MODEL, Crash, make_base_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["callbacks=ema", "data=imagefolder", f"data.root={root}", "data.batch_size=8", "data.augment=none", *TINY_MODEL,
            *FAST_TRAINER, "logger=none", "trainer.max_epochs=2", "model.lr=0.01", *extra]


class Recorder(L.Callback):
    """The weights the model holds during the last validation epoch and at the start of the test."""

    def __init__(self) -> None:
        self.validated: dict[str, torch.Tensor] = {}
        self.tested: dict[str, torch.Tensor] = {}

    @staticmethod
    def _state(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.sanity_checking:
            self.validated = self._state(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.tested:
            self.tested = self._state(pl_module)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_ema_weights_are_validated_tested_and_saved(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    metrics = run(compose_cfg(_overrides(imagefolder, "method=full")), extra_callbacks=[recorder])
    best, last = _load(tmp_path / "run/checkpoints/best.ckpt"), _load(tmp_path / "run/checkpoints/last.ckpt")
    weights = [k for k, v in best["state_dict"].items() if k.startswith("net.") and v.is_floating_point()]
    # The checkpoints hold the average as their weights and the training weights beside them.
    assert _differs(best["state_dict"], best["current_model_state"], weights)
    # Validated: the last validation ran on the average that last.ckpt then saved, not the training weights.
    assert not _differs(recorder.validated, last["state_dict"], weights)
    assert _differs(recorder.validated, last["current_model_state"], weights)
    # Tested: the best checkpoint's average (Lightning alone would restore current_model_state here).
    assert not _differs(recorder.tested, best["state_dict"], weights)
    # Saved: the artifact is the tested average.
    assert metrics["artifact"] == "model.safetensors"
    saved = load_file(str(tmp_path / "run/model.safetensors"))
    assert all(torch.equal(saved[k[len("net."):]], best["state_dict"][k]) for k in weights)


def test_ema_under_lora_averages_only_what_trains(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    run(compose_cfg(_overrides(imagefolder, "method=lora", "model.targets=[layer4.*conv\\d]")))
    best = _load(tmp_path / "run/checkpoints/best.ckpt")
    avg, cur = best["state_dict"], best["current_model_state"]
    trainable = [k for k in avg if "lora_" in k or k.startswith("net.fc.")]
    frozen = [k for k in avg if k.startswith("net.") and k not in trainable and "running_" not in k
              and "num_batches" not in k]
    assert trainable and frozen
    assert _differs(avg, cur, trainable)
    # Frozen pretrained weights come out of the average bit for bit (no rounding drift).
    assert not _differs(avg, cur, frozen)
    # BatchNorm statistics, re-estimated under LoRA, are averaged too.
    assert _differs(avg, cur, [k for k in avg if k.endswith("running_mean")])
    saved = load_file(str(tmp_path / "run/adapter.safetensors"))
    assert saved and all(torch.equal(v, avg["net." + k]) for k, v in saved.items())


def test_ema_on_cached_features_keeps_frozen_statistics(compose_cfg, imagefolder: Path, tmp_path: Path,
                                                        caplog) -> None:
    with caplog.at_level("INFO"):
        run(compose_cfg(_overrides(imagefolder, "method=linear")))
    assert "feature" in caplog.text.lower()  # the cache was used
    best = _load(tmp_path / "run/checkpoints/best.ckpt")
    avg, cur = best["state_dict"], best["current_model_state"]
    head = [k for k in avg if k.startswith("net.fc.")]
    rest = [k for k in avg if k.startswith("net.") and k not in head and avg[k].is_floating_point()]
    assert _differs(avg, cur, head)
    assert not _differs(avg, cur, rest)  # frozen weights and frozen running statistics


@pytest.mark.parametrize("method", ["full", "lora"])
def test_ema_resumes_where_it_stopped(compose_cfg, imagefolder: Path, tmp_path: Path, method: str) -> None:
    # 3 steps per epoch; a step checkpoint every 2 steps: the crash at step 5 resumes from step 4, mid-epoch.
    # LoRA on a base in a file: PEFT checkpoints, without the frozen base in the average or the training weights.
    peft = [f"model.checkpoint={make_base_weights(tmp_path / 'base.safetensors')}"] if method == "lora" else []
    args = _overrides(imagefolder, f"method={method}", "test=false", "callbacks.step_checkpoint.every_n_steps=2",
                      *peft)
    with pytest.raises(RuntimeError, match="crash"):
        run(compose_cfg(args, run_dir=tmp_path / "resumed"), extra_callbacks=[Crash(5)])
    assert _load(tmp_path / "resumed/checkpoints/last.ckpt")["global_step"] == 4
    run(compose_cfg([*args, "ckpt_path=last"], run_dir=tmp_path / "resumed"))
    run(compose_cfg(args, run_dir=tmp_path / "straight"))
    resumed = _load(tmp_path / "resumed/checkpoints/last.ckpt")
    straight = _load(tmp_path / "straight/checkpoints/last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 6
    # The training weights and their average both continue exactly as in the uninterrupted run. (LoRA: the
    # average; the resumed run's final last.ckpt is written after training ended, when the model already holds
    # the average, so its current_model_state is not that of the straight run's step checkpoint. Same with
    # whole checkpoints: a Lightning/EMA timing matter, not a PEFT one.)
    for key in ("state_dict", "current_model_state") if method == "full" else ("state_dict",):
        for name, value in straight[key].items():
            if value.is_floating_point():
                torch.testing.assert_close(resumed[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    assert resumed["averaging_state"]["n_averaged"] == straight["averaging_state"]["n_averaged"] == 6
    assert ("ftlab_base" in resumed) == ("ftlab_base" in straight) == (method == "lora")
    if method == "lora":
        frozen = straight["ftlab_base"]["frozen"]
        assert frozen and not any(k in frozen for k in (*straight["state_dict"], *straight["current_model_state"]))
        assert straight["state_dict"].keys() == straight["current_model_state"].keys()


def test_ema_tests_the_average_of_a_peft_checkpoint(compose_cfg, imagefolder: Path, tmp_path: Path) -> None:
    base = make_base_weights(tmp_path / "base.safetensors")
    recorder = Recorder()
    run(compose_cfg(_overrides(imagefolder, "method=lora", f"model.checkpoint={base}")), extra_callbacks=[recorder])
    best = _load(tmp_path / "run/checkpoints/best.ckpt")
    assert "ftlab_base" in best
    avg, cur = best["state_dict"], best["current_model_state"]
    trainable = [k for k in avg if "lora_" in k or k.startswith("net.fc.")]
    assert trainable and _differs(avg, cur, trainable)
    # The test stage ran on the best checkpoint's average, its frozen base rebuilt from the base file.
    assert not _differs(recorder.tested, avg, list(avg))
    base_weights = load_file(str(base))
    frozen = [k for k in best["ftlab_base"]["frozen"] if k[len("net."):] in base_weights]
    assert frozen and all(torch.equal(recorder.tested[k], base_weights[k[len("net."):]]) for k in frozen)


def test_update_is_exact_for_unchanged_tensors_and_warms_up() -> None:
    x = torch.randn(1000)
    update = ema_update(0.999, warmup=True)
    assert torch.equal(update(x.clone(), x, 5), x)
    # n updates so far: the decay is (1 + n) / (10 + n) until it reaches the configured one.
    assert torch.allclose(update(torch.zeros(3), torch.ones(3), 0), torch.full((3,), 0.9))
    assert torch.allclose(update(torch.zeros(3), torch.ones(3), 10_000), torch.full((3,), 0.001))
    plain = ema_update(0.99, warmup=False)
    assert torch.allclose(plain(torch.zeros(3), torch.ones(3), 1), torch.full((3,), 0.01))
    assert EMA(decay=0.5).decay == 0.5


@pytest.mark.parametrize(("override", "key"), [
    ("callbacks.ema.decay=1.0", "callbacks.ema.decay"),
    ("callbacks.ema.decay=0", "callbacks.ema.decay"),
    ("callbacks.ema.warmup=3", "callbacks.ema.warmup"),
    ("callbacks.ema.update_every_n_steps=0", "callbacks.ema.update_every_n_steps"),
])
def test_bad_ema_keys_are_one_line_errors(compose_cfg, override: str, key: str) -> None:
    with pytest.raises(UserError, match=f"^{key}="):
        validate(compose_cfg(["callbacks=ema", override]))
