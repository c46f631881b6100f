"""redact_steps: what the broker shows never contains a secret parameter's value."""

from __future__ import annotations

import json
import shlex

import msgspec

from zerorun.documents import load_document, redact_steps, render_document


def _doc(params: str, run_command: str, extra: str = "", inputs: str = "", templating: str = "ssm"):
    return load_document(f"""
schemaVersion: "2.2"
templating: {templating}
parameters:
{params}
mainSteps:
  - action: runShellScript
    name: s
{extra}    inputs:
      runCommand: {run_command}
{inputs}""")


def _both(doc, values):
    steps = render_document(doc, values)
    before = msgspec.json.encode(steps)
    shown = redact_steps(doc, values, steps)
    assert msgspec.json.encode(steps) == before  # the real steps are untouched
    return steps, shown


def test_secret_string_in_script_and_env():
    doc = _doc("  pw: {type: String, secret: true}\n  user: {type: String}",
               '["login {{ user }} {{ pw }}", "echo {{ pw | quote }}"]', templating="jinja")
    steps, shown = _both(doc, {"pw": "s3cr3t", "user": "bob"})
    assert "s3cr3t" in steps[0].script
    assert shown[0].script == "login bob ***\necho ***"
    assert shown[0].env["ZERORUN_PARAM_pw"] == "***"
    assert shown[0].env["ZERORUN_PARAM_user"] == "bob"
    assert steps[0].env["ZERORUN_PARAM_pw"] == "s3cr3t"


def test_securestring_and_quoted_form_with_special_characters():
    doc = _doc("  pw: {type: SecureString}", '["use {{ pw | quote }}", "raw {{ pw }}"]', templating="jinja")
    secret = "it's a \"p@ss\""
    steps, shown = _both(doc, {"pw": secret})
    assert shlex.quote(secret) in steps[0].script
    assert shown[0].script == "use ***\nraw ***"
    assert "p@ss" not in msgspec.json.encode(shown).decode()


def test_secret_default_is_redacted_too():
    doc = _doc("  token: {type: String, secret: true, default: tok-123456}", '["curl -H {{ token }}"]')
    _, shown = _both(doc, {})
    assert shown[0].script == "curl -H ***" and shown[0].env["ZERORUN_PARAM_token"] == "***"


def test_secret_string_list_whole_json_and_each_item():
    doc = _doc("  keys: {type: StringList, secret: true}",
               '["echo {{ keys }}", "{{ keys }}", "for k in {{ keys | quote }}; do :; done"]', templating="jinja")
    keys = ["alpha-key", "beta key", 'gam"ma']
    steps, shown = _both(doc, {"keys": keys})
    assert json.dumps(keys, separators=(",", ":")) in steps[0].script
    text = msgspec.json.encode(shown).decode()
    for key in ("alpha-key", "beta key", "gam", "ma"):
        assert key not in text
    assert shown[0].script.splitlines() == ["echo ***", "***", "***", "***",
                                            "for k in *** *** ***; do :; done"]
    assert shown[0].env["ZERORUN_PARAM_keys"] == "***"


def test_secret_string_map_values():
    doc = _doc("  creds: {type: StringMap, secret: true}", '["echo {{ creds }}", "echo {{ creds.user }}"]',
               templating="jinja")
    steps, shown = _both(doc, {"creds": {"user": "root-user", "password": "hunter22"}})
    assert shown[0].script == "echo ***\necho ***"
    assert "hunter22" not in msgspec.json.encode(shown).decode()


def test_precondition_working_directory_and_env_var_interpolation():
    doc = _doc("  pw: {type: String, secret: true}\n  plat: {type: String, default: Linux}",
               '["echo {{ pw }}"]',
               extra="    precondition: {StringEquals: [\"{{ pw }}\", \"{{ plat }}\"]}\n",
               inputs='      workingDirectory: "/home/{{ pw }}"\n')
    steps, shown = _both(doc, {"pw": "s3cr3t"})
    assert steps[0].precondition.operands == ["s3cr3t", "Linux"]
    assert shown[0].precondition.operands == ["***", "Linux"]
    assert shown[0].working_directory == "/home/***"


def test_env_var_interpolation_keeps_reference_and_redacts_ssm_var():
    doc = _doc("  pw: {type: String, secret: true, interpolationType: ENV_VAR}", '["echo {{ pw }}"]')
    steps, shown = _both(doc, {"pw": "s3cr3t"})
    assert shown[0].script == steps[0].script == 'echo "${ZERORUN_PARAM_pw}"'
    assert shown[0].env["SSM_pw"] == shown[0].env["ZERORUN_PARAM_pw"] == "***"


def test_no_secret_parameters_means_identical_copy():
    doc = _doc("  msg: {type: String}", '["echo {{ msg }}"]')
    steps, shown = _both(doc, {"msg": "hi"})
    assert shown == steps and shown[0] is not steps[0]


def test_secret_integer_and_boolean():
    doc = _doc("  port: {type: Integer, secret: true}\n  flag: {type: Boolean, secret: true}",
               '["connect {{ port }} {{ flag }}"]')
    _, shown = _both(doc, {"port": "48213", "flag": True})
    assert shown[0].script == "connect *** ***"


def test_a_secret_in_a_download_spec_is_redacted_whatever_its_characters():
    """An aws:downloadContent step's script is its spec as JSON written by msgspec, which escapes
    a quote or a backslash but not ``<``, ``>`` or ``&`` the way Go does: a secret holding both
    (a token ``a"b&c``) matched none of the forms searched for, and ``show --script`` and
    ``send --dry-run`` printed it."""
    from zerorun.documents import render

    doc = load_document('schemaVersion: "2.2"\nparameters:\n  tok: {type: String, secret: true}\nmainSteps:\n'
                        '- action: aws:downloadContent\n  name: dl\n  inputs:\n    sourceType: HTTP\n'
                        '    sourceInfo: {url: "https://example.com/f?t={{ tok }}"}\n    destinationPath: /tmp/x\n')
    for secret in ('a"b&c', 'x\\y<z', 'q"<>&\u2028'):
        (shown,) = render(doc, {"tok": secret}).display_steps
        assert json.loads(shown.script)["url"] == "https://example.com/f?t=***", (secret, shown.script)
