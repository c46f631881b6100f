"""Zerorun command documents: SSM-compatible, typed, hashed, rendered once on the broker.

``load_document`` parses and validates text; ``render`` checks parameter values and produces the
``protocol.Step`` list an agent runs (``render_document``: the steps alone), expanding composite
documents through a resolver. SSM documents render with amazon-ssm-agent's own substitution,
Zerorun-native ones may ask for sandboxed Jinja2 (``templating.py``). YAML and Jinja2 are
imported on first use, so importing this package stays cheap.
"""

from zerorun.documents.builtin import builtin_document, builtin_names, builtin_resolver
from zerorun.documents.loader import load_document
from zerorun.documents.model import (MISSING, Document, DocumentError, ParameterError,
                                     ParameterSpec, is_reserved_document_name,
                                     validate_document_name)
from zerorun.documents.params import coerce_parameters, redact
from zerorun.documents.redaction import redact_steps
from zerorun.documents.render import NestedDocument, Rendering, Resolver, render, render_document
from zerorun.documents.templating import DESCRIPTIONS as TEMPLATING_DESCRIPTIONS

__all__ = [
    "MISSING", "TEMPLATING_DESCRIPTIONS", "Document", "DocumentError", "NestedDocument",
    "ParameterError", "ParameterSpec", "Rendering", "Resolver", "builtin_document",
    "builtin_names", "builtin_resolver", "coerce_parameters", "is_reserved_document_name", "load_document", "redact",
    "redact_steps", "render", "render_document", "validate_document_name",
]
