"""The upfront image check: decode every file once so a bad one is named (or skipped) before training.

PIL's ``verify()`` reads headers only and passes truncated files, so the check decodes fully. JPEGs are
decoded at 1/8 scale (``draft``): that still walks the whole entropy-coded stream, so truncation is
caught, at a fraction of the cost. Images over PIL's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) count as bad without being decoded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from lightning.fabric.utilities.rank_zero import rank_zero_only
from PIL import Image

from ftlab.errors import UserError

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
# How many skipped files the warning names.
LIST_AT_MOST = 10


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


def find_bad_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for every unusable image, in the order given (decoded on a thread pool)."""
    with warnings.catch_warnings():
        # The size check above reports these; PIL's own warning would be a second, vaguer message.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=8) as pool:
            problems = list(pool.map(image_problem, paths))
    return [(p, why) for p, why in zip(paths, problems, strict=True) if why]


def screen(samples: Sequence[tuple[str, int]], policy: str = "error") -> list[tuple[str, int]]:
    """The usable samples. ``error``: the first bad file is a :class:`UserError`; ``skip``: one warning."""
    if policy not in BAD_IMAGE_POLICIES:
        raise UserError(f"data.on_bad_image={policy!r}: choose one of {', '.join(BAD_IMAGE_POLICIES)}")
    bad = find_bad_images([p for p, _ in samples])
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
