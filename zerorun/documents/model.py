"""The document data model: errors, parameter specs, parsed steps, name rules.

Kept free of YAML/Jinja imports so that importing it (and the CLI) stays cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PARAMETER_TYPES = ("String", "StringList", "Integer", "Boolean", "StringMap", "MapList")
SCHEMA_VERSIONS = ("1.2", "2.0", "2.2")
SHELL_ACTIONS = {"runShellScript": "runShellScript", "aws:runShellScript": "runShellScript",
                 "runScript": "runScript"}
"""Actions Zerorun executes, mapped to the ``protocol.Step.action`` value the agent runs."""
RUN_DOCUMENT = "aws:runDocument"
"""The composite action: expanded into the steps of the document it names when rendered."""
SSM_DOCUMENT = "SSMDocument"
DOWNLOAD_CONTENT = "aws:downloadContent"
"""Rendered into a ``downloadContent`` step: the agent fetches (HTTP) or writes (SSMDocument) a file."""
DOWNLOAD_SOURCES = ("HTTP", SSM_DOCUMENT)
FLOW_VALUES = ("exit", "successAndExit")

_NAME_RE = re.compile(r"[a-zA-Z0-9_.\-]{3,128}")  # always fullmatch: "$" would let a final newline in
_RESERVED_PREFIXES = ("zr-", "zerorun-")
_SSM_PREFIXES = ("aws-", "amazon", "amzn")  # reserved by SSM for its own documents
_CONFUSABLE = str.maketrans({"0": "o", "1": "l", "i": "l", "_": "-", ".": "-"})


class DocumentError(ValueError):
    """The document itself is invalid or cannot run here. ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ParameterError(ValueError):
    """A parameter value breaks its declaration. Never carries a secret value."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """Error messages end up in one-line CLI output and logs: fold newlines."""
    return " ".join(text.split("\n")).strip()


class _Missing:
    """Sentinel for "no default": the parameter is required."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


@dataclass(frozen=True)
class ParameterSpec:
    """One declared parameter. ``default is MISSING`` means required."""

    name: str
    type: str = "String"
    description: str = ""
    default: Any = MISSING
    allowed_values: tuple[Any, ...] = ()
    allowed_pattern: str = ""
    min_items: int | None = None
    max_items: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    secret: bool = False
    interpolation_type: str = ""  # "" | "ENV_VAR"
    bool_allowed_values: bool = False
    """allowedValues were YAML/JSON booleans on a String parameter (``- True``): SSM documents
    in the wild do this, so those values match case-insensitively."""

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class StepDef:
    """A parsed, not yet rendered step. ``inputs`` keeps the raw (templated) values."""

    name: str
    action: str  # as written, e.g. "aws:runShellScript"
    inputs: dict[str, Any] = field(default_factory=dict)
    precondition: tuple[str, tuple[Any, ...]] | None = None  # (op, raw operands)
    on_failure: str = ""
    on_success: str = ""
    finally_step: bool = False
    run_as: str = ""  # raw (templated) user name: Zerorun-native (Jinja) documents only

    @property
    def supported(self) -> bool:
        """Runs on Linux: a shell action, an ``aws:runDocument`` whose documentType is
        SSMDocument, or an ``aws:downloadContent`` from HTTP or a stored document (or a
        template, known only when rendered)."""
        if self.action == RUN_DOCUMENT:
            kind = self.inputs.get("documentType")
            return kind == SSM_DOCUMENT or (isinstance(kind, str) and "{{" in kind)
        if self.action == DOWNLOAD_CONTENT:  # HTTP and SSMDocument sources (or a template)
            kind = self.inputs.get("sourceType")
            return kind in DOWNLOAD_SOURCES or (isinstance(kind, str) and "{{" in kind)
        return self.action in SHELL_ACTIONS


@dataclass(frozen=True)
class Document:
    """A validated document. ``content``/``sha256`` identify exactly what was submitted."""

    name: str
    content: str
    sha256: str
    schema_version: str
    description: str
    parameters: dict[str, ParameterSpec]
    steps: tuple[StepDef, ...] = ()
    templating: str = "ssm"  # "ssm" | "jinja": see templating.language_of
    version: str = ""  # the stored version it was read from, when a store says so


def is_reserved_document_name(name: str) -> bool:
    """True for a built-in's name or alias (any case) and for the ``ZR-``/``Zerorun-`` prefixes."""
    from zerorun.documents.builtin import all_builtin_names

    lowered = str(name).lower()
    return lowered.startswith(_RESERVED_PREFIXES) or lowered in {n.lower() for n in all_builtin_names()}


def name_skeleton(name: str) -> str:
    """What a name looks like to a hurried reader: case, 0/o, 1/l/i and _ . - are one each.
    Two document names with the same skeleton are confusable."""
    return name.casefold().translate(_CONFUSABLE)


def validate_document_name(name: str) -> None:
    """SSM's name rule, plus Zerorun's reserved built-in names and prefixes."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise DocumentError(f"invalid document name {name!r}: use 3-128 characters of a-z A-Z 0-9 _ . -")
    lowered = name.lower()
    if lowered.startswith(_RESERVED_PREFIXES):
        raise DocumentError(f"invalid document name {name!r}: the ZR- and Zerorun- prefixes are reserved "
                            f"for built-in documents")
    if lowered.startswith(_SSM_PREFIXES):
        raise DocumentError(f"invalid document name {name!r}: the AWS-, Amazon and amzn prefixes are reserved, "
                            f"as in SSM")
    from zerorun.documents.builtin import all_builtin_names

    if lowered in {n.lower() for n in all_builtin_names()}:
        raise DocumentError(f"invalid document name {name!r}: it is the name of a built-in document")
