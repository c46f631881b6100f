"""zerorun.fleet.run_command while it waits: who shows progress and output, that the batch's lines
come before its hosts' results, that -v does not dump shown output again; and the async refusal.

The broker is a fake client (``broker.connect`` is patched) that answers at once; threads stand in
for the forks of a batch and run the real coalescing. Ansible's display is the real singleton
with its ``display`` method recorded. The same behaviour against a real broker, agents and
ansible-playbook is in tests/integration/test_ansible_collection.py.
"""

import contextlib
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
from ansible.errors import AnsibleActionFail
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.play import Play
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import action_loader
from ansible.utils.display import Display
from ansible.vars.manager import VariableManager

from ansible_collections.zerorun.fleet.plugins.action import run_command as action
from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker, coalesce
from zerorun import protocol


class FakeBroker:
    """Every invocation succeeds at once, printing ``out of <instance>``; records each request."""

    def __init__(self):
        self.calls, self.commands = [], {}
        self.lock = threading.Lock()

    def _record(self, *call):
        with self.lock:
            self.calls.append(call)

    def view(self, command_id, instance_ids):
        invocations = [protocol.InvocationView(
            invocation_id="inv-" + iid, command_id=command_id, instance_id=iid, status="Success", exit_code=0,
            stdout="out of %s\n" % iid, started_at=100.0, ended_at=101.0) for iid in self.commands[command_id]]
        if instance_ids:
            invocations = [i for i in invocations if i.instance_id in set(instance_ids)]
        ids = self.commands[command_id]
        return protocol.CommandView(
            command_id=command_id, status="Success", status_details="", document_name="RunShellScript",
            document_version="1", document_sha256="ab" * 32, parameters={}, targets=[], requested_by="test",
            requested_at=99.0, counts={"Success": len(ids)}, target_count=len(ids), invocations=invocations)

    def send(self, dry_run=False, **request):
        command_id = "cmd-%d" % len(self.commands)
        self.commands[command_id] = list(request.get("instance_ids") or []) or ["i-t1", "i-t2"]
        self._record("send", command_id)
        pending = self.view(command_id, ())
        for inv in pending.invocations:
            inv.status, inv.stdout = "Pending", ""
        return pending

    def wait(self, command_id, timeout=None, include_output=True, on_progress=None, poll_interval=15.0,
             instance_ids=()):
        self._record("wait", command_id)
        return self.view(command_id, instance_ids)

    def get_command(self, command_id, include_output=True, instance_ids=()):
        self._record("get", command_id)
        return self.view(command_id, instance_ids)

    def follow(self, command_id, cursors, instance_ids=(), timeout=10.0):
        self._record("follow", command_id)
        ids = self.commands[command_id]
        return protocol.OutputUpdate(
            command_id=command_id, status="Success", done=True,
            chunks=[protocol.OutputChunk(iid, "stdout", "out of %s\n" % iid) for iid in ids],
            cursors={}, statuses={iid: "Success" for iid in ids})


@pytest.fixture
def fake(monkeypatch, tmp_path):
    fake = FakeBroker()

    @contextlib.contextmanager
    def connect(options, kind="module"):
        yield fake

    monkeypatch.setattr(broker, "connect", connect)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the rendezvous directory
    monkeypatch.setattr(coalesce, "QUIET", 0.3)
    return fake


class Screen:
    """What the display printed, in order, with the hosts' returns interleaved."""

    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def display(self, msg, color=None, stderr=False, screen_only=False, log_only=False, newline=True, caplevel=None):
        with self.lock:
            self.events.extend(("line", line) for line in msg.split("\n"))

    def returned(self, host):
        with self.lock:
            self.events.append(("returned", host))

    def lines(self):
        return [text for kind, text in self.events if kind == "line"]


@pytest.fixture
def screen(monkeypatch):
    screen = Screen()
    monkeypatch.setattr(Display(), "display", screen.display)
    return screen


def verbosity(monkeypatch, level):
    monkeypatch.setattr(Display(), "verbosity", level)


def make_task(args, **keywords):
    loader = DataLoader()
    play = Play.load({"hosts": "all", "gather_facts": False,
                      "tasks": [dict({"zerorun.fleet.run_command": args}, **keywords)]},
                     loader=loader, variable_manager=VariableManager(loader=loader))
    return [t for b in play.compile() for t in b.block if t.action == "zerorun.fleet.run_command"][0]


def action_for(task):
    connection = SimpleNamespace(_shell=SimpleNamespace(tmpdir=None))
    return action_loader.get("zerorun.fleet.run_command", task=task, connection=connection,
                             play_context=PlayContext(), loader=DataLoader(), templar=None, shared_loader_obj=None)


def host_vars(host, batch):
    return {"inventory_hostname": host, "ansible_play_batch": batch, "zerorun_instance_id": "i-" + host,
            "hostvars": {h: {"zerorun_instance_id": "i-" + h} for h in batch}}


def run_batch(task, batch, screen, leader_delay=0.0):
    """The batch's hosts in concurrent threads (forks); the first one leads."""
    results = {}

    def run(host):
        results[host] = action_for(task).run(task_vars=host_vars(host, batch))
        screen.returned(host)

    threads = []
    for host in batch:
        threads.append(threading.Thread(target=run, args=(host,)))
        threads[-1].start()
        if host == batch[0]:
            time.sleep(leader_delay)
    for thread in threads:
        thread.join(30)
    return results


# -- per-host mode ----------------------------------------------------------------------------------

def test_with_v_only_the_leader_follows_and_its_lines_come_before_every_result(fake, screen, monkeypatch):
    verbosity(monkeypatch, 1)
    batch = ["web1", "web2", "web3"]
    results = run_batch(make_task({"commands": "uptime"}), batch, screen, leader_delay=0.2)
    assert [c[0] for c in fake.calls].count("follow") == 1  # one process follows the batch's command
    output = [line for line in screen.lines() if "|" in line or "--" in line]
    assert sorted(output) == sorted(["i-web1 | out of i-web1", "i-web2 | out of i-web2", "i-web3 | out of i-web3",
                                     "i-web1 -- Success", "i-web2 -- Success", "i-web3 -- Success"])
    first_return = next(i for i, (kind, _) in enumerate(screen.events) if kind == "returned")
    assert all(kind == "line" for kind, _ in screen.events[:first_return])
    assert len([e for e in screen.events if e[0] == "line"]) == len(output)
    for host, result in results.items():
        assert not result["failed"] and result["stdout"] == "out of i-" + host
        assert result["_ansible_verbose_override"] is True  # -v does not dump the output again


def test_without_v_nothing_is_followed_and_a_quick_command_prints_nothing(fake, screen, monkeypatch):
    verbosity(monkeypatch, 0)
    batch = ["web1", "web2"]
    results = run_batch(make_task({"commands": "uptime"}), batch, screen)
    assert "follow" not in [c[0] for c in fake.calls]
    assert [c[0] for c in fake.calls].count("wait") == 2 and "get" not in [c[0] for c in fake.calls]
    assert screen.lines() == []
    assert all("_ansible_verbose_override" not in r and not r["failed"] for r in results.values())


def test_no_log_shows_no_output_and_keeps_the_dump_rule(fake, screen, monkeypatch):
    verbosity(monkeypatch, 3)
    results = run_batch(make_task({"commands": "cat secret"}, no_log=True), ["a", "b"], screen)
    assert "follow" not in [c[0] for c in fake.calls]
    assert not any("out of" in line for line in screen.lines())
    assert all("_ansible_verbose_override" not in r for r in results.values())


def test_no_wait_shows_nothing(fake, screen, monkeypatch):
    verbosity(monkeypatch, 1)
    results = run_batch(make_task({"commands": "uptime", "wait": False}), ["a", "b"], screen)
    assert [c[0] for c in fake.calls if c[0] != "send"] == ["get", "get"]
    assert screen.lines() == [] and all("_ansible_verbose_override" not in r for r in results.values())


# -- explicit targets ---------------------------------------------------------------------------

def test_explicit_targets_with_v_show_every_instance_and_hide_the_dump(fake, screen, monkeypatch):
    verbosity(monkeypatch, 1)
    result = action_for(make_task({"commands": "uptime", "targets": "tag:role=web"})).run(task_vars={})
    assert screen.lines() == ["i-t1 | out of i-t1", "i-t2 | out of i-t2", "i-t1 -- Success", "i-t2 -- Success"]
    assert result["_ansible_verbose_override"] is True and result["invocations"][0]["stdout"] == "out of i-t1"


def test_negative_progress_interval_is_refused(fake, screen):
    result = action_for(make_task({"commands": "x", "targets": "tag:a=b", "progress_interval": -1})).run(task_vars={})
    assert result["failed"] and "progress_interval must be 0" in result["msg"] and fake.calls == []


@pytest.mark.parametrize("task_vars", [{}, {"inventory_hostname": "web-1"}])
def test_negative_wait_timeout_is_refused_before_anything_is_sent(fake, screen, task_vars):
    """wait_timeout=-1 sent the command, then failed the task "still InProgress after
    wait_timeout=-1s" (the CLI's --wait-timeout refuses it before sending)."""
    args = {"commands": "x", "wait_timeout": -1}
    args.update({} if task_vars else {"targets": "tag:a=b"})
    result = action_for(make_task(args)).run(task_vars=dict(task_vars))
    assert result["failed"] and "wait_timeout must be 0 or more" in result["msg"] and fake.calls == []


def test_notify_invocations_without_notify_is_refused_before_anything_is_sent(fake, screen):
    """It was dropped without a word: no webhook would ever be told."""
    result = action_for(make_task({"commands": "x", "targets": "tag:a=b", "notify_invocations": True})).run(task_vars={})
    assert result["failed"] and "notify_invocations needs notify" in result["msg"] and fake.calls == []


# -- async --------------------------------------------------------------------------------------

@pytest.mark.parametrize("poll", [0, 5])
def test_async_is_refused_with_the_native_equivalent(fake, poll):
    task = make_task({"commands": "x", "targets": "tag:a=b"}, **{"async": 60, "poll": poll})
    with pytest.raises(AnsibleActionFail) as refused:
        action_for(task).run(task_vars={})
    message = str(refused.value)
    assert "zerorun.fleet.run_command does not support async" in message
    assert "wait: false" in message and "zerorun.fleet.command_info" in message and "wait_timeout" in message
    assert fake.calls == []


def test_async_refusal_of_the_other_modules_names_no_run_command_option():
    assert "wait: false" in action.ActionModule.ASYNC_HINT
    from ansible_collections.zerorun.fleet.plugins.plugin_utils.action import ZerorunAction

    assert "remove async" in ZerorunAction.ASYNC_HINT
