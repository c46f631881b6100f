"""Composite documents: aws:runDocument expanded at render time through a resolver."""

from __future__ import annotations

import dataclasses
import json

import msgspec
import pytest

from zerorun.documents import DocumentError, ParameterError, load_document, render
from zerorun.protocol import Scope


class Store:
    """A resolver over documents given as text, recording what it was asked for."""

    def __init__(self, **texts: str):
        self.docs = {name: load_document(text, name=name) for name, text in texts.items()}
        self.asked: list[tuple[str, str]] = []

    def __call__(self, name: str, version: str):
        self.asked.append((name, version))
        if name not in self.docs:
            raise DocumentError(f"document {name} not found")
        return dataclasses.replace(self.docs[name], version=version or "1")


def run_doc(path: str, params: object = None, name: str = "call", extra: str = "",
            doc_type: str = "SSMDocument") -> str:
    """One aws:runDocument step (YAML)."""
    lines = [f"  - action: aws:runDocument\n    name: {name}\n{extra}    inputs:\n",
             f"      documentType: {doc_type}\n      documentPath: {json.dumps(path)}\n"]
    if params is not None:
        lines.append(f"      documentParameters: {json.dumps(params)}\n")
    return "".join(lines)


def shell(name: str, line: str, extra: str = "") -> str:
    return (f"  - action: aws:runShellScript\n    name: {name}\n{extra}    inputs:\n"
            f"      runCommand: [{json.dumps(line)}]\n")


def document(*steps: str, params: str = "{}", marker: str = "") -> str:
    return f'schemaVersion: "2.2"\n{marker}parameters: {params}\nmainSteps:\n' + "".join(steps)


CHILD = document(shell("greet", "echo child {{ who }} {{ n }} {{ tags }}"),
                 params="{who: {type: String}, n: {type: String, default: zero}, "
                        "tags: {type: StringList, default: []}}")
JINJA_CHILD = document(shell("quoted", "echo {{ who | quote }}"), params="{who: {type: String}}",
                       marker="templating: jinja\n")


def test_two_levels_rendered_each_in_its_own_language():
    store = Store(Child=CHILD, Quoted=JINJA_CHILD)
    parent = load_document(document(
        shell("before", "echo '{{.Names}}' {{ who }}"),
        run_doc("Child", '{"who": "{{ who }}", "n": 5, "tags": ["a", "b"]}'),
        run_doc("Quoted:$LATEST", {"who": "{{ who }}"}, name="call2"),
        shell("after", "echo after"),
        params="{who: {type: String}}"), name="Parent")
    rendering = render(parent, {"who": "it's me"}, resolver=store)
    assert [s.name for s in rendering.steps] == ["before", "call/greet", "call2/quoted", "after"]
    scripts = [s.script for s in rendering.steps]
    assert scripts == ["echo '{{.Names}}' it's me", 'echo child it\'s me 5 ["a","b"]',
                       "echo 'it'\"'\"'s me'", "echo after"]
    assert rendering.steps[1].env == {"ZERORUN_PARAM_who": "it's me", "ZERORUN_PARAM_n": "5",
                                      "ZERORUN_PARAM_tags": '["a","b"]'}
    assert store.asked == [("Child", ""), ("Quoted", "$LATEST")]
    assert [(n.step, n.name, n.version, n.depth, n.templating) for n in rendering.nested] == [
        ("call", "Child", "1", 1, "ssm"), ("call2", "Quoted", "$LATEST", 1, "jinja")]
    assert rendering.nested[0].sha256 == store.docs["Child"].sha256
    assert rendering.nested_names == ["Child", "Quoted"]
    assert rendering.parameters == {"who": "it's me"} and rendering.templating == "ssm"


def test_a_stringlist_passed_whole_stays_a_list():
    store = Store(Child=CHILD)
    parent = load_document(document(run_doc("Child", {"who": "x", "tags": "{{ items }}"}),
                                    params="{items: {type: StringList}}"))
    (step,) = render(parent, {"items": ["p", "q r"]}, resolver=store).steps
    assert step.script == 'echo child x zero ["p","q r"]'


def test_depth_limit_is_ssms():
    """The command's document runs depth 1, ... up to 3; a fourth level is refused."""
    store = Store(L1=document(run_doc("L2", name="down")), L2=document(run_doc("L3", name="down")),
                  L3=document(shell("leaf", "echo leaf")), L4=document(run_doc("L1", name="down")))
    rendering = render(load_document(document(run_doc("L1"))), {}, resolver=store)
    assert [s.name for s in rendering.steps] == ["call/down/down/leaf"]
    assert [(n.name, n.depth, n.step) for n in rendering.nested] == [
        ("L1", 1, "call"), ("L2", 2, "call/down"), ("L3", 3, "call/down/down")]
    with pytest.raises(DocumentError) as err:
        render(load_document(document(run_doc("L4"))), {}, resolver=store)
    assert "step 'call/down/down/down' (aws:runDocument)" in str(err.value)
    assert "at most 3 levels" in str(err.value) and "depth 4" in str(err.value)


def test_a_document_that_runs_itself_stops_at_the_depth_limit():
    store = Store(Loop=document(run_doc("Loop", name="again")))
    with pytest.raises(DocumentError, match="at most 3 levels"):
        render(store.docs["Loop"], {}, resolver=store)


@pytest.mark.parametrize("step,fragment", [
    (run_doc("Child", doc_type="LocalPath"), "documentType LocalPath"),
    (run_doc("Child", doc_type="S3"), "documentType must be SSMDocument or LocalPath, got 'S3'"),
    (run_doc("{{ name }}"), "documentPath is required"),
    (run_doc("arn:aws:ssm:us-east-1:1:document/Child"), "ARNs and paths are not supported"),
    (run_doc("Child:1:2"), "name:version"),
    (run_doc("Missing"), "document Missing not found"),
    (run_doc("Child", '"who":x}'), "documentParameters is neither valid JSON nor valid YAML"),
    (run_doc("Child", "[1, 2]"), "neither a JSON object nor a YAML mapping (it reads as a list)"),
])
def test_clear_errors_name_the_step(step, fragment):
    store = Store(Child=CHILD)
    doc = load_document(document(step, params="{name: {type: String, default: ''}}"))
    with pytest.raises(DocumentError) as err:
        render(doc, {}, resolver=store)
    message = str(err.value)
    assert message.startswith("step 'call' (aws:runDocument): ") and fragment in message, message


@pytest.mark.parametrize("params,fragment", [
    ({}, "'who' (String) is required"),
    ({"who": "x", "colour": "red"}, "unknown parameter 'colour'"),
    ({"who": {"a": 1}}, "expected a string"),
])
def test_parameter_errors_name_the_step_and_document(params, fragment):
    doc = load_document(document(run_doc("Child", params)))
    with pytest.raises(ParameterError) as err:
        render(doc, {}, resolver=Store(Child=CHILD))
    assert str(err.value).startswith("step 'call' (aws:runDocument): documentParameters for Child: ")
    assert fragment in str(err.value)


def test_nulls_are_dropped_and_numbers_are_text():
    doc = load_document(document(run_doc("Child", '{"who": true, "n": null, "tags": [1, 2.0]}')))
    (step,) = render(doc, {}, resolver=Store(Child=CHILD)).steps
    assert step.script == 'echo child true zero ["1","2"]'


def test_yaml_document_parameters():
    doc = load_document(document(run_doc("Child", "who: yaml\nn: '7'")))
    (step,) = render(doc, {}, resolver=Store(Child=CHILD)).steps
    assert step.script == "echo child yaml 7 []"


def test_without_a_resolver():
    with pytest.raises(DocumentError, match="only a broker .* renders documents that run stored documents"):
        render(load_document(document(run_doc("Child"))), {})


def test_aws_noop_runs_nothing():
    (step,) = render(load_document(document(run_doc("AWS-Noop", name="noop"))), {}).steps
    assert (step.name, step.action, step.script) == ("noop", "runShellScript",
                                                     "# aws:runDocument AWS-Noop: nothing to run")


def test_nested_steps_keep_their_flow_and_name_the_run_document_steps_they_are_in():
    """The runDocument step's flow is the nested steps' scope (the agent applies it to the nested
    document's outcome); it was copied onto the nested steps, which made a nested exit end the
    parent's flow and a nested finallyStep run after the parent had stopped."""
    child = document(shell("one", "true"), shell("two", "true", "    onFailure: successAndExit\n"),
                     run_doc("Leaf", name="deeper"))
    parent = load_document(document(
        shell("mine", "true"),
        run_doc("Child", extra="    onFailure: exit\n    onSuccess: exit\n    finallyStep: true\n")))
    store = Store(Child=child, Leaf=document(shell("leaf", "true", "    finallyStep: true\n")))
    mine, one, two, leaf = render(parent, {}, resolver=store).steps
    assert [s.name for s in (mine, one, two, leaf)] == ["mine", "call/one", "call/two", "call/deeper/leaf"]
    assert [s.on_failure for s in (one, two, leaf)] == ["", "successAndExit", ""]
    assert [s.on_success for s in (one, two, leaf)] == ["", "", ""]
    assert [s.finally_step for s in (one, two, leaf)] == [False, False, True]
    call = Scope("call", on_failure="exit", on_success="exit", finally_step=True)
    assert one.scope == two.scope == [call]
    assert leaf.scope == [call, Scope("call/deeper")] and mine.scope == []


def test_parent_precondition():
    child = document(shell("any", "true"), shell("win", "dir", "    precondition: {StringEquals: "
                                                               "[platformType, Windows]}\n"))
    store = Store(Child=child)
    on_linux = "    precondition: {StringEquals: [platformType, Linux]}\n"
    any_step, win = render(load_document(document(run_doc("Child", extra=on_linux))), {}, resolver=store).steps
    assert any_step.precondition.operands == ["platformType", "Linux"]  # copied: others skip it
    assert win.precondition.operands == ["platformType", "Windows"]  # its own stays
    # false on the rendering platform: one step, for the agent to report Skipped; nothing resolved
    store.asked.clear()
    (skipped,) = render(load_document(document(run_doc("Child", extra=on_linux))), {}, platform="Windows",
                        resolver=store).steps
    assert (skipped.name, skipped.action, skipped.script) == ("call", "aws:runDocument", "")
    assert skipped.precondition.operands == ["platformType", "Linux"] and store.asked == []
    # a parameter precondition is decided when rendered and not copied
    by_param = load_document(document(run_doc("Child", extra="    precondition: {StringEquals: "
                                                             "['{{ go }}', 'yes']}\n"),
                                      params="{go: {type: String}}"))
    steps = render(by_param, {"go": "yes"}, resolver=store).steps
    assert steps[0].precondition is None
    (skipped,) = render(by_param, {"go": "no"}, resolver=store).steps
    assert skipped.precondition.operands == ["no", "yes"]


def test_secrets_of_every_level_are_redacted():
    child = document(shell("use", "login {{ user }} {{ pw }}"),
                     params="{user: {type: String}, pw: {type: String, secret: true}}")
    parent = load_document(document(run_doc("Child", {"user": "{{ token }}", "pw": "child-secret-1"}),
                                    shell("mine", "echo {{ token }}"),
                                    params="{token: {type: String, secret: true}}"))
    rendering = render(parent, {"token": "parent-secret-2"}, resolver=Store(Child=child))
    assert rendering.steps[0].script == "login parent-secret-2 child-secret-1"
    shown = msgspec.json.encode(rendering.display_steps).decode()
    assert "secret-1" not in shown and "secret-2" not in shown
    assert rendering.display_steps[0].script == "login *** ***"
    assert rendering.display_steps[0].env["ZERORUN_PARAM_pw"] == "***"
    assert rendering.shown_parameters == {"token": "***"}


def test_nested_names_must_stay_unique():
    parent = load_document(document(run_doc("Child", {"who": "x"}), shell("call/greet", "true")))
    with pytest.raises(DocumentError, match="'call/greet' occurs twice"):
        render(parent, {}, resolver=Store(Child=CHILD))


def test_execution_timeout_reaches_nested_steps():
    parent = load_document(document(run_doc("Child", {"who": "x"}), shell("mine", "true")))
    steps = render(parent, {}, resolver=Store(Child=CHILD), execution_timeout=9).steps
    assert [s.timeout_seconds for s in steps] == [9, 9]


def test_validate_sees_which_run_document_steps_can_run():
    doc = load_document(document(run_doc("A"), run_doc("B", name="b", doc_type="LocalPath"),
                                 run_doc("C", name="c", doc_type="'{{ t }}'"),
                                 params="{t: {type: String}}"))
    assert [s.supported for s in doc.steps] == [True, False, True]
    with pytest.raises(DocumentError, match=r"inputs\.documentPath is required"):
        load_document(document("  - {action: aws:runDocument, name: x, inputs: {documentType: SSMDocument}}\n"))


def test_a_document_several_steps_run_is_looked_up_once_per_rendering():
    """Each aws:runDocument (and downloadContent) step asked the resolver again, and a render
    worker's resolver parses what it gets: a document run by ten steps was parsed ten times."""
    store = Store(Child=CHILD)
    download = ("  - action: aws:downloadContent\n    name: get\n    inputs: {sourceType: SSMDocument, "
                "sourceInfo: '{\"name\": \"Child\"}', destinationPath: child.yml}\n")
    parent = load_document(document(run_doc("Child", {"who": "a"}, name="a"), run_doc("Child", {"who": "b"}, name="b"),
                                    run_doc("Child:1", {"who": "c"}, name="c"), download))
    steps = render(parent, {}, resolver=store).steps
    assert [s.script for s in steps[:3]] == ["echo child a zero []", "echo child b zero []", "echo child c zero []"]
    assert store.asked == [("Child", ""), ("Child", "1")]
    render(parent, {}, resolver=store)  # a rendering of its own: asked again
    assert store.asked == [("Child", ""), ("Child", "1")] * 2
