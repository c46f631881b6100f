"""Named, versioned command documents in the broker's SQLite database.

Versions count from 1 and are never reused; each keeps its content and SHA-256. ``update`` adds
a version without moving the default (as SSM does) unless asked to. Built-in documents are
resolved by ``get``/``versions`` and listed by ``list`` as read-only version 1. Writes commit at
once (a document change is rare and off the broker's hot path). Version selectors: ``""`` or
``$DEFAULT``, ``$LATEST``, or a number (``"3"`` or ``3``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable

import msgspec

from zerorun.documents import (Document, DocumentError, builtin_document, builtin_names,
                               is_reserved_document_name, load_document, validate_document_name)
from zerorun.sqlite import transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (name TEXT NOT NULL, version INTEGER NOT NULL,
    content TEXT NOT NULL, sha256 TEXT NOT NULL, created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',
    document_format TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS document_heads (name TEXT PRIMARY KEY,
    default_version INTEGER NOT NULL, last_version INTEGER NOT NULL);
"""
_COLUMNS = "name, version, sha256, created_at, created_by, description, document_format"

NOT_FOUND, ALREADY_EXISTS, CONFLICT = "NotFound", "AlreadyExists", "Conflict"
INVALID_DOCUMENT, INVALID_VERSION, FORBIDDEN = "InvalidDocument", "InvalidDocumentVersion", "Forbidden"


class DocumentStoreError(Exception):
    """``code`` is one of the constants above; ``message`` is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class DocumentStore:
    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        db.executescript(SCHEMA)

    # -- writes ------------------------------------------------------------------------------

    def create(self, name: str, content: str, created_by: str = "") -> DocumentVersionInfo:
        self._check_writable(name)
        try:
            validate_document_name(name)
        except DocumentError as exc:
            raise DocumentStoreError(INVALID_DOCUMENT, str(exc)) from None
        doc = self._load(name, content)
        if self._head(name) is not None:
            raise DocumentStoreError(ALREADY_EXISTS, f"document {name} already exists (use update)")
        with transaction(self._db, "IMMEDIATE"):
            self._db.execute("INSERT INTO document_heads VALUES (?, 1, 1)", (name,))
            self._insert(doc, 1, created_by)
        return self._info(name, 1)

    def update(self, name: str, content: str, created_by: str = "", *,
               set_default: bool = False) -> DocumentVersionInfo:
        self._check_writable(name)
        default, last = self._require(name)
        doc = self._load(name, content)
        same = self._db.execute("SELECT version FROM documents WHERE name = ? AND sha256 = ?",
                                (name, doc.sha256)).fetchone()
        if same is not None:
            raise DocumentStoreError(CONFLICT, f"document {name}: content is identical to version {same[0]}")
        version = last + 1
        with transaction(self._db, "IMMEDIATE"):
            self._insert(doc, version, created_by)
            self._db.execute("UPDATE document_heads SET last_version = ?, default_version = ? "
                             "WHERE name = ?", (version, version if set_default else default, name))
        return self._info(name, version)

    def set_default(self, name: str, version: str | int) -> DocumentVersionInfo:
        self._check_writable(name)
        number = self._resolve(name, version)
        self._db.execute("UPDATE document_heads SET default_version = ? WHERE name = ?", (number, name))
        return self._info(name, number)

    def delete(self, name: str, version: str | int | None = None) -> None:
        """The whole document, or (``version`` given) one version that is not the default."""
        self._check_writable(name)
        default, _ = self._require(name)
        if version is None:
            with transaction(self._db, "IMMEDIATE"):
                self._db.execute("DELETE FROM documents WHERE name = ?", (name,))
                self._db.execute("DELETE FROM document_heads WHERE name = ?", (name,))
            return
        number = self._resolve(name, version)
        if number == default:
            raise DocumentStoreError(CONFLICT, f"document {name}: version {number} is the default "
                                     f"version; set another default or delete the whole document")
        self._db.execute("DELETE FROM documents WHERE name = ? AND version = ?", (name, number))

    # -- reads -------------------------------------------------------------------------------

    def get(self, name: str, version: str | int = "") -> tuple[DocumentVersionInfo, Document]:
        builtin = builtin_document(name)
        if builtin is not None:
            self._builtin_version(builtin, version)
            info = self._builtin_info(builtin)
            info.content = builtin.content
            return info, builtin
        info = self._info(name, self._resolve(name, version))
        content = self._db.execute("SELECT content FROM documents WHERE name = ? AND version = ?",
                                   (name, info.version)).fetchone()[0]
        info.content = content
        return info, load_document(content, name=name)

    def versions(self, name: str) -> list[DocumentVersionInfo]:
        builtin = builtin_document(name)
        if builtin is not None:
            return [self._builtin_info(builtin)]
        default, _ = self._require(name)
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM documents WHERE name = ? ORDER BY version",
                                (name,)).fetchall()
        return [self._row_info(row, default) for row in rows]

    def list(self) -> list[DocumentSummary]:
        summaries = []
        for name in builtin_names():
            doc = builtin_document(name)
            assert doc is not None
            summaries.append(DocumentSummary(name=name, default_version=1, latest_version=1,
                                             description=doc.description, sha256=doc.sha256,
                                             builtin=True))
        rows = self._db.execute(
            "SELECT h.name, h.default_version, (SELECT MAX(version) FROM documents v "
            "WHERE v.name = h.name), d.description, d.sha256 FROM document_heads h "
            "JOIN documents d ON d.name = h.name AND d.version = h.default_version").fetchall()
        summaries += [DocumentSummary(name=r[0], default_version=r[1], latest_version=r[2],
                                      description=r[3], sha256=r[4]) for r in rows]
        return sorted(summaries, key=lambda s: s.name.lower())

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _check_writable(name: str) -> None:
        if is_reserved_document_name(name):
            raise DocumentStoreError(FORBIDDEN, f"document {name} is built in (or uses a reserved "
                                     f"name or prefix) and is read-only")

    @staticmethod
    def _load(name: str, content: str) -> Document:
        try:
            return load_document(content, name=name)
        except DocumentError as exc:
            raise DocumentStoreError(INVALID_DOCUMENT, f"document {name}: {exc}") from None

    def _insert(self, doc: Document, version: int, created_by: str) -> None:
        self._db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (doc.name, version, doc.content, doc.sha256, self._clock(), created_by,
                          doc.description, document_format(doc.content)))

    def _head(self, name: str) -> tuple[int, int] | None:
        row = self._db.execute("SELECT default_version, last_version FROM document_heads "
                               "WHERE name = ?", (name,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _require(self, name: str) -> tuple[int, int]:
        head = self._head(name)
        if head is None:
            raise DocumentStoreError(NOT_FOUND, f"no document named {name!r}")
        return head

    def _resolve(self, name: str, version: str | int) -> int:
        """A version selector to an existing version number of a stored document."""
        default, _ = self._require(name)
        selector = str(version).strip()
        if selector in ("", "$DEFAULT"):
            return default
        if selector == "$LATEST":
            return self._db.execute("SELECT MAX(version) FROM documents WHERE name = ?",
                                    (name,)).fetchone()[0]
        exists = selector.isdigit() and self._db.execute(
            "SELECT 1 FROM documents WHERE name = ? AND version = ?", (name, int(selector))).fetchone()
        if not exists:
            raise DocumentStoreError(INVALID_VERSION, f"document {name} has no version {version!r}")
        return int(selector)

    def _info(self, name: str, version: int) -> DocumentVersionInfo:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM documents WHERE name = ? AND version = ?",
                               (name, version)).fetchone()
        return self._row_info(row, self._require(name)[0])

    @staticmethod
    def _row_info(row: tuple, default: int) -> DocumentVersionInfo:
        return DocumentVersionInfo(name=row[0], version=row[1], sha256=row[2], created_at=row[3],
                                   created_by=row[4], description=row[5], document_format=row[6],
                                   is_default=row[1] == default)

    @staticmethod
    def _builtin_version(doc: Document, version: str | int) -> None:
        if str(version).strip() not in ("", "$DEFAULT", "$LATEST", "1"):
            raise DocumentStoreError(INVALID_VERSION, f"built-in document {doc.name} has only version 1, "
                                     f"not {version!r}")

    @staticmethod
    def _builtin_info(doc: Document) -> DocumentVersionInfo:
        return DocumentVersionInfo(name=doc.name, version=1, sha256=doc.sha256, created_by="zerorun",
                                   description=doc.description, document_format=document_format(doc.content),
                                   is_default=True, builtin=True)
