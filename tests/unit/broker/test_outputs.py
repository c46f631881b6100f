"""The output store's reader without processes: it paces its reads (a window across agents and per
invocation), asks again what went unanswered, ignores what it did not ask for, and says why an
output is incomplete."""

from __future__ import annotations

import pytest

from zerorun import protocol
from zmq_broker import outputs
from zmq_broker.outputs import CHUNK, PER_INVOCATION, WINDOW, FileData, WholeOutputs
from zmq_broker.store.sqlite import SqliteStore


class Agents:
    """Which agents are connected, and what the reader asked of them."""

    def __init__(self):
        self.online = {"web-1", "web-2"}
        self.reads: list[tuple[str, protocol.OutputRead]] = []
        self.done: list[str] = []

    def read(self, instance_id: str, message: protocol.OutputRead) -> bool:
        if instance_id not in self.online:
            return False
        self.reads.append((instance_id, message))
        return True

    def finished(self, instance_id: str, ids: list[str]) -> None:
        self.done.extend(ids)


@pytest.fixture
def reader(tmp_path):
    agents = Agents()
    store = SqliteStore(tmp_path / "broker.db")
    whole = WholeOutputs(store, FileData(tmp_path / "outputs"), 10 * CHUNK, "", agents.read, agents.finished)
    yield whole, agents, store
    store.close()


def _result(iid: str, stdout: int = 0, stderr: int = 0, text: str = "") -> protocol.InvocationResult:
    return protocol.InvocationResult(iid, "Success", stdout=text, stdout_follows=stdout, stderr_follows=stderr)


def _answer(whole, instance_id, read, data=None, error=""):
    data = bytes([read.offset % 251]) * read.length if data is None else data
    whole.data_arrived(instance_id, protocol.OutputData(read.invocation_id, read.stream, read.offset, data, error))


def test_reads_stay_within_the_window_and_the_limit(reader):
    whole, agents, store = reader
    for n in range(6):
        whole.result_arrived("web-1", "c1", _result(f"i{n}", stdout=3 * CHUNK), 1000)
    whole.pump()
    assert len(agents.reads) == WINDOW
    per_invocation = {}
    for _, read in agents.reads:
        per_invocation[read.invocation_id] = per_invocation.get(read.invocation_id, 0) + 1
    assert max(per_invocation.values()) <= PER_INVOCATION
    # answers free the window; everything arrives; each output is complete and told to the agent
    while agents.reads:
        instance_id, read = agents.reads.pop(0)
        _answer(whole, instance_id, read)
        whole.pump()
    assert not whole.reading and sorted(agents.done) == [f"i{n}" for n in range(6)]
    rec = store.get_output("i3")
    assert rec.state == "complete" and rec.stdout_have == 3 * CHUNK
    assert whole.data.read("c1", "i3", "stdout", CHUNK, 3) == bytes([CHUNK % 251]) * 3

    # beyond the broker's limit: cut, and said so; stdout first
    whole.result_arrived("web-1", "c2", _result("big", stdout=12 * CHUNK, stderr=CHUNK), 1000)
    while True:
        whole.pump()
        if not agents.reads:
            break
        _answer(whole, *agents.reads.pop(0))
    rec = store.get_output("big")
    assert (rec.state, rec.stdout_have, rec.stderr_have) == ("incomplete", 10 * CHUNK, 0)
    assert "limit of" in rec.note


def test_an_agent_away_is_read_later_and_unanswered_reads_are_asked_again(reader, monkeypatch):
    whole, agents, store = reader
    agents.online = set()
    whole.result_arrived("web-1", "c1", _result("i1", stdout=100), 10)
    whole.pump()
    assert agents.reads == []
    agents.online = {"web-1"}
    whole.pump()
    assert [r.offset for _, r in agents.reads] == [0]
    lost = agents.reads.pop()[1]
    now = outputs.time.monotonic()
    monkeypatch.setattr(outputs.time, "monotonic", lambda: now + outputs.READ_TIMEOUT + 1)
    whole.pump()
    again = agents.reads.pop()[1]
    assert (again.offset, again.length) == (lost.offset, lost.length)
    _answer(whole, "web-2", again)  # another instance's agent: not its output
    _answer(whole, "web-1", again, b"x" * 100)
    _answer(whole, "web-1", again, b"y" * 100)  # the late answer to the first read: asked once, used once
    assert store.get_output("i1").state == "complete"
    assert whole.data.read("c1", "i1", "stdout", 0, 200) == b"x" * 100


def test_an_agent_that_lost_the_output_leaves_it_incomplete_with_the_reason(reader):
    whole, agents, store = reader
    whole.result_arrived("web-1", "c1", _result("i1", stdout=2 * CHUNK), 10)
    whole.pump()
    _answer(whole, "web-1", agents.reads[0][1])
    _answer(whole, "web-1", agents.reads[1][1], error="this agent no longer holds that output")
    rec = store.get_output("i1")
    assert rec.state == "incomplete" and rec.stdout_have == CHUNK and "no longer holds" in rec.note
    view = protocol.InvocationView("i1", "c1", "web-1", "Success", stdout_size=2 * CHUNK)
    part = whole.slice(view, rec, "stdout", 0, 10 * CHUNK)
    assert len(part.data) == CHUNK and not part.complete and not part.pending and "no longer holds" in part.note


def test_output_the_view_holds_is_served_from_it_and_larger_text_is_kept(reader):
    whole, agents, store = reader
    whole.result_arrived("web-1", "c1", _result("small", text="hello\n"), 10)
    assert store.get_output("small") is None and agents.reads == []
    view = protocol.InvocationView("small", "c1", "web-1", "Success", stdout="hello\n", stdout_size=6)
    part = whole.slice(view, None, "stdout", 1, 100)
    assert (part.data, part.complete, part.size) == (b"ello\n", True, 6)
    whole.result_arrived("web-1", "c1", _result("wide", text="x" * 50), 10)  # the view keeps 10: the store all
    rec = store.get_output("wide")
    assert rec.state == "complete" and whole.data.read("c1", "wide", "stdout", 0, 100) == b"x" * 50
