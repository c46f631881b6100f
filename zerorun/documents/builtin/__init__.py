"""Built-in documents, shipped as package data (``zerorun/documents/builtin/*.yml``).

A built-in is looked up by its name or an alias (``AWS-RunShellScript`` for ``RunShellScript``),
so documents and scripts written for SSM keep their names.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zerorun.documents.model import Document

_FILES = {"RunShellScript": "RunShellScript.yml", "RunPythonScript": "RunPythonScript.yml",
          "GetInstanceInfo": "GetInstanceInfo.yml", "UpdateAgent": "UpdateAgent.yml"}
_ALIASES = {"AWS-RunShellScript": "RunShellScript"}


def builtin_names() -> list[str]:
    """Canonical built-in names (aliases excluded), sorted."""
    return sorted(_FILES)


def all_builtin_names() -> list[str]:
    """Canonical names and aliases: none of them may be used for a stored document."""
    return sorted([*_FILES, *_ALIASES])


@lru_cache(maxsize=None)
def _load(name: str) -> Document:
    from importlib import resources  # lazily: ~25 ms of import time

    from zerorun.documents.loader import load_document

    content = resources.files(__name__).joinpath(_FILES[name]).read_text(encoding="utf-8")
    return load_document(content, name=name)


def builtin_document(name: str) -> Document | None:
    """The built-in called ``name`` (or aliased so), else None."""
    name = _ALIASES.get(name, name)
    return _load(name) if name in _FILES else None


def builtin_resolver(name: str, version: str) -> Document:
    """A composite-document resolver that knows the built-ins only: for rendering without a
    broker (``zerorun documents render``)."""
    import dataclasses

    from zerorun.documents.model import DocumentError

    doc = builtin_document(name)
    if doc is None:
        raise DocumentError(f"document {name!r} is not a built-in, and only built-ins are known without "
                            f"a broker: 'zerorun send --dry-run' renders with the broker's documents")
    if str(version).strip() not in ("", "$DEFAULT", "$LATEST", "1"):
        raise DocumentError(f"built-in document {doc.name} has only version 1, not {version!r}")
    return dataclasses.replace(doc, version="1")
