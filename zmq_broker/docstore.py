"""Named, versioned command documents, kept in the broker's store.

Versions count from 1 and are never reused; each keeps its content and SHA-256. ``update`` adds
a version without moving the default (as SSM does) unless asked to. Built-in documents are
resolved by ``get``/``versions`` and listed by ``list`` as read-only version 1. Writes commit at
once (a document change is rare and off the broker's hot path). Version selectors: ``""`` or
``$DEFAULT``, ``$LATEST``, or a number (``"3"`` or ``3``).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Callable

import msgspec

from zerorun.documents import (Document, DocumentError, builtin_document, builtin_names,
                               is_reserved_document_name, load_document, validate_document_name)
from zerorun.documents.model import name_skeleton

from .errors import BrokerError
from .store import DocumentRow, Store

PARSED_CACHE = 256  # parsed document versions kept: a send of a stored document parses nothing
NOT_FOUND, ALREADY_EXISTS, CONFLICT = "NotFound", "AlreadyExists", "Conflict"
INVALID_DOCUMENT, INVALID_VERSION, FORBIDDEN = "InvalidDocument", "InvalidDocumentVersion", "Forbidden"


class DocumentVersionInfo(msgspec.Struct):
    name: str
    version: int
    sha256: str
    created_at: float = 0.0
    created_by: str = ""
    description: str = ""
    document_format: str = "YAML"
    is_default: bool = False
    builtin: bool = False
    content: str = ""  # filled in by get() only


class CheckedDocument(msgspec.Struct):
    """What a render worker found checking a document's text: enough to store it (and to show
    it) without parsing it again in the broker's loop."""

    name: str
    sha256: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # what show lists (parameter_view); None: not known


def parameter_view(doc: Document) -> dict[str, dict[str, Any]]:
    """What ``documents show`` gets of each parameter from the broker (the CLI reads the rest from
    the content)."""
    return {name: {"type": spec.type, "description": spec.description, "required": spec.required,
                   "secret": spec.secret}
            for name, spec in doc.parameters.items()}


class DocumentSummary(msgspec.Struct):
    name: str
    default_version: int
    latest_version: int
    description: str = ""
    sha256: str = ""  # of the default version
    builtin: bool = False


def document_format(content: str) -> str:
    try:
        json.loads(content)
        return "JSON"
    except ValueError:
        return "YAML"


_BUILTIN_FORMATS: dict[str, str] = {}  # built-in document's sha256 -> JSON or YAML


class DocumentStore:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._parsed: OrderedDict[tuple[str, int, str], Document] = OrderedDict()  # parsed once per version
        self.parses = 0  # documents parsed here, in the caller's thread (the broker's loop): ping says it
        self._shown: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()  # (name, sha256): parameter_view

    # -- writes ------------------------------------------------------------------------------

    def create(self, name: str, content: str, created_by: str = "",
               checked: CheckedDocument | None = None) -> DocumentVersionInfo:
        """``checked``: what a render worker found in ``content`` (else it is parsed here)."""
        self._check_writable(name)
        try:
            validate_document_name(name)
        except DocumentError as exc:
            raise BrokerError(INVALID_DOCUMENT, str(exc)) from None
        doc = checked or self._load(name, content)
        if self._store.document_head(name) is not None:
            raise BrokerError(ALREADY_EXISTS, f"document {name} already exists (use update)")
        skeleton = name_skeleton(name)
        like = next((s.name for s in self.list() if name_skeleton(s.name) == skeleton), None)
        if like is not None:
            raise BrokerError(CONFLICT, f"document name {name!r} is too easily mistaken for the existing document "
                                        f"{like!r} (it differs only by case or by look-alike characters)")
        self._store.create_document(self._row(doc, content, 1, created_by), content)
        self._keep_view(name, doc)
        return self._info(name, 1)

    def update(self, name: str, content: str, created_by: str = "", *,
               set_default: bool = False, checked: CheckedDocument | None = None) -> DocumentVersionInfo:
        self._check_writable(name)
        default, last = self._require(name)
        doc = checked or self._load(name, content)
        same = self._store.document_version_with_sha256(name, doc.sha256)
        if same is not None:
            raise BrokerError(CONFLICT, f"document {name}: content is identical to version {same}")
        version = last + 1
        self._store.add_document_version(self._row(doc, content, version, created_by), content,
                                         version if set_default else default)
        self._keep_view(name, doc)
        return self._info(name, version)

    def set_default(self, name: str, version: str | int) -> DocumentVersionInfo:
        self._check_writable(name)
        number = self._resolve(name, version)
        self._store.set_default_document_version(name, number)
        return self._info(name, number)

    def delete(self, name: str, version: str | int | None = None) -> None:
        """The whole document, or (``version`` given) one version that is not the default."""
        self._check_writable(name)
        default, _ = self._require(name)
        if version is None:
            self._store.delete_document(name)
            return
        number = self._resolve(name, version)
        if number == default:
            raise BrokerError(CONFLICT, f"document {name}: version {number} is the default "
                              f"version; set another default or delete the whole document")
        self._store.delete_document(name, number)

    # -- reads -------------------------------------------------------------------------------

    def read(self, name: str, version: str | int = "") -> DocumentVersionInfo:
        """A version with its content, not parsed (a render worker parses what it asks for)."""
        builtin = builtin_document(name)
        if builtin is not None:
            self._builtin_version(builtin, version)
            info = self._builtin_info(builtin)
            info.content = builtin.content
            return info
        info = self._info(name, self._resolve(name, version))
        info.content = self._store.document_content(name, info.version) or ""
        return info

    def get(self, name: str, version: str | int = "") -> tuple[DocumentVersionInfo, Document]:
        info, doc = self.get_if_cheap(name, version, None)
        assert doc is not None
        return info, doc

    def get_if_cheap(self, name: str, version: str | int,
                     parse_at_most: int | None) -> tuple[DocumentVersionInfo, Document | None]:
        """As ``get``; but a version not parsed yet whose text is longer than ``parse_at_most``
        bytes is not parsed here: ``(info, None)``, for a render worker to parse (a send's first
        of a 256 KiB YAML document held the loop for a tenth of a second or more)."""
        builtin = builtin_document(name)
        if builtin is not None:
            return self.read(name, version), builtin
        info = self.read(name, version)
        key = (name, info.version, info.sha256)
        doc = self._parsed.get(key)
        if doc is None and parse_at_most is not None and len(info.content) > parse_at_most:
            return info, None
        if doc is None:
            # checked: it passed load_document when it was stored (in a render worker, under its
            # deadline); this runs in the loop, where an author's slow allowedPattern must not
            self.parses += 1
            try:
                doc = self._parsed[key] = load_document(info.content, name=name, checked=True)
            except DocumentError as exc:  # stored under older, laxer rules
                raise BrokerError(INVALID_DOCUMENT, f"document {name} version {info.version} cannot be "
                                                    f"used: {exc}") from None
            if len(self._parsed) > PARSED_CACHE:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(key)
        return info, doc

    def parameter_view(self, info: DocumentVersionInfo) -> dict[str, dict[str, Any]] | None:
        """``parameter_view`` of a version ``read`` returned, if it is known without parsing (it is
        kept when a version is stored, or when a worker parsed it for show); else None: the
        caller has a render worker parse it (``Renderer.check_stored``) and ``keep_view``s that."""
        builtin = builtin_document(info.name) if info.builtin else None
        if builtin is not None:
            return parameter_view(builtin)
        key = (info.name, info.sha256)
        view = self._shown.get(key)
        if view is None:
            doc = self._parsed.get((info.name, info.version, info.sha256))
            if doc is None:
                return None
            view = self.keep_view(info.name, info.sha256, parameter_view(doc))
        self._shown.move_to_end(key)
        return view

    def keep_view(self, name: str, sha256: str, view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        self._shown[(name, sha256)] = view
        if len(self._shown) > PARSED_CACHE:
            self._shown.popitem(last=False)
        return view

    def _keep_view(self, name: str, doc: Document | CheckedDocument) -> None:
        view = doc.parameters if isinstance(doc, CheckedDocument) else parameter_view(doc)
        if view is not None:
            self.keep_view(name, doc.sha256, view)

    def versions(self, name: str) -> list[DocumentVersionInfo]:
        builtin = builtin_document(name)
        if builtin is not None:
            return [self._builtin_info(builtin)]
        default, _ = self._require(name)
        return [self._row_info(row, default) for row in self._store.document_rows(name)]

    def list(self) -> list[DocumentSummary]:
        summaries = []
        for name in builtin_names():
            doc = builtin_document(name)
            assert doc is not None
            summaries.append(DocumentSummary(name=name, default_version=1, latest_version=1,
                                             description=doc.description, sha256=doc.sha256,
                                             builtin=True))
        summaries += [DocumentSummary(name=row.name, default_version=default, latest_version=latest,
                                      description=row.description, sha256=row.sha256)
                      for row, default, latest in self._store.document_heads()]
        return sorted(summaries, key=lambda s: s.name.lower())

    @staticmethod
    def is_builtin(name: str) -> bool:
        return builtin_document(name) is not None

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_writable(name: str) -> None:
        if is_reserved_document_name(name):
            raise BrokerError(FORBIDDEN, f"document {name} is built in (or uses a reserved "
                              f"name or prefix) and is read-only")

    def _load(self, name: str, content: str) -> Document:
        self.parses += 1
        try:
            return load_document(content, name=name)
        except DocumentError as exc:
            raise BrokerError(INVALID_DOCUMENT, f"document {name}: {exc}") from None

    def _row(self, doc: Document | CheckedDocument, content: str, version: int, created_by: str) -> DocumentRow:
        return DocumentRow(doc.name, version, doc.sha256, self._clock(), created_by, doc.description,
                           document_format(content))

    def _require(self, name: str) -> tuple[int, int]:
        head = self._store.document_head(name)
        if head is None:
            raise BrokerError(NOT_FOUND, f"no document named {name!r}")
        return head

    def _resolve(self, name: str, version: str | int) -> int:
        """A version selector to an existing version number of a stored document."""
        default, _ = self._require(name)
        selector = str(version).strip()
        if selector in ("", "$DEFAULT"):
            return default
        if selector == "$LATEST":
            return self._store.latest_document_version(name)
        # ASCII digits of a 64-bit number: "²" (a digit to isdigit(), not to int()) or 10**20 (no
        # SQLite INTEGER) was an InternalError
        if not (selector.isascii() and selector.isdigit() and int(selector) < 2**63
                and self._store.document_row(name, int(selector)) is not None):
            raise BrokerError(INVALID_VERSION, f"document {name} has no version {version!r}")
        return int(selector)

    def _info(self, name: str, version: int) -> DocumentVersionInfo:
        row = self._store.document_row(name, version)
        assert row is not None
        return self._row_info(row, self._require(name)[0])

    @staticmethod
    def _row_info(row: DocumentRow, default: int) -> DocumentVersionInfo:
        return DocumentVersionInfo(name=row.name, version=row.version, sha256=row.sha256,
                                   created_at=row.created_at, created_by=row.created_by,
                                   description=row.description, document_format=row.document_format,
                                   is_default=row.version == default)

    @staticmethod
    def _builtin_version(doc: Document, version: str | int) -> None:
        if str(version).strip() not in ("", "$DEFAULT", "$LATEST", "1"):
            raise BrokerError(INVALID_VERSION, f"built-in document {doc.name} has only version 1, "
                              f"not {version!r}")

    @staticmethod
    def _builtin_info(doc: Document) -> DocumentVersionInfo:
        fmt = _BUILTIN_FORMATS.get(doc.sha256)
        if fmt is None:  # parsing the content to tell cost 4 % of a 1-instance command's loop time
            fmt = _BUILTIN_FORMATS[doc.sha256] = document_format(doc.content)
        return DocumentVersionInfo(name=doc.name, version=1, sha256=doc.sha256, created_by="zerorun",
                                   description=doc.description, document_format=fmt,
                                   is_default=True, builtin=True)
