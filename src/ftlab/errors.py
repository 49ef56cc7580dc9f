"""User-facing errors: one clear line on stderr and exit code 1, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from omegaconf.errors import MissingMandatoryValue


class UserError(Exception):
    """A mistake in the user's input (path, key, value) that the user can fix."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return ' Did you mean: a, b?' for the closest names, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def user_message(exc: BaseException | None) -> str | None:
    """The one-line message for a user mistake anywhere in ``exc``'s chain, else None.

    A :class:`UserError`'s text, or a missing mandatory config value (``???``) named by its key.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return str(exc)
        if isinstance(exc, MissingMandatoryValue):
            key = getattr(exc, "full_key", "") or ""
            return f"{key}: a value is required (set it on the command line, e.g. {key}=...)"
        exc = exc.__cause__ or exc.__context__
    return None


class RunInterrupted(UserError):
    """Training stopped by the user (Ctrl-C); the run directory can be resumed."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(f"training was interrupted; the run in {run_dir} can be resumed with ckpt_path=last")
        self.run_dir = run_dir
