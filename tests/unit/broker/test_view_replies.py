"""Command views go into replies as they are (msgspec encodes a Struct inside ``Reply.data``):
making a dict of each first (``to_builtins``) cost more than the encoding, on every send, show,
wait and follow answer. What a client decodes must not change."""

import time

import msgspec

from zerorun import protocol
from zmq_broker.model import CommandRecord


def _view() -> protocol.CommandView:
    step = protocol.Step(name="runShellScript", script="echo é", env={"A": "b"}, timeout_seconds=60)
    inv = protocol.InvocationView(invocation_id="i-1", command_id="c-1", instance_id="web-1", status="Success",
                                  exit_code=0, stdout="out\n", ended_at=time.time(),
                                  steps=[protocol.StepResult(name="runShellScript", status="Success", exit_code=0)])
    rec = CommandRecord("c-1", "Success", "Success", "RunShellScript", "1", "a" * 64,
                        {"commands": ["echo é"], "nested": {"k": [1, 2.5, None, True]}}, ["tag:role=web"],
                        "admin", time.time(), time.time() + 60, 60, 50, 0, [step], invocation_ids=["i-1"])
    view = rec.view([inv])
    view.webhooks = [protocol.WebhookStatus(target="ops", event="command", state="delivered", attempts=1)]
    return view


def _decoded(data) -> dict:
    return msgspec.msgpack.decode(protocol.encode(protocol.Reply(7, True, data=data)))


def test_a_view_encoded_as_itself_decodes_as_its_plain_form():
    view = _view()
    update = protocol.OutputUpdate("c-1", "InProgress", False, [protocol.OutputChunk("web-1", "stdout", "x")],
                                   {"web-1:stdout": 1}, {"web-1": "InProgress"})
    for data in (view, [view, view], update):
        assert _decoded(data) == _decoded(protocol.to_builtins(data))
    reply = protocol.reply_decoder.decode(protocol.encode(protocol.Reply(7, True, data=view)))
    assert protocol.convert(reply.data, protocol.CommandView) == view
