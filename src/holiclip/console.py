"""holiclip's messages on the console: the ``holiclip`` logger hierarchy, written beside tqdm bars.

Library modules log to ``logging.getLogger(__name__)`` and configure nothing, so an application
silences or redirects them as it likes (``logging.getLogger("holiclip").setLevel(logging.WARNING)``).
The command line calls :func:`setup` once: each message is one plain line, INFO on stdout and
warnings on stderr (where ``print`` and the warnings put them before), written with ``tqdm.write``
so that a progress bar is cleared and redrawn around it instead of being broken.
"""
from __future__ import annotations

import logging
import sys

ROOT = "holiclip"


class TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write`` to the ``sys.stdout`` / ``sys.stderr`` of the moment
    (so that redirections made later, e.g. by test runners, are followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: report, never raise
            self.handleError(record)


def setup(level: int = logging.INFO) -> logging.Logger:
    """Shows holiclip's messages from ``level`` up on the console; calling it again only sets the level."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, TqdmHandler) for h in logger.handlers):
        logger.addHandler(TqdmHandler())
    logger.setLevel(level)
    return logger
