"""Rendering: SSM substitution semantics, Jinja safety, steps, env, preconditions."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from zerorun.documents import DocumentError, load_document, render_document


def _doc(params: str, inputs: str, action: str = "runShellScript", extra: str = "",
         templating: str = "") -> object:
    marker = f"templating: {templating}" if templating else ""
    return load_document(f"""
schemaVersion: "2.2"
{marker}
parameters:
{params}
mainSteps:
  - action: {action}
    name: s
{extra}    inputs:
{inputs}
""")


def _script(params: str, run_command: str, values: dict, templating: str = "") -> str:
    doc = _doc(params, f"      runCommand: {run_command}", templating=templating)
    return render_document(doc, values)[0].script


LIST = "  c: {type: StringList}"


def test_list_item_that_is_exactly_a_stringlist_is_flattened():
    script = _script(LIST, '["echo start", "{{ c }}", "{{c}}", "echo end"]', {"c": ["a", "b"]})
    assert script == "echo start\na\nb\na\nb\necho end"


def test_scalar_runcommand_that_is_a_stringlist():
    assert _script(LIST, '"{{ commands }}"'.replace("commands", "c"), {"c": ["x", "y"]}) == "x\ny"


def test_stringlist_inside_a_longer_string_renders_as_ssm_json():
    script = _script(LIST, '["echo {{ c }}"]', {"c": ["a b", "it's <&>"]})
    assert script == 'echo ["a b","it\'s \\u003c\\u0026\\u003e"]'


def test_integer_boolean_map_render_like_ssm():
    params = "  n: {type: Integer}\n  b: {type: Boolean}\n  m: {type: StringMap}"
    script = _script(params, '["{{ n }} {{ b }} {{ m }}", "{{ b }}"]', {"n": 3, "b": True, "m": {"k": "v"}})
    assert script == '3 true {"k":"v"}\ntrue'


def test_strict_undefined_names_the_missing_name():
    doc = _doc("  m: {type: StringMap}", '      runCommand: ["echo {{ m.nokey }}"]', templating="jinja")
    with pytest.raises(DocumentError) as err:
        render_document(doc, {"m": {"k": "v"}})
    assert "nokey" in str(err.value) and "step 's'" in str(err.value)


def test_strict_undefined_through_the_quote_filter():
    doc = _doc("  m: {type: StringMap}", '      runCommand: ["echo {{ m.nokey | quote }}"]', templating="jinja")
    with pytest.raises(DocumentError, match="nokey"):
        render_document(doc, {"m": {}})


def test_sandbox_blocks_python_internals():
    doc = _doc("  s: {type: String}", "      runCommand: [\"{{ s.__class__.__mro__ }}\"]", templating="jinja")
    with pytest.raises(DocumentError, match="step 's'"):
        render_document(doc, {"s": "x"})


def test_quote_filter_defeats_injection(tmp_path):
    evil = "'; touch " + str(tmp_path / "pwned") + " #"
    script = _script("  s: {type: String}", '["echo {{ s | quote }}"]', {"s": evil}, "jinja")
    assert script == "echo " + shlex.quote(evil)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == evil + "\n" and not (tmp_path / "pwned").exists()
    rm = "'; rm -rf / #"
    quoted = _script("  s: {type: String}", '["echo {{ s | quote }}"]', {"s": rm}, "jinja")
    assert quoted == "echo ''\"'\"'; rm -rf / #'"


def test_quote_filter_on_a_list():
    script = _script(LIST, '["printf \'%s\\n\' {{ c | quote }}"]', {"c": ["a b", "$(id)", "x"]}, "jinja")
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "a b\n$(id)\nx\n"


def test_shell_text_that_looks_like_jinja_passes_through():
    lines = ['x=(1 2 3); echo ${#x[@]} {{ s }}', 'echo "${#}" {#notacomment#}', "awk '{ print $1 }' f"]
    script = _script("  s: {type: String}", json.dumps(lines), {"s": "v"})
    assert script == "\n".join(lines).replace("{{ s }}", "v")
    ran = subprocess.run(["bash", "-c", script.splitlines()[0]], capture_output=True, text=True)
    assert ran.stdout == "3 v\n"


def test_untemplated_strings_are_byte_for_byte():
    text = "printf 'a\\r\\n' # {% raw"
    doc = load_document(json.dumps({"schemaVersion": "2.2", "mainSteps": [
        {"action": "runShellScript", "name": "a", "inputs": {"runCommand": ["x\r\ny", "#!/bin/bash\n"]}}]}))
    assert render_document(doc, {})[0].script == "x\r\ny\n#!/bin/bash\n"
    assert "{% raw" in text  # a lone "{%" would be a syntax error, so untemplated docs must avoid it


def test_block_scalar_keeps_its_trailing_newline():
    doc = load_document('schemaVersion: "2.2"\nparameters: {s: {type: String}}\nmainSteps:\n'
                        '  - action: runShellScript\n    name: a\n    inputs:\n      runCommand:\n'
                        '        - |\n          #!/bin/bash\n          echo {{ s }}\n')
    assert render_document(doc, {"s": "v"})[0].script == "#!/bin/bash\necho v\n"


def test_env_exports_every_parameter():
    params = ("  s: {type: String}\n  n: {type: Integer}\n  b: {type: Boolean}\n"
              "  l: {type: StringList}\n  m: {type: StringMap}")
    doc = _doc(params, '      runCommand: ["true"]')
    step = render_document(doc, {"s": "a\nb", "n": 4, "b": False, "l": ["x", "y\nz"], "m": {"k": 1}})[0]
    assert step.env == {"ZERORUN_PARAM_s": "a\nb", "ZERORUN_PARAM_n": "4", "ZERORUN_PARAM_b": "false",
                        "ZERORUN_PARAM_l": '["x","y\\nz"]', "ZERORUN_PARAM_m": '{"k":1}'}
    assert json.loads(step.env["ZERORUN_PARAM_l"]) == ["x", "y\nz"]


def test_env_var_interpolation_is_a_variable_reference(tmp_path):
    evil = "$(touch " + str(tmp_path / "pwned") + "); echo 'x' \"y\""
    doc = _doc("  msg: {type: String, interpolationType: ENV_VAR}",
               '      runCommand: ["echo {{ msg }}", "echo {{ msg | quote }}", "printf %s \\"$SSM_msg\\""]',
               templating="jinja")
    step = render_document(doc, {"msg": evil})[0]
    assert step.script.splitlines()[:2] == ['echo "${ZERORUN_PARAM_msg}"'] * 2
    assert step.env["ZERORUN_PARAM_msg"] == evil and step.env["SSM_msg"] == evil
    out = subprocess.run(["sh", "-c", step.script], env=step.env, capture_output=True, text=True).stdout
    assert out == f"{evil}\n{evil}\n{evil}" and not (tmp_path / "pwned").exists()


def test_env_var_interpolation_in_run_script_gives_the_variable_name():
    doc = _doc("  msg: {type: String, interpolationType: ENV_VAR}",
               "      interpreter: python3\n      script: [\"import os\", \"print(os.environ['{{ msg }}'])\"]",
               action="runScript")
    step = render_document(doc, {"msg": "hi"})[0]
    assert step.script == "import os\nprint(os.environ['ZERORUN_PARAM_msg'])"
    out = subprocess.run([*step.interpreter, "-c", step.script], env=step.env, capture_output=True, text=True)
    assert out.stdout == "hi\n"


def test_env_var_parameters_are_values_outside_the_script():
    """workingDirectory, timeoutSeconds and interpreter are not shell text: a ``"${VAR}"`` there
    would be a directory named ``"${ZERORUN_PARAM_d}"``, so ENV_VAR parameters render as values."""
    doc = _doc("  d: {type: String, interpolationType: ENV_VAR}\n"
               "  t: {type: String, interpolationType: ENV_VAR}\n"
               "  i: {type: String, interpolationType: ENV_VAR}",
               "      interpreter: '{{ i }} -u'\n      script: \"print(1) # {{ d }}\"\n"
               "      workingDirectory: '{{ d }}'\n      timeoutSeconds: '{{ t }}'", action="runScript")
    step = render_document(doc, {"d": "/tmp", "t": "42", "i": "python3"})[0]
    assert (step.working_directory, step.timeout_seconds, step.interpreter) == ("/tmp", 42, ["python3", "-u"])
    assert step.script == "print(1) # ZERORUN_PARAM_d"


def test_run_script_step():
    doc = _doc("  d: {type: String, default: /tmp}",
               "      interpreter: [python3, -u]\n      script: \"print({{ 'x' | quote }})\"\n"
               "      workingDirectory: '{{ d }}'\n      timeoutSeconds: 30", action="runScript")
    step = render_document(doc, {})[0]
    assert (step.action, step.interpreter, step.script) == ("runScript", ["python3", "-u"], "print(x)")
    assert step.working_directory == "/tmp" and step.timeout_seconds == 30


@pytest.mark.parametrize("raw,expected", [
    ("45", 45), (45, 45), ("'45'", 45), (0, 3600), ("'0'", 3600), (172800, 172800), (172801, 3600),
    ("'abc'", 3600), ("-5", 3600), ("true", 3600), ("'{{ t }}'", 99),
    ("'\u00b2'", 3600), ("'\u0663'", 3600), ("'" + "9" * 5000 + "'", 3600), ("'000000000000045'", 45),
])
def test_timeout_seconds(raw, expected):
    doc = _doc("  t: {type: String, default: '99'}", f"      runCommand: [x]\n      timeoutSeconds: {raw}")
    assert render_document(doc, {})[0].timeout_seconds == expected


@pytest.mark.parametrize("given", ["\u00b2", "\u0663", "9" * 5000, " 7 x"])
def test_timeout_seconds_from_a_parameter_that_is_no_number(given):
    """The runner's text in ``timeoutSeconds: '{{ t }}'``: SSM's default, never int()'s ValueError."""
    doc = _doc("  t: {type: String, default: '99'}", "      runCommand: [x]\n      timeoutSeconds: '{{ t }}'")
    assert render_document(doc, {"t": given})[0].timeout_seconds == 3600


def test_execution_timeout_overrides_every_step():
    doc = load_document('schemaVersion: "2.2"\nmainSteps:\n'
                        '  - {action: runShellScript, name: a, inputs: {runCommand: [x], timeoutSeconds: 5}}\n'
                        '  - {action: runShellScript, name: b, inputs: {runCommand: [x]}}')
    assert [s.timeout_seconds for s in render_document(doc, {}, execution_timeout=77)] == [77, 77]
    assert [s.timeout_seconds for s in render_document(doc, {})] == [5, 3600]


CROSS = """
schemaVersion: "2.2"
mainSteps:
  - action: aws:runPowerShellScript
    name: win
    precondition: {StringEquals: [platformType, Windows]}
    inputs: {runCommand: [dir]}
  - action: aws:runShellScript
    name: lin
    precondition: {StringEquals: [platformType, Linux]}
    inputs: {runCommand: [ls]}
"""


def test_unsupported_step_tolerated_when_its_precondition_skips_it():
    win, lin = render_document(load_document(CROSS), {})
    assert (win.name, win.action, win.script) == ("win", "aws:runPowerShellScript", "")
    assert win.precondition.op == "StringEquals" and win.precondition.operands == ["platformType", "Windows"]
    assert lin.action == "runShellScript" and lin.precondition.operands == ["platformType", "Linux"]


def test_unsupported_step_rejected_when_its_precondition_holds():
    with pytest.raises(DocumentError) as err:
        render_document(load_document(CROSS), {}, platform="Windows")
    assert "'win'" in str(err.value) and "aws:runPowerShellScript" in str(err.value)


def test_unsupported_step_without_precondition_rejected():
    doc = load_document('schemaVersion: "2.2"\nmainSteps:\n'
                        '  - {action: aws:configurePackage, name: sub, inputs: {name: x}}')
    with pytest.raises(DocumentError, match=r"step 'sub': action 'aws:configurePackage' is not supported"):
        render_document(doc, {})


def test_download_content_renders_a_download_spec_for_the_agent():
    doc = load_document('schemaVersion: "2.2"\nparameters:\n  u: {type: String}\nmainSteps:\n'
                        '  - action: aws:downloadContent\n    name: dl\n    inputs:\n'
                        '      sourceType: HTTP\n      sourceInfo: \'{"url": "{{ u }}", "sha256": "AB"}\'\n'
                        '      destinationPath: /tmp/x\n')
    step = render_document(doc, {"u": "http://127.0.0.1:9/f"})[0]
    assert step.action == "downloadContent"
    assert json.loads(step.script) == {"sourceType": "HTTP", "destinationPath": "/tmp/x",
                                       "url": "http://127.0.0.1:9/f", "sha256": "ab"}


@pytest.mark.parametrize(("inputs", "message"), [
    ("{sourceType: HTTP}", "inputs.sourceInfo is required"),
    ("{sourceInfo: '{}'}", "inputs.sourceType is required"),
    ("{sourceType: HTTP, sourceInfo: 'not json'}", "sourceInfo is not JSON"),
    ("{sourceType: HTTP, sourceInfo: '{\"url\": \"ftp://x\"}'}", "must be an http"),
    ("{sourceType: GitHub, sourceInfo: '{}'}", "sourceType 'GitHub' is not supported"),
    ("{sourceType: SSMDocument, sourceInfo: '{\"name\": \"other\"}'}", "only a broker renders"),
])
def test_download_content_errors_name_the_problem(inputs, message):
    with pytest.raises(DocumentError, match=message):
        render_document(load_document('schemaVersion: "2.2"\nmainSteps:\n'
                                      f'  - {{action: aws:downloadContent, name: dl, inputs: {inputs}}}'), {})


def test_parameter_precondition_is_rendered():
    doc = _doc("  a: {type: String}\n  c: {type: Boolean}", "      runCommand: [x]",
               extra='    precondition: {StringEquals: ["{{ a }} {{ c }}", "Uninstall true"]}\n')
    step = render_document(doc, {"a": "Uninstall", "c": True})[0]
    assert step.precondition.operands == ["Uninstall true", "Uninstall true"]


def test_platform_type_precondition_ignores_case_as_ssm_does():
    """SSM lower-cases the document's platform before comparing it with its own ``linux``: the
    broker took ``[platformType, windows]`` as holding nowhere and ``[platformType, linux]`` as not
    holding on Linux, so it let an unsupported step through, or refused a runnable one."""
    text = CROSS.replace("Windows]", "windows]").replace("Linux]", "LINUX]")
    win, lin = render_document(load_document(text), {})
    assert win.script == "" and lin.script == "ls"
    with pytest.raises(DocumentError, match="'win'"):
        render_document(load_document(text), {}, platform="Windows")
    skipped = load_document('schemaVersion: "2.2"\nmainSteps:\n'
                            '  - {action: aws:configurePackage, name: sub, inputs: {name: x},\n'
                            '     precondition: {StringEquals: [platformType, linux]}}')
    with pytest.raises(DocumentError, match="'sub'.*not supported"):
        render_document(skipped, {})


def test_a_template_that_renders_a_lone_surrogate_is_refused():
    """Jinja writes a lone surrogate from ``"\\ud800"`` or ``"%c" % 55296``, which no UTF-8 (so no
    msgpack) holds: the render worker died sending its result back, and the operator was told the
    document needed more memory than a worker may use."""
    for expression in ('{{ "\\ud800" }}', '{{ "%c" % 55296 }}'):
        doc = load_document('schemaVersion: "2.2"\ntemplating: jinja\nmainSteps:\n- action: aws:runShellScript\n'
                            '  name: s\n  inputs:\n    workingDirectory: /tmp\n    runCommand:\n'
                            f"    - 'echo {expression}'\n")
        with pytest.raises(DocumentError, match="step 's'.*lone surrogate"):
            render_document(doc, {})


def test_an_interpreter_with_an_unclosed_quote_is_an_invalid_document():
    """``shlex.split`` raises ValueError on an unclosed quote: the render worker died of it (the
    operator was told the document needed more memory than a worker may use)."""
    doc = load_document('schemaVersion: "2.2"\nparameters:\n  i: {type: String, default: python3}\nmainSteps:\n'
                        '- {action: runScript, name: s, inputs: {script: "print(1)", interpreter: "{{ i }} -c \'x"}}')
    with pytest.raises(DocumentError, match="step 's' interpreter: .*closing quotation"):
        render_document(doc, {})



def _timeouts(cases):
    doc = _doc("  t: {type: String, default: '99'}", "      runCommand: [x]\n      timeoutSeconds: '{{ t }}'")
    return [(given, render_document(doc, {"t": given})[0].timeout_seconds) for given, _ in cases]


def test_timeout_seconds_is_truncated_from_a_number_as_amazon_ssm_agent_does():
    """``pluginutil.ValidateExecutionTimeout``: a number is truncated, and a string that Atoi
    refuses is read by ParseFloat: ``"90.7"`` is 90 s there, and it was 3600 here."""
    for raw, expected in (("90.7", 90), ("'90.7'", 90), ("'1e3'", 1000), ("'+60'", 60), ("0.5", 3600)):
        doc = _doc("  t: {type: String, default: '99'}", f"      runCommand: [x]\n      timeoutSeconds: {raw}")
        assert (raw, render_document(doc, {})[0].timeout_seconds) == (raw, expected)
    cases = [("90.7", 90), ("1e3", 1000), ("1e400", 3600), ("nan", 3600), ("1_000", 3600)]
    assert _timeouts(cases) == cases


def test_timeout_seconds_with_spaces_around_the_digits_is_the_default_as_in_ssm():
    """Go's Atoi and ParseFloat refuse ``" 60"``; ``int()`` read it as 60."""
    cases = [(" 60", 3600), ("60 ", 3600), ("\t60", 3600), ("60", 60)]
    assert _timeouts(cases) == cases
