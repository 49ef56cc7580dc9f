"""Several processes under Hydra: DDP children join the parent's job, multirun jobs start clean, FSDP.

Lightning's DDP launcher starts ranks 1..N-1 by re-running the command line. Under ``-m`` that re-runs
the whole sweep in every child (each child starts its own jobs, the parent's job waits for a peer that
never comes: lightning-hydra-template#393). :class:`DistributedJobs`, a Hydra callback, makes the
children of a multirun job re-run *that job* only (its overrides, in its directory, as a plain run),
and after each job closes the process group and forgets the rendezvous that Lightning set up, so the
next job launches its own children instead of waiting on finished ones.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger(__name__)

# What Lightning's launcher puts in the parent's environment for its children.
_RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")
_LAUNCHER_MODULES = (
    "lightning.fabric.strategies.launchers.subprocess_script",
    "lightning.pytorch.strategies.launchers.subprocess_script",
)


def _passthrough_args(argv: Sequence[str]) -> list[str]:
    """Command-line words that are not overrides (subcommands, --config-dir ...), minus -m/--multirun."""
    keep = []
    for arg in argv:
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith(("+", "~")) or ("=" in arg and not arg.startswith("-")):
            continue
        keep.append(arg)
    return keep


def child_command(local_rank: int) -> tuple[list[str], str]:
    """The command (and cwd) that starts DDP rank ``local_rank`` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # This job's own overrides (the sweep already expanded), run as a single job.
        command += _passthrough_args(sys.argv[1:]) + list(hydra_cfg.overrides.task)
    else:
        command += sys.argv[1:]
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        # Only the parent writes .hydra/ (the children would race on the same files).
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def install_child_command() -> None:
    """Make Lightning's subprocess launcher start children with :func:`child_command`."""
    import importlib

    for name in _LAUNCHER_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = child_command
        else:  # a Lightning release that reorganised its launcher: keep its own behaviour
            log.debug("%s has no _hydra_subprocess_cmd; DDP children use Lightning's command", name)


# Where launchers put a process's index among the processes of its machine (Lightning's launcher and
# torchrun: LOCAL_RANK; SLURM: SLURM_LOCALID; IBM jsrun: JSM_NAMESPACE_LOCAL_RANK).
_LOCAL_RANK_ENV = ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")


def local_rank() -> int:
    """This process's index on its machine, read from the launcher's environment (0 when not launched as one
    of several). Usable before the process group is up, which is when the data module scans its files."""
    for key in _LOCAL_RANK_ENV:
        value = os.environ.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def release_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class DistributedJobs(Callback):
    """Hydra callback: correct DDP child commands, and a clean slate between jobs of one process."""

    def __init__(self) -> None:
        self._env: dict[str, str | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_child_command()
        self._env = {k: os.environ.get(k) for k in _RENDEZVOUS_ENV}

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        release_process_group()
        if self._env.get("LOCAL_RANK") is not None:
            return  # launched externally (torchrun, SLURM) or a DDP child: the environment is not ours
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _runs_on_cpu(accelerator: Any) -> bool:
    if accelerator in ("cpu", None):
        return True
    return accelerator == "auto" and not torch.cuda.is_available()


def trainer_adjustments(trainer_cfg: DictConfig) -> dict[str, Any]:
    """Trainer arguments that replace configured ones which cannot work on this machine."""
    changes: dict[str, Any] = {}
    if trainer_cfg.get("sync_batchnorm") and _runs_on_cpu(trainer_cfg.get("accelerator")):
        # torch's SyncBatchNorm only runs on GPUs; plain per-process BatchNorm is what DDP on CPU can do.
        log.info("trainer.sync_batchnorm=true needs GPUs: using per-process BatchNorm on CPU")
        changes["sync_batchnorm"] = False
    return changes


# -- FSDP ---------------------------------------------------------------------------------------
def is_block(module: nn.Module) -> bool:
    """Repeated network stages worth their own FSDP unit: timm/torchvision ``*Block`` modules."""
    return type(module).__name__.endswith("Block")


def block_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int, **_: Any) -> bool:
    """FSDP auto-wrap policy: one unit per block (ViT ``Block``, Swin/ConvNeXt blocks, ``EncoderBlock``)."""
    return True if recurse else is_block(module)


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    **kwargs: Any,
) -> Any:
    """Lightning's FSDPStrategy set up for fine-tuning large backbones.

    Each block is a shard unit; ``use_orig_params`` lets frozen and trainable weights share a unit
    (PEFT/LoRA); checkpoints hold full (unsharded) state dicts, so ``best.ckpt``/``last.ckpt`` stay
    plain files that load with ``weights_only=True`` and resume on any device count.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    policy: Callable[..., bool] = block_policy
    return FSDPStrategy(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=policy if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type="full",
        use_orig_params=True,
        **kwargs,
    )


def is_sharded(trainer: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def unsharded_copy(trainer: Any, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A plain (unwrapped) module with the weights of the run's best checkpoint, or None without one.

    Under FSDP the trained module holds shards and gathering them is a collective; the checkpoint
    already holds the full state dict (``state_dict_type="full"``), so rank 0 reads it instead.
    """
    callback = trainer.checkpoint_callback
    path = (callback.best_model_path or callback.last_model_path) if callback else ""
    if not path:
        log.warning("no checkpoint to write the artifact from (FSDP keeps only shards in memory)")
        return None
    module = build()
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module
