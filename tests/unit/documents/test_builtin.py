"""Built-in documents."""

from __future__ import annotations

import pytest

from zerorun.documents import ParameterError, builtin_document, builtin_names, render_document


def test_names_and_alias():
    assert builtin_names() == ["GetInstanceInfo", "RunPythonScript", "RunShellScript", "UpdateAgent"]
    assert builtin_document("AWS-RunShellScript") is builtin_document("RunShellScript")
    assert builtin_document("NoSuchDoc") is None


def test_run_shell_script_contract():
    doc = builtin_document("RunShellScript")
    assert list(doc.parameters) == ["commands", "workingDirectory", "executionTimeout"]
    (step,) = render_document(doc, {"commands": ["cd /", "ls"], "workingDirectory": "/tmp",
                                    "executionTimeout": "120"})
    assert step.action == "runShellScript" and step.script == "cd /\nls"
    assert step.working_directory == "/tmp" and step.timeout_seconds == 120
    assert render_document(doc, {"commands": "ls"})[0].timeout_seconds == 3600
    for bad in ("0", "172801", "1h"):
        with pytest.raises(ParameterError, match="executionTimeout"):
            render_document(doc, {"commands": "ls", "executionTimeout": bad})
    with pytest.raises(ParameterError, match="commands"):
        render_document(doc, {})


def test_run_python_script():
    (step,) = render_document(builtin_document("RunPythonScript"), {"commands": ["import sys", "print(1)"]})
    assert step.action == "runScript" and step.interpreter == ["python3"]
    assert step.script == "import sys\nprint(1)"


def test_get_instance_info():
    (step,) = render_document(builtin_document("GetInstanceInfo"), {})
    assert "uname -a" in step.script and "/etc/os-release" in step.script and "hostname" in step.script
