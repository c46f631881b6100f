"""Resolves the document a SendCommand names and renders it once, for every invocation alike.

Composite documents (``aws:runDocument`` of an SSMDocument) are expanded here too: the engine
asks ``store`` for every document they name (``resolver``), and ``Rendered.nested`` lists them,
so that the caller can hold each name against the client's policy as it does the top one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zerorun import protocol

from .docstore import DocumentStore
from .errors import BrokerError

if TYPE_CHECKING:
    from zerorun.documents import Document, NestedDocument

DocumentProblem = BrokerError  # (code, message)


@dataclass
class Rendered:
    name: str
    version: str
    sha256: str
    steps: list[protocol.Step]  # what the agents run
    display_steps: list[protocol.Step]  # the same with secret values replaced by ***
    parameters: dict[str, Any]  # validated, defaulted, secrets redacted
    templating: str = "ssm"  # the document's template language: ssm | jinja
    nested: list[NestedDocument] = field(default_factory=list)  # expanded by aws:runDocument steps

    @property
    def nested_names(self) -> list[str]:
        """Every document that aws:runDocument steps run, once each: for the policy check."""
        return list(dict.fromkeys(n.name for n in self.nested))


def resolver(store: DocumentStore) -> Any:
    """The engine's (name, version) -> Document lookup, over the broker's store."""
    from zerorun.documents import DocumentError

    def resolve(name: str, version: str) -> Document:
        try:
            info, doc = store.get(name, version)
        except BrokerError as exc:
            raise DocumentError(str(exc)) from None
        return dataclasses.replace(doc, version=str(info.version))

    return resolve


def prepare(msg: protocol.SendCommand, platform: str, store: DocumentStore) -> Rendered:
    from zerorun import documents as engine  # Jinja and YAML load only in the broker

    try:
        if msg.document_content:
            doc = engine.load_document(msg.document_content, name=msg.document or "local-document")
            version = "$LOCAL"
        else:
            if not msg.document:
                raise DocumentProblem("InvalidDocument", "no document named")
            info, doc = store.get(msg.document, msg.document_version)
            version = str(info.version)
        if msg.document_hash and msg.document_hash.lower() != doc.sha256:
            raise DocumentProblem("DocumentHashMismatch",
                                  f"document {doc.name} v{version} has SHA-256 {doc.sha256},"
                                  f" not {msg.document_hash}")
        rendering = engine.render(doc, msg.parameters, platform=platform,
                                  execution_timeout=msg.execution_timeout, resolver=resolver(store))
    except BrokerError as exc:
        raise DocumentProblem(exc.code if exc.code != "NotFound" else "InvalidDocument", str(exc)) from None
    except engine.ParameterError as exc:
        raise DocumentProblem("InvalidParameters", str(exc)) from None
    except engine.DocumentError as exc:
        raise DocumentProblem("InvalidDocument", str(exc)) from None
    return Rendered(doc.name, version, doc.sha256, rendering.steps, rendering.display_steps,
                    rendering.shown_parameters, rendering.templating, rendering.nested)
