"""``data.cache_features``: with a frozen backbone, run it once per image and train the head on its outputs.

When only the head trains, the backbone's norm statistics are frozen and the train images never change
(``data.augment=none``), every epoch would feed the head the same inputs. The cache computes them once
per split (the whole network in eval mode, no grad, the inputs of the head captured by a forward
pre-hook), and the train and val loaders then serve those tensors, batch by batch, in the same seeded
order (:class:`~ftlab.data.resumable.ResumableSampler`, so resuming mid-epoch still works). During fit
the module runs only the head (:class:`HeadOnFeatures`). Optimizer, schedule, step counts, metrics,
checkpoints and artifacts are those of an uncached run: the head's weights still live in ``net``.

Dropout between the features and the head still applies while training: ``model.head_dropout`` (a
pre-hook on the head) and, without it, the backbone's own (an ``nn.Dropout`` beside the head, or timm's
``drop_rate``). Random layers deeper in the backbone (dropout, drop-path) would change the features
every step, so they make the cache invalid. The test split is not cached: it runs once, so caching
would cost the same forward pass, and the test report shows its images.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ftlab.data.resumable import ResumableLoader
from ftlab.distributed import is_sharded
from ftlab.errors import UserError

log = logging.getLogger(__name__)

# Test runs once: caching it would cost the same forward pass, and its report shows the images.
CACHED_SPLITS = ("train", "val")
# Layers that are random in training mode, and the attribute holding their rate (timm, torchvision).
_RANDOM_LAYERS = {"DropPath": "drop_prob", "DropBlock2d": "drop_prob", "StochasticDepth": "p"}


class FeatureDataset(Dataset):
    """One split's head inputs and labels. A batch is a single indexing operation (``__getitems__``)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.features[index], self.labels[index]


def _batch_as_is(batch: Any) -> Any:
    # __getitems__ already returns the batch; a module-level function so the loader pickles.
    return batch


def pre_head_dropouts(net: nn.Module, head_name: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The backbone's own dropout on the head's input: ``nn.Dropout`` modules beside the head in its
    parent (torchvision ``classifier``, timm ``head.drop``/``head_drop``); without one, timm's ``drop_rate``
    (see :mod:`ftlab.models.head_dropout`, which switches the same ones off)."""
    parent_name, _, leaf = head_name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    siblings = [m for name, m in parent.named_children() if name != leaf and isinstance(m, nn.Dropout) and m.p > 0]
    if siblings:
        return siblings
    rate = getattr(net, "drop_rate", None)
    if isinstance(rate, float) and rate > 0:
        return [_DropRate(net)]
    return []


class _DropRate:
    """timm's ``F.dropout(x, net.drop_rate)`` before the classifier, following the net's train/eval mode."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, float(self.net.drop_rate), self.net.training)


class HeadOnFeatures:
    """What the module runs on cached features: the backbone's pre-head dropout, then the head (with its
    ``model.head_dropout`` pre-hook). A plain class, so it never joins the module's state dict."""

    def __init__(self, net: nn.Module, head_name: str) -> None:
        self.head = net.get_submodule(head_name)
        self.dropouts = pre_head_dropouts(net, head_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for dropout in self.dropouts:
            x = dropout(x)
        return self.head(x)


def random_layers(net: nn.Module, head_name: str) -> list[str]:
    """Backbone layers that are random while training, other than the dropout right before the head."""
    allowed = {id(m) for m in pre_head_dropouts(net, head_name)}
    out = []
    for name, m in net.named_modules():
        if name == head_name or name.startswith(head_name + ".") or id(m) in allowed:
            continue
        attr = "p" if isinstance(m, nn.modules.dropout._DropoutNd) else _RANDOM_LAYERS.get(type(m).__name__)
        rate = getattr(m, attr, 0.0) if attr else 0.0
        if isinstance(rate, (int, float)) and rate > 0:
            out.append(f"{name} ({type(m).__name__}, p={rate:g})")
    return out


def _listing(names: Sequence[str], limit: int = 3) -> str:
    more = f", … {len(names)} in all" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def why_not(datamodule: Any, model: Any, trainer: L.Trainer | None = None) -> str | None:
    """Why cached features would train differently from the images (None: they would not)."""
    mixing = [f"data.{k}={getattr(datamodule, k)}" for k in ("mixup", "cutmix") if getattr(datamodule, k, 0)]
    if mixing:
        return f"{' and '.join(mixing)} mix the images of every batch; use data.mixup=0 data.cutmix=0"
    if datamodule.augment != "none":
        return f"data.augment={datamodule.augment} changes the images every epoch; use data.augment=none"
    head = f"net.{model.head_name}."
    # gradual hands frozen parameters to the optimizer too: they train in later epochs.
    trainable = model.optimizer_parameter_names() | {n for n, p in model.named_parameters() if p.requires_grad}
    outside = [n.removeprefix("net.") for n, _ in model.named_parameters() if n in trainable and not n.startswith(head)]
    if outside:
        return (f"method {type(model).method} trains backbone parameters ({_listing(outside)}), "
                "so the features change every step; use method=linear")
    if not model.hparams.get("freeze_norm_stats"):
        return ("model.freeze_norm_stats=false lets the backbone's norm statistics follow every training batch; "
                "use model.freeze_norm_stats=true")
    random = random_layers(model.net, model.head_name)
    if random:
        return (f"backbone layers are random while training ({_listing(random)}), "
                "so the features differ every epoch; use a backbone without them")
    if trainer is not None:
        if is_sharded(trainer):
            return "FSDP shards the backbone, and cached features need it whole; use trainer=gpu or trainer=ddp"
    return None


class FeatureCache(L.Callback):
    """Computes each cached split's features once and serves them; switches the module to head-only
    inputs for the duration of fit (test runs on images)."""

    def __init__(self, model: Any, trainer: L.Trainer, num_workers: int = 0) -> None:
        super().__init__()
        self.model = model
        self.trainer = trainer
        self.num_workers = num_workers
        self.datasets: dict[str, FeatureDataset] = {}

    # -- loaders --------------------------------------------------------------------------
    def serves(self, split: str) -> bool:
        """Whether ``split``'s loader should be this cache's: train and val while fitting (the module runs
        only the head then), never the test stage or a separate ``trainer.validate``."""
        from lightning.pytorch.trainer.states import TrainerFn

        return split in CACHED_SPLITS and self.trainer.state.fn == TrainerFn.FITTING

    def loader(self, split: str, images: Dataset, batch_size: int, sampler: Sampler | None = None,
               collate_fn: Callable[[list[Any]], Any] | None = None, drop_last: bool = False) -> DataLoader:
        """The split's loader over cached features: the same batch size, sampler and ``drop_last`` as over
        ``images`` (``collate_fn``: how the data module batches its samples, e.g. padding texts)."""
        if split not in self.datasets:
            self.datasets[split] = self.extract(split, images, batch_size, collate_fn)
        # In memory: worker processes would only add pickling.
        loader_cls = ResumableLoader if split == "train" else DataLoader
        return loader_cls(self.datasets[split], batch_size=batch_size, sampler=sampler, shuffle=False,
                          num_workers=0, collate_fn=_batch_as_is, drop_last=drop_last)

    def extract(self, split: str, images: Dataset, batch_size: int,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> FeatureDataset:
        """The head's input for every image of ``images``, in order, as training would compute it."""
        model, trainer = self.model, self.trainer
        net = model.net
        captured: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach().cpu())

        loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                            pin_memory=model.device.type == "cuda", collate_fn=collate_fn)
        # Before the head's own pre-hooks (model.head_dropout): the raw features.
        handle = net.get_submodule(model.head_name).register_forward_pre_hook(capture, prepend=True)
        modes = {m: m.training for m in net.modules()}
        # The module's own forward on images (input layout such as channels_last), even mid-fit.
        head_only, model.feature_head = model.feature_head, None
        device = model.device
        started = time.perf_counter()
        # The extraction loader draws its seeds from a forked generator, so training consumes random numbers
        # exactly as an uncached run does: same seed, same dropout masks.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                net.eval()
                with torch.no_grad():
                    for batch in loader:
                        # The path a training batch takes: precision, transfer hooks, autocast.
                        batch = trainer.precision_plugin.convert_input(batch)
                        batch = model.on_before_batch_transfer(batch, 0)
                        x, y = trainer.strategy.batch_to_device(batch, device)
                        with trainer.precision_plugin.forward_context():
                            model(x)
                        labels.append(y.cpu())
            finally:
                handle.remove()
                model.feature_head = head_only
                for m, training in modes.items():
                    m.training = training
        features, targets = torch.cat(captured), torch.cat(labels)
        log.info("feature cache: %s split, %d × %s features (%.1f MB) in %.1f s", split, len(features),
                 "×".join(map(str, features.shape[1:])), features.numel() * features.element_size() / 2**20,
                 time.perf_counter() - started)
        return FeatureDataset(features, targets)

    # -- the module runs only the head while fitting ----------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.feature_head = HeadOnFeatures(pl_module.net, pl_module.head_name)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.feature_head = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        pl_module.feature_head = None


def check_cache_features(value: Any) -> bool | str:
    """``data.cache_features``: auto, true or false."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise UserError(f"data.cache_features={value!r}: choose auto, true or false")


def attach(datamodule: Any, model: Any, trainer: L.Trainer) -> FeatureCache | None:
    """Turn the cache on for this fit when ``data.cache_features`` asks for it and it is valid."""
    setting = getattr(datamodule, "cache_features", False)
    if setting is False:
        return None
    reason = why_not(datamodule, model, trainer)
    if reason is not None:
        if setting is True:
            raise UserError(f"data.cache_features=true: {reason} or data.cache_features=auto")
        log.debug("data.cache_features=auto: off, %s", reason)
        return None
    cache = FeatureCache(model, trainer, num_workers=datamodule.num_workers)
    datamodule.feature_cache = cache
    trainer.callbacks.append(cache)
    # Lightning's advice to add loader workers does not apply to tensors already in memory.
    warnings.filterwarnings("ignore", message=r"The '(train|val)_dataloader' does not have many workers")
    log.info("data.cache_features: on (frozen backbone, no augmentation): the backbone runs once per train/val "
             "sample, then every epoch trains the head on the cached features")
    return cache

