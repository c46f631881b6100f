"""The broker's append-only audit log: one JSON object per line, who did what, where, when."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path | None):
        self.path = path
        self._file = None
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")  # line-buffered

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        entry = {"ts": round(time.time(), 6), "event": event, **fields}
        self._file.write(json.dumps(entry, sort_keys=True, default=str) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
