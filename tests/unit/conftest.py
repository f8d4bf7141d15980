"""What every unit test gets: the logging configuration as it found it, whatever the test changed.

Unit tests run the balancer in-process, and `lb.log.setup_logging` (at a reload) sets the root
logger's handlers and level and `lb.access`'s level; a few tests set levels themselves.  Left as they
were, the next test in the same process read another configuration: a failure that came and went
with the order pytest-xdist gave the files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

# The loggers the product configures (lb.log.setup_logging) and their children.
_OURS = ("lb", "aiohttp")


@pytest.fixture(autouse=True)
def logging_as_found() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = _not_pytests(root.handlers), root.level
    loggers = {
        name: (logger.level, logger.disabled, logger.propagate)
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in _OURS
    }
    yield
    # pytest puts its capturing handlers on the root for each phase of a test and takes them off after:
    # those of this phase stay; the rest is what the root had.
    root.handlers[:] = [handler for handler in root.handlers if _is_pytests(handler)] + handlers
    root.setLevel(level)
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and name.split(".")[0] in _OURS:
            # One the test made is put back as a new logger is: NOTSET, enabled, propagating.
            logger.level, logger.disabled, logger.propagate = loggers.get(name, (logging.NOTSET, False, True))
    logging.Logger.manager._clear_cache()  # type: ignore[attr-defined]


def _is_pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


def _not_pytests(handlers: list[logging.Handler]) -> list[logging.Handler]:
    return [handler for handler in handlers if not _is_pytests(handler)]
