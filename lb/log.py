"""Logging set-up: plain or JSON lines on stderr, level from the config."""

from __future__ import annotations

import json
import logging
import sys

from lb.config import LogFormat, LoggingConfig


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_process_name = ""


def setup_logging(config: LoggingConfig, *, process: str | None = None) -> None:
    """Args:
    process: names the process in every line (the workers of `workers: N`);
        None keeps the name given before (a reload calls this again).
    """
    global _process_name
    if process is not None:
        _process_name = process
    process = _process_name
    handler = logging.StreamHandler(sys.stderr)
    if config.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(process))
    else:
        where = f"{process} " if process else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # aiohttp's access log would log every admin scrape at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("lb.access").setLevel(logging.INFO if config.access_log else logging.WARNING)
