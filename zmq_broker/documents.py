"""Resolves the document a SendCommand names and renders it once, for every invocation alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zerorun import protocol

from .docstore import DocumentStore
from .errors import BrokerError

DocumentProblem = BrokerError  # (code, message)


@dataclass
class Rendered:
    name: str
    version: str
    sha256: str
    steps: list[protocol.Step]  # what the agents run
    display_steps: list[protocol.Step]  # the same with secret values replaced by ***
    parameters: dict[str, Any]  # validated, defaulted, secrets redacted


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
        steps = engine.render_document(doc, msg.parameters, platform=platform,
                                       execution_timeout=msg.execution_timeout)
        values = engine.coerce_parameters(doc, msg.parameters)
        display = engine.redact_steps(doc, values, steps)
        parameters = engine.redact(doc, values)
    except BrokerError as exc:
        raise DocumentProblem(exc.code if exc.code != "NotFound" else "InvalidDocument", str(exc)) from None
    except engine.ParameterError as exc:
        raise DocumentProblem("InvalidParameters", str(exc)) from None
    except engine.DocumentError as exc:
        raise DocumentProblem("InvalidDocument", str(exc)) from None
    return Rendered(doc.name, version, doc.sha256, steps, display, parameters)
