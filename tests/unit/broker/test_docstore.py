"""The broker's document store: versions, defaults, hashes, built-ins, errors (on each backend)."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest

from zmq_broker.docstore import DocumentStore, DocumentSummary, DocumentVersionInfo
from zmq_broker.errors import BrokerError as DocumentStoreError
from zmq_broker.store.sqlite import SqliteStore


def _content(word: str = "hello") -> str:
    return f"""schemaVersion: "2.2"
description: says {word}
parameters:
  who: {{type: String, default: world}}
mainSteps:
  - action: runShellScript
    name: say
    inputs:
      runCommand: ["echo {word} {{{{ who }}}}"]
"""


JSON_CONTENT = json.dumps({"schemaVersion": "2.2", "description": "json doc",
                           "mainSteps": [{"action": "aws:runShellScript", "name": "s",
                                          "inputs": {"runCommand": ["true"]}}]})


@pytest.fixture
def db(open_store):
    return open_store()


@pytest.fixture
def store(db):
    ticks = iter(range(1000, 2000))
    return DocumentStore(db, clock=lambda: float(next(ticks)))


def _code(exc_info) -> str:
    return exc_info.value.code


def test_create_returns_version_1_as_default(store):
    info = store.create("Hello", _content(), created_by="alice")
    assert isinstance(info, DocumentVersionInfo)
    assert (info.name, info.version, info.is_default, info.builtin) == ("Hello", 1, True, False)
    assert info.sha256 == hashlib.sha256(_content().encode()).hexdigest()
    assert info.created_by == "alice" and info.created_at == 1000.0
    assert info.description == "says hello" and info.document_format == "YAML"
    assert info.content == ""


def test_create_existing_name_is_already_exists(store):
    store.create("Hello", _content())
    with pytest.raises(DocumentStoreError) as exc:
        store.create("Hello", _content("other"))
    assert _code(exc) == "AlreadyExists"


def test_update_adds_version_without_moving_default(store):
    store.create("Hello", _content("v1"))
    info = store.update("Hello", _content("v2"), created_by="bob")
    assert (info.version, info.is_default, info.created_by) == (2, False, "bob")
    default, _ = store.get("Hello")
    assert default.version == 1 and "v1" in default.content
    latest, doc = store.get("Hello", "$LATEST")
    assert latest.version == 2 and "echo v2" in doc.steps[0].inputs["runCommand"][0]


def test_update_with_set_default(store):
    store.create("Hello", _content("v1"))
    info = store.update("Hello", _content("v2"), set_default=True)
    assert info.is_default
    assert store.get("Hello", "$DEFAULT")[0].version == 2
    assert [v.is_default for v in store.versions("Hello")] == [False, True]


def test_update_identical_to_any_version_is_conflict(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    for content, version in ((_content("v1"), 1), (_content("v2"), 2)):
        with pytest.raises(DocumentStoreError) as exc:
            store.update("Hello", content)
        assert _code(exc) == "Conflict" and f"identical to version {version}" in exc.value.message
    assert [v.version for v in store.versions("Hello")] == [1, 2]


def test_update_unknown_name_is_not_found(store):
    with pytest.raises(DocumentStoreError) as exc:
        store.update("Nope", _content())
    assert _code(exc) == "NotFound"


def test_get_by_selector(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    store.update("Hello", _content("v3"))
    store.set_default("Hello", 2)
    assert store.get("Hello")[0].version == 2
    assert store.get("Hello", "")[0].version == 2
    assert store.get("Hello", "$DEFAULT")[0].version == 2
    assert store.get("Hello", "$LATEST")[0].version == 3
    assert store.get("Hello", "1")[0].version == 1
    assert store.get("Hello", 3)[0].version == 3
    info, doc = store.get("Hello", "1")
    assert info.content == doc.content == _content("v1") and doc.sha256 == info.sha256
    assert doc.name == "Hello"


def test_unknown_and_malformed_versions(store):
    store.create("Hello", _content())
    for version in ("2", "0", "-1", "abc", "$NEWEST", 7):
        with pytest.raises(DocumentStoreError) as exc:
            store.get("Hello", version)
        assert _code(exc) == "InvalidDocumentVersion"
    with pytest.raises(DocumentStoreError) as exc:
        store.set_default("Hello", "5")
    assert _code(exc) == "InvalidDocumentVersion"


def test_unknown_document_is_not_found(store):
    for call in (lambda: store.get("Missing"), lambda: store.versions("Missing"),
                 lambda: store.delete("Missing"), lambda: store.set_default("Missing", 1)):
        with pytest.raises(DocumentStoreError) as exc:
            call()
        assert _code(exc) == "NotFound"


def test_hash_per_version_is_stable(store, open_store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    before = {v.version: v.sha256 for v in store.versions("Hello")}
    assert before == {1: hashlib.sha256(_content("v1").encode()).hexdigest(),
                      2: hashlib.sha256(_content("v2").encode()).hexdigest()}
    store.update("Hello", _content("v3"), set_default=True)
    store.delete("Hello", 1)
    reopened = DocumentStore(open_store())  # the same data, read back
    assert reopened.get("Hello", 2)[0].sha256 == before[2]
    assert reopened.get("Hello", 2)[1].sha256 == before[2]


def test_versions_lists_metadata_without_content(store):
    store.create("Hello", _content("v1"), created_by="a")
    store.update("Hello", JSON_CONTENT, created_by="b")
    versions = store.versions("Hello")
    assert [(v.version, v.created_by, v.document_format, v.content) for v in versions] == [
        (1, "a", "YAML", ""), (2, "b", "JSON", "")]
    assert versions[0].created_at < versions[1].created_at


def test_delete_one_version_and_numbers_are_not_reused(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    store.delete("Hello", "2")
    assert [v.version for v in store.versions("Hello")] == [1]
    with pytest.raises(DocumentStoreError) as exc:
        store.get("Hello", 2)
    assert _code(exc) == "InvalidDocumentVersion"
    assert store.update("Hello", _content("v3")).version == 3


def test_delete_default_version_is_refused(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    with pytest.raises(DocumentStoreError) as exc:
        store.delete("Hello", 1)
    assert _code(exc) == "Conflict" and "default" in exc.value.message


def test_delete_whole_document(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    store.delete("Hello")
    with pytest.raises(DocumentStoreError) as exc:
        store.get("Hello")
    assert _code(exc) == "NotFound"
    assert store.create("Hello", _content("again")).version == 1


def test_list_summaries_include_builtins(store):
    store.create("Hello", _content("v1"))
    store.update("Hello", _content("v2"))
    summaries = {s.name: s for s in store.list()}
    assert summaries["Hello"] == DocumentSummary(
        name="Hello", default_version=1, latest_version=2, description="says v1",
        sha256=hashlib.sha256(_content("v1").encode()).hexdigest(), builtin=False)
    for name in ("RunShellScript", "RunPythonScript", "GetInstanceInfo"):
        assert summaries[name].builtin and summaries[name].default_version == 1
    assert "AWS-RunShellScript" not in summaries  # aliases are not listed twice


@pytest.mark.parametrize("name", ["ab", "has space", "x" * 129, "slash/name", ""])
def test_invalid_names(store, name):
    with pytest.raises(DocumentStoreError) as exc:
        store.create(name, _content())
    assert _code(exc) == "InvalidDocument"


@pytest.mark.parametrize("name", ["ZR-Mine", "zerorun-thing", "Zerorun-X", "RunShellScript",
                                  "runshellscript", "AWS-RunShellScript", "GetInstanceInfo"])
def test_reserved_names_are_forbidden(store, name):
    with pytest.raises(DocumentStoreError) as exc:
        store.create(name, _content())
    assert _code(exc) == "Forbidden"


@pytest.mark.parametrize("name", ["RunShellScript", "AWS-RunShellScript", "RunPythonScript"])
def test_builtins_are_read_only(store, name):
    for call in (lambda: store.update(name, _content()), lambda: store.delete(name),
                 lambda: store.delete(name, 1), lambda: store.set_default(name, 1)):
        with pytest.raises(DocumentStoreError) as exc:
            call()
        assert _code(exc) == "Forbidden"


def test_get_builtin_and_alias(store):
    info, doc = store.get("AWS-RunShellScript")
    assert (info.name, info.version, info.builtin, info.is_default) == ("RunShellScript", 1, True, True)
    assert info.sha256 == doc.sha256 and info.content == doc.content
    for version in ("", "$DEFAULT", "$LATEST", "1", 1):
        assert store.get("RunShellScript", version)[0].version == 1
    with pytest.raises(DocumentStoreError) as exc:
        store.get("RunShellScript", "2")
    assert _code(exc) == "InvalidDocumentVersion"
    assert [v.version for v in store.versions("RunShellScript")] == [1]


def test_invalid_document_content(store):
    for content in ("not: [valid", "schemaVersion: '9.9'\nmainSteps: []", "- a list",
                    'schemaVersion: "2.2"\ntemplating: jinja\nmainSteps:\n  - {action: runShellScript, name: s, '
                    'inputs: {runCommand: ["echo {{ undeclared }}"]}}'):
        with pytest.raises(DocumentStoreError) as exc:
            store.create("Broken", content)
        assert _code(exc) == "InvalidDocument" and "\n" not in exc.value.message
    store.create("Hello", _content())
    with pytest.raises(DocumentStoreError) as exc:
        store.update("Hello", "schemaVersion: '2.2'")
    assert _code(exc) == "InvalidDocument"
    assert [v.version for v in store.versions("Hello")] == [1]


def test_structs_serialise(store):
    store.create("Hello", _content(), created_by="alice")
    info, _ = store.get("Hello")
    for codec in (msgspec.json, msgspec.msgpack):
        assert codec.decode(codec.encode(info), type=DocumentVersionInfo) == info
    decoded = json.loads(msgspec.json.encode(store.list()))
    assert {"name", "default_version", "latest_version", "sha256", "builtin"} <= set(decoded[0])


def test_writes_are_committed_immediately(store, open_store):
    store.create("Hello", _content())
    store.update("Hello", _content("v2"), set_default=True)
    assert DocumentStore(open_store()).get("Hello")[0].version == 2


def test_in_memory_database():
    store = DocumentStore(SqliteStore(":memory:"))
    store.create("Mem-Doc", _content())
    assert store.get("Mem-Doc")[0].version == 1


def test_reading_a_stored_version_does_not_redo_the_checks_made_when_it_was_stored(db, monkeypatch):
    """The broker's loop parses a stored version the first time a command names it (after every
    start, and again once 256 others have pushed it out): that re-checked the default against its
    author's ``allowedPattern``, which Python's ``re`` may take seconds over (``(a+)+b|.*`` on two
    dozen a's and a '!' matches, after backtracking), and re-parsed every Jinja template. Both were
    checked when the version was stored (in a render worker, under its deadline)."""
    from zerorun.documents import loader, params

    text = ("schemaVersion: '2.2'\ntemplating: jinja\nparameters:\n"
            "  p: {type: String, default: 'aaaa!', allowedPattern: '(a+)+b|.*'}\n"
            "mainSteps:\n- action: aws:runShellScript\n  name: s\n  inputs: {runCommand: ['echo {{ p | quote }}']}\n")
    DocumentStore(db).create("ops-checked", text)

    def checked_again(*args, **kwargs):
        raise AssertionError("a stored version was checked again")

    monkeypatch.setattr(loader, "check_template", checked_again)
    monkeypatch.setattr(params, "_check_scalar", checked_again)
    info, doc = DocumentStore(db).get("ops-checked")  # a broker started again: nothing parsed yet
    assert info.version == 1 and doc.parameters["p"].default == "aaaa!" and doc.templating == "jinja"
    assert doc.parameters["p"].allowed_pattern == "(a+)+b|.*"  # a value sent is still checked


def test_a_stored_version_these_rules_refuse_is_an_invalid_document_not_an_internal_error(store):
    """A version stored under older, laxer rules (a NaN, a lone surrogate, a non-string
    allowedPattern were accepted once) raised DocumentError from get(): in the broker's loop that is
    an internal error, logged with a traceback, instead of an answer that names the document."""
    from zmq_broker.docstore import CheckedDocument

    text = ("schemaVersion: '2.2'\nparameters:\n  p: {type: String, default: '5', allowedPattern: 5}\n"
            "mainSteps:\n- {action: aws:runShellScript, name: s, inputs: {runCommand: [echo]}}\n")
    store.create("ops-old-rules", text, checked=CheckedDocument("ops-old-rules", hashlib.sha256(text.encode()).hexdigest()))
    with pytest.raises(DocumentStoreError) as err:
        store.get("ops-old-rules")
    assert _code(err) == "InvalidDocument" and "ops-old-rules" in err.value.message and "version 1" in err.value.message
    assert "allowedPattern must be a string" in err.value.message


def test_what_show_lists_is_kept_when_a_version_is_stored_and_else_not_parsed_for(db, monkeypatch):
    """``documents show`` parsed the version in the broker's loop: what it lists of the
    parameters is kept when a version is stored now, and a version that a broker started again
    does not know is left to a render worker (None), unless a command parsed it already."""
    from zmq_broker import docstore
    from zmq_broker.docstore import CheckedDocument, parameter_view
    from zerorun.documents import load_document

    expected = {"who": {"type": "String", "description": "", "required": False, "secret": False}}
    first = DocumentStore(db)
    first.create("ops-view", _content())
    checked = CheckedDocument("ops-view", hashlib.sha256(_content("again").encode()).hexdigest(), "",
                              parameter_view(load_document(_content("again"))))
    first.update("ops-view", _content("again"), checked=checked)
    assert [first.parameter_view(first.read("ops-view", v)) for v in (1, 2)] == [expected, expected]
    restarted = DocumentStore(db)

    def parsed(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr(docstore, "load_document", parsed)
    assert restarted.parameter_view(restarted.read("ops-view", 1)) is None
    builtin = restarted.read("RunShellScript")
    assert restarted.parameter_view(builtin)["commands"]["required"] is True
    monkeypatch.undo()
    restarted.get("ops-view", 2)  # as a command naming it does
    assert restarted.parameter_view(restarted.read("ops-view", 2)) == expected
    assert restarted.keep_view("ops-view", restarted.read("ops-view", 1).sha256, expected) == expected
    assert restarted.parameter_view(restarted.read("ops-view", 1)) == expected
