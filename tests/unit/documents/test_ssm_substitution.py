"""SSM substitution, pinned case by case against amazon-ssm-agent.

The first tables are the cases of aws/amazon-ssm-agent
``agent/framework/docparser/parameters/parameters_test.go`` (commit 1c217c89b42d), translated
one to one; the test each comes from is named beside it. The later ones pin rules read from
``parameters.go`` itself (``ReplaceParameters``, ``ReplaceParameter``, ``convertToString``) that
its tests do not cover, and from Go's regexp and encoding/json.
"""

from __future__ import annotations

import pytest

from zerorun.documents.gojson import go_json
from zerorun.documents.ssm_substitution import SsmSubstitution, convert_to_string


def replace(value, params):
    return SsmSubstitution(params).replace(value)


# -- parameters_test.go ------------------------------------------------------------------------

@pytest.mark.parametrize("text,name,single", [  # TestIsSingleParameterString
    ("{{ command}}", "command", True),
    ("{{ comm}}", "command", False),
    ("{{ command }}", "com", False),
    ("a {{ command}}", "command", False),
    ("{{ command }} {{ command }}", "command", False),
    ("{{ co!mmand}}", "co!mmand", False),
])
def test_is_single_parameter_string(text, name, single):
    assert SsmSubstitution({name: "value"}).single_parameter(text) == (name if single else None)


P12 = {"p1": "p1-value", "p2": "p2-value"}


@pytest.mark.parametrize("text,params,expected", [
    ("A {{ p1 }}", {"p1": "name"}, "A name"),  # TestReplaceParameter_SingleOccurrence
    ("A {{p1 }} is a {{ p1}}", {"p1": "name"}, "A name is a name"),  # _MultipleOccurrences
    # _EscapesDollarSigns: a "$" in a value is no regexp back reference
    ("Write-Host '{{Path}}'", {"Path": "C:\\$Recycle.Bin"}, "Write-Host 'C:\\$Recycle.Bin'"),
    # _LeavesEscapedDollarSigns: "$$" in a value becomes "$"
    ("Write-Host '{{ Path }}'", {"Path": "C:\\$$Recycle.Bin"}, "Write-Host 'C:\\$Recycle.Bin'"),
    # _embedded_parameter: a substituted value is not scanned again
    (" we have embedded {{p1}} and {{p2}}, should not see 2 {{p2}} in result",
     {"p1": "{{p2}}", "p2": "p2-value"},
     " we have embedded {{p2}} and p2-value, should not see 2 p2-value in result"),
    # _novalue_parameter: an undeclared token stays as written
    (" we have {{p1}} and {{p2}}, but no {{p3}}", P12, " we have p1-value and p2-value, but no {{p3}}"),
    ("{{p1}} and {{p2}}", P12, "p1-value and p2-value"),  # _start_and_end
    ("there is no parameter", P12, "there is no parameter"),  # _no_parameter
    # _json: the Go test marshals a struct (fields in declaration order); parameter values are
    # maps, which Go's json.Marshal writes with sorted keys
    ("{{p1}} and {{p2}}", {"p1": "p1-value", "p2": {"S": "p2-string", "I": 10}},
     'p1-value and {"I":10,"S":"p2-string"}'),
])
def test_replace_parameter(text, params, expected):
    assert SsmSubstitution(params).replace_in_string(text) == expected
    assert replace(text, params) == expected


# TestReplaceParameters / generateReplaceParamTestCases
GEN = {"param1": "a parameter", "param2": ["a", "plane"], "param3": 5}
GENERATED = [
    ("{{ param1 }}", "a parameter"),  # parameter-only strings: the value itself
    ("{{ param2 }}", ["a", "plane"]),
    ("{{ param3 }}", 5),
    ("put {{ param1 }} here", "put a parameter here"),  # inside other text: convertToString
    ("put {{ param2 }} here", 'put ["a","plane"] here'),
    ("put {{ param3 }} here", "put 5 here"),
    (5, 5), (True, True), (None, None), (1.5, 1.5),  # "any other type, return as is"
]


@pytest.mark.parametrize("given,expected", GENERATED)
def test_replace_parameters_generated_cases(given, expected):
    assert replace(given, GEN) == expected


def test_replace_parameters_deeper_hierarchies():
    """Slices item by item and maps value by value, three levels down, as the Go test builds them."""
    inputs, outputs = [g for g, _ in GENERATED], [e for _, e in GENERATED]
    for _ in range(3):
        inputs, outputs = ([*inputs, list(inputs)], [*outputs, list(outputs)])
        inputs.append({"one": list(inputs), "two": 5, "three": True})
        outputs.append({"one": list(outputs), "two": 5, "three": True})
    assert replace(inputs, GEN) == outputs


def test_replace_parameters_slice_of_maps():  # sliceOfMapsTestCase
    given = [{"workingDirectory": "{{ workingDirectory }}", "timeoutSeconds": "{{ timeoutSeconds }}",
              "runCommand": "{{ runCommand }}", "id": "0.aws:runScript"}]
    params = {"workingDirectory": "", "runCommand": ["echo hello; ls; whoami;"]}
    assert replace(given, params) == [{"workingDirectory": "", "timeoutSeconds": "{{ timeoutSeconds }}",
                                       "runCommand": ["echo hello; ls; whoami;"], "id": "0.aws:runScript"}]


@pytest.mark.parametrize("value,text", [  # TestConvertToString
    ("a parameter", "a parameter"), (["a", "plane"], '["a","plane"]'), (5, "5"),
])
def test_convert_to_string(value, text):
    assert convert_to_string(value) == text


# -- rules read from parameters.go, Go's regexp and encoding/json --------------------------------

L = {"l": ["x", "y"], "s": "v", "d": "a$$b", "m": {"b": 1, "a": "<&>"}, "n": 3, "t": True}


@pytest.mark.parametrize("given,expected", [
    # isSingleParameterString's regexp is ^...$ in Go: "$" is the end of the text, so a token
    # followed by a newline (a YAML block scalar) is not a single parameter
    ("{{ l }}\n", '["x","y"]\n'),
    ("{{\tl\n}}", ["x", "y"]),  # Go's \s: tab, newline, CR, form feed, space
    ("{{\vs}}", "{{\vs}}"),  # ... but not vertical tab
    ("{{\u00a0s}}", "{{\u00a0s}}"),  # ... nor Unicode spaces
    ("{{s}}{{s}}", "vv"),
    ("{{ d }}", "a$$b"),  # the exact token returns the value as it is: no "$$" rule
    ("x {{ d }}", "x a$b"),  # inside a longer string: "$$" -> "$"
    ("x {{ d }} $$ {{ s }}", "x a$b $$ v"),  # the rule is for values, not for the document's text
    ("x {{ l }}", 'x ["x","y"]'),
    ("{{ m }}", {"b": 1, "a": "<&>"}),
    ("m={{ m }}", 'm={"a":"\\u003c\\u0026\\u003e","b":1}'),  # sorted keys, HTML-safe escapes
    ("{{ n }}{{ t }}", "3true"),
    # everything that is not a declared token runs as written
    ("docker ps --format '{{.Names}}'", "docker ps --format '{{.Names}}'"),
    ("kubectl get pods -o go-template='{{range .items}}{{.metadata.name}}{{end}}'",
     "kubectl get pods -o go-template='{{range .items}}{{.metadata.name}}{{end}}'"),
    ("echo ${{ s }}", "echo $v"),
    ("echo {{{ s }}}", "echo {v}"),
    ("{{#items}}{{name}}{{/items}}", "{{#items}}{{name}}{{/items}}"),
    ("echo {{ s | quote }} {{ s.x }} {% if s %}", "echo {{ s | quote }} {{ s.x }} {% if s %}"),
    ("echo {{ undeclared }} {{", "echo {{ undeclared }} {{"),
    ({"{{ s }}": "{{ s }}"}, {"{{ s }}": "v"}),  # map keys stay as written
])
def test_rules_read_from_the_source(given, expected):
    assert replace(given, L) == expected


def test_dollar_rule_applies_to_json_of_non_string_values():
    assert replace("x {{ l }}", {"l": ["$$HOME", "$$$"]}) == 'x ["$HOME","$$"]'


def test_values_are_substituted_in_one_pass_left_to_right():
    params = {"a": "{{ b }}", "b": "B", "ab": "AB"}
    assert replace("{{ab}}{{a}}{{ b }}", params) == "AB{{ b }}B"


@pytest.mark.parametrize("value,text", [  # Go's json.Marshal, beyond Python's json.dumps
    (1.0, "1"), (1e-7, "1e-7"), (1e16, "10000000000000000"), (1e21, "1e+21"), (-0.0, "-0"),
    (0.000001, "0.000001"), ({"b": [1, 2.5], "a": None}, '{"a":null,"b":[1,2.5]}'),
    ("a\u2028b\x1b", '"a\\u2028b\\u001b"'), ("tab\t\"q\"", '"tab\\t\\"q\\""'),
])
def test_go_json(value, text):
    assert go_json(value) == text


def test_unmarshalable_value_becomes_empty_text():
    assert convert_to_string(float("nan")) == ""
