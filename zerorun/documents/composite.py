"""``aws:runDocument`` inputs: which document a step runs, with which parameters, how deep.

Read from aws/amazon-ssm-agent ``agent/plugins/rundocument/rundocument.go`` and
``agent/framework/docparser/docparser.go`` (``ParseDocumentNameAndVersion``) at commit
1c217c89b42d:

* ``documentType`` is required and is ``SSMDocument`` or ``LocalPath``; ``documentPath`` is
  required. ``documentPath: AWS-Noop`` succeeds at once without running anything.
* ``SSMDocument``: ``documentPath`` is a document name, optionally ``name:version``.
* ``documentParameters`` is a map, or a string holding a JSON object, or else a YAML mapping;
  a parameter whose value is null is dropped, so that its default applies.
* Depth: a runDocument step of the command's own document runs at depth 1, one of the document
  it runs at depth 2, and so on; more than 3 (``executeCommandMaxDepth``) fails.

Zerorun expands the named document on the broker when the command is rendered (see render.py),
so every failure here refuses the command with a message naming the step.
"""

from __future__ import annotations

from typing import Any

from zerorun.documents.model import SSM_DOCUMENT, DocumentError

MAX_DEPTH = 3
NOOP_DOCUMENT = "AWS-Noop"
LOCAL_PATH = "LocalPath"
DOCUMENT_TYPES = (SSM_DOCUMENT, LOCAL_PATH)


def check_inputs(document_type: Any, document_path: Any) -> None:
    """amazon-ssm-agent's ``validateInput``, with its rules and clearer words."""
    if not isinstance(document_type, str) or not document_type:
        raise DocumentError("documentType is required: SSMDocument or LocalPath")
    if document_type not in DOCUMENT_TYPES:
        raise DocumentError(f"documentType must be SSMDocument or LocalPath, got {document_type!r}")
    if not isinstance(document_path, str) or not document_path:
        raise DocumentError("documentPath is required")


def check_depth(depth: int) -> None:
    if depth > MAX_DEPTH:
        raise DocumentError(f"documents nest at most {MAX_DEPTH} levels deep (as in SSM); this "
                            f"aws:runDocument step would run one at depth {depth}")


def parse_document_path(path: str) -> tuple[str, str]:
    """``name`` or ``name:version`` -> (name, version; "" for the default version)."""
    if "/" in path:
        raise DocumentError(f"documentPath {path!r}: give a document name, optionally name:version "
                            f"(ARNs and paths are not supported)")
    name, _, version = path.partition(":")
    if not name or ":" in version:
        raise DocumentError(f"documentPath {path!r}: give a document name, optionally name:version")
    return name, version


def parse_document_parameters(value: Any) -> dict[str, Any]:
    """The parameters a runDocument step passes, nulls dropped."""
    if value is None:
        return {}
    if isinstance(value, str):
        parsed = _parse_text(value)
    elif isinstance(value, dict):
        parsed = value
    else:
        raise DocumentError(f"documentParameters must be a mapping or a JSON/YAML string, "
                            f"got {type(value).__name__}")
    if not all(isinstance(key, str) for key in parsed):
        raise DocumentError("documentParameters: every parameter name must be a string")
    return {key: item for key, item in parsed.items() if item is not None}


def _parse_text(text: str) -> dict[str, Any]:
    from zerorun.documents.loader import parse_data

    if not text.strip():
        return {}  # as Go's yaml.Unmarshal of nothing: no parameters
    parsed = parse_data(text, "documentParameters")
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise DocumentError(f"documentParameters is neither a JSON object nor a YAML mapping "
                            f"(it reads as a {type(parsed).__name__}): {text[:80]!r}")
    return parsed
