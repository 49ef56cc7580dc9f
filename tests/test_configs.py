"""Every shipped YAML composes, and every _target_ accepts the keys its config gives it (no drift)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf, open_dict

from ftlab.config import CONFIG_DIR
from ftlab.speed import SPEED_KEYS, apply_speed_options
from ftlab.validate import CHECKS

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]


def _targets(node: object, path: str = ""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if path or key != "hydra":
                yield from _targets(node[key], f"{path}.{key}" if path else str(key))


def _accepted(obj: object) -> tuple[set[str], bool]:
    """Keyword names a callable accepts; for classes, every __init__ up the MRO plus configure_trainable."""
    if isinstance(obj, type):
        names: set[str] = set()
        open_ended = True
        for klass in obj.__mro__:
            if "__init__" in klass.__dict__ and open_ended:
                params = inspect.signature(klass.__dict__["__init__"]).parameters
                names |= set(params)
                open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
        hook = getattr(obj, "configure_trainable", None)
        if hook is not None:
            names |= set(inspect.signature(hook).parameters)
        return names, False
    params = inspect.signature(obj).parameters
    return set(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_signature(path: str, node: DictConfig) -> None:
    target = node._target_
    try:
        obj = get_class(target)
    except (ImportError, ValueError):
        obj = get_method(target)
    names, open_ended = _accepted(obj)
    if open_ended:
        return
    if path == "trainer":  # ftlab's own trainer keys, taken out before the Trainer is built
        names |= set(SPEED_KEYS)
    unknown = [k for k in node if not str(k).startswith("_") and k not in names]
    assert not unknown, f"{path} ({target}) does not accept {unknown}"


def test_every_group_has_options() -> None:
    for group in ("data", "model", "method", "trainer", "callbacks", "logger", "paths", "experiment"):
        assert any(g == group for g, _ in OPTIONS), group


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_matches_code(compose_cfg, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option in ("imagefolder", "textfile", "textfolder"):
        overrides.append("data.root=/tmp/anything")
    if group == "model" and option == "hf":
        overrides.append("model.name=/tmp/anything")
    if group == "model_method":  # <model>_<method>: a specialisation, chosen by composing that pair
        model, method = option.split("_", 1)
        overrides = [f"model={model}", f"method={method}"] + (["model.name=/tmp/anything"] if model == "hf" else [])
    if group == "data_method":  # <data>_<method>: chosen by composing that pair (data names may hold "_")
        data, method = option.rsplit("_", 1)
        overrides = [f"data={data}", f"method={method}"]
    cfg = compose_cfg(overrides)
    for key in cfg:
        if key != "hydra" and isinstance(cfg[key], DictConfig):
            OmegaConf.to_container(cfg[key], resolve=True)  # every interpolation resolves
    for path, node in _targets(cfg):
        _check_signature(path, node)


def test_speed_keys_are_read_by_apply_speed_options() -> None:
    assert set(SPEED_KEYS) <= set(inspect.signature(apply_speed_options).parameters)


def test_typo_in_key_fails(compose_cfg) -> None:
    with pytest.raises(Exception, match="rnak"):
        compose_cfg(["model.rnak=16"])


def test_validation_checks_point_at_real_keys(compose_cfg) -> None:
    # Method keys (model.rank, model.unfreeze_last, ...) exist only for their method: every check must
    # match a real key in at least one shipped composition.
    methods = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
    cfgs = [compose_cfg(["data=imagefolder", "data.root=/x", "callbacks=early_stopping", f"method={m}"])
            for m in methods]
    cfgs.append(compose_cfg(["callbacks=ema"]))
    cfgs.append(compose_cfg(["experiment=compare_tuned"]))
    for key in CHECKS:
        assert any(OmegaConf.select(cfg, key, default="absent") != "absent" for cfg in cfgs), key


def test_run_dir_names_method_and_model(compose_cfg) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=full", "model=timm", "model.name=resnet18"], return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    run_dir = cfg.hydra.run.dir
    assert run_dir.endswith("_full_resnet18"), run_dir
    assert "/runs/" in run_dir
    assert cfg.hydra.sweep.subdir == "3_full_resnet18"
