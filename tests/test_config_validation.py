"""Wrong types and impossible values fail before any work starts, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftlab.config import CONFIG_DIR
from ftlab.errors import UserError
from ftlab.train import run
from ftlab.validate import validate

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))

BAD = [
    (["model.rank=0"], "model.rank=0: must be a positive integer"),
    (["model.rank=2.5"], "model.rank=2.5"),
    (["model.rank=abc"], "model.rank='abc'"),
    (["method=dora", "model.alpha=0"], "model.alpha=0: must be a number > 0"),
    (["model.dropout=1.0"], "model.dropout=1.0: must be in [0, 1)"),
    (["model.dropout=-0.1"], "model.dropout=-0.1"),
    (["model.init=xavier"], "model.init='xavier': must be one of kaiming, gaussian, pissa"),
    (["model.rslora=maybe"], "model.rslora='maybe'"),
    (["model.lr=true"], "model.lr=True: must be a number > 0"),
    (["model.lr=fast"], "model.lr='fast'"),
    (["method=full", "model.weight_decay=-1"], "model.weight_decay=-1"),
    (["method=partial", "model.unfreeze_last=-1"], "model.unfreeze_last=-1"),
    (["method=gradual", "model.epochs_per_stage=0"], "model.epochs_per_stage=0"),
    (["method=gradual", "model.unfreeze=some"], "model.unfreeze='some'"),
    (["data.val_fraction=0"], "data.val_fraction=0: must be in (0, 1)"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["data.batch_size=0"], "data.batch_size=0: must be a positive integer"),
    (["data.batch_size=true"], "data.batch_size=True"),
    (["data.image_size=4"], "data.image_size=4: must be null or an integer >= 8"),
    (["data.crop_scale=[0.9,0.1]"], "data.crop_scale=[0.9, 0.1]"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.augment=heavy"], "data.augment='heavy'"),
    (["data.on_bad_image=ignore"], "data.on_bad_image='ignore': must be one of error, skip"),
    (["data.check_cache=maybe"], "data.check_cache='maybe': must be true or false"),
    (["data.check_cache_dir=''"], "data.check_cache_dir='': must be null or a folder"),
    (["seed=abc"], "seed='abc': must be an integer"),
    (["trainer.precision=17"], "trainer.precision=17"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5"),
    (["callbacks.step_checkpoint.every_n_steps=-5"], "callbacks.step_checkpoint.every_n_steps=-5"),
    (["callbacks=early_stopping", "callbacks.early_stopping.patience=-1"],
     "callbacks.early_stopping.patience=-1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_impossible_value_is_one_line_naming_the_key(compose_cfg, overrides: list[str], message: str) -> None:
    cfg = compose_cfg(["data=imagefolder", "data.root=/x", *overrides])
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_default_is_valid(compose_cfg, method: str) -> None:
    for data in (["data=digits"], ["data=imagefolder", "data.root=/x"]):
        validate(compose_cfg([*data, f"method={method}", "callbacks=early_stopping"]))


@pytest.mark.parametrize("good", [["trainer.devices=auto"], ["trainer.devices=[0,1]"], ["trainer.devices=-1"],
                                  ["trainer.precision=bf16-mixed"], ["trainer.limit_train_batches=0.25"],
                                  ["callbacks.step_checkpoint.every_n_steps=null"], ["data.image_size=null"]])
def test_accepted_alternatives(compose_cfg, good: list[str]) -> None:
    validate(compose_cfg(["data=imagefolder", "data.root=/x", *good]))


def test_validation_runs_before_any_work(compose_cfg, tmp_path: Path) -> None:
    # The data root does not exist and the weights file neither: the bad value is still what is reported.
    cfg = compose_cfg(["data=imagefolder", f"data.root={tmp_path / 'missing'}", "model.rank=0",
                       f"model.checkpoint={tmp_path / 'missing.safetensors'}"])
    with pytest.raises(UserError, match="model.rank=0"):
        run(cfg)
    assert not any((tmp_path / "run").iterdir())
