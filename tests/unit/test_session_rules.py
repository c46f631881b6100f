"""Pure rules of sessions: the policy's forward destinations, the CLI's forward spec and escape,
the broker's per-session accounting and asciicast transcripts."""

from __future__ import annotations

import json

import pytest

from zerorun import protocol
from zerorun.policy import PolicyError, parse_forward_rule, parse_policy, warnings
from zerorun.session import _Escape, parse_forward
from zmq_broker.tunnels import REPLY_BYTES, Transcript, Tunnel, TunnelTable


@pytest.mark.parametrize("rule, host, port, allowed", [
    ("22", "", 22, True),
    ("22", "localhost", 22, True),
    ("22", "127.0.0.1", 22, True),
    ("22", "db.internal", 22, False),
    ("22", "", 23, False),
    ("localhost:5432", "", 5432, True),
    ("db.internal:5432", "db.internal", 5432, True),
    ("db.internal:5432", "DB.internal", 5432, True),
    ("db.internal:5432", "", 5432, False),
    ("10.0.3.*:8000-8099", "10.0.3.7", 8050, True),
    ("10.0.3.*:8000-8099", "10.0.3.7", 8100, False),
    ("*:443", "anything.example", 443, True),
    ("[fe80::1]:80", "fe80::1", 80, True),
    ("*", "x", 1, True),
])
def test_forward_rules(rule, host, port, allowed):
    assert parse_forward_rule(rule).allows(host, port) is allowed


@pytest.mark.parametrize("rule", ["0", "70000", "host:", ":22", "a b:22", "fe80::1:80", "9-8", "x:y"])
def test_malformed_forward_rules_are_refused(rule):
    with pytest.raises(ValueError):
        parse_forward_rule(rule)


def test_the_policy_has_session_and_forward_and_says_what_they_grant():
    policy = parse_policy("roles:\n  dba:\n    allow: [forward, session]\n    targets: ['tag:role=db']\n"
                          "    forward: ['5432', '*:443']\nclients: {x: dba}\n")
    role = policy.roles["dba"]
    assert role.permits("session") and role.may_forward("", 5432) and not role.may_forward("", 22)
    said = " ".join(warnings(policy))
    assert "has session" in said and "any host" in said
    with pytest.raises(PolicyError, match="forward destination"):
        parse_policy("roles:\n  r:\n    allow: [forward]\n    forward: ['nope']\n")
    with pytest.raises(PolicyError):
        parse_policy("roles:\n  r:\n    allow: [forward]\n    forward: '22'\n")  # a list, always
    bare = parse_policy("roles:\n  r:\n    allow: [forward]\n    targets: ['*']\nclients: {x: r}\n")
    assert not bare.roles["r"].may_forward("", 22)  # no list: no destination
    assert "no forward destinations" in " ".join(warnings(bare))


@pytest.mark.parametrize("spec, expected", [
    ("8080:80", (8080, "", 80)),
    ("0:22", (0, "", 22)),
    ("5432:db.internal:5432", (5432, "db.internal", 5432)),
    ("8080:[fe80::1]:80", (8080, "fe80::1", 80)),
])
def test_forward_specs(spec, expected):
    assert parse_forward(spec) == expected


@pytest.mark.parametrize("spec", ["80", "x:80", "8080:0", "8080:70000", "70000:80", "8080:"])
def test_bad_forward_specs(spec):
    with pytest.raises(ValueError):
        parse_forward(spec)


def test_the_escape_sequence_as_ssh():
    escape = _Escape()
    assert escape.feed(b"ls~x\r") == (b"ls~x\r", False)  # a tilde inside a line is plain
    assert escape.feed(b"~~") == (b"~", False)  # ~~ after a newline sends one
    escape = _Escape()
    assert escape.feed(b"~") == (b"", False)
    assert escape.feed(b"x") == (b"~x", False)
    escape = _Escape()
    assert escape.feed(b"echo\r~.") == (b"echo\r", True)


class _Agent:
    routing_id, fd = b"a", 1


def _tunnel(**kw) -> Tunnel:
    return Tunnel("s" * 32, "shell", "web-1", "key", "client", _Agent(), 0.0, 0.0, **kw)


def test_an_update_hands_over_output_in_bounded_replies_then_the_end():
    tunnel = _tunnel()
    for seq in range(1, 5):
        tunnel.buffer.append(protocol.SessionChunk(seq, "", b"x" * (REPLY_BYTES // 2)))
        tunnel.buffered += REPLY_BYTES // 2
    tunnel.state = "ended"
    first = tunnel.take_update()
    assert [c.seq for c in first.chunks] == [1, 2] and not first.ended
    second = tunnel.take_update()
    assert [c.seq for c in second.chunks] == [3, 4] and second.ended and tunnel.told_end
    assert tunnel.buffered == 0


def test_a_held_poll_is_answered_for_output_or_an_acknowledgement_worth_having():
    tunnel = _tunnel(state="open", agent_window=1000)
    assert not tunnel.worth_answering()
    tunnel.agent_acked = 100  # small, and the client is far from its limit
    tunnel.to_agent = 100
    assert not tunnel.worth_answering()
    tunnel.agent_acked = 300  # a quarter window
    assert tunnel.worth_answering()
    assert not tunnel.worth_answering(release=False)  # command work first: acknowledgements wait
    update = tunnel.take_update(release=False)
    assert update.ack == 0 and tunnel.acked_told == 0
    assert tunnel.take_update().ack == 300


def test_command_work_makes_sessions_yield_for_a_moment():
    table = TunnelTable()
    assert table.commands_busy(1, 100.0)  # the mark moved
    assert table.commands_busy(1, 100.2)
    assert not table.commands_busy(1, 100.3)
    assert table.commands_busy(2, 100.3)


def test_a_transcript_is_asciicast_v2(tmp_path):
    tunnel = _tunnel(detail={"command": "top"})
    transcript = Transcript(tmp_path / "casts", tunnel, 120, 40, "xterm-256color")
    transcript.output("héllo".encode()[:2])  # a character cut between chunks
    transcript.output("héllo".encode()[2:] + b"\r\n")
    transcript.resize(100, 30)
    transcript.close()
    header, *events = [json.loads(line) for line in transcript.path.read_text().splitlines()]
    assert header["version"] == 2 and header["width"] == 120 and header["height"] == 40
    assert header["env"] == {"TERM": "xterm-256color"} and header["command"] == "top"
    assert "".join(e[2] for e in events if e[1] == "o") == "héllo\r\n"
    assert events[-1][1:] == ["r", "100x30"]
    assert oct(transcript.path.stat().st_mode & 0o777) == "0o600"
