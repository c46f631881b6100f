"""A holder's relayed items as ``relay`` rows and back: runs of a command's items of one kind share
a row, the owner gets every item back in the order the holder relayed it."""

from __future__ import annotations

import msgspec
import pytest

from zerorun import protocol
from zmq_broker import cluster as c


def _result(iid: str, code: int = 0) -> protocol.InvocationResult:
    return protocol.InvocationResult(invocation_id=iid, status="Success" if code == 0 else "Failed", exit_code=code,
                                     stdout=f"out {iid}", steps=[protocol.StepResult(name="run", status="Success")])


def _item(command: str, kind: str, instance: str, body) -> tuple[str, str, str, bytes]:
    return command, kind, instance, c._enc.encode(body)


def _stored(rows):
    """As the store gives them back: a seq each, bodies as bytes."""
    return [(seq, *row[:3], bytes(row[3])) for seq, row in enumerate(rows, start=100)]


def _view(item: c.RelayedItem):
    value = {"ack": item.ack, "started": item.ack, "result": item.result, "refuse": item.refusal,
             "undeliverable": item.undelivered, "cancel": item.instances}[item.kind]()
    return item.command_id, item.kind, item.instance_id, msgspec.to_builtins(value)


def test_a_commands_results_share_a_row_and_come_back_in_order():
    items = [_item("cmd-a", "result", f"i-{n}", _result(f"inv-{n}", n)) for n in range(20)]
    rows = c.relay_rows(items)
    assert [(r[0], r[1], r[2]) for r in rows] == [("cmd-a", "result*", "")]
    back = c.relayed_items(_stored(rows))
    assert [_view(i) for i in back] == [("cmd-a", "result", f"i-{n}", msgspec.to_builtins(_result(f"inv-{n}", n)))
                                        for n in range(20)]
    assert {i.seq for i in back} == {100}


def test_each_commands_order_is_kept_across_kinds_and_interleaving():
    items = [
        _item("cmd-a", "ack", "i-1", c.RelayedAck(["inv-1"], 1.0)),
        _item("cmd-b", "result", "i-9", _result("inv-9")),
        _item("cmd-a", "ack", "i-2", c.RelayedAck(["inv-2"], 1.0)),
        _item("cmd-a", "result", "i-1", _result("inv-1")),
        _item("cmd-b", "result", "i-8", _result("inv-8")),
        _item("cmd-a", "cancel", "", ["i-2"]),
        _item("cmd-a", "result", "i-2", _result("inv-2", 1)),
        _item("cmd-a", "undeliverable", "i-3", c.Undelivered("inv-3", "too large")),
        _item("cmd-a", "refuse", "i-4", protocol.Refusal(invocation_id="inv-4", reason="expired", message="late")),
        _item("cmd-a", "refuse", "i-5", protocol.Refusal(invocation_id="inv-5", reason="expired", message="late")),
    ]
    rows = c.relay_rows(items)
    assert [(r[0], r[1]) for r in rows] == [("cmd-a", "ack*"), ("cmd-a", "result"), ("cmd-a", "cancel"),
                                            ("cmd-a", "result"), ("cmd-a", "undeliverable"), ("cmd-a", "refuse*"),
                                            ("cmd-b", "result*")]
    back = [_view(i) for i in c.relayed_items(_stored(rows))]
    expected = [_view(c.RelayedItem(0, cmd, kind, inst, body)) for cmd, kind, inst, body in items]
    for command in ("cmd-a", "cmd-b"):
        assert [v for v in back if v[0] == command] == [v for v in expected if v[0] == command]


def test_a_single_item_is_the_plain_row_an_earlier_broker_wrote():
    item = _item("cmd-a", "result", "i-1", _result("inv-1"))
    assert c.relay_rows([item]) == [item]
    (back,) = c.relayed_items([(7, *item)])
    assert (back.seq, back.kind, back.instance_id, back.result()) == (7, "result", "i-1", _result("inv-1"))


@pytest.mark.parametrize("kind", ["result*", "ack*"])
def test_a_run_that_does_not_decode_is_dropped_and_still_deleted(kind, caplog):
    (back,) = c.relayed_items([(5, "cmd-a", kind, "", b"\xc1 not msgpack")])
    assert (back.seq, back.kind) == (5, "")
    assert "does not decode" in caplog.text
