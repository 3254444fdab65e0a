"""Structured, quiet-by-default logging: one `key=value` line per event on stderr."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"ts={ts}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}",
                 f"logger={record.name}", f"msg={record.getMessage()!r}"]
        for k, v in vars(record).items():
            if k not in _STD:
                parts.append(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")
        if record.exc_info:
            parts.append(f"exc={self.formatException(record.exc_info)!r}")
        return " ".join(parts)


def setup_logging(level: str = "warning", service: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless we debug.
    for name in ("NIXL", "nixl", "grpc", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    if service:
        old = logging.getLogRecordFactory()

        def factory(*a: Any, **kw: Any) -> logging.LogRecord:
            rec = old(*a, **kw)
            rec.service = service
            return rec

        logging.setLogRecordFactory(factory)
