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
