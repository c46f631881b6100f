"""Every public SSM document in tests/data/ssm-documents: supported ones load and render,
the ones SOURCES.md marks EXPECTED UNSUPPORTED are refused with a message saying why."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from zerorun.documents import DocumentError, load_document, render_document

CORPUS = Path(__file__).resolve().parents[2] / "data" / "ssm-documents"
FILES = sorted(p.name for p in CORPUS.iterdir() if p.name != "SOURCES.md")
SHELL = {"aws:runShellScript", "runShellScript", "runScript"}

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


def expected_unsupported() -> set[str]:
    """File names whose SOURCES.md table row says EXPECTED UNSUPPORTED."""
    names = set()
    for line in (CORPUS / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and re.fullmatch(r"[\w.-]+\.(json|ya?ml)", cells[1]) and "EXPECTED UNSUPPORTED" in line:
            names.add(cells[1])
    return names


UNSUPPORTED = expected_unsupported()


def _first_unrunnable_step(data: dict) -> tuple[str, str]:
    """(name, action) of the first step a Linux shell-only executor must refuse."""
    if data["schemaVersion"] == "1.2":
        plugin, config = next((k, v) for k, v in data["runtimeConfig"].items() if k not in SHELL)
        return str(config["properties"][0].get("id") or f"0.{plugin}"), plugin
    for step in data["mainSteps"]:
        pre = (step.get("precondition") or {}).get("StringEquals")
        skipped = pre is not None and "platformType" in pre and "Linux" not in pre
        if step["action"] not in SHELL and not skipped:
            return step["name"], step["action"]
    raise AssertionError("no unsupported step")


def test_corpus_is_complete():
    assert len(FILES) == 23 and UNSUPPORTED <= set(FILES) and len(UNSUPPORTED) == 8
    assert not set(VALUES) - set(FILES)


@pytest.mark.parametrize("name", sorted(set(FILES) - UNSUPPORTED))
def test_supported_document_renders(name):
    doc = load_document((CORPUS / name).read_text(encoding="utf-8"), name=name)
    steps = render_document(doc, VALUES.get(name, {}))
    runnable = [s for s in steps if s.action in ("runShellScript", "runScript")]
    assert runnable and all(s.script.strip() for s in runnable)
    assert all(s.action in ("runShellScript", "runScript") or not s.script for s in steps)
    for step in runnable:  # syntax only (bash -n executes nothing): items joined into one script
        checked = subprocess.run(["bash", "-n"], input=step.script, capture_output=True, text=True)
        assert checked.returncode == 0, f"{step.name}: {checked.stderr}"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_document_is_refused_clearly(name):
    text = (CORPUS / name).read_text(encoding="utf-8")
    with pytest.raises(DocumentError) as err:
        render_document(load_document(text, name=name), VALUES.get(name, {}))
    message = str(err.value)
    if re.search(r"\{\{\s*ssm:", text):
        assert "Parameter Store references are not supported" in message
        assert "'commands'" in message
    else:
        step, action = _first_unrunnable_step(yaml.safe_load(text))
        assert repr(step) in message and repr(action) in message


def test_cross_platform_document_skips_windows_step():
    text = (CORPUS / "ssm-agent-logs-to-cloudwatch.json").read_text(encoding="utf-8")
    win, lin = render_document(load_document(text), VALUES["ssm-agent-logs-to-cloudwatch.json"])
    assert win.script == "" and win.precondition.operands == ["platformType", "Windows"]
    assert "ENABLE=false" in lin.script and lin.script.startswith("#!/bin/bash\nset -e\n")


def test_ssm_shapes_from_the_corpus():
    def render(name: str, values: dict | None = None):
        text = (CORPUS / name).read_text(encoding="utf-8")
        return render_document(load_document(text), values if values is not None else VALUES.get(name, {}))

    (step,) = render("aws-runshellscript.json")  # 1.2, scalar "{{ commands }}" StringList
    assert step.name == "0.aws:runShellScript" and step.script == "echo hello\nuname -a"
    assert step.timeout_seconds == 3600 and step.working_directory == ""
    (step,) = render("chaos-kill-process.yml")  # YAML integer timeoutSeconds
    assert step.timeout_seconds == 10 and "killall -SIGTERM 'sleep'" in step.script
    install, stress = render("chaos-cpu-stress.yml")  # onFailure inside inputs
    assert install.on_failure == "exit" and stress.on_failure == ""
    (step,) = render("datadog-install-agent.yaml")
    assert step.working_directory == "/tmp" and step.timeout_seconds == 3600
    first, second = render("awsdocs-parameter-precondition.yml")
    assert first.precondition.operands == ["Uninstall", "Install"]
    assert second.precondition.operands == ["Uninstall True", "Uninstall True"]
    (step,) = render("awsdocs-runshellscript-timeout.yml")
    assert step.script == "echo Hello World" and step.timeout_seconds == 60
    (step,) = render("eks-log-collector.json")
    assert "if [ -f /bin/aws ]; then\necho" in step.script and "s3://Enabled" in step.script
    (step,) = render("cdk-test-params-boolean.yml")
    assert step.script == 'echo "Hello World!"' and step.env["ZERORUN_PARAM_yesOrNo"] == "true"
