"""Which template language a document uses, and what each one does with real-world text."""

from __future__ import annotations

import json
import subprocess

import pytest

from zerorun.documents import (DocumentError, ParameterError, builtin_document, coerce_parameters,
                               load_document, render, render_document)


def _doc(*lines: str, params: str = "", action: str = "aws:runShellScript", marker: str = "",
         inputs: str = "") -> str:
    body = "".join(f"        - {json.dumps(line)}\n" for line in lines)
    key = "script" if action == "runScript" else "runCommand"
    return (f'schemaVersion: "2.2"\n{marker}parameters:\n{params or "  {}"}\nmainSteps:\n'
            f"  - action: {action}\n    name: s\n    inputs:\n{inputs}      {key}:\n{body}")


def _script(text: str, values: dict | None = None) -> str:
    return render_document(load_document(text), values or {})[0].script


@pytest.mark.parametrize("text,language", [
    (_doc("true"), "ssm"),
    (_doc("true", marker="templating: jinja\n"), "jinja"),
    (_doc("true", marker="templating: ssm\n"), "ssm"),
    (_doc("print(1)", action="runScript", inputs="      interpreter: python3\n"), "jinja"),
    (_doc("print(1)", action="runScript", inputs="      interpreter: python3\n", marker="templating: ssm\n"),
     "ssm"),
])
def test_language_choice(text, language):
    doc = load_document(text)
    assert doc.templating == language
    assert render(doc, {}).templating == language


def test_unknown_marker_is_refused():
    with pytest.raises(DocumentError, match="templating must be ssm or jinja, got 'mustache'"):
        load_document(_doc("true", marker="templating: mustache\n"))


def test_builtin_languages():
    assert {name: builtin_document(name).templating for name in
            ("RunShellScript", "GetInstanceInfo", "RunPythonScript")} == {
        "RunShellScript": "ssm", "GetInstanceInfo": "ssm", "RunPythonScript": "jinja"}


# -- SSM documents: every character that is not a declared token runs as written ---------------

LITERAL_LINES = [
    "docker ps --format '{{.Names}}'",
    "docker inspect -f '{{ .State.Running }}' web",
    "kubectl get pods -o go-template='{{range .items}}{{.metadata.name}}{{\"\\n\"}}{{end}}'",
    "helm template x --set a='{{ .Values.x | quote }}'",
    "echo 'Hello {{name}}' > mustache.tpl",
    "echo '${{ github.sha }}'",
    "echo '{% raw %}{{ x'",
    "echo {{ undeclared }}",
]


def test_literal_braces_run_as_written():
    text = _doc(*LITERAL_LINES, "echo {{ who }}", params="  who: {type: String}")
    assert _script(text, {"who": "me"}) == "\n".join([*LITERAL_LINES, "echo me"])


def test_literal_braces_in_a_real_shell():
    text = _doc("x='{{.Names}}'; y='${{ a }}'; printf '%s|%s|%s\\n' \"$x\" \"$y\" {{ a }}",
                params="  a: {type: String}")
    out = subprocess.run(["sh", "-c", _script(text, {"a": "v"})], capture_output=True, text=True, check=True)
    assert out.stdout == "{{.Names}}|$v|v\n"


def test_double_dollar_in_a_value_inside_a_longer_string():
    text = _doc("{{ cmd }}", "echo {{ cmd }}", params="  cmd: {type: String}")
    assert _script(text, {"cmd": "echo $$HOME"}).splitlines() == ["echo $$HOME", "echo echo $HOME"]


def test_exact_token_followed_by_a_newline_is_text():
    """A YAML block scalar ends with a newline, so SSM substitutes it as text (JSON for a list)."""
    text = ('schemaVersion: "2.2"\nparameters: {c: {type: StringList}}\nmainSteps:\n'
            "  - action: aws:runShellScript\n    name: s\n    inputs:\n      runCommand: |\n"
            "        {{ c }}\n")
    assert _script(text, {"c": ["a", "b"]}) == '["a","b"]\n'


@pytest.mark.parametrize("line,snippet", [
    ("echo {{ s | quote }}", "{{ s | quote }}"),
    ("echo {{s|quote}}", "{{s|quote}}"),
    ("echo {{ m.key }}", "{{ m.key }}"),
    ("echo {{ m['key'] }}", "{{ m['key'] }}"),
    ("{% if s %}echo{% endif %}", "{% if s %}"),
    ("{% for x in m %}{{ x }}{% endfor %}", "{% for x in m %}"),
])
def test_jinja_syntax_on_declared_parameters_needs_the_marker(line, snippet):
    params = "  s: {type: String}\n  m: {type: StringMap}"
    with pytest.raises(DocumentError) as err:
        load_document(_doc(line, params=params))
    message = str(err.value)
    assert snippet in message and "templating: jinja" in message and "step 's'" in message
    load_document(_doc(line, params=params, marker="templating: jinja\n"))  # fine with the marker


@pytest.mark.parametrize("line", [
    "echo {{ .Values.s | quote }}", "echo {{ other | quote }}", "{% if other %}", "{{ s }}.{{ s }}",
    "echo {{ s }} | tr a b",
])
def test_jinja_looking_text_without_declared_parameters_is_literal(line):
    text = _doc(line, params="  s: {type: String}")
    assert _script(text, {"s": "v"}) == line.replace("{{ s }}", "v")


def test_values_are_data_in_both_languages():
    for marker in ("", "templating: jinja\n"):
        text = _doc("echo {{ s }}", params="  s: {type: String}", marker=marker)
        assert _script(text, {"s": "{{ 7 * 7 }} {{ s }} $$"}) == "echo {{ 7 * 7 }} {{ s }} " + (
            "$" if not marker else "$$")


def test_env_var_interpolation_in_ssm_documents(tmp_path):
    evil = f"$(touch {tmp_path}/pwned)"
    text = _doc("echo {{ v }}", params="  v: {type: String, interpolationType: ENV_VAR}")
    step = render_document(load_document(text), {"v": evil})[0]
    assert step.script == 'echo "${ZERORUN_PARAM_v}"'
    out = subprocess.run(["sh", "-c", step.script], env=step.env, capture_output=True, text=True)
    assert out.stdout == evil + "\n" and not (tmp_path / "pwned").exists()


# -- Jinja documents ---------------------------------------------------------------------------

def test_jinja_documents_keep_strict_names_and_explain_literal_braces():
    with pytest.raises(DocumentError, match="undeclared parameter 'nope'"):
        load_document(_doc("echo {{ nope }}", marker="templating: jinja\n"))
    with pytest.raises(DocumentError) as err:
        load_document(_doc("docker ps --format '{{.Names}}'", marker="templating: jinja\n"))
    assert "templating: ssm" in str(err.value) and "{{ '{{' }}" in str(err.value)


def test_run_script_with_literal_braces_uses_templating_ssm():
    text = _doc('d = {"a": 1}; print(f"{{d}}", d)', action="runScript",
                inputs="      interpreter: python3\n", marker="templating: ssm\n")
    step = render_document(load_document(text), {})[0]
    out = subprocess.run([*step.interpreter, "-c", step.script], capture_output=True, text=True, check=True)
    assert out.stdout == "{d} {'a': 1}\n"


# -- "default": null ---------------------------------------------------------------------------

def test_null_default_is_no_default():
    for declaration in ('{type: String, default: null}', '{type: String, default: ~}',
                        '{"type": "String", "default": null}'):
        doc = load_document(_doc("echo {{ p }}", params=f"  p: {declaration}"))
        assert doc.parameters["p"].required
        with pytest.raises(ParameterError) as err:
            coerce_parameters(doc, {})
        assert str(err.value) == "parameter 'p' (String) is required and has no default"
        assert _script(doc.content, {"p": "given"}) == "echo given"


def test_null_value_means_not_given():
    doc = load_document(_doc("echo {{ p }}", params="  p: {type: String, default: dflt}"))
    assert coerce_parameters(doc, {"p": None}) == {"p": "dflt"}


@pytest.mark.parametrize("name", ["none", "None", "true", "True", "false", "False", "self", "loop"])
def test_a_jinja_document_cannot_name_a_parameter_as_jinja_names_its_own(name):
    """In Jinja ``none``/``true``/``false`` (any of their spellings) are literals and ``self`` and
    ``loop`` are Jinja's objects: ``echo {{ none }} x`` rendered ``echo  x`` and ``{{ self }}``
    a TemplateReference whatever the operator passed, while a bare ``{{ none }}`` got the value."""
    params = f"  '{name}':\n    type: String\n    default: VALUE\n"
    with pytest.raises(DocumentError, match=f"parameter '{name}'.*Jinja.*rename"):
        load_document(_doc(f"echo {{{{ {name} }}}} x", params=params, marker="templating: jinja\n"))
    # SSM substitution is text: the same name is an ordinary parameter there
    assert _script(_doc(f"echo {{{{ {name} }}}} x", params=params)) == "echo VALUE x"
