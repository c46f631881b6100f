"""Resolves the document a SendCommand names and renders it once, for every invocation alike.

Composite documents (``aws:runDocument`` of an SSMDocument) are expanded here too: the engine
asks a resolver for every document they name, and ``Rendered.nested`` lists them, so that the
caller can hold each name against the client's policy as it does the top one.

What rendering may produce is bounded (``RenderLimits``): a step's script and a whole command
have byte caps, checked on every rendering. Whether a rendering may run inside the broker's loop
(``may_render_inline``) or must go to a render worker (``rendering.py``) is decided here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec

from zerorun import protocol
from zerorun.documents import Document, NestedDocument

from .docstore import DocumentStore
from .errors import BrokerError

Resolver = Callable[[str, str], Document]

MAX_DOCUMENT_BYTES = 256 * 1024
"""Document text a client may send or store (SSM allows 64 KB): parsing stays cheap."""


@dataclass
class RenderLimits:
    max_step_bytes: int = 1024 * 1024  # one step's script, once rendered
    max_command_bytes: int = 8 * 1024 * 1024  # every step of a command, once rendered (scripts, env, directories, interpreters)


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
    size: int = 0  # bytes of the rendered steps (scripts and environment)

    def copy(self) -> "Rendered":
        """A shallow copy, a tenth of ``dataclasses.replace`` (which runs ``__init__``)."""
        new = object.__new__(Rendered)
        new.__dict__.update(self.__dict__)
        return new

    @property
    def nested_names(self) -> list[str]:
        """Every document that aws:runDocument steps run, once each: for the policy check."""
        return list(dict.fromkeys(n.name for n in self.nested))


def store_resolver(store: DocumentStore) -> Resolver:
    """The engine's (name, version) -> Document lookup, over the broker's store."""
    from zerorun.documents import DocumentError

    def resolve(name: str, version: str) -> Document:
        try:
            info, doc = store.get(name, version)
        except BrokerError as exc:
            raise DocumentError(str(exc)) from None
        return dataclasses.replace(doc, version=str(info.version))

    return resolve


def check_content(content: str) -> None:
    size = len(content.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise BrokerError("InvalidDocument", f"the document is {size} bytes, more than the {MAX_DOCUMENT_BYTES} "
                                             "a document may have")


def load_local(msg: protocol.SendCommand) -> tuple[Document, str]:
    """The document a client sent with its command (``send --document-file``)."""
    from zerorun import documents as engine

    check_content(msg.document_content)
    try:
        return engine.load_document(msg.document_content, name=msg.document or "local-document"), "$LOCAL"
    except engine.DocumentError as exc:
        raise BrokerError("InvalidDocument", str(exc)) from None


def load_named(msg: protocol.SendCommand, store: DocumentStore) -> tuple[Document, str]:
    """The stored or built-in document a command names."""
    doc, version = load_named_if_cheap(msg, store, None)
    assert doc is not None
    return doc, version


def load_named_if_cheap(msg: protocol.SendCommand, store: DocumentStore,
                        parse_at_most: int | None) -> tuple[Document | None, str]:
    """As ``load_named``; None instead of a document that would have to be parsed from a text
    longer than ``parse_at_most`` (``DocumentStore.get_if_cheap``)."""
    if not msg.document:
        raise BrokerError("InvalidDocument", "no document named")
    try:
        info, doc = store.get_if_cheap(msg.document, msg.document_version, parse_at_most)
    except BrokerError as exc:
        raise BrokerError(exc.code if exc.code != "NotFound" else "InvalidDocument", exc.message) from None
    return doc, str(info.version)


def may_render_inline(doc: Document, msg: protocol.SendCommand, limits: RenderLimits) -> bool:
    """Whether rendering this document cannot take long or grow large, so that the loop may do it:
    SSM substitution (linear, no code), no nested documents, and an output bound within the caps.
    Every parameter value is at most the JSON of all of them, the defaults of those not given
    included; each ``{{`` and each step's environment can hold one such value, and each step's
    environment holds every parameter's variable names too."""
    from zerorun.documents.model import RUN_DOCUMENT
    from zerorun.documents.params import ENV_PREFIX

    if doc.templating != "ssm" or any(step.action == RUN_DOCUMENT for step in doc.steps):
        return False
    values = len(msgspec.json.encode(msg.parameters)) + sum(
        len(msgspec.json.encode(spec.default)) for name, spec in doc.parameters.items()
        if not spec.required and msg.parameters.get(name) is None)  # null: not given, the default applies
    names = sum(2 * (len(ENV_PREFIX) + len(name)) for name in doc.parameters)  # ZERORUN_PARAM_x, SSM_x
    bound = (len(doc.content) + (doc.content.count("{{") + 2 * len(doc.steps) + 1) * 2 * values
             + len(doc.steps) * names)
    return bound <= limits.max_command_bytes


def render(doc: Document, version: str, msg: protocol.SendCommand, platform: str, resolve: Resolver | None,
           limits: RenderLimits) -> Rendered:
    from zerorun import documents as engine

    if msg.document_hash and msg.document_hash.lower() != doc.sha256:
        raise BrokerError("DocumentHashMismatch", f"document {doc.name} v{version} has SHA-256 {doc.sha256},"
                                                  f" not {msg.document_hash}")
    try:
        rendering = engine.render(doc, msg.parameters, platform=platform,
                                  execution_timeout=msg.execution_timeout, resolver=resolve)
    except engine.ParameterError as exc:
        raise BrokerError("InvalidParameters", str(exc)) from None
    except engine.DocumentError as exc:
        raise BrokerError("InvalidDocument", str(exc)) from None
    size = check_size(rendering.steps, limits)
    return Rendered(doc.name, version, doc.sha256, rendering.steps, rendering.display_steps,
                    rendering.shown_parameters, rendering.templating, rendering.nested, size)


def check_size(steps: list[protocol.Step], limits: RenderLimits) -> int:
    """The rendered steps' size; RenderTooLarge naming the cap when a step or the whole is over it."""
    total = 0
    for step in steps:
        script = len(step.script.encode("utf-8", "surrogatepass"))
        if script > limits.max_step_bytes:
            raise BrokerError("RenderTooLarge", f"step {step.name!r} renders to {script} bytes, over the limit of "
                                                f"{limits.max_step_bytes} per step (--max-step-bytes)")
        total += script + sum(len(k) + len(v.encode("utf-8", "surrogatepass")) for k, v in step.env.items())
        if step.working_directory or step.interpreter:  # parameters may render into these too
            total += len(step.working_directory.encode("utf-8", "surrogatepass")) + sum(
                len(arg.encode("utf-8", "surrogatepass")) for arg in step.interpreter)
    if total > limits.max_command_bytes:
        raise BrokerError("RenderTooLarge", f"the command renders to {total} bytes, over the limit of "
                                            f"{limits.max_command_bytes} per command (--max-command-bytes)")
    return total


def prepare(msg: protocol.SendCommand, platform: str, store: DocumentStore,
            limits: RenderLimits | None = None) -> Rendered:
    """Loads and renders in one call, in this process (tests and tools; the broker's loop uses
    ``rendering.Renderer``, which keeps untrusted work off the loop)."""
    doc, version = load_local(msg) if msg.document_content else load_named(msg, store)
    return render(doc, version, msg, platform, store_resolver(store), limits or RenderLimits())
