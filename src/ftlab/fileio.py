"""Atomic file writes: a crash, a kill or a full disk never leaves a truncated file behind.

Every file ftlab writes for a user (metrics, summaries, predictions, checkpoints) goes through
:func:`atomic_open`: the content is written to a temporary file beside the target, flushed to disk and
renamed over the target in one step, so readers see either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ftlab.errors import UserError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` is left as it was. ``kwargs`` go to
    :func:`open` (``newline=""`` for CSV, ``encoding``).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes files; mode {mode!r} has no 'w'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk.

    ``torch.save`` reports a failed write from its C++ zip writer as a ``RuntimeError``
    ("unexpected pos ...") rather than ``OSError(ENOSPC)``, so both are recognised.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | os.PathLike[str], needed: int | None, kept: str) -> UserError:
    """The one-line message for a write that failed because the disk is full."""
    target = Path(path)
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
    need = f", about {needed:,} needed" if needed else ""
    return UserError(f"{target}: could not be written, the disk is full ({free:,} bytes free{need}); {kept}")


@contextlib.contextmanager
def atomic_dir(root: str | os.PathLike[str], complete: Callable[[Path], bool], not_complete: str) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) and rename it to ``root`` when the block ends cleanly,
    so a process killed half-way never leaves a partial tree. When ``root`` appeared meanwhile (another
    process finished first) it is kept if ``complete(root)``, else ``"<root>: <not_complete>; remove it to
    rebuild"`` is the error. The temporary folder never outlives the block."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        # mkdtemp makes the folder private (0700); the tree gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        try:
            os.rename(tmp, root)
        except OSError:
            if not complete(root):
                raise UserError(f"{root}: {not_complete}; remove it to rebuild") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
