"""The upfront image check: decode every file once so a bad one is named (or skipped) before training.

PIL's ``verify()`` reads headers only and passes truncated files, so the check decodes fully. JPEGs are
decoded at 1/8 scale (``draft``): that still walks the whole entropy-coded stream, so truncation is
caught, at a fraction of the cost. Images over PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) count as bad without being decoded.

What the check found is remembered (:class:`CheckCache`, ``data.check_cache``): one JSON file maps each
file (its path relative to the data root, size and modification time in ns) to ``null`` (it decodes) or
the problem. A later start decodes only files that are new or whose size or mtime changed; removed files
drop out. The file lives beside the data (``<root>/.ftlab-image-check.json``) when the data folder is
writable, else under ``data.check_cache_dir`` (the output root's ``image_check/``), and is replaced
atomically, so runs starting together never see half a file (the last writer wins). A file modified within
:data:`RACY_NS` of the check's start is recorded but checked again next time: a second change within the
same file-system clock tick would keep its size and mtime (git's "racily clean" entries).

Several processes on one machine (DDP ranks): the data module checks before the process group exists, so
the wait is on the file. Local rank 0 checks and writes (at least :data:`SAVE_EVERY_S` seconds apart while it runs,
and at the end); the other ranks read the file until it answers for every one of their images, then decode
only what it cannot vouch for. If the file stops changing for :data:`WAIT_STALL_S` seconds they check the
rest themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import PIL
from lightning.fabric.utilities.rank_zero import rank_zero_only
from PIL import Image

from ftlab.distributed import local_rank
from ftlab.errors import UserError
from ftlab.fileio import atomic_open

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
# How many skipped files the warning names.
LIST_AT_MOST = 10

CACHE_NAME = ".ftlab-image-check.json"
CACHE_FORMAT = 1
# Files modified this close to the check's start (or later) are checked again at the next start; 2 s covers
# the coarsest common mtime resolution (FAT) and small clock differences with a network file system.
RACY_NS = 2_000_000_000
# Local rank 0 writes what it has found this often during a long check (progress for the other ranks, and
# an interrupted first start keeps its work).
SAVE_EVERY_S = 60.0
# The other ranks re-read the file this often, and check by themselves once it has not changed this long.
POLL_S = 0.5
WAIT_STALL_S = 600.0
THREADS = 8

# One remembered result: size in bytes, mtime in ns, the problem (None: it decodes), whether it was racy.
Entry = tuple[int, int, "str | None", bool]
Stat = tuple[int, int]


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as a training image, or None when it decodes."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                return f"{width}x{height} pixels is over PIL's decompression-bomb limit of {limit} pixels"
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Image.DecompressionBombError as exc:
        return str(exc)
    except Exception as exc:  # PIL raises many types for bad files
        # PIL often repeats the path; the caller already names it.
        message = str(exc).replace(f" {path!r}", "").replace(path, "").strip()
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return None


def _stat(path: str) -> Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # the decode names the problem
    return st.st_size, st.st_mtime_ns


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def _check_signature() -> dict[str, Any]:
    """What else decides the answers: a cache written under another Pillow or bomb limit is not reused."""
    return {"pillow": PIL.__version__, "max_image_pixels": Image.MAX_IMAGE_PIXELS}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse(data: Any) -> dict[str, Entry]:
    """The entries of a cache file's JSON, or ValueError saying what is wrong with it."""
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"not format {CACHE_FORMAT}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("no 'entries' object")
    out: dict[str, Entry] = {}
    for key, value in entries.items():
        if not (isinstance(value, list) and len(value) == 4 and _is_count(value[0]) and _is_count(value[1])
                and (value[2] is None or isinstance(value[2], str)) and value[3] in (0, 1)):
            raise ValueError(f"entry {key!r} is not [size, mtime_ns, problem, racy]")
        out[key] = (value[0], value[1], value[2], bool(value[3]))
    return out


class CheckCache:
    """The image check's memory for one data root: one JSON file, beside the data or under ``fallback_dir``."""

    def __init__(self, root: str | os.PathLike[str], fallback_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        self.fallback_dir = Path(fallback_dir).expanduser() if fallback_dir else None
        self._prefix = str(self.root).rstrip(os.sep) + os.sep
        self._warned: set[str] = set()
        self.path = self._locate()

    def _fallback_path(self) -> Path | None:
        if self.fallback_dir is None:
            return None
        # One file per data root: its name, and a digest of its resolved path so two "train" roots differ.
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return self.fallback_dir / f"{self.root.resolve().name or 'root'}-{digest}.json"

    def _locate(self) -> Path | None:
        if _writable(self.root):
            return self.root / CACHE_NAME
        fallback = self._fallback_path()
        if fallback is None:
            log.info("%s is not writable and no data.check_cache_dir is set: the image check is not remembered",
                     self.root)
        return fallback

    def key(self, path: str) -> str:
        """A file's name in the cache: relative to the root (the cache stays valid when the tree moves)."""
        return path[len(self._prefix):] if path.startswith(self._prefix) else os.path.abspath(path)

    def file(self, key: str) -> str:
        return key if os.path.isabs(key) else self._prefix + key

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        """One warning per problem (``what``: reading, or writing one path) and cache."""
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    def state(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime) of the cache file, which changes with every write; None when there is none."""
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def load(self, quiet: bool = False) -> dict[str, Entry]:
        """The remembered entries; {} when there is no file, and (one warning) when it cannot be trusted."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            entries = _parse(data)
        except (OSError, ValueError, RecursionError) as exc:
            if not quiet:
                reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
                self._warn_once("read", "%s: not a usable image-check cache (%s); ignoring it, every image is checked "
                                "and the file rewritten", self.path, reason.splitlines()[0][:200])
            return {}
        if data.get("check") != _check_signature():
            if not quiet:
                log.info("%s was written with %s, this is %s: every image is checked again",
                         self.path, data.get("check"), _check_signature())
            return {}
        return entries

    def save(self, entries: dict[str, Entry]) -> None:
        """Replace the file atomically; a file that cannot be written is a warning (the run goes on)."""
        while self.path is not None:
            data = {
                "format": CACHE_FORMAT,
                "root": str(self.root),
                "check": _check_signature(),
                "entries": {k: [size, mtime, why, int(racy)] for k, (size, mtime, why, racy) in entries.items()},
            }
            try:
                with atomic_open(self.path, "w", encoding="utf-8") as handle:
                    json.dump(data, handle, separators=(",", ":"))
                return
            except OSError as exc:
                fallback = self._fallback_path()
                moved = fallback is not None and self.path != fallback
                self._warn_once(f"write {self.path}", "%s: could not write the image-check cache (%s)%s", self.path, exc,
                                f"; writing it to {fallback}" if moved else "; the next start checks every image")
                self.path = fallback if moved else None


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _decode(paths: Sequence[str]) -> Iterable[str | None]:
    """``image_problem`` of each path, in order, on a thread pool; stopping early (Ctrl-C) drops the rest."""
    pool = ThreadPoolExecutor(max_workers=THREADS)
    try:
        yield from pool.map(image_problem, paths)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _trusted(entry: Entry | None, stat: Stat | None) -> bool:
    return entry is not None and stat is not None and (entry[0], entry[1]) == stat and not entry[3]


def _check_and_remember(paths: Sequence[str], cache: CheckCache) -> dict[str, str | None]:
    """Local rank 0 (or a single process): decode what the cache cannot vouch for, then write the cache."""
    started = time.time_ns()
    known = cache.load()
    results: dict[str, str | None] = {}
    entries: dict[str, Entry] = {}
    todo: list[tuple[str, str, Stat | None]] = []
    ours: set[str] = set()
    for path in paths:
        key = cache.key(path)
        if key in ours:
            continue
        ours.add(key)
        stat, entry = _stat(path), known.get(key)
        if _trusted(entry, stat):
            assert entry is not None
            results[path] = entry[2]
            entries[key] = entry
        else:
            todo.append((path, key, stat))
    # Files of this root that another run checked (a different subset): kept while they exist.
    entries.update((k, e) for k, e in known.items() if k not in ours and os.path.exists(cache.file(k)))
    log.info("image check: %d of %d images to decode (%d remembered in %s)",
             len(todo), len(paths), len(paths) - len(todo), cache.path)
    last_save = time.monotonic()
    every = SAVE_EVERY_S
    done = 0
    try:
        for (path, key, stat), why in zip(todo, _decode([t[0] for t in todo]), strict=True):
            results[path] = why
            done += 1
            if stat is not None:
                entries[key] = (stat[0], stat[1], why, stat[1] >= started - RACY_NS)
            if time.monotonic() - last_save > every:
                t0 = time.monotonic()
                cache.save(entries)
                last_save = time.monotonic()
                # A big cache takes a while to write: at most a tenth of the check goes into progress saves.
                every = max(SAVE_EVERY_S, 10 * (last_save - t0))
    finally:
        # Also when interrupted: the next start resumes from what was decoded.
        if done or entries.keys() != known.keys():
            cache.save(entries)
    return results


def _wait_and_read(paths: Sequence[str], cache: CheckCache) -> dict[str, str | None]:
    """Another rank: wait until local rank 0's cache answers for every image, decode only what it cannot."""
    stats = {path: _stat(path) for path in paths}
    keys = {path: cache.key(path) for path in paths}
    known: dict[str, Entry] = {}
    seen: tuple[int, int, int] | None = None
    changed = time.monotonic()
    while True:
        state = cache.state()
        if state != seen or not known:
            if state != seen:
                seen, changed = state, time.monotonic()
            known = cache.load(quiet=True)
            # Files that cannot be stat'ed never get an entry: decoded here, not waited for.
            missing = sum(1 for p in paths if stats[p] is not None
                          and (keys[p] not in known or known[keys[p]][:2] != stats[p]))
            if not missing:
                break
        if time.monotonic() - changed > WAIT_STALL_S:
            log.warning("image check: %s has not changed for %.0f s and lacks %d of %d images; checking them here",
                        cache.path, WAIT_STALL_S, missing, len(paths))
            break
        _pause(POLL_S)
    results: dict[str, str | None] = {}
    todo = []
    for path in paths:
        entry = known.get(keys[path])
        if _trusted(entry, stats[path]):
            assert entry is not None
            results[path] = entry[2]
        else:
            todo.append(path)
    log.info("image check (local rank %d): %d of %d images to decode, the rest read from %s",
             local_rank(), len(todo), len(paths), cache.path)
    results.update(zip(todo, _decode(todo), strict=True))
    return results


def find_bad_images(
    paths: Sequence[str], cache: CheckCache | None = None, leader: bool | None = None
) -> list[tuple[str, str]]:
    """``(path, reason)`` for every unusable image, in the order given (decoded on a thread pool).

    With a ``cache`` only files it cannot vouch for are decoded; ``leader`` (default: local rank 0) checks
    and writes it, the others wait for it and read it.
    """
    with warnings.catch_warnings():
        # The size check above reports these; PIL's own warning would be a second, vaguer message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if cache is None or cache.path is None:
            results = dict(zip(paths, _decode(paths), strict=True))
        elif local_rank() == 0 if leader is None else leader:
            results = _check_and_remember(paths, cache)
        else:
            results = _wait_and_read(paths, cache)
    return [(p, why) for p in paths if (why := results[p])]


def screen(
    samples: Sequence[tuple[str, int]], policy: str = "error", cache: CheckCache | None = None
) -> list[tuple[str, int]]:
    """The usable samples. ``error``: the first bad file is a :class:`UserError`; ``skip``: one warning."""
    if policy not in BAD_IMAGE_POLICIES:
        raise UserError(f"data.on_bad_image={policy!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    bad = find_bad_images([p for p, _ in samples], cache)
    if not bad:
        return list(samples)
    if policy == "error":
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more; data.on_bad_image=skip drops them)" if len(bad) > 1 else ""
        raise UserError(f"{path}: unreadable image ({why}){more}")
    dropped = {p for p, _ in bad}
    listed = "; ".join(f"{p} ({why})" for p, why in bad[:LIST_AT_MOST])
    rest = f"; and {len(bad) - LIST_AT_MOST} more" if len(bad) > LIST_AT_MOST else ""
    if rank_zero_only.rank == 0:
        log.warning("data.on_bad_image=skip: skipped %d of %d images: %s%s",
                    len(bad), len(samples), listed, rest)
    return [s for s in samples if s[0] not in dropped]
