"""pdcluster's own log lines, on stderr at INFO. They hang off the `pdcluster` logger, not the
root: a package vLLM's OpenAI layer imports (model_hosting_container_standards) sets the root
logger to ERROR, which silenced every router warning (workers lost, streams resumed)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure_logging() -> None:
    logger = logging.getLogger("pdcluster")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the root's handlers and level are other packages' to set
