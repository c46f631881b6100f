"""zerorun.fleet.document: the idempotence rule, check and diff mode, against a fake document store."""

import contextlib
import hashlib
from types import SimpleNamespace

import pytest
from ansible.errors import AnsibleActionFail
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.play import Play
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import action_loader
from ansible.vars.manager import VariableManager

from ansible_collections.zerorun.fleet.plugins.action import document as action
from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker
from zerorun import client as zclient
from zerorun import protocol

DOC_A = 'schemaVersion: "2.2"\ndescription: A\nmainSteps:\n  - action: aws:runShellScript\n    name: a\n' \
        '    inputs:\n      runCommand: ["echo a"]\n'
DOC_B = DOC_A.replace("echo a", "echo b").replace("description: A", "description: B")


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


class FakeStore:
    """The broker's document operations, in memory, recording writes."""

    def __init__(self):
        self.docs = {}  # name -> {"default": n, "versions": {n: content}}
        self.writes = []

    def _info(self, name, number, content=""):
        doc = self.docs[name]
        return protocol.DocumentInfo(name=name, version=number, sha256=sha(doc["versions"][number]),
                                     is_default=number == doc["default"], content=content,
                                     default_version=doc["default"], latest_version=max(doc["versions"]))

    def document_versions(self, name):
        if name not in self.docs:
            raise zclient.RequestFailed("no document named %r" % name, code="NotFound")
        return [self._info(name, n) for n in sorted(self.docs[name]["versions"])]

    def get_document(self, name, version=""):
        doc = self.docs[name]
        number = int(version) if version else doc["default"]
        return self._info(name, number, content=doc["versions"][number])

    def create_document(self, name, content):
        self.writes.append(("create", name))
        self.docs[name] = {"default": 1, "versions": {1: content}}
        return self._info(name, 1)

    def update_document(self, name, content, set_default=False):
        self.writes.append(("update", name, set_default))
        doc = self.docs[name]
        number = max(doc["versions"]) + 1
        doc["versions"][number] = content
        if set_default:
            doc["default"] = number
        return self._info(name, number)

    def set_default_document_version(self, name, version):
        self.writes.append(("set_default", name, int(version)))
        self.docs[name]["default"] = int(version)
        return self._info(name, int(version))

    def delete_document(self, name, version=""):
        self.writes.append(("delete", name, version))
        if version:
            del self.docs[name]["versions"][int(version)]
        else:
            del self.docs[name]


@pytest.fixture
def store(monkeypatch):
    fake = FakeStore()

    @contextlib.contextmanager
    def connect(options, kind="module"):
        with broker.broker_errors():
            yield fake

    monkeypatch.setattr(broker, "connect", connect)
    return fake


def run(args, check_mode=False, diff=False):
    loader = DataLoader()
    play = Play.load({"hosts": "localhost", "gather_facts": False, "tasks": [{"zerorun.fleet.document": args}]},
                     loader=loader, variable_manager=VariableManager(loader=loader))
    task = [t for b in play.compile() for t in b.block if t.action == "zerorun.fleet.document"][0]
    task.check_mode, task.diff = check_mode, diff
    plugin = action_loader.get("zerorun.fleet.document", task=task,
                               connection=SimpleNamespace(_shell=SimpleNamespace(tmpdir=None)),
                               play_context=PlayContext(), loader=loader, templar=None, shared_loader_obj=None)
    return plugin.run(task_vars={})


@pytest.mark.parametrize("versions, set_default, expected", [
    ([], False, ("create", None)),
    ([{"version": 1, "sha256": "x", "is_default": True}], False, ("update", None)),
    ([{"version": 1, "sha256": "s", "is_default": True}], True, ("none", 1)),
    ([{"version": 1, "sha256": "s"}, {"version": 2, "sha256": "x", "is_default": True}], False, ("none", 1)),
    ([{"version": 1, "sha256": "s"}, {"version": 2, "sha256": "x", "is_default": True}], True, ("set_default", 1)),
])
def test_plan_present(versions, set_default, expected):
    action_name, same = action.plan_present(versions, "s", set_default)
    assert (action_name, same and same["version"]) == expected


def test_create_then_unchanged(store):
    first = run({"name": "Hello", "content": DOC_A})
    assert first["changed"] is True and first["failed"] is False and first["version"] == 1
    assert first["created"] is True and first["default_version"] == 1
    second = run({"name": "Hello", "content": DOC_A})
    assert second["changed"] is False and second["version"] == 1
    assert store.writes == [("create", "Hello")]


def test_new_version_with_and_without_default(store):
    run({"name": "Hello", "content": DOC_A})
    added = run({"name": "Hello", "content": DOC_B})
    assert added["changed"] is True and added["version"] == 2 and added["default_version"] == 1
    # identical to the non-default version 2: unchanged ...
    assert run({"name": "Hello", "content": DOC_B})["changed"] is False
    # ... unless it should become the default
    promoted = run({"name": "Hello", "content": DOC_B, "set_default": True})
    assert promoted["changed"] is True and promoted["default_version"] == 2
    assert run({"name": "Hello", "content": DOC_B, "set_default": True})["changed"] is False
    assert store.writes[-1] == ("set_default", "Hello", 2)


def test_check_mode_writes_nothing_and_diff_shows_old_default(store):
    run({"name": "Hello", "content": DOC_A})
    result = run({"name": "Hello", "content": DOC_B}, check_mode=True, diff=True)
    assert result["changed"] is True and result["version"] is None
    assert result["diff"]["before"] == DOC_A and result["diff"]["after"] == DOC_B
    assert store.writes == [("create", "Hello")]
    assert run({"name": "Nope", "content": DOC_A}, check_mode=True)["changed"] is True
    assert "Nope" not in store.docs


def test_invalid_content_and_builtin_names_fail_cleanly(store):
    bad = run({"name": "Hello", "content": "schemaVersion: '2.2'\nmainSteps: 3\n"})
    assert bad["failed"] is True and "not valid" in bad["msg"]
    builtin = run({"name": "RunShellScript", "content": DOC_A})
    assert builtin["failed"] is True and "read-only" in builtin["msg"]
    with pytest.raises(AnsibleActionFail, match="mutually exclusive"):
        run({"name": "Hello", "content": DOC_A, "src": "x.yml"})
    assert store.writes == []


def test_absent_whole_and_one_version(store):
    assert run({"name": "Hello", "state": "absent"})["changed"] is False
    run({"name": "Hello", "content": DOC_A})
    run({"name": "Hello", "content": DOC_B})
    default = run({"name": "Hello", "state": "absent", "version": "1"})
    assert default["failed"] is True and "default version" in default["msg"]
    checked = run({"name": "Hello", "state": "absent", "version": "2"}, check_mode=True, diff=True)
    assert checked["changed"] is True and checked["diff"]["before"] == DOC_B and 2 in store.docs["Hello"]["versions"]
    assert run({"name": "Hello", "state": "absent", "version": "2"})["changed"] is True
    assert run({"name": "Hello", "state": "absent", "version": "2"})["changed"] is False
    assert run({"name": "Hello", "state": "absent"})["changed"] is True
    assert "Hello" not in store.docs


def test_a_version_that_is_no_number_is_no_version(store):
    """version: "²" (a digit to str.isdigit, not to int) failed the task with "invalid literal
    for int()"; it is a version the document does not have, as any other."""
    run({"name": "Hello", "content": DOC_A})
    result = run({"name": "Hello", "state": "absent", "version": "\u00b2"})
    assert result["changed"] is False and result["msg"] == "document Hello has no version \u00b2", result
    assert 1 in store.docs["Hello"]["versions"]
