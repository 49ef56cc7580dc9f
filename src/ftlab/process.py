"""The life of a command-line process (``python -m ftlab``, the ``ftlab`` command): keep the garbage
collector off the objects that live as long as the process.

Importing torch, Lightning and timm leaves about half a million objects that live until the process
exits. Python's cyclic garbage collector walks all of them at every full collection: a few tenths of a
second each. While the imports run, the collector starts such a full collection every so often (seven
in ``python -m ftlab``'s import of torch and Lightning, 1.0 s together on a 2-core machine), and while
the interpreter shuts down it cost 1.6–1.9 s per process (``make bench``'s default-run breakdown).

- :func:`command_process` moves the objects imported so far into the collector's permanent generation
  (:func:`gc.freeze`) when the command starts, and again before the exit.
- :func:`imports_without_collection`, around a command's import of the big libraries, keeps the
  collector off while they import and freezes what they created; only inside :func:`command_process`.

Reference counting still frees everything as usual, objects created later are still collected, ``atexit``
handlers (logging, TensorBoard writers, data-loader workers) still run, and everything ftlab writes is
closed before the exit; what the exit skips is a last walk over objects that are about to disappear with
the process anyway. Forked data-loader workers also touch fewer copy-on-write pages when the collector
leaves those objects alone.

Only the program's own entry points use them: a library caller (a notebook, a test) keeps its collector
as it is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_in_command = False


@contextmanager
def command_process() -> Iterator[None]:
    """Around a command-line program's ``main``, in the process that runs only that program."""
    global _in_command
    _in_command = True
    gc.freeze()  # what is imported so far
    try:
        yield
    finally:
        # Whatever the outcome, the interpreter exits next; the run's objects go with it.
        gc.freeze()


@contextmanager
def imports_without_collection() -> Iterator[None]:
    """Around the command's import of torch, Lightning and the like: no cyclic collection while they import
    (their objects are long-lived; a full collection would walk all of them again and again), then freeze
    them. Does nothing outside :func:`command_process`."""
    if not _in_command:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
