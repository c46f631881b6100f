"""Zerorun command documents: SSM-compatible, typed, hashed, rendered with sandboxed Jinja2.

``load_document`` parses and validates text; ``render_document`` checks parameter values and
produces the ``protocol.Step`` list an agent runs. YAML and Jinja2 are imported on first use,
so importing this package stays cheap.
"""

from zerorun.documents.builtin import builtin_document, builtin_names
from zerorun.documents.loader import load_document
from zerorun.documents.model import (MISSING, Document, DocumentError, ParameterError,
                                     ParameterSpec, is_reserved_document_name,
                                     validate_document_name)
from zerorun.documents.params import coerce_parameters, redact
from zerorun.documents.redaction import redact_steps
from zerorun.documents.render import render_document

__all__ = [
    "MISSING", "Document", "DocumentError", "ParameterError", "ParameterSpec",
    "builtin_document", "builtin_names", "coerce_parameters", "is_reserved_document_name",
    "load_document", "redact", "redact_steps", "render_document", "validate_document_name",
]
