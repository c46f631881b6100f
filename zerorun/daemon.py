"""What both daemons share: their settings as one typed record that the YAML config file and the
command line both fill, and journald-friendly logging.

A daemon declares its settings once, as a ``@settings`` class whose fields are made with
``option()`` (``agent/config.py``, ``zmq_broker/config.py``). ``DaemonParser`` turns that into the flags
(``--state-dir`` for ``state_dir``), the config-file keys (``state_dir``; dashes are accepted
too), the conversion of file values to the field's type, and the record itself: flags beat the
file, which beats the field's default. A repeatable flag (a ``dict`` field such as the agent's
``tags``) adds to what the file gives. ``@settings`` makes the record (keyword ``__init__``, ``==``,
``repr``) without ``dataclasses``, which imports ``inspect`` and ``ast``: 0.5 MB of an idle agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("plain", "json")

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}

Settings = TypeVar("Settings")


class ConfigFileError(Exception):
    pass


class Option(NamedTuple):
    default: Any = MISSING
    default_factory: Any = MISSING
    help: str = ""
    key: str = ""  # config key and flag stem, when not the field's name (policy_file: "policy")
    flag: str = ""  # the flag, when not --key-with-dashes (tags: "--tag")
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    item: Callable[[str], tuple[str, str]] | None = None  # dict fields: one KEY=VALUE occurrence


class Field(NamedTuple):
    """One field of a ``@settings`` record; ``option`` is None for a field that is not a setting."""

    name: str
    default: Any
    default_factory: Any
    option: Option | None


def option(default: Any = MISSING, *, default_factory: Any = MISSING, help: str = "", key: str = "",
           flag: str = "", metavar: str | None = None, choices: tuple[str, ...] | None = None,
           item: Callable[[str], tuple[str, str]] | None = None) -> Any:
    """A field of a ``@settings`` class that is a daemon setting: a config-file key and a flag."""
    return Option(default, default_factory, help, key, flag, metavar, choices, item)


def settings(cls: type[Settings]) -> type[Settings]:
    """Makes a class of annotated fields (``option()``s, or plain defaults) a record: a keyword
    ``__init__`` (a default factory is called for each record), ``==`` and ``repr``."""
    declared = []
    for name in cls.__dict__.get("__annotations__", {}):
        value = cls.__dict__.get(name, MISSING)
        opt = value if isinstance(value, Option) else None
        default, factory = (opt.default, opt.default_factory) if opt is not None else (value, MISSING)
        declared.append(Field(name, default, factory, opt))
        if opt is not None:
            delattr(cls, name)
    record = tuple(declared)

    def __init__(self: Any, **values: Any) -> None:
        unknown = values.keys() - {f.name for f in record}
        if unknown:
            raise TypeError(f"{cls.__name__}() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        for f in record:
            if f.name in values:
                value = values[f.name]
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            elif f.default is not MISSING:
                value = f.default
            else:
                raise TypeError(f"{cls.__name__}() missing keyword argument: {f.name!r}")
            setattr(self, f.name, value)

    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in record)

    def __repr__(self: Any) -> str:
        return f"{cls.__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in record)})"

    cls.__init__ = __init__  # type: ignore[misc]
    cls.__eq__ = __eq__  # type: ignore[method-assign, assignment]
    cls.__repr__ = __repr__  # type: ignore[method-assign, assignment]
    cls.__hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass
    cls.__settings_fields__ = record  # type: ignore[attr-defined]
    return cls


def fields(settings_type: type[Any]) -> tuple[Field, ...]:
    """The fields of a ``@settings`` class, in their order."""
    return settings_type.__settings_fields__  # type: ignore[no-any-return]


def log_level_option() -> Any:
    return option("info", choices=LOG_LEVELS)


def log_format_option() -> Any:
    return option("plain", choices=LOG_FORMATS)


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"tag {text!r} must look like KEY=VALUE")
    return key.strip(), value.strip()


class _Setting:
    """One option field: how it appears on the command line and in the file, and its type."""

    def __init__(self, f: Field, hint: Any):
        opt = f.option
        assert opt is not None
        self.name = f.name
        self.key = opt.key or f.name
        self.flag = opt.flag or "--" + self.key.replace("_", "-")
        self.option = opt
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0]
        self.optional = optional
        self.kind = typing.get_origin(hint) or hint  # str int float bool Path dict

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        opt = self.option
        common: dict[str, Any] = {"dest": self.key, "default": argparse.SUPPRESS, "help": opt.help or None}
        if self.kind is bool:
            parser.add_argument(self.flag, action="store_true", **common)
        elif self.kind is dict:
            parser.add_argument(self.flag, action="append", type=opt.item, metavar=opt.metavar, **common)
        elif self.kind is list:  # repeatable; the flags given replace the file's list
            parser.add_argument(self.flag, action="append", metavar=opt.metavar, **common)
        else:
            parser.add_argument(self.flag, type=self.kind, metavar=opt.metavar, choices=opt.choices, **common)

    def convert(self, value: Any, where: str) -> Any:
        """A config-file value as this setting's type; ConfigFileError says what is wrong."""
        kind, opt = self.kind, self.option
        if value is None and self.optional:
            return None
        if kind is dict:
            return self._pairs(value, where)
        if kind is list:  # a YAML list, or one string (commas separate several)
            items = value if isinstance(value, list) else str(value).split(",")
            if not all(isinstance(v, (str, int, float)) for v in items):
                raise ConfigFileError(f"{where} must be a list of values")
            return [str(v).strip() for v in items if str(v).strip()]
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigFileError(f"{where} must be a single value, not {_yaml_kind(value)}")
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ConfigFileError(f"{where} must be true or false, not {value!r}")
        if kind in (int, float):
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ConfigFileError(f"{where} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
            try:
                return kind(value)
            except ValueError:
                raise ConfigFileError(f"{where} must be {'an integer' if kind is int else 'a number'}, "
                                      f"not {value!r}") from None
        text = str(value)
        if opt.choices is not None:
            if text.lower() not in opt.choices:
                raise ConfigFileError(f"{where} must be one of {', '.join(opt.choices)}, not {value!r}")
            text = text.lower()
        return kind(text)

    def _pairs(self, value: Any, where: str) -> dict[str, str]:
        """A mapping, a list of KEY=VALUE strings or [key, value] pairs, or one KEY=VALUE."""
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return {str(k): str(v) for k, v in value.items()}
        out: dict[str, str] = {}
        for entry in value if isinstance(value, list) else [value]:
            if isinstance(entry, (list, tuple)) and len(entry) == 2:
                out[str(entry[0])] = str(entry[1])
                continue
            if not isinstance(entry, str) or self.option.item is None:
                raise ConfigFileError(f"{where}: {entry!r} must look like KEY=VALUE")
            try:
                k, v = self.option.item(entry)
            except argparse.ArgumentTypeError as exc:
                raise ConfigFileError(f"{where}: {exc}") from None
            out[k] = v
        return out


def _yaml_kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "empty"}.get(type(value), type(value).__name__)


class Parsed(NamedTuple, Generic[Settings]):
    settings: Settings
    config_file: str | None  # --config as given
    check_config: bool


class DaemonParser(argparse.ArgumentParser):
    """A daemon's command line, made from its ``@settings`` class: ``--version``, ``--config``,
    one flag per option field, ``--check-config``."""

    def __init__(self, settings_type: type[Any], *, prog: str, description: str, default_config: str,
                 version: str, epilog: str | None = None):
        super().__init__(prog=prog, description=description, epilog=epilog)
        self.settings_type = settings_type
        self.default_config = default_config
        hints = typing.get_type_hints(settings_type)
        self.settings = [_Setting(f, hints[f.name]) for f in fields(settings_type) if f.option is not None]
        self._by_key = {s.key: s for s in self.settings}
        self.add_argument("--version", action="version", version=f"{prog} {version}")
        self.add_argument("--config", help=f"YAML config file (default {default_config} if it exists)")
        for setting in self.settings:
            setting.add_to(self)
        self.add_argument("--check-config", action="store_true",
                          help="only check the configuration (file and flags), then exit 0 or 2")

    def parse(self, argv: list[str] | None = None) -> Parsed[Any]:
        """Flags, then the config file under them, then the defaults; a bad file is one line on
        stderr and exit 2."""
        args = self.parse_args(argv)
        try:
            values = self.read_config_file(args.config)
        except ConfigFileError as exc:
            self.exit(2, f"{self.prog}: error: {exc}\n")
        for setting in self.settings:
            if setting.key not in args:
                continue
            given = getattr(args, setting.key)
            if setting.kind is dict:  # repeatable: adds to the file's entries
                given = {**values.get(setting.name, {}), **dict(given)}
            elif setting.kind is list:  # each flag may also hold several, comma-separated
                given = [part.strip() for flag in given for part in flag.split(",") if part.strip()]
            values[setting.name] = given
        return Parsed(self.settings_type(**values), args.config, args.check_config)

    def read_config_file(self, path: str | None) -> dict[str, Any]:
        """The settings a YAML file gives, by field name and converted; {} when no file is named
        and the default one does not exist."""
        candidate = Path(path or self.default_config)
        if not path and not candidate.exists():
            return {}
        import yaml

        try:
            data = yaml.safe_load(candidate.read_text()) or {}
        except OSError as exc:
            raise ConfigFileError(f"cannot read config file {candidate}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            from .yamltext import yaml_problem

            raise ConfigFileError(f"config file {candidate} is not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigFileError(f"config file {candidate} must be a mapping of option: value")
        out: dict[str, Any] = {}
        for key, value in data.items():
            setting = self._by_key.get(str(key).replace("-", "_"))
            if setting is None:
                raise ConfigFileError(f"config file {candidate}: unknown option {key!r}")
            if value is None and not setting.optional and setting.kind not in (dict, list):
                continue  # "key:" with nothing after it: the default
            out[setting.name] = setting.convert(value, f"config file {candidate}: option {key!r}")
        return out


def parse_with_config(parser: DaemonParser, argv: list[str] | None, default_config: str | None = None) -> Any:
    """The settings from flags and config file (the roles validate a config file with this)."""
    if default_config is not None:
        parser.default_config = default_config
    return parser.parse(argv).settings


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
