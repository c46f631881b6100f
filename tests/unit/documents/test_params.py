"""Parameter coercion, constraints, required/unknown, redaction."""

from __future__ import annotations

import json

import pytest

from zerorun.documents import (MISSING, DocumentError, ParameterError, coerce_parameters, load_document,
                               redact, render_document)

DOC = """
schemaVersion: "2.2"
parameters:
  s: {type: String, default: "x"}
  n: {type: Integer, default: 5}
  b: {type: Boolean, default: false}
  l: {type: StringList, default: []}
  m: {type: StringMap, default: {}}
mainSteps:
  - action: runShellScript
    name: one
    inputs: {runCommand: ["true"]}
"""


def _doc(params: str = "", body: str = '["true"]'):
    return load_document(f"""
schemaVersion: "2.2"
parameters:
{params}
mainSteps:
  - action: runShellScript
    name: one
    inputs: {{runCommand: {body}}}
""")


def test_defaults_filled_in_document_order():
    doc = load_document(DOC)
    assert list(coerce_parameters(doc, {})) == ["s", "n", "b", "l", "m"]
    assert coerce_parameters(doc, {}) == {"s": "x", "n": 5, "b": False, "l": [], "m": {}}


@pytest.mark.parametrize("name,given,expected", [
    ("s", "hello", "hello"), ("s", ["one"], "one"),
    ("n", 7, 7), ("n", "42", 42), ("n", "-3", -3), ("n", ["8"], 8),
    ("b", True, True), ("b", "TRUE", True), ("b", "false", False), ("b", ["true"], True),
    ("l", ["a", "b"], ["a", "b"]), ("l", "single", ["single"]),
    ("m", {"k": "v"}, {"k": "v"}), ("m", '{"k": 1}', {"k": 1}),
    ("n", str(2 ** 63 - 1), 2 ** 63 - 1), ("n", -2 ** 63, -2 ** 63), ("n", "0" * 30 + "7", 7),
    ("m", '{"k": [-9223372036854775808]}', {"k": [-2 ** 63]}),
])
def test_accepted_input_forms(name, given, expected):
    assert coerce_parameters(load_document(DOC), {name: given})[name] == expected


@pytest.mark.parametrize("name,given,rule", [
    ("s", 5, "expected a string"), ("s", ["a", "b"], "expected a string"),
    ("n", True, "not a boolean"), ("n", "4.5", "expected an integer"), ("n", "x", "expected an integer"),
    ("b", "yes", "expected a boolean"), ("b", 1, "expected a boolean"),
    ("l", ["a", 1], "must be a string"), ("l", [True], "must be a string"), ("l", 3, "list of strings"),
    ("m", "[1]", "map"), ("m", "{oops", "JSON object"), ("m", {"x": float("nan")}, "NaN"),
    # integers msgpack cannot hold: the command, its audit line and its results are msgpack
    ("n", 2 ** 63, "out of range"), ("n", "1" + "0" * 30, "out of range"), ("n", "-" + "9" * 5000, "out of range"),
    ("m", '{"k": {"deep": [100000000000000000000000000000]}}', "out of range"),
])
def test_wrong_types_name_parameter_and_rule(name, given, rule):
    with pytest.raises(ParameterError) as err:
        coerce_parameters(load_document(DOC), {name: given})
    assert f"'{name}'" in str(err.value) and rule in str(err.value)


def test_allowed_values():
    doc = _doc("  mode: {type: String, allowedValues: [enforce, audit]}")
    assert coerce_parameters(doc, {"mode": "audit"}) == {"mode": "audit"}
    with pytest.raises(ParameterError, match=r"'mode'.*allowedValues.*'destroy'"):
        coerce_parameters(doc, {"mode": "destroy"})


def test_allowed_values_apply_to_each_list_item():
    doc = _doc("  l: {type: StringList, allowedValues: [a, b]}")
    assert coerce_parameters(doc, {"l": ["a", "b", "a"]})["l"] == ["a", "b", "a"]
    with pytest.raises(ParameterError, match="allowedValues"):
        coerce_parameters(doc, {"l": ["a", "c"]})


def test_allowed_pattern_is_a_full_match():
    doc = _doc("  p: {type: String, allowedPattern: '[0-9]+'}")
    assert coerce_parameters(doc, {"p": "123"}) == {"p": "123"}
    for bad in ("12a", "a12", "1 2", ""):
        with pytest.raises(ParameterError, match="allowedPattern"):
            coerce_parameters(doc, {"p": bad})


def test_min_max_chars_and_items():
    doc = _doc("  s: {type: String, minChars: 2, maxChars: 3}\n"
               "  l: {type: StringList, minItems: 1, maxItems: 2, maxChars: 2}")
    ok = {"s": "ab", "l": ["x"]}
    assert coerce_parameters(doc, ok) == ok
    cases = [({"s": "a", "l": ["x"]}, "minChars 2"), ({"s": "abcd", "l": ["x"]}, "maxChars 3"),
             ({"s": "ab", "l": []}, "minItems 1"), ({"s": "ab", "l": ["a", "b", "c"]}, "maxItems 2"),
             ({"s": "ab", "l": ["abc"]}, "maxChars 2")]
    for given, rule in cases:
        with pytest.raises(ParameterError, match=rule):
            coerce_parameters(doc, given)


def test_missing_required_and_unknown():
    doc = _doc("  req: {type: String}")
    assert doc.parameters["req"].default is MISSING and doc.parameters["req"].required
    with pytest.raises(ParameterError, match="'req'.*required"):
        coerce_parameters(doc, {})
    with pytest.raises(ParameterError, match="unknown parameter 'other'"):
        coerce_parameters(doc, {"req": "x", "other": "y"})
    with pytest.raises(ParameterError):
        render_document(doc, {})


def test_secret_values_never_in_messages():
    doc = _doc("  pw: {type: String, secret: true, allowedPattern: '[a-z]+'}\n"
               "  tok: {type: SecureString, maxChars: 3}")
    assert doc.parameters["pw"].secret and doc.parameters["tok"].secret
    assert doc.parameters["tok"].type == "String"
    for given in ({"pw": "Hunter2", "tok": "abc"}, {"pw": "abc", "tok": "Hunter2"}):
        with pytest.raises(ParameterError) as err:
            coerce_parameters(doc, given)
        assert "Hunter2" not in str(err.value) and "***" in str(err.value)


def test_redact():
    doc = _doc("  pw: {type: String, secret: true}\n  user: {type: String}")
    values = coerce_parameters(doc, {"pw": "s3cret", "user": "bob"})
    assert redact(doc, values) == {"pw": "***", "user": "bob"}
    assert values["pw"] == "s3cret"  # not mutated


def test_parameter_store_reference_in_a_value_is_rejected():
    doc = _doc("  s: {type: String}")
    with pytest.raises(ParameterError, match="Parameter Store"):
        coerce_parameters(doc, {"s": "{{ssm:/my/param}}"})


def test_yaml_boolean_allowed_values_on_a_string():
    # awsdocs-parameter-precondition.yml writes `- True` unquoted on a String parameter
    doc = _doc("  c: {type: String, allowedValues: [True, False]}")
    assert coerce_parameters(doc, {"c": "True"}) == {"c": "True"}
    assert coerce_parameters(doc, {"c": "false"}) == {"c": "false"}
    with pytest.raises(ParameterError):
        coerce_parameters(doc, {"c": "maybe"})


def test_values_are_rendered_as_data_not_templates():
    doc = _doc("  s: {type: String}", '["echo {{ s }}"]')
    assert render_document(doc, {"s": "{{ 7 * 7 }}"})[0].script == "echo {{ 7 * 7 }}"


@pytest.mark.parametrize("given", ["a\x00b", ["a\x00b"]])
def test_a_string_holding_nul_is_refused_before_anything_is_sent(given):
    """Every parameter is exported as ``ZERORUN_PARAM_<name>``, and no environment variable can
    hold a NUL: the broker sent the command and every instance failed it with "agent error:
    embedded null byte"."""
    with pytest.raises(ParameterError, match="'s'.*NUL"):
        coerce_parameters(load_document(DOC), {"s": given})
    with pytest.raises(DocumentError, match="invalid default.*NUL"):
        _doc('  s: {type: String, default: "a\\0b"}')


def test_a_string_map_is_held_to_its_constraints_as_ssm_holds_it():
    """amazon-ssm-agent checks a StringMap's ``allowedPattern``, ``allowedValues`` and
    ``min/maxChars`` against its JSON (``json.Marshal``: compact, keys sorted) and
    ``min/maxItems`` against its number of keys (its ``paramvalidator`` package). Zerorun ignored
    them all, so a pattern an author wrote to keep a map's text out of the shell let anything in."""
    doc = _doc('  m:\n    type: StringMap\n    default: {}\n    allowedPattern: \'\\{("[a-z]+":"[a-z]+",?)*\\}\'\n'
               '    maxItems: 2\n    maxChars: 30', body="[\"echo '{{ m }}'\"]")
    assert coerce_parameters(doc, {"m": {"b": "x", "a": "y"}})["m"] == {"b": "x", "a": "y"}
    for hostile, rule in (({"a": "'; rm -rf / #"}, "allowedPattern"), ({"a": "x", "b": "y", "c": "z"}, "maxItems"),
                          ({"abcdefghijklmno": "abcdefghijklmno"}, "maxChars")):
        with pytest.raises(ParameterError, match=f"'m'.*{rule}"):
            coerce_parameters(doc, {"m": hostile})
    listed = _doc('  m:\n    type: StringMap\n    default: {"k": "v"}\n    allowedValues: [\'{"k":"v"}\', {k: w}]\n'
                  '    minItems: 1')
    assert coerce_parameters(listed, {"m": '{"k": "w"}'})["m"] == {"k": "w"}
    for refused, rule in (({"k": "x"}, "allowedValues"), ({}, "minItems")):
        with pytest.raises(ParameterError, match=f"'m'.*{rule}"):
            coerce_parameters(listed, {"m": refused})


@pytest.mark.parametrize("given", ['{"k": "a\\ud800"}', '{"k\\udfff": "v"}', '{"k": ["\\ud800"]}'])
def test_a_string_map_whose_json_holds_a_lone_surrogate_is_refused(given):
    """A StringMap given as JSON text is decoded here, and ``\\ud800`` decodes to a lone surrogate
    that no UTF-8 can hold: the broker accepted it, and storing the command stopped the broker."""
    with pytest.raises(ParameterError, match="'m'.*surrogate"):
        coerce_parameters(load_document(DOC), {"m": given})


def test_a_value_too_long_for_an_environment_variable_is_not_exported():
    """Linux passes no ``NAME=value`` longer than 128 KiB to a program (MAX_ARG_STRLEN): an
    AWS-RunShellScript whose commands came to more than that failed on every instance with
    "Argument list too long", because every parameter was exported as ZERORUN_PARAM_<name>.
    SSM exports none; such a value now stays out of the environment (the script text has it),
    unless the document asks for it there (interpolationType: ENV_VAR), which is refused."""
    from zerorun.documents.params import parameter_env

    doc = _doc("  c: {type: StringList}\n  s: {type: String, default: small}")
    big = ["# " + "x" * 1000] * 200
    env = parameter_env(doc, coerce_parameters(doc, {"c": big}))
    assert env == {"ZERORUN_PARAM_s": "small"}
    fits = ["x" * 100] * 1000  # ~100 KiB of JSON: still exported
    assert "ZERORUN_PARAM_c" in parameter_env(doc, coerce_parameters(doc, {"c": fits}))
    step = render_document(doc, {"c": big})[0]
    assert "ZERORUN_PARAM_c" not in step.env
    env_var = _doc("  v: {type: String, interpolationType: ENV_VAR}", body='["echo {{ v }}"]')
    with pytest.raises(ParameterError, match="'v'.*ENV_VAR.*environment variable"):
        render_document(env_var, {"v": "y" * 140_000})


def test_allowed_values_are_looked_up_not_scanned():
    """Each StringList item was compared with every allowed value in turn: 20,000 allowed values
    (a 160 KB document) and 100,000 items that fit the bound for rendering in the broker's loop
    held the loop for about 100 s. Membership is a lookup now: counted in comparisons, one per
    item (a scan made 20,000 each)."""
    compared = [0]

    class Counted(str):
        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    allowed = ", ".join(f"v{i:05d}" for i in range(20000))
    doc = _doc(f"  l:\n    type: StringList\n    allowedValues: [{allowed}]")
    assert len(coerce_parameters(doc, {"l": [Counted("v19999")] * 10000})["l"]) == 10000
    assert compared[0] <= 10000, compared[0]
    with pytest.raises(ParameterError, match="allowedValues"):
        coerce_parameters(doc, {"l": ["v19999", "nope"]})


@pytest.mark.parametrize("depth", [70, 600, 5000])
def test_a_string_map_nested_absurdly_deep_is_refused(depth):
    """A StringMap nested a few hundred levels deep raised RecursionError (from json.loads or from
    writing it as Go JSON): the broker answered InternalError and logged a traceback."""
    nested = '{"a": ' + "[" * depth + "]" * depth + "}"
    for given in (nested, {"a": json.loads('[' * 70 + ']' * 70)} if depth == 70 else nested):
        with pytest.raises(ParameterError, match="'m'.*nested more than 64"):
            coerce_parameters(load_document(DOC), {"m": given})


def test_the_parameters_environment_stays_within_what_a_program_may_be_given():
    """Linux gives a program at most ARG_MAX (2 MiB with the usual 8 MiB stack) of arguments and
    environment together: 22 parameters of 100 KB, each small enough for one variable, made every
    step fail to start ("Argument list too long"). The largest values stay out of the environment
    until the parameters take at most 1 MiB of it."""
    from zerorun.documents.params import MAX_ENV_TOTAL, parameter_env

    doc = _doc("".join(f"  p{i:02d}: {{type: String}}\n" for i in range(22)) + "  small: {type: String, default: s}")
    values = coerce_parameters(doc, {f"p{i:02d}": str(i % 10) * (100_000 + i) for i in range(22)})
    env = parameter_env(doc, values)
    assert sum(len(k) + 1 + len(v) for k, v in env.items()) <= MAX_ENV_TOTAL
    assert env["ZERORUN_PARAM_small"] == "s" and "ZERORUN_PARAM_p00" in env and "ZERORUN_PARAM_p21" not in env


def test_a_parameter_store_reference_in_a_string_map_is_refused_as_in_a_string():
    """A String or StringList value holding ``{{ssm:...}}`` was refused, but a StringMap's went
    through as literal text unless the map had a constraint; SSM's agent resolves it anywhere in
    a step's inputs (``docparser.replaceValidatedPluginParameters``), keys included."""
    doc = _doc("  m: {type: StringMap, default: {}}", body='["echo \'{{ m }}\'"]')
    for hostile in ({"k": "{{ssm:/db/password}}"}, {"{{ ssm:key }}": "v"}, {"k": ["{{ssm-secure:x}}"]},
                    '{"k": "{{resolve:ssm:/x}}"}'):
        with pytest.raises(ParameterError, match="'m'.*Parameter Store references are not supported"):
            coerce_parameters(doc, {"m": hostile})
    assert coerce_parameters(doc, {"m": {"k": "{{ not_ssm }}", "ssm:": "{x}"}})["m"] == {"k": "{{ not_ssm }}", "ssm:": "{x}"}


def test_map_list_parameters():
    """SSM's sixth type (amazon-ssm-agent's paramvalidator reads it as a list and checks each
    map's JSON): a document declaring one was refused as of an unsupported type."""
    doc = _doc("  ml:\n    type: MapList\n    default: [{name: a, size: 1}]\n    maxItems: 2\n"
               "    allowedPattern: '^\\{\"name\":\"[a-z]+\"(,\"size\":[0-9]+)?\\}$'",
               body="[\"echo '{{ ml }}'\", \"{{ ml }}\"]")
    assert coerce_parameters(doc, {}) == {"ml": [{"name": "a", "size": 1}]}
    for given in ('[{"name": "b"}]', [{"name": "b"}], ['{"name": "b"}'], ['[{"name": "b"}]']):
        assert coerce_parameters(doc, {"ml": given}) == {"ml": [{"name": "b"}]}
    (step,) = render_document(doc, {"ml": [{"name": "b", "size": 2}]})
    assert step.script == 'echo \'[{"name":"b","size":2}]\'\n{"name":"b","size":2}'
    assert step.env["ZERORUN_PARAM_ml"] == '[{"name":"b","size":2}]'
    for bad, rule in (([{"name": "B"}], "allowedPattern"), ([{"name": "a"}] * 3, "maxItems 2"),
                      ("x", "a list of maps"), ([["a"]], "must be a map"), ([{"k": 2 ** 64}], "out of range")):
        with pytest.raises(ParameterError, match=f"'ml' \\(MapList\\).*{rule}"):
            coerce_parameters(doc, {"ml": bad})
    free = _doc("  ml: {type: MapList, default: []}")
    with pytest.raises(ParameterError, match="Parameter Store references are not supported"):
        coerce_parameters(free, {"ml": [{"pw": "{{ssm:/db/pw}}"}]})


def test_a_yaml_boolean_or_number_for_a_string_is_the_text_ssm_substitutes():
    """``default: true`` (unquoted) on a String: SSM's agent substitutes the JSON ``true``
    (``convertToString``), Zerorun wrote Python's ``True``; ``5.0`` was ``5.0``, not ``5``."""
    doc = _doc("  b: {type: String, default: true}\n  f: {type: String, default: 5.0, allowedValues: [5.0, 1e3]}\n"
               "  l: {type: StringList, default: [false, 0.5, 7]}", body='["echo {{ b }} {{ f }} {{ l }}"]')
    assert coerce_parameters(doc, {}) == {"b": "true", "f": "5", "l": ["false", "0.5", "7"]}
    assert render_document(doc, {})[0].script == 'echo true 5 ["false","0.5","7"]'
    assert coerce_parameters(doc, {"f": "1000"})["f"] == "1000"
