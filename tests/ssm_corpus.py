"""The public SSM document corpus in tests/data/ssm-documents, shared by the unit and integration
corpus tests: file list, the EXPECTED UNSUPPORTED set (read from SOURCES.md), representative
parameter values, and the step a shell-only executor must refuse.

``COMPOSITE``: the EXPECTED UNSUPPORTED documents whose only non-shell steps are
``aws:runDocument`` steps of stored documents (``documentType: SSMDocument``). Zerorun expands
those when the documents they name are stored, so they are refused for another reason: the
named documents are missing, or (the awsdocs sample) its documentParameters are malformed.

Imported by path (``sys.path`` gets this directory), as ``ssm_corpus``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "data" / "ssm-documents"
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name != "SOURCES.md")
SHELL = {"aws:runShellScript", "runShellScript", "runScript"}
RUN_DOCUMENT = "aws:runDocument"

# Representative values, for required parameters only.
VALUES: dict[str, dict[str, object]] = {
    "aws-runshellscript.json": {"commands": ["echo hello", "uname -a"]},
    "awsdocs-downloadcontent-stringmap.yml": {"sourceType": "GitHub", "sourceInfo": {"owner": "me"}},
    "awsdocs-parameter-precondition.yml": {"action": "Uninstall", "confirmed": "True"},
    "awsdocs-rundocument-shared-inputs.yml": {"customDocumentParameter": "x"},
    "chaos-cpu-stress.yml": {"DurationSeconds": "5"},
    "chaos-kill-process.yml": {"ProcessName": "sleep"},
    "chaos-network-latency.yml": {"DurationSeconds": "5"},
    "datadog-install-agent.yaml": {"datadogAPIKey": "0123abcd"},
    "log4j-custom-inventory.yml": {"PowerShellCommands": ["dir"], "ShellCommands": ["echo a", "echo b"]},
    "ssm-agent-logs-to-cloudwatch.json": {"LogLevel": "Info", "EnableCloudWatchUpload": "false"},
    "ssmconverge-run.json": {"Config": "ZWNobyBoaQo="},
}


def read(name: str) -> str:
    """A corpus file's exact text (``newline=""``: CRLF files keep their bytes, and their hash)."""
    with open(CORPUS / name, encoding="utf-8", newline="") as f:
        return f.read()


def expected_unsupported() -> set[str]:
    """File names whose SOURCES.md table row says EXPECTED UNSUPPORTED."""
    names = set()
    for line in (CORPUS / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and re.fullmatch(r"[\w.-]+\.(json|ya?ml)", cells[1]) and "EXPECTED UNSUPPORTED" in line:
            names.add(cells[1])
    return names


def recorded_sha256() -> dict[str, str]:
    """The SHA-256 list at the end of SOURCES.md: file name -> hex digest."""
    text = (CORPUS / "SOURCES.md").read_text(encoding="utf-8")
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64})  (\S+)$", text, re.MULTILINE)}


def sha256_of(name: str) -> str:
    return hashlib.sha256((CORPUS / name).read_bytes()).hexdigest()


def _runs_stored_document(step: dict) -> bool:
    return step["action"] == RUN_DOCUMENT and (step.get("inputs") or {}).get("documentType") == "SSMDocument"


def _unrunnable_steps(data: dict) -> list[tuple[str, str]]:
    """(name, action) of every step that Zerorun cannot run on Linux, in order."""
    if data["schemaVersion"] == "1.2":
        return [(str(config["properties"][0].get("id") or f"0.{plugin}"), plugin)
                for plugin, config in data["runtimeConfig"].items() if plugin not in SHELL]
    found = []
    for step in data["mainSteps"]:
        pre = (step.get("precondition") or {}).get("StringEquals")
        skipped = pre is not None and "platformType" in pre and "Linux" not in pre
        if step["action"] not in SHELL and not skipped and not _runs_stored_document(step):
            found.append((step["name"], step["action"]))
    return found


def first_unrunnable_step(data: dict) -> tuple[str, str]:
    """(name, action) of the first step a Linux shell-only executor must refuse."""
    found = _unrunnable_steps(data)
    if not found:
        raise AssertionError("no unsupported step")
    return found[0]


def stored_documents_run(data: dict) -> list[tuple[str, str]]:
    """(step name, documentPath) of every aws:runDocument step that runs a stored document."""
    return [(step["name"], step["inputs"]["documentPath"]) for step in data.get("mainSteps") or []
            if _runs_stored_document(step)]


def _composite(name: str) -> bool:
    import yaml

    data = yaml.safe_load(read(name))
    return bool(stored_documents_run(data)) and not _unrunnable_steps(data)


UNSUPPORTED = expected_unsupported()
SUPPORTED = sorted(set(FILES) - UNSUPPORTED)
COMPOSITE = {name for name in UNSUPPORTED if _composite(name)}


def uses_parameter_store(text: str) -> bool:
    return re.search(r"\{\{\s*ssm:", text) is not None
