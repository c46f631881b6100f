"""Inline renderings are reused for the same document, parameters, platform and timeout (a
playbook in per-host mode sends one such command per host); each command still gets steps of its
own to change."""

from __future__ import annotations

from zerorun import protocol
from zmq_broker.docstore import DocumentStore
from zmq_broker.handlers.commands import _run_as
from zmq_broker.rendering import Renderer, RenderSettings
from zmq_broker.store.sqlite import SqliteStore


def _renderer():
    renderer = Renderer(RenderSettings(), DocumentStore(SqliteStore(":memory:")))
    out: list = []

    def send(**fields):
        fields.setdefault("parameters", {"commands": ["true"]})
        renderer.render(protocol.SendCommand(document="RunShellScript", **fields), "Linux",
                        lambda rendered, error: out.append((rendered, error)))
        return out[-1]

    return renderer, send


def test_the_same_command_is_rendered_once_and_each_gets_its_own_copy():
    renderer, send = _renderer()
    first, error = send()
    second, again = send(parameters={"commands": ["true"]}, comment="another command")
    assert error is None and again is None and renderer.stats.get("inline_again") == 1
    assert first is not second and first.steps == second.steps
    first.steps = _run_as(first.steps, "alice")  # what a send with run_as does to its copy
    assert all(step.run_as == "alice" for step in first.steps)
    third, _ = send()
    assert third.steps == second.steps and all(step.run_as == "" for step in third.steps)


def test_what_changes_the_rendering_is_not_reused():
    renderer, send = _renderer()
    base, _ = send()
    other, _ = send(parameters={"commands": ["false"]})
    timed, _ = send(execution_timeout=7)
    assert "false" in other.steps[0].script and "false" not in base.steps[0].script
    assert timed.steps[0].timeout_seconds == 7 != base.steps[0].timeout_seconds
    assert "inline_again" not in renderer.stats
    rendered, error = send(document_hash="0" * 64)  # a check, not part of what is reused
    assert rendered is None and error.code == "DocumentHashMismatch"
    assert send()[0].steps == base.steps and renderer.stats["inline_again"] == 1


PATTERNED = """schemaVersion: '2.2'
description: a parameter checked by its author's regular expression
parameters:
  name: {type: String, allowedPattern: '^[a-z]+$'}
mainSteps:
  - action: aws:runShellScript
    name: run
    inputs: {runCommand: ['echo {{ name }}']}
"""


def test_a_stored_documents_own_patterns_are_checked_in_a_worker_and_its_rendering_kept():
    """Its author's ``allowedPattern`` may be long to compile, so the loop never runs it: a worker
    renders (under its deadline), and what it rendered is kept as an inline rendering would be."""
    import time

    renderer = Renderer(RenderSettings(workers=1), DocumentStore(SqliteStore(":memory:")))
    renderer.documents.create("ops-patterned", PATTERNED)
    out: list = []

    def send(value: str):
        renderer.render(protocol.SendCommand(document="ops-patterned", parameters={"name": value}), "Linux",
                        lambda rendered, error: out.append((rendered, error)))
        deadline = time.monotonic() + 30
        while renderer and time.monotonic() < deadline:
            renderer.collect()
            time.sleep(0.01)
        return out.pop()

    try:
        rendered, error = send("abc")
        assert error is None and "echo abc" in rendered.steps[0].script
        assert renderer.stats["worker"] == 1 and renderer.stats["inline"] == 0
        again, error = send("abc")
        assert error is None and again is not rendered and again.steps == rendered.steps
        assert renderer.stats["worker"] == 1 and renderer.stats["inline_again"] == 1
        refused, error = send("ABC")
        assert refused is None and error.code == "InvalidParameters" and renderer.stats["worker"] == 2
    finally:
        renderer.close()
    builtin, send_builtin = _renderer()
    send_builtin(parameters={"commands": ["true"], "executionTimeout": "60"})  # a built-in's patterns are ours
    assert builtin.stats["inline"] == 1 and builtin.stats["worker"] == 0


def test_a_document_a_worker_asks_for_is_handed_over_unparsed(monkeypatch):
    """A composite document's worker asks the loop for each document it runs: the loop parsed
    each one (a stored document's YAML, ~0.5 s for 256 KiB) only to send its text."""
    from zmq_broker import docstore
    from zmq_broker.rendering import NeedDocument

    renderer, _ = _renderer()
    renderer.documents.create("ops-child", "schemaVersion: '2.2'\ndescription: c\nmainSteps:\n"
                                           "- {action: aws:runShellScript, name: s, inputs: {runCommand: [echo]}}\n")
    renderer.documents._parsed.clear()  # as after a restart

    def parsed(*args, **kwargs):
        raise AssertionError("the loop parsed a document a worker asked for")

    monkeypatch.setattr(docstore, "load_document", parsed)
    reply = renderer._document_for(3, NeedDocument(3, "ops-child", ""))
    assert (reply.job, reply.name, reply.version, reply.error) == (3, "ops-child", "1", "")
    assert reply.content.startswith("schemaVersion")
    reply = renderer._document_for(4, NeedDocument(4, "ops-missing", ""))
    assert reply.code == "NotFound" and "ops-missing" in reply.error
