"""Every public SSM document in tests/data/ssm-documents: supported ones load and render (with
SSM substitution: they are SSM documents), the ones SOURCES.md marks EXPECTED UNSUPPORTED are
refused with a message saying why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zerorun.documents import DocumentError, load_document, render_document

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the shared corpus helper
from ssm_corpus import (COMPOSITE, CORPUS, FILES, UNSUPPORTED, VALUES, first_unrunnable_step,  # noqa: E402
                        read, recorded_sha256, sha256_of, stored_documents_run)

_first_unrunnable_step = first_unrunnable_step


def test_corpus_is_complete():
    assert len(FILES) == 23 and UNSUPPORTED <= set(FILES) and len(UNSUPPORTED) == 8
    assert not set(VALUES) - set(FILES)


def test_document_hash_is_the_file_hash_recorded_in_sources():
    """A document's SHA-256 is that of the file's bytes: CRLF line ends included
    (log4j-custom-inventory.yml has them), so ``sha256sum FILE`` gives the value to pin."""
    recorded = recorded_sha256()
    assert set(recorded) == set(FILES)
    for name in FILES:
        assert sha256_of(name) == recorded[name], name
    for name in sorted(set(FILES) - UNSUPPORTED):
        assert load_document(read(name)).sha256 == recorded[name], name


@pytest.mark.parametrize("name", sorted(set(FILES) - UNSUPPORTED))
def test_supported_document_renders(name):
    doc = load_document((CORPUS / name).read_text(encoding="utf-8"), name=name)
    assert doc.templating == "ssm"
    steps = render_document(doc, VALUES.get(name, {}))
    runnable = [s for s in steps if s.action in ("runShellScript", "runScript")]
    assert runnable and all(s.script.strip() for s in runnable)
    assert all(s.action in ("runShellScript", "runScript") or not s.script for s in steps)
    for step in runnable:  # syntax only (bash -n executes nothing): items joined into one script
        checked = subprocess.run(["bash", "-n"], input=step.script, capture_output=True, text=True)
        assert checked.returncode == 0, f"{step.name}: {checked.stderr}"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED - COMPOSITE))
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


@pytest.mark.parametrize("name", sorted(COMPOSITE))
def test_composite_document_needs_its_documents_and_valid_parameters(name):
    """Refused without a store; with the documents it names stored, refused only for its
    malformed documentParameters (as published: '"documentParameter":{{customDocumentParameter}}}')."""
    text = read(name)
    doc = load_document(text, name=name)
    assert all(step.supported for step in doc.steps)
    (first, _), *_ = runs = stored_documents_run(yaml.safe_load(text))
    with pytest.raises(DocumentError) as err:
        render_document(doc, VALUES.get(name, {}))
    assert str(err.value).startswith(f"step {first!r} (aws:runDocument): ")
    stored = {path: load_document('schemaVersion: "2.2"\nmainSteps: [{action: aws:runShellScript, '
                                  'name: s, inputs: {runCommand: [echo]}}]', name=path) for _, path in runs}
    with pytest.raises(DocumentError) as err:
        render_document(doc, VALUES.get(name, {}), resolver=lambda n, v: stored[n])
    assert str(err.value).startswith(f"step {first!r} (aws:runDocument): documentParameters is neither")


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
