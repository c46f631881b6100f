"""A step's ``runAs`` (issue 22): a Zerorun extension of Jinja documents, rendered and checked like
any input; nested documents take the runDocument step's user."""

from __future__ import annotations

import pytest

from zerorun.documents import DocumentError, load_document, render

JINJA = """
schemaVersion: "2.2"
templating: jinja
parameters:
  user: {type: String, default: deploy}
mainSteps:
  - name: one
    action: aws:runShellScript
    runAs: "{{ user }}"
    inputs: {runCommand: [id -un]}
  - name: two
    action: aws:runShellScript
    inputs: {runCommand: [id -un]}
"""


def test_run_as_is_rendered_per_step():
    doc = load_document(JINJA, name="users")
    steps = render(doc, {}).steps
    assert [s.run_as for s in steps] == ["deploy", ""]
    assert render(doc, {"user": "app-web"}).display_steps[0].run_as == "app-web"
    with pytest.raises(DocumentError, match="step 'one' runAs: invalid run-as user"):
        render(doc, {"user": "x; rm -rf /"})


def test_ssm_documents_have_no_run_as():
    ssm = JINJA.replace("templating: jinja\n", "").replace('"{{ user }}"', "deploy")
    with pytest.raises(DocumentError, match="runAs is a Zerorun extension, only in Zerorun-native documents"):
        load_document(ssm, name="users")
    with pytest.raises(DocumentError, match="runAs must be a user name"):
        load_document(JINJA.replace('"{{ user }}"', "[a, b]"), name="users")


def test_nested_steps_take_the_run_document_steps_user():
    child = load_document("""
schemaVersion: "2.2"
mainSteps:
  - name: inner
    action: aws:runShellScript
    inputs: {runCommand: [id -un]}
""", name="child")
    parent = load_document("""
schemaVersion: "2.2"
templating: jinja
mainSteps:
  - name: call
    action: aws:runDocument
    runAs: deploy
    inputs: {documentType: SSMDocument, documentPath: child}
""", name="parent")
    steps = render(parent, {}, resolver=lambda name, version: child).steps
    assert [(s.name, s.run_as) for s in steps] == [("call/inner", "deploy")]
