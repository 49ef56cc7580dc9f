"""The life of a command-line process (``python -m ftlab``, the ``ftlab`` command): keep the garbage
collector off the objects that live as long as the process.

Importing torch, Lightning and timm leaves about half a million objects that live until the process
exits. Python's cyclic garbage collector walks all of them at every full collection: a few tenths of a
second each, several times in a run, and again while the interpreter shuts down, where it cost 1.6–1.9 s
per process on a 2-core machine (``make bench``'s default-run breakdown). :func:`command_process` moves
them into the collector's permanent generation (:func:`gc.freeze`) once the imports are done and again
before the exit. Reference counting still frees everything as usual, objects created later are still
collected, ``atexit`` handlers (logging, TensorBoard writers, data-loader workers) still run, and
everything ftlab writes is closed before the exit; what the exit skips is a last walk over objects that
are about to disappear with the process anyway. Forked data-loader workers also touch fewer
copy-on-write pages when the collector leaves those objects alone.

Only the program's own entry points use it: a library caller (a notebook, a test) keeps its collector as
it is.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def command_process() -> Iterator[None]:
    """Around a command-line program's ``main``, in the process that runs only that program."""
    gc.freeze()  # the imports so far (torch, Lightning, ftlab's modules)
    try:
        yield
    finally:
        # Whatever the outcome, the interpreter exits next; the run's objects go with it.
        gc.freeze()
