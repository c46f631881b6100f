"""zerorun.fleet.run_command: option handling, both targeting modes, batch coalescing, check mode.

The broker is a fake client (``broker.connect`` is patched); the coalescing runs for real, with
threads standing in for forks (flock locks are per open file, so threads contend like processes).
"""

import contextlib
import tempfile
import threading
from types import SimpleNamespace

import pytest
from ansible.errors import AnsibleActionFail, AnsibleError
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.play import Play
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import action_loader
from ansible.vars.manager import VariableManager

from ansible_collections.zerorun.fleet.plugins.action import run_command as action
from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker, coalesce
from zerorun import protocol


# -- a fake broker ------------------------------------------------------------------------------

class FakeBroker:
    """Records sends; every invocation succeeds except instances listed in ``failing``."""

    def __init__(self, failing=()):
        self.sends, self.waits, self.failing = [], [], set(failing)
        self.commands = {}
        self.lock = threading.Lock()

    def view(self, command_id, instance_ids, done=True, dry_run=False):
        invocations = []
        for iid in instance_ids:
            bad = iid in self.failing
            invocations.append(protocol.InvocationView(
                invocation_id="inv-" + iid, command_id=command_id, instance_id=iid,
                status=("Pending" if not done else "Failed" if bad else "Success"),
                exit_code=(-1 if not done else 3 if bad else 0),
                stdout="" if not done else "out of %s\n" % iid, stderr="boom\n" if bad and done else "",
                started_at=100.0 if done else 0.0, ended_at=101.5 if done else 0.0))
        status = "Pending" if not done else ("Failed" if self.failing & set(instance_ids) else "Success")
        return protocol.CommandView(
            command_id=command_id, status=status, status_details="", document_name="RunShellScript",
            document_version="1", document_sha256="ab" * 32, parameters={}, targets=[], requested_by="test",
            requested_at=99.0, counts={status: len(instance_ids)}, target_count=len(instance_ids),
            steps=[protocol.Step(name="runShellScript", script="uptime\n")],
            invocations=[] if dry_run and not instance_ids else invocations)

    # Client API used by the plugins
    def send(self, dry_run=False, **request):
        with self.lock:
            self.sends.append(dict(request, dry_run=dry_run))
            command_id = "" if dry_run else "cmd-%d" % len(self.sends)
            ids = list(request.get("instance_ids") or []) or ["i-t1", "i-t2"]
            if dry_run:
                return self.view(command_id, ids, dry_run=True)
            self.commands[command_id] = ids
            return self.view(command_id, ids, done=False)

    def wait(self, command_id, timeout=None, include_output=True, instance_ids=()):
        self.waits.append(command_id)
        return self._only(self.view(command_id, self.commands[command_id]), instance_ids)

    def get_command(self, command_id, include_output=True, instance_ids=()):
        return self._only(self.view(command_id, self.commands[command_id], done=False), instance_ids)

    @staticmethod
    def _only(view, instance_ids):
        """As the broker does: only these invocations, counts still whole."""
        if instance_ids:
            view.invocations = [i for i in view.invocations if i.instance_id in set(instance_ids)]
        return view

    def instances(self, targets, include_offline=True):
        return []


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


def make_task(args, check_mode=False, diff=False, **keywords):
    """One task, as every fork of a play batch receives it (same play and task uuids)."""
    loader = DataLoader()
    play = Play.load({"hosts": "all", "gather_facts": False,
                      "tasks": [dict({"zerorun.fleet.run_command": args}, **keywords)]},
                     loader=loader, variable_manager=VariableManager(loader=loader))
    task = [t for b in play.compile() for t in b.block if t.action == "zerorun.fleet.run_command"][0]
    task.check_mode = check_mode
    task.diff = diff
    return task


def action_for(task):
    connection = SimpleNamespace(_shell=SimpleNamespace(tmpdir=None))  # never used: broker-only action
    return action_loader.get("zerorun.fleet.run_command", task=task, connection=connection,
                             play_context=PlayContext(), loader=DataLoader(), templar=None, shared_loader_obj=None)


def make_action(args, **options):
    return action_for(make_task(args, **options))


def host_vars(host, batch):
    return {"inventory_hostname": host, "ansible_play_batch": batch, "zerorun_instance_id": "i-" + host,
            "hostvars": {h: {"zerorun_instance_id": "i-" + h} for h in batch}}


# -- pure option handling -------------------------------------------------------------------------

def test_send_request_defaults_and_short_form():
    request = action.send_request({"commands": "uptime; hostname", "max_concurrency": 10, "max_errors": "10%"},
                                  read_document=None)
    assert request["document"] == "RunShellScript"
    assert request["parameters"] == {"commands": ["uptime; hostname"]}
    assert request["max_concurrency"] == "10" and request["max_errors"] == "10%"
    assert request["timeout_seconds"] == 0 and request["document_content"] == ""


def test_send_request_reads_document_file_on_controller():
    request = action.send_request({"document_file": "doc.yml", "parameters": {"a": ["1"]}},
                                  read_document=lambda path: "content of " + path)
    assert request["document_content"] == "content of doc.yml"
    assert request["parameters"] == {"a": ["1"]}


def test_an_empty_local_document_is_refused_as_empty():
    """An empty document_file went as no local document (the broker looked for a stored document
    named after the file), and document_content "" ran the stored RunShellScript instead."""
    with pytest.raises(AnsibleError, match="document_file empty.yml is empty: a document is a mapping"):
        action.send_request({"document_file": "empty.yml"}, read_document=lambda path: "")
    with pytest.raises(AnsibleError, match="document_content is empty: a document is a mapping"):
        action.send_request({"document_content": ""}, read_document=None)
    assert action.send_request({"document_content": None, "commands": "true"}, None)["document"] == "RunShellScript"


@pytest.mark.parametrize("commands, expected", [("a", ["a"]), (["a", "b"], ["a", "b"]), ([1], ["1"])])
def test_commands_list(commands, expected):
    assert action.commands_list(commands) == expected


def test_commands_must_be_strings():
    with pytest.raises(AnsibleError, match="commands must be"):
        action.commands_list({"a": 1})


def test_batch_arguments_ignore_connection_options():
    assert action.batch_arguments({"commands": "x", "endpoint": "tcp://a", "broker_timeout": 3}) == {"commands": "x"}


def test_host_instance_id_falls_back_to_inventory_name():
    assert action.host_instance_id({"zerorun_instance_id": "i-1"}, "web1") == "i-1"
    assert action.host_instance_id({}, "web1") == "web1"
    assert action.host_instance_id(None, "web1") == "web1"


def test_validation_errors_are_clean(fake):
    with pytest.raises(AnsibleActionFail, match="mutually exclusive"):
        make_action({"commands": "x", "parameters": {"commands": ["y"]}}).run(task_vars=host_vars("a", ["a"]))
    with pytest.raises(AnsibleActionFail, match="commandz. Supported parameters include"):
        make_action({"commandz": "x"}).run(task_vars=host_vars("a", ["a"]))


def test_single_target_string_is_not_split(fake):
    result = make_action({"commands": "x", "targets": "tag:role=web,db"}).run(task_vars={})
    assert not result["failed"], result
    assert fake.sends[0]["targets"] == ["tag:role=web,db"]


def test_bad_target_fails_without_broker(fake):
    result = make_action({"commands": "x", "targets": ["role=web"]}).run(task_vars={})
    assert result["failed"] and "invalid target" in result["msg"]
    assert fake.sends == []


def test_broker_error_becomes_failed_result(monkeypatch):
    @contextlib.contextmanager
    def connect(options, kind="module"):
        raise broker.BrokerError("no answer from the broker")
        yield  # pragma: no cover

    monkeypatch.setattr(broker, "connect", connect)
    result = make_action({"commands": "x", "targets": ["tag:a=b"]}).run(task_vars={})
    assert result == {"failed": True, "changed": False, "msg": "no answer from the broker"} | {
        k: v for k, v in result.items() if k not in ("failed", "changed", "msg")}


# -- mode 1: explicit targets ---------------------------------------------------------------------

def test_explicit_targets_one_command_all_invocations(fake):
    fake.failing = {"i-t2"}
    result = make_action({"commands": ["uptime"], "targets": ["tag:role=web"]}).run(task_vars={})
    assert len(fake.sends) == 1 and fake.sends[0]["targets"] == ["tag:role=web"]
    assert result["changed"] and result["failed"]
    assert "i-t2" in result["msg"] and "exit code 3" in result["msg"]
    assert [i["instance_id"] for i in result["invocations"]] == ["i-t1", "i-t2"]
    assert result["invocations"][0]["stdout_lines"] == ["out of i-t1"]


def test_explicit_targets_no_wait(fake):
    result = make_action({"commands": "uptime", "instance_ids": ["i-9"], "wait": False}).run(task_vars={})
    assert not result["failed"] and result["command_id"] == "cmd-1" and fake.waits == []


def test_check_mode_sends_a_dry_run_and_shows_the_script(fake):
    result = make_action({"commands": "uptime", "targets": ["tag:role=web"]}, check_mode=True, diff=True).run(task_vars={})
    assert fake.sends[0]["dry_run"] is True
    assert result["command_id"] is None and result["would_run_on"] == ["i-t1", "i-t2"]
    assert result["diff"][0]["after"] == "uptime\n"


def test_check_mode_returns_the_keys_of_a_real_run(fake):
    """A loop over ``invocations`` (or a look at ``rc``/``stdout``) works in check mode too."""
    real = make_action({"commands": "uptime", "targets": ["tag:role=web"]}).run(task_vars={})
    dry = make_action({"commands": "uptime", "targets": ["tag:role=web"]}, check_mode=True).run(task_vars={})
    assert set(real) - {"changed"} <= set(dry)
    assert dry["invocations"] == [] and dry["counts"] == {} and dry["status"] == "DryRun"
    batch = ["web1", "web2"]
    real_host = action_for(make_task({"commands": "uptime"})).run(task_vars=host_vars("web1", batch))
    dry_host = action_for(make_task({"commands": "uptime"}, check_mode=True)).run(task_vars=host_vars("web1", batch))
    assert set(real_host) - {"changed"} <= set(dry_host)
    assert dry_host["stdout"] == "" and dry_host["stdout_lines"] == [] and dry_host["rc"] == -1
    assert dry_host["instance_id"] == "i-web1" and dry_host["zerorun_invocation"] is None


def test_check_mode_fails_where_the_run_would_on_an_instance_the_broker_does_not_know():
    """The broker's dry run now names such an instance (Undeliverable); it was listed in
    would_run_on and the check passed, where the real run fails the task."""
    from ansible_collections.zerorun.fleet.plugins.plugin_utils import results

    dry = {"document_name": "RunShellScript", "target_count": 2, "invocations": [
        {"instance_id": "web-1", "status": "DryRun"},
        {"instance_id": "nosuch", "status": "Undeliverable", "status_details": "unknown instance"}]}
    result = results.dry_run_result(dry, False)
    assert result["would_run_on"] == ["web-1"] and result["failed"]
    assert "nosuch" in result["msg"] and "Undeliverable" in result["msg"]
    host = results.dry_run_host_result(dict(dry, invocations=dry["invocations"][1:], target_count=1), "nosuch", False)
    assert host["failed"] and host["would_run_on"] == [] and "nosuch" in host["msg"]
    fine = results.dry_run_result(dict(dry, invocations=dry["invocations"][:1], target_count=1), False)
    assert not fine["failed"] and fine["msg"] == "check mode: would run RunShellScript on 1 instance(s)"


def test_a_local_document_is_named_after_its_file_never_a_stored_name():
    def read(path):
        return "schemaVersion: '2.2'\nmainSteps: []\n"

    request = action.send_request({"document": "RunShellScript", "document_file": "files/patch-web.yml"}, read)
    assert request["document"] == "patch-web" and request["document_content"]
    request = action.send_request({"document": "RunShellScript", "document_content": "x: 1"}, read)
    assert request["document"] == "local-document"
    assert action.send_request({"document": "Mine", "parameters": {}}, read)["document"] == "Mine"


# -- mode 2: per inventory host, coalesced ----------------------------------------------------------

def test_per_host_batch_is_one_command_whatever_the_forks(fake):
    batch = ["web1", "web2", "web3"]
    task = make_task({"commands": "uptime"})
    results = {h: action_for(task).run(task_vars=host_vars(h, batch)) for h in batch}  # forks=1
    assert len(fake.sends) == 1
    assert fake.sends[0]["instance_ids"] == ["i-web1", "i-web2", "i-web3"]
    for host, result in results.items():
        assert result["stdout"] == "out of i-" + host and result["rc"] == 0 and result["failed"] is False
        assert result["stdout_lines"] == ["out of i-" + host] and result["instance_id"] == "i-" + host


def test_per_host_failure_fails_only_that_host(fake):
    fake.failing = {"i-web2"}
    batch = ["web1", "web2"]
    task = make_task({"commands": "false"})
    results = {h: action_for(task).run(task_vars=host_vars(h, batch)) for h in batch}
    assert results["web1"]["failed"] is False
    assert results["web2"]["failed"] is True and results["web2"]["rc"] == 3
    assert results["web2"]["msg"].startswith("instance i-web2: Failed")


def test_per_host_concurrent_forks_share_one_command(fake):
    batch = ["h%d" % i for i in range(8)]
    task = make_task({"commands": "uptime"})
    results = {}

    def run(host):
        results[host] = action_for(task).run(task_vars=host_vars(host, batch))

    threads = [threading.Thread(target=run, args=(h,)) for h in batch]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(fake.sends) == 1 and len(fake.sends[0]["instance_ids"]) == 8
    assert all(not r["failed"] for r in results.values())


def test_conditional_task_gathers_only_arriving_hosts(fake):
    batch = ["a", "b", "c"]  # "c" is skipped by its `when`: it never arrives
    task = make_task({"commands": "uptime"}, when="run_it")
    results = {}

    def run(host):
        results[host] = action_for(task).run(task_vars=host_vars(host, batch))

    threads = [threading.Thread(target=run, args=(h,)) for h in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(fake.sends) == 1 and fake.sends[0]["instance_ids"] == ["i-a", "i-b"]
    assert not results["a"]["failed"] and not results["b"]["failed"]


def test_repeated_task_runs_again(fake):
    batch = ["a"]
    task = make_task({"commands": "uptime"})
    action_for(task).run(task_vars=host_vars("a", batch))
    action_for(task).run(task_vars=host_vars("a", batch))
    assert len(fake.sends) == 2


def test_leader_error_reaches_followers(fake, monkeypatch):
    def refuse(dry_run=False, **request):
        raise broker.BrokerError("the broker refused the request (InvalidDocument): bad")

    monkeypatch.setattr(fake, "send", refuse)
    batch = ["a", "b"]
    task = make_task({"commands": "x"})
    first = action_for(task).run(task_vars=host_vars("a", batch))
    second = action_for(task).run(task_vars=host_vars("b", batch))
    assert first["failed"] and "InvalidDocument" in first["msg"]
    assert second["failed"] and "host a" in second["msg"] and "InvalidDocument" in second["msg"]


def test_per_host_check_mode_sends_nothing_real(fake):
    result = make_action({"commands": "uptime"}, check_mode=True).run(task_vars=host_vars("a", ["a", "b"]))
    assert [s["dry_run"] for s in fake.sends] == [True]
    assert fake.sends[0]["instance_ids"] == ["i-a"] and result["would_run_on"] == ["i-a"]


def test_tagged_task_data_becomes_builtin():
    """ansible-core 2.19 passes str/dict subclasses (data tagging); msgspec encodes builtins only."""
    class Tagged(str):
        pass

    class TaggedDict(dict):
        pass

    data = broker.builtin_data(TaggedDict(commands=[Tagged("uptime")], n=3, flag=True, none=None))
    assert data == {"commands": ["uptime"], "n": 3, "flag": True, "none": None}
    assert type(data) is dict and type(data["commands"][0]) is str
    assert protocol.to_builtins(protocol.SendCommand(parameters=data)).get("parameters") == data
