"""Document parsing and structural validation."""

from __future__ import annotations

import hashlib
import json

import pytest

from zerorun.documents import DocumentError, load_document, render_document, validate_document_name


def _steps(steps: str, params: str = "{}", templating: str = "") -> str:
    marker = f"templating: {templating}\n" if templating else ""
    return f'schemaVersion: "2.2"\n{marker}parameters: {params}\nmainSteps:\n{steps}'


SIMPLE = _steps("  - {action: runShellScript, name: a, inputs: {runCommand: [echo a]}}")


def test_identity_and_metadata():
    doc = load_document(SIMPLE, name="mine")
    assert doc.name == "mine" and doc.schema_version == "2.2"
    assert doc.sha256 == hashlib.sha256(SIMPLE.encode("utf-8")).hexdigest()
    assert doc.content == SIMPLE


def test_json_and_schema_20():
    text = json.dumps({"schemaVersion": "2.0", "description": "d", "mainSteps": [
        {"action": "aws:runShellScript", "name": "s", "inputs": {"runCommand": ["echo x"]}}]})
    doc = load_document(text)
    assert doc.schema_version == "2.0" and doc.description == "d"
    assert render_document(doc, {})[0].script == "echo x"


def test_schema_12_runtime_config():
    text = json.dumps({"schemaVersion": "1.2", "parameters": {"c": {"type": "StringList"}},
                       "runtimeConfig": {"aws:runShellScript": {"properties": [
                           {"id": "0.aws:runShellScript", "runCommand": "{{ c }}", "timeoutSeconds": "20"},
                           {"runCommand": ["echo second"], "workingDirectory": "/tmp"}]}}})
    steps = render_document(load_document(text), {"c": ["echo 1", "echo 2"]})
    assert [s.name for s in steps] == ["0.aws:runShellScript", "1.aws:runShellScript"]
    assert steps[0].script == "echo 1\necho 2" and steps[0].timeout_seconds == 20
    assert steps[1].working_directory == "/tmp"


def test_schema_12_other_plugin_is_unsupported():
    text = json.dumps({"schemaVersion": "1.2", "runtimeConfig": {
        "aws:runPowerShellScript": {"properties": [{"id": "0.ps", "runCommand": ["dir"]}]}}})
    with pytest.raises(DocumentError, match=r"'0\.ps'.*'aws:runPowerShellScript'"):
        render_document(load_document(text), {})


@pytest.mark.parametrize("text,fragment", [
    ("- not a mapping", "mapping"),
    ('schemaVersion: "3.0"\nmainSteps: []', "schemaVersion"),
    ('schemaVersion: "2.2"', "mainSteps"),
    ('schemaVersion: "2.2"\nmainSteps: [{action: runShellScript, inputs: {runCommand: [x]}}]', "name"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}\n"
            "  - {action: runShellScript, name: a, inputs: {runCommand: [y]}}"), "'a' is used twice"),
    (_steps("  - {action: runShellScript, name: a, onFailure: abort, inputs: {runCommand: [x]}}"),
     "step 'a': onFailure"),
    (_steps("  - {action: runShellScript, name: a, onSuccess: maybe, inputs: {runCommand: [x]}}"),
     "step 'a': onSuccess"),
    (_steps("  - {action: runShellScript, name: a, inputs: {}}"), "runCommand is required"),
    (_steps("  - {action: runScript, name: a, inputs: {script: x}}"), "interpreter is required"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: ['{{ x'] }}", templating="jinja"),
     "step 'a' inputs.runCommand[0]: template syntax error"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: ['{{ nope }}'] }}", templating="jinja"),
     "undeclared parameter 'nope'"),
    (_steps("  - {action: runShellScript, name: a, precondition: {StringEquals: [a]}, inputs: {runCommand: [x]}}"),
     "two operands"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}", "{p: {type: SecureStringList}}"),
     "unsupported type"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
            "{p: {type: String, default: b, allowedValues: [a]}}"), "invalid default"),
    ("schemaVersion: '2.2'\nmainSteps: [\n", "YAML"),
    # str.isdigit() takes "²" and int() does not; int() refuses 4,300 digits: DocumentError, never ValueError
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
            "{p: {type: String, maxChars: '\u00b2'}}"), "maxChars must be a non-negative integer"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
            "{p: {type: String, minChars: '" + "9" * 5000 + "'}}"), "minChars must be a non-negative integer"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
            "{p: {type: Integer, default: 2, allowedValues: ['+-1', '\u00b2', 1]}}"), "invalid default"),
    (_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
            "{p: {type: Integer, allowedValues: [" + "9" * 5000 + "]}}"), "YAML"),
])
def test_invalid_documents(text, fragment):
    with pytest.raises(DocumentError) as err:
        load_document(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("ref", ["{{ssm:/a/b}}", "{{ ssm-secure:pw }}", "{{resolve:ssm:/x}}", "{{ssm:p:2}}"])
def test_parameter_store_references_rejected(ref):
    in_step = _steps(f"  - {{action: runShellScript, name: a, inputs: {{runCommand: ['echo {ref}']}}}}")
    in_default = _steps("  - {action: runShellScript, name: a, inputs: {runCommand: ['{{ p }}']}}",
                        f"{{p: {{type: String, default: '{ref}'}}}}")
    for text in (in_step, in_default):
        with pytest.raises(DocumentError, match="Parameter Store references"):
            load_document(text)


def test_flow_keys_on_step_or_inside_inputs():
    doc = load_document(_steps(
        "  - {action: runShellScript, name: a, onFailure: exit, inputs: {runCommand: [x]}}\n"
        "  - {action: runShellScript, name: b, inputs: {onFailure: successAndExit, onSuccess: exit, runCommand: [x]}}\n"
        "  - {action: runShellScript, name: c, finallyStep: true, inputs: {runCommand: [x]}}"))
    a, b, c = render_document(doc, {})
    assert a.on_failure == "exit" and not a.finally_step
    assert b.on_failure == "successAndExit" and b.on_success == "exit"
    assert c.finally_step


def test_finally_step_only_on_the_last_step():
    """amazon-ssm-agent honours finallyStep on the last step only (runpluginutil: "Ignoring
    FinallyStep" elsewhere): a finallyStep that would not be one is refused, not run otherwise."""
    for where in ("finallyStep: true, inputs: {runCommand: [x]}", "inputs: {finallyStep: 'true', runCommand: [x]}"):
        with pytest.raises(DocumentError, match="step 'a': finallyStep is for the last step only"):
            load_document(_steps(f"  - {{action: runShellScript, name: a, {where}}}\n"
                                 "  - {action: runShellScript, name: b, inputs: {runCommand: [x]}}"))
    doc = load_document(_steps("  - {action: runShellScript, name: a, finallyStep: false, inputs: {runCommand: [x]}}\n"
                               "  - {action: runShellScript, name: b, finallyStep: true, inputs: {runCommand: [x]}}"))
    assert [s.finally_step for s in doc.steps] == [False, True]


def test_on_success_takes_exit_only():
    """SSM's onSuccess has one value, exit (its agent ignores successAndExit there)."""
    for where in ("onSuccess: successAndExit, inputs: {runCommand: [x]}",
                  "inputs: {onSuccess: successAndExit, runCommand: [x]}"):
        with pytest.raises(DocumentError, match="onSuccess must be exit, got 'successAndExit'"):
            load_document(_steps(f"  - {{action: runShellScript, name: a, {where}}}"))
    with pytest.raises(DocumentError, match="onFailure must be exit or successAndExit, got 'stop'"):
        load_document(_steps("  - {action: runShellScript, name: a, onFailure: stop, inputs: {runCommand: [x]}}"))


def test_a_precondition_needs_schema_22():
    """amazon-ssm-agent fails a step with a precondition in a document before 2.2."""
    text = json.dumps({"schemaVersion": "2.0", "mainSteps": [
        {"action": "aws:runShellScript", "name": "s", "precondition": {"StringEquals": ["platformType", "Linux"]},
         "inputs": {"runCommand": ["echo x"]}}]})
    with pytest.raises(DocumentError, match="step 's': precondition needs schemaVersion 2.2"):
        load_document(text)
    assert load_document(text.replace('"2.0"', '"2.2"')).steps[0].precondition is not None


@pytest.mark.parametrize("text, value", [
    ("12:30:00", "12:30:00"), ("1:30", "1:30"), ("2024-01-02", "2024-01-02"),
    ("2001-12-14t21:59:43.10-05:00", "2001-12-14t21:59:43.10-05:00"), ("=", "="), ("y", "y"), ("N", "N"),
    ("0o17", 15), ("017", 15), ("0x1F", 31), ("0b101", 5), ("1_000", 1000), ("-5", -5), ("+7", 7),
    ("18446744073709551615", 2 ** 64 - 1), ("1e3", 1000.0), ("09", 9.0), ("1.10", 1.1), (".5", 0.5),
    ("yes", True), ("Off", False), ("TRUE", True), ("~", None), ("'12:30:00'", "12:30:00")])
def test_yaml_scalars_read_as_amazon_ssm_agents_yaml_v2_reads_them(text, value):
    """gopkg.in/yaml.v2 (resolve.go): no base-60 numbers, timestamps kept as written (decoding
    into an untyped value), Go's integer syntax; PyYAML read 12:30:00 as 45000."""
    from zerorun.documents.loader import parse_data

    got = parse_data(f"a: {text}")["a"]
    assert got == value and type(got) is type(value)


def test_plain_mapping_keys_are_text_as_written():
    from zerorun.documents.loader import parse_data

    assert parse_data("on: 1\nyes: 2\n1: 3\n~: 4\nm: {<<: {a: 1}, b: 2}") == {
        "on": 1, "yes": 2, "1": 3, "~": 4, "m": {"a": 1, "b": 2}}
    doc = load_document(_steps("  - {action: runShellScript, name: a, inputs: {runCommand: ['{{ on }}']}}",
                               "{on: {type: String, default: x}}"))
    assert list(doc.parameters) == ["on"] and render_document(doc, {})[0].script == "x"


def test_a_time_of_day_in_a_step_runs_as_written():
    doc = load_document(_steps("  - {action: runShellScript, name: a, inputs: {runCommand: [12:30:00, 2024-01-02]}}"))
    assert render_document(doc, {})[0].script == "12:30:00\n2024-01-02"


def test_unknown_keys_tolerated():
    doc = load_document('schemaVersion: "2.2"\nassumeRole: r\noutputs: [x]\nmainSteps:\n'
                        '  - {action: runShellScript, name: a, description: d, maxAttempts: 2,\n'
                        '     inputs: {runCommand: [x], maxAttempts: 1, whatever: 3}}')
    assert render_document(doc, {})[0].script == "x"


@pytest.mark.parametrize("name", ["abc", "My.Doc_1-2", "a" * 128])
def test_valid_names(name):
    validate_document_name(name)


@pytest.mark.parametrize("name", ["ab", "a" * 129, "has space", "slash/name", "ZR-thing", "zr-x",
                                  "Zerorun-Doc", "ZERORUN-doc", "RunShellScript", "aws-runshellscript", ""])
def test_invalid_names(name):
    with pytest.raises(DocumentError):
        validate_document_name(name)


def test_yaml_alias_bomb_and_deep_nesting_are_refused_quickly():
    """Small text that expands exponentially (YAML aliases) or nests absurdly is refused before
    anything walks it: a document must not be able to hang or crash the broker."""
    import time

    bomb = "schemaVersion: '2.2'\nx0: &a0 [" + ",".join(["lol"] * 10) + "]\n"
    for i in range(1, 10):
        bomb += f"x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]\n"
    bomb += "mainSteps:\n- action: aws:runShellScript\n  name: s\n  inputs:\n    runCommand: [echo]\n    x: *a9\n"
    started = time.monotonic()
    with pytest.raises(DocumentError, match="too large"):
        load_document(bomb)
    assert time.monotonic() - started < 5
    deep_texts = ("a: " + "[" * 1000 + "]" * 1000,  # YAML's parser recurses: RecursionError
                  '{"a": ' + "[" * 3000 + "]" * 3000 + "}",
                  "a: " + "[" * 80 + "]" * 80)  # parses, but deeper than MAX_DEPTH
    for deep in deep_texts:
        with pytest.raises(DocumentError, match="nested more than"):
            load_document(deep)


def test_byte_order_mark_before_json():
    doc = load_document('\ufeff{"schemaVersion": "2.2", "mainSteps": [{"action": "aws:runShellScript", '
                        '"name": "s", "inputs": {"runCommand": ["echo"]}}]}')
    assert doc.steps[0].name == "s"


@pytest.mark.parametrize("pattern", ["5", "[a]", "{a: b}", "true"])
def test_an_allowed_pattern_that_is_no_string_is_an_invalid_document(pattern):
    """``re.compile(5)`` raised TypeError: a render worker died of it and the operator was told
    the document needed more memory than a worker may use."""
    text = _steps("  - {action: runShellScript, name: a, inputs: {runCommand: [x]}}",
                  f"{{p: {{type: String, default: '5', allowedPattern: {pattern}}}}}")
    with pytest.raises(DocumentError, match="parameter 'p': allowedPattern must be a string"):
        load_document(text)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
@pytest.mark.parametrize("where", ["runCommand: [echo, VALUE]", "runCommand: [echo], workingDirectory: VALUE",
                                   "runCommand: [echo], timeoutSeconds: VALUE"])
def test_nan_and_infinity_anywhere_are_an_invalid_document(value, where):
    """JSON has no NaN or Infinity (SSM documents are JSON): YAML's ``.nan`` in a step's inputs
    made rendering raise ValueError, which killed a render worker."""
    text = _steps("  - {action: runShellScript, name: a, inputs: {" + where.replace("VALUE", value) + "}}")
    with pytest.raises(DocumentError, match="NaN or Infinity"):
        render_document(load_document(text), {})


@pytest.mark.parametrize("where", ['"runCommand": ["echo a\\ud800b"]', '"runCommand": ["echo"], "workingDirectory": "\\udfff"',
                                   '"runCommand": ["echo"], "x\\ud800": 1'])
def test_a_lone_surrogate_is_an_invalid_document(where):
    """JSON's ``\\ud800`` escape decodes to a lone surrogate, which no UTF-8 (hence no msgpack)
    can hold: a stored document holding one was accepted, and the first send of it stopped the
    broker (UnicodeEncodeError in the store's group commit)."""
    text = ('{"schemaVersion": "2.2", "mainSteps": [{"action": "aws:runShellScript", "name": "s", '
            '"inputs": {' + where + '}}]}')
    with pytest.raises(DocumentError, match="surrogate"):
        load_document(text)


@pytest.mark.parametrize("declaration,fragment", [
    ("{type: String, allowedpattern: '^[a-z]+$'}", "unknown key 'allowedpattern' (did you mean 'allowedPattern'?)"),
    ("{type: String, allowedValue: [a, b]}", "unknown key 'allowedValue' (did you mean 'allowedValues'?)"),
    ("{type: String, maxchars: 3}", "(did you mean 'maxChars'?)"),
    ("{type: String, required: true}", "unknown key 'required'"),
    ("{type: String, displayType: multiline}", "displayType must be textfield or textarea, got 'multiline'"),
])
def test_a_parameter_declaration_with_an_unknown_key_is_invalid(declaration, fragment):
    """A misspelt constraint was ignored: the parameter took any value while its author believed
    it guarded. SSM's own schema for a declaration allows no other key."""
    text = f'schemaVersion: "2.2"\nparameters:\n  p: {declaration}\nmainSteps:\n' \
           f'  - {{action: runShellScript, name: a, inputs: {{runCommand: ["echo {{{{ p }}}}"]}}}}'
    with pytest.raises(DocumentError, match="parameter 'p'") as err:
        load_document(text)
    assert fragment in str(err.value)
    assert load_document(text, checked=True).parameters["p"].type == "String"  # a stored version still loads


@pytest.mark.parametrize("operands,fragment", [
    ('[platformType, "{{ os }}"]', "cannot come from a parameter"),
    ('["{{os}}", platformType]', "cannot come from a parameter"),
    ('["a", "b"]', "at least one of operator's arguments must contain a valid document parameter"),
    ('["{{ undeclared }}", "x"]', "at least one of operator's arguments"),
    ('["a", "a"]', "the two operands are the same"),
    ('["{{ os }}", "{{ os }}"]', "the two operands are the same"),
    ('[platformType, platformType]', "the two operands are the same"),
])
def test_a_precondition_that_amazon_ssm_agent_fails_is_an_invalid_document(operands, fragment):
    """``runpluginutil.evaluatePreconditions`` fails such a step; Zerorun ran or skipped it
    (``[platformType, "{{ os }}"]`` let a parameter pick the platform, ``["a", "b"]`` skipped)."""
    text = ('schemaVersion: "2.2"\nparameters:\n  os: {type: String, default: Linux}\nmainSteps:\n'
            f'  - {{action: aws:runShellScript, name: a, precondition: {{StringEquals: {operands}}},\n'
            '     inputs: {runCommand: ["true"]}}')
    with pytest.raises(DocumentError, match="step 'a': precondition StringEquals") as err:
        load_document(text)
    assert fragment in str(err.value)
    load_document(text, checked=True)  # a stored version still loads
    for fine in ('[platformType, Linux]', '[Windows, platformType]', '["{{ os }}", Linux]', '["x-{{os}}", "{{ os }}-x"]'):
        assert load_document(text.replace(operands, fine)).steps[0].precondition is not None

