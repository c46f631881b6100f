"""What both daemons share: a YAML config file under flags, and journald-friendly logging."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


class ConfigFileError(Exception):
    pass


def load_config_file(path: str | None, default_path: str, known: set[str]) -> dict[str, Any]:
    """Options from a YAML file (keys as the long flags, dashes or underscores)."""
    candidate = Path(path or default_path)
    if not path and not candidate.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(candidate.read_text()) or {}
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {candidate}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"config file {candidate} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {candidate} must be a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigFileError(f"config file {candidate}: unknown option {key!r}")
        out[name] = value
    return out


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                      default_config: str) -> argparse.Namespace:
    """Flags beat the config file, which beats the parser's defaults."""
    args = parser.parse_args(argv)
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    try:
        from_file = load_config_file(args.config, default_config, known)
    except ConfigFileError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    appending = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}
    defaults = {}
    for key, value in from_file.items():
        if key in appending and isinstance(value, dict):  # tags: {role: web} -> [(role, web)]
            value = [(str(k), str(v)) for k, v in value.items()]
        elif key in appending and not isinstance(value, list):
            value = [value]
        defaults[key] = value
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "plain") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="plain", choices=["plain", "json"])
