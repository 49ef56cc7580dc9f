"""``data.cache=true``: every image of the splits decoded once, in memory, before the loader workers start.

What is stored: when every split uses the eval transform (``data.augment=none``), the output of its
deterministic resize + centre crop (``size`` x ``size``), so an epoch only converts it to a normalised
tensor; otherwise the decoded image at native resolution (after :func:`load_rgb`'s EXIF/mode handling),
and each split's transform, random augmentation included, runs per sample as without the cache. Either
way a sample's tensor is the one the uncached pipeline gives.

Layout: one flat ``uint8`` buffer per store, with offset and shape arrays. The data module builds it in
its ``setup``, in the main process; loader workers are forked later and read it copy-on-write. Reading
a sample touches the reference counts of a handful of array objects, never the pixel pages, whereas a
list of PIL images or small arrays would put object headers (and small images' pixels) on every page
and each read would dirty and copy them, worker by worker.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ftlab.data.images import ImageListDataset, Sample, load_rgb
from ftlab.data.transforms import eval_geometry, to_normalized_tensor
from ftlab.errors import UserError

log = logging.getLogger(__name__)

# Refuse when the cache would take more than this fraction of the available memory: training itself
# (model, optimizer, batches in flight, worker processes) needs the rest.
MAX_FRACTION = 0.5

# Every store alive in this process, by content. Cross-validation folds (one data module each, same
# images) then share one instead of building the next while the previous fold's is still referenced.
_STORES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _threads() -> int:
    # PIL releases the GIL while decoding; past a few threads the disk is the limit.
    return max(1, min(8, os.cpu_count() or 1))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> int | None:
    """Bytes this process can still use: the kernel's MemAvailable, capped by a cgroup memory limit
    (containers); None when neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    # cgroup v2, then v1. Inactive page cache counts as usage there but is reclaimable, as in MemAvailable.
    for root, limit_name, usage_name, inactive in (
        ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        limit, usage = _read_int(f"{root}/{limit_name}"), _read_int(f"{root}/{usage_name}")
        if limit is not None and usage is not None:
            usage -= _stat_value(f"{root}/memory.stat", inactive)
            return min(avail, max(0, limit - usage))
    return avail


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def check_memory(need: int, images: int, processes: int = 1) -> None:
    """:class:`UserError` when ``need`` bytes (all processes of this machine together) would take more
    than :data:`MAX_FRACTION` of the available memory."""
    avail = available_memory()
    if avail is None or need <= MAX_FRACTION * avail:
        return
    copies = f", {processes} processes with a copy each" if processes > 1 else ""
    raise UserError(
        f"data.cache=true: the {images} decoded images would take about {_size(need)}{copies}, more than "
        f"half of the {_size(avail)} of available memory; set data.cache=false"
    )


def _unreadable(path: str, exc: Exception) -> UserError:
    return UserError(f"{path}: unreadable image ({type(exc).__name__}: {exc}) while filling data.cache")


def _pixels(path: str) -> int:
    """Width x height from the header (no decoding); EXIF rotation does not change it."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as exc:  # PIL raises many types for bad files
        raise _unreadable(path, exc) from None
    return width * height


class DecodedImages:
    """RGB images decoded once into one flat ``uint8`` buffer, optionally passed through ``prepare``
    (a deterministic PIL transform) first; ``nbytes[i]`` must be the size of image ``i`` as stored."""

    def __init__(
        self,
        paths: Sequence[str],
        nbytes: Sequence[int],
        prepare: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.paths = list(paths)
        self._slot = {p: i for i, p in enumerate(self.paths)}
        self._offsets = np.zeros(len(self.paths) + 1, np.int64)
        np.cumsum(np.asarray(nbytes, np.int64), out=self._offsets[1:])
        self._shapes = np.zeros((len(self.paths), 2), np.int64)
        self._pixels = np.empty(int(self._offsets[-1]), np.uint8)
        pool = ThreadPoolExecutor(max_workers=_threads())
        try:
            for _ in pool.map(lambda i: self._fill(i, prepare), range(len(self.paths))):
                pass
        finally:
            # A bad file stops the build at once, not after every other image has been decoded.
            pool.shutdown(cancel_futures=True)

    def _fill(self, i: int, prepare: Callable[[Image.Image], Image.Image] | None) -> None:
        path = self.paths[i]
        try:
            img = load_rgb(path)
            if prepare is not None:
                img = prepare(img)
        except Exception as exc:  # data.check_images=false, or a file changed since the check
            raise _unreadable(path, exc) from None
        arr = np.asarray(img)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        if arr.nbytes != end - start:
            raise RuntimeError(f"{path}: decoded to {arr.shape}, but {end - start} bytes were planned for it")
        self._pixels[start:end] = arr.reshape(-1)
        self._shapes[i] = arr.shape[:2]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        return int(self._pixels.nbytes)

    def slots(self, paths: Sequence[str]) -> np.ndarray:
        """Positions of ``paths`` in this store, as one array (cheap to read from forked workers)."""
        return np.array([self._slot[p] for p in paths], np.int64)

    def image(self, slot: int) -> Image.Image:
        height, width = self._shapes[slot]
        start = int(self._offsets[slot])
        # fromarray copies (PIL keeps RGB as 4 bytes a pixel), so nothing downstream can write to the buffer.
        return Image.fromarray(self._pixels[start : start + height * width * 3].reshape(height, width, 3))


def image_store(
    paths: Sequence[str],
    preprocessing: dict[str, Any] | None = None,
    processes: int = 1,
) -> DecodedImages:
    """The store of ``paths``: native resolution, or with ``preprocessing`` the eval resize + centre crop
    already applied. An alive store of the same content is reused; a new one is checked against the
    available memory (``processes`` on this machine each build their own) before anything is decoded."""
    unique = sorted(set(paths))
    geometry = eval_geometry(preprocessing) if preprocessing is not None else None
    key = (repr(geometry), tuple(unique))
    store = _STORES.get(key)
    if store is not None:
        return store
    if preprocessing is not None:
        nbytes = [int(preprocessing["size"]) ** 2 * 3] * len(unique)
    else:
        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            nbytes = [3 * n for n in pool.map(_pixels, unique)]
    check_memory(sum(nbytes) * processes, len(unique), processes)
    started = time.perf_counter()
    store = DecodedImages(unique, nbytes, geometry)
    what = f"resized to {preprocessing['size']} px" if preprocessing is not None else "native resolution"
    log.info("data.cache: decoded %d images (%s, %s) in %.1f s",
             len(store), _size(store.nbytes), what, time.perf_counter() - started)
    _STORES[key] = store
    return store


class CachedImageListDataset(ImageListDataset):
    """:class:`ImageListDataset` that reads its images from a :class:`DecodedImages` store."""

    def __init__(self, samples: Sequence[Sample], transform: Any, images: DecodedImages) -> None:
        super().__init__(samples, transform)
        self.images = images
        self._slots = images.slots([p for p, _ in self.samples])
        self._labels = np.array([y for _, y in self.samples], np.int64)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = self.images.image(int(self._slots[i]))
        return (self.transform(img) if self.transform else img), int(self._labels[i])


def cached_datasets(
    splits: dict[str, list[Sample]],
    transforms: dict[str, Any],
    preprocessing: dict[str, Any],
    resized: bool,
    processes: int = 1,
) -> dict[str, CachedImageListDataset]:
    """One dataset per split over a single store of all their images. ``resized``: every split's
    transform is the eval transform, so the store holds its resize + crop and the datasets only convert
    to tensors."""
    paths = [p for samples in splits.values() for p, _ in samples]
    store = image_store(paths, preprocessing if resized else None, processes)
    if resized:
        tensor = to_normalized_tensor(preprocessing)
        transforms = {name: tensor for name in splits}
    return {name: CachedImageListDataset(samples, transforms[name], store)
            for name, samples in splits.items()}
