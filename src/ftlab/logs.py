"""What a run prints, and what its ``train.log`` keeps.

Hydra sets up the handlers (``conf/hydra/default.yaml``: the console and ``<run dir>/train.log``).
:func:`configure` then routes Lightning's loggers and Python warnings through them, so ``train.log``
holds the whole run, and installs :class:`QuietConsole` on the handlers: lines a user cannot act on
(hardware availability, Lightning's tips and advertisements, known third-party deprecations) are
dropped. ``python -m ftlab -v`` (``hydra.verbose=true``) keeps everything.
"""

from __future__ import annotations

import logging
import re
import sys

log = logging.getLogger(__name__)

# Lightning's INFO lines that describe the machine or advertise, not the run.
_LIGHTNING_NOISE = re.compile(
    r"^(GPU available|TPU available|HPU available|IPU available|💡 Tip|.*litlogger"
    r"|Trainer already configured with model summary callbacks"
    r"|`Trainer\(limit_\w+_batches=1\.0\)` was configured"
    r"|Loading `train_dataloader` to estimate number of stepping batches"
    r"|`Trainer\.fit` stopped: `max_epochs=\d+` reached"
    # The test stage loading the best checkpoint (a resume from last.ckpt still shows).
    r"|Restoring states from the checkpoint path at .*best\.ckpt$"
    r"|Loaded model weights from the checkpoint at .*best\.ckpt$)"
)
# Warnings the user cannot act on: (message pattern, where it is raised). Narrow on purpose.
_WARNING_NOISE = (
    # Lightning's own use of a torch pytree API that torch deprecates.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning/pytorch/utilities/_pytree\.py"),
    (r"`torch\.utils\._pytree\._register_pytree_node` is deprecated", r""),
    # Lightning suggests more loader workers on a 2-core machine, where ftlab already uses cores - 1.
    (r"The '\w+_dataloader' does not have many workers", r""),
)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


class QuietConsole(logging.Filter):
    """Drop records a user cannot act on (with ``quiet``); on the console (``console``), also records marked
    ``extra={"console": False}`` (shown another way, kept for ``train.log``)."""

    def __init__(self, console: bool = True, quiet: bool = True) -> None:
        super().__init__()
        self.console = console
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if self.console and getattr(record, "console", True) is False:
            return False
        if not self.quiet:
            return True
        message = record.getMessage()
        if record.name.startswith("lightning") and _LIGHTNING_NOISE.match(message.strip()):
            return False
        if record.name == "py.warnings":
            return not any(re.search(m, message) and re.search(mod, message) for m, mod in _WARNING_NOISE)
        return True


class ConsoleFormatter(logging.Formatter):
    """INFO as the bare message (ftlab's own lines read as plain output); others with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO:
            return message
        if record.name == "py.warnings":
            # "path:line: Category: text\n  source line" -> the first line only.
            message = message.strip().splitlines()[0]
        return f"{record.levelname.lower()}: {message}"


def configure(verbose: bool = False) -> None:
    """Route Lightning's loggers and Python warnings into Hydra's handlers; filter noise unless ``verbose``."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        # Lightning gives itself a stderr handler when imported before logging is configured.
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, QuietConsole)]:
            handler.removeFilter(old)
        # train.log keeps everything; the console drops the noise unless -v.
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        handler.addFilter(QuietConsole(console=console, quiet=console and not verbose))


def error(message: str) -> None:
    """One line on stderr, and the same in ``train.log``."""
    print(message, file=sys.stderr, flush=True)
    log.error(message, extra={"console": False})


def file_only(message: str) -> None:
    """Record ``message`` in ``train.log`` without printing it (it was shown another way)."""
    log.info(message, extra={"console": False})
