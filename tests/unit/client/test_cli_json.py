"""``--json`` is a contract for scripts: every field of a view, whatever its value."""

import json

from zerorun import cli, protocol


def _fields(kind: type) -> set[str]:
    return set(kind.__struct_fields__)


def test_a_view_has_every_field_even_at_its_default(capsys):
    """Fields at their default were left out (the views omit them on the wire): a pending
    invocation had no exit_code, stdout or stderr, a command without a comment no comment,
    so `jq .invocations[0].exit_code` gave null and `view["stderr"]` a KeyError."""
    pending = protocol.InvocationView(invocation_id="i-1", command_id="c-1", instance_id="web-1", status="Pending")
    view = protocol.CommandView(command_id="c-1", status="Pending", status_details="", document_name="RunShellScript",
                                document_version="1", document_sha256="ab", parameters={}, targets=["tag:role=web"],
                                requested_by="admin", requested_at=1.0, invocations=[pending],
                                steps=[protocol.Step(name="s", script="true")])
    cli._print_json(view)
    data = json.loads(capsys.readouterr().out)
    assert set(data) == _fields(protocol.CommandView)
    assert set(data["invocations"][0]) == _fields(protocol.InvocationView)
    assert data["invocations"][0]["exit_code"] == -1 and data["invocations"][0]["stderr"] == ""
    assert set(data["steps"][0]) == _fields(protocol.Step)
    assert data["comment"] == "" and data["counts"] == {} and data["webhooks"] == []


def test_lists_and_plain_data_are_printed_as_before(capsys):
    token = protocol.TokenView(token_id="tok-1", state="active", tags={"role": "web"}, uses=1, uses_left=1,
                               expires_at=2.0, created_at=1.0)
    cli._print_json([token])
    listed = json.loads(capsys.readouterr().out)
    assert set(listed[0]) == _fields(protocol.TokenView) and listed[0]["instance_prefix"] == ""
    cli._print_json({"deleted": "App", "version": ""})
    assert json.loads(capsys.readouterr().out) == {"deleted": "App", "version": ""}
