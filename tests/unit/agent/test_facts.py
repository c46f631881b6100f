"""What the agent reports about its machine (agent/facts.py) and how the core says it."""

from __future__ import annotations

import os

from agent import facts
from agent.core import AgentCore, Identity
from agent.journal import MemoryJournal
from zerorun import protocol


def test_os_release_fields(tmp_path):
    release = tmp_path / "os-release"
    release.write_text('NAME="Ubuntu"\nID=ubuntu\nID_LIKE="debian gnu"\nVERSION_ID=\'22.04\'\n# comment\nbad line\n')
    assert facts.os_release((tmp_path / "missing", release)) == protocol.OsFacts(
        id="ubuntu", version="22.04", name="Ubuntu", like=["debian", "gnu"])
    assert facts.os_release((tmp_path / "missing",)) == protocol.OsFacts()


def test_os_release_override_from_the_environment(tmp_path, monkeypatch):
    release = tmp_path / "os-release"
    release.write_text("ID=alpine\nVERSION_ID=3.20\n")
    monkeypatch.setenv(facts.OS_RELEASE_ENV, str(release))
    assert facts.os_release().id == "alpine"


def test_addresses_memory_and_boot_time_from_proc(tmp_path):
    net = tmp_path / "net"
    net.mkdir()
    (net / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 10.1.2.3\n"
        "        /32 host LOCAL\n     |-- 10.1.2.255\n        /32 link BROADCAST\nLocal:\n     |-- 10.1.2.3\n"
        "        /32 host LOCAL\n")
    (net / "if_inet6").write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd000000000000000000000000000002 04 40 00 82     eth0\n"
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n")
    (tmp_path / "meminfo").write_text("MemTotal:        2048000 kB\nMemFree: 1 kB\n")
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\n")
    assert facts.ip_addresses(tmp_path) == ["10.1.2.3", "fd00::2"]
    assert facts.memory_mb(tmp_path) == 2000
    assert facts.boot_time(tmp_path) == 1700000000.0
    assert facts.ip_addresses(tmp_path / "nothing") == [] and facts.memory_mb(tmp_path / "nothing") == 0


def test_collected_facts_fit_the_wire():
    found = facts.collect()
    assert found.kernel == os.uname().release and found.cpus >= 1 and found.python_version
    decoded = protocol.agent_message_decoder.decode(protocol.encode(protocol.FactsUpdate(found)))
    assert decoded.facts == found


def test_the_watcher_reports_changes_only(tmp_path, monkeypatch):
    release = tmp_path / "os-release"
    release.write_text("ID=debian\nVERSION_ID=12\n")
    monkeypatch.setenv(facts.OS_RELEASE_ENV, str(release))
    now = [0.0]
    watcher = facts.FactsWatcher(every=60, monotonic=lambda: now[0])
    watcher._resolving_for = ""  # the lookup thread's answer, whenever it comes, is not taken
    watcher._fqdn = watcher.current.fqdn  # as if resolved already
    assert not watcher.due()
    now[0] = 61
    assert watcher.due() and watcher.check() is None and not watcher.due()
    release.write_text("ID=debian\nVERSION_ID=13\n")
    now[0] = 122
    changed = watcher.check()
    assert changed is not None and changed.os.version == "13" and watcher.check() is None


def test_the_core_sends_facts_and_the_token_until_welcomed():
    sent: list[object] = []
    identity = Identity("i-1", {"role": "web"}, facts=protocol.Facts(kernel="6.1"), enrol_token="zrt1_secret")
    core = AgentCore(identity, MemoryJournal(), runner=None, send=sent.append)  # type: ignore[arg-type]
    core.connection_opened()
    core.connected()
    hello = sent.pop()
    assert isinstance(hello, protocol.Hello) and hello.enrol_token == "zrt1_secret" and hello.facts.kernel == "6.1"
    core.set_facts(protocol.Facts(kernel="6.2"))
    assert sent == []  # not welcomed: it goes with the next HELLO
    core.receive(protocol.frames(protocol.Welcome("i-1", 5.0, 0.0)))
    core.set_facts(protocol.Facts(kernel="6.3"))
    assert sent[-1] == protocol.FactsUpdate(protocol.Facts(kernel="6.3"))
    core.receive(protocol.frames(protocol.PleaseHello()))
    hello = sent[-1]
    assert hello.enrol_token == "" and hello.facts.kernel == "6.3"
