"""Command documents end to end: the real broker's versioned store, real agents, the real CLI.

One broker and one agent (``doc-1``) serve the whole module. Every refused request is also
checked to have sent nothing (``zerorun commands --json`` keeps its length).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zerorun.testing import LocalFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402

AGENT = "doc-1"


@pytest.fixture(scope="module")
def dfleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("docfleet"))
    try:
        fleet.start_broker()
        fleet.start_agent(AGENT, {"role": "doc"})
        fleet.wait_online([AGENT])
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request, dfleet):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("----- broker log -----\n" + dfleet.broker_log()[-6000:])
        print(f"----- agent {AGENT} log -----\n" + dfleet.agent_log(AGENT)[-3000:])




def command_count(fleet) -> int:
    rc, listed, err = run_json(fleet, "commands", "--limit", "10000")
    assert rc == 0, err
    return len(listed)


def refused(fleet, *args, expect: list[str]) -> str:
    """Runs a CLI command that must fail with exit 2, a one-line message naming ``expect``, and
    nothing sent."""
    before = command_count(fleet)
    proc = fleet.cli(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for text in expect:
        assert text in message, (text, message)
    assert command_count(fleet) == before, "a refused request must send nothing"
    return message


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def doc(*lines: str, parameters: str = "", templating: str = "") -> str:
    """A one-step 2.2 document running ``lines`` (SSM substitution unless ``templating`` says)."""
    body = "\n".join(f"        - {json.dumps(line)}" for line in lines)
    params = f"parameters:\n{parameters}" if parameters else ""
    marker = f"templating: {templating}\n" if templating else ""
    return (f"schemaVersion: '2.2'\ndescription: test document\n{marker}{params}\nmainSteps:\n"
            f"  - action: aws:runShellScript\n    name: run\n    inputs:\n      runCommand:\n{body}\n")


def send(fleet, *args):
    rc, view, err = run_json(fleet, "send", *args, "-i", AGENT)
    assert view is not None, err
    return rc, view


def stdout_of(view) -> str:
    (inv,) = view["invocations"]
    return inv["stdout"]


# ---------------------------------------------------------------------------------------------


def test_create_update_versions_default_and_delete(dfleet, tmp_path):
    name = "ops-hello"
    v1 = write(tmp_path, "v1.yml", doc("echo version-1"))
    v2 = write(tmp_path, "v2.yml", doc("echo version-2"))
    v3 = write(tmp_path, "v3.yml", doc("echo version-3"))

    rc, info, err = run_json(dfleet, "documents", "create", name, str(v1))
    assert rc == 0, err
    assert info["version"] == 1 and info["is_default"] is True
    assert info["sha256"] == hashlib.sha256(v1.read_bytes()).hexdigest()
    again = dfleet.cli("documents", "create", name, str(v2))
    assert again.returncode == 2 and "AlreadyExists" in again.stderr

    rc, info, _ = run_json(dfleet, "documents", "update", name, str(v2))
    assert rc == 0 and info["version"] == 2 and info["is_default"] is False  # update keeps the default
    # identical content to any existing version is refused
    for same in (v1, v2):
        proc = dfleet.cli("documents", "update", name, str(same))
        assert proc.returncode == 2 and "identical" in proc.stderr and "Traceback" not in proc.stderr

    rc, versions, _ = run_json(dfleet, "documents", "versions", name)
    assert [(v["version"], v["is_default"]) for v in versions] == [(1, True), (2, False)]
    assert versions[1]["sha256"] == hashlib.sha256(v2.read_bytes()).hexdigest()
    table = dfleet.cli("documents", "versions", name)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["VERSION", "DEFAULT"]

    # send NAME runs the default version; --document-version picks another
    rc, view = send(dfleet, name)
    assert rc == 0 and stdout_of(view) == "version-1\n" and view["document_version"] == "1"
    rc, view = send(dfleet, name, "--document-version", "2")
    assert rc == 0 and stdout_of(view) == "version-2\n" and view["document_version"] == "2"
    rc, view = send(dfleet, name, "--document-version", "$LATEST")
    assert rc == 0 and stdout_of(view) == "version-2\n"
    refused(dfleet, "send", name, "--document-version", "7", "-i", AGENT,
            expect=["InvalidDocumentVersion", "7"])

    rc, info, _ = run_json(dfleet, "documents", "set-default", name, "2")
    assert rc == 0 and info["version"] == 2 and info["is_default"] is True
    rc, view = send(dfleet, name)
    assert stdout_of(view) == "version-2\n"

    rc, info, _ = run_json(dfleet, "documents", "update", name, str(v3), "--set-default")
    assert rc == 0 and info["version"] == 3 and info["is_default"] is True
    rc, shown, _ = run_json(dfleet, "documents", "show", name)
    assert shown["version"] == 3 and shown["content"] == v3.read_text()
    rc, shown, _ = run_json(dfleet, "documents", "show", name, "--version", "1")
    assert shown["version"] == 1 and shown["is_default"] is False
    content = dfleet.cli("documents", "show", name, "--version", "1", "--content")
    assert content.returncode == 0 and content.stdout == v1.read_text()
    human = dfleet.cli("documents", "show", name)
    assert human.returncode == 0 and f"document {name} v3 (default)" in human.stdout

    rc, listed, _ = run_json(dfleet, "documents", "list")
    mine = next(d for d in listed if d["name"] == name)
    assert (mine["default_version"], mine["latest_version"], mine["builtin"]) == (3, 3, False)
    assert {"RunShellScript", "RunPythonScript", "GetInstanceInfo"} <= {d["name"] for d in listed if d["builtin"]}
    assert "ops-hello" in dfleet.cli("documents", "list").stdout

    # the default version cannot be deleted alone; another one can; then the whole document
    proc = dfleet.cli("documents", "delete", name, "--version", "3")
    assert proc.returncode == 2 and "default" in proc.stderr
    assert dfleet.cli("documents", "delete", name, "--version", "1").returncode == 0
    rc, versions, _ = run_json(dfleet, "documents", "versions", name)
    assert [v["version"] for v in versions] == [2, 3]
    rc, deleted, _ = run_json(dfleet, "documents", "delete", name)
    assert rc == 0 and deleted == {"deleted": name, "version": ""}
    gone = dfleet.cli("documents", "show", name)
    assert gone.returncode == 2 and name in gone.stderr
    refused(dfleet, "send", name, "-i", AGENT, expect=[name])


@pytest.mark.parametrize("version", [str(10**20), "\u00b2"])
def test_a_version_that_cannot_be_one_is_no_such_version(dfleet, tmp_path, version):
    """A version past 64 bits (no SQLite INTEGER) or "²" (a digit to str.isdigit, not to int) was
    an InternalError, "the broker failed to handle this request; see its log"."""
    name = "ops-versions"
    internal = dfleet.broker_log().count("internal error")
    if dfleet.cli("documents", "show", name).returncode != 0:
        assert dfleet.cli("documents", "create", name, str(write(tmp_path, "v.yml", doc("echo v")))).returncode == 0
    refused(dfleet, "send", name, "--document-version", version, "-i", AGENT,
            expect=["InvalidDocumentVersion", f"has no version {version!r}"])
    refused(dfleet, "documents", "set-default", name, version, expect=["InvalidDocumentVersion"])
    assert dfleet.broker_log().count("internal error") == internal


def test_names_and_invalid_documents_are_refused(dfleet, tmp_path):
    good = write(tmp_path, "good.yml", doc("true"))
    for name in ("ZR-mine", "zerorun-mine", "Zerorun-X", "RunShellScript", "AWS-RunShellScript",
                 "runpythonscript"):
        proc = dfleet.cli("documents", "create", name, str(good))
        assert proc.returncode == 2, name
        assert "reserved" in proc.stderr or "built" in proc.stderr, proc.stderr
    for name in ("ab", "has space", "x" * 129, "semi;colon"):
        proc = dfleet.cli("documents", "create", name, str(good))
        assert proc.returncode == 2 and "invalid document name" in proc.stderr, (name, proc.stderr)
    # built-ins are read-only
    for args in (("update", "RunShellScript", str(good)), ("delete", "RunShellScript"),
                 ("set-default", "RunShellScript", "1")):
        proc = dfleet.cli("documents", *args)
        assert proc.returncode == 2 and "read-only" in proc.stderr, (args, proc.stderr)
    # an invalid document is refused before it is stored, with a one-line reason
    bad = write(tmp_path, "bad.yml", doc("echo {{ nope }}", templating="jinja"))
    proc = dfleet.cli("documents", "create", "bad-doc", str(bad))
    assert proc.returncode == 2 and "undeclared parameter 'nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = dfleet.cli("documents", "create", "bad-doc", str(tmp_path / "missing.yml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    rc, listed, _ = run_json(dfleet, "documents", "list")
    assert "bad-doc" not in {d["name"] for d in listed}


def test_document_hash_pins_the_content(dfleet, tmp_path):
    path = write(tmp_path, "pinned.yml", doc("echo pinned"))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert dfleet.cli("documents", "create", "ops-pinned", str(path)).returncode == 0
    rc, view = send(dfleet, "ops-pinned", "--document-hash", sha)
    assert rc == 0 and view["document_sha256"] == sha and stdout_of(view) == "pinned\n"
    rc, view = send(dfleet, "ops-pinned", "--document-hash", sha.upper())  # hex in any case
    assert rc == 0
    # after an update (made the default) the old pin no longer matches: refused, nothing sent
    assert dfleet.cli("documents", "update", "ops-pinned", str(write(tmp_path, "p2.yml", doc("echo new"))),
                      "--set-default").returncode == 0
    refused(dfleet, "send", "ops-pinned", "--document-hash", sha, "-i", AGENT,
            expect=["DocumentHashMismatch", sha])
    # pinning the old version by number and hash works
    rc, view = send(dfleet, "ops-pinned", "--document-version", "1", "--document-hash", sha)
    assert rc == 0 and stdout_of(view) == "pinned\n"
    # the pin applies to --document-file too
    refused(dfleet, "send", "--document-file", str(path), "--document-hash", "0" * 64, "-i", AGENT,
            expect=["DocumentHashMismatch"])


def test_an_empty_document_file_is_refused_as_empty(dfleet, tmp_path):
    """An empty --document-file (or empty stdin) went as no local document at all: the broker
    looked for a stored document of the file's name ("no document named 'empty'")."""
    empty = write(tmp_path, "empty.yml", "")
    refused(dfleet, "send", "--document-file", str(empty), "-i", AGENT,
            expect=[f"zerorun: error: {empty} is empty: a document is a mapping with schemaVersion"])
    before = command_count(dfleet)
    proc = dfleet.cli("send", "--document-file", "-", "-i", AGENT, input="")
    assert proc.returncode == 2 and proc.stderr == "zerorun: error: - is empty: a document is a mapping with" \
                                                   " schemaVersion\n", proc.stderr
    assert command_count(dfleet) == before


def test_document_file_runs_a_local_document(dfleet, tmp_path):
    text = doc("echo local {{ who }}", parameters="  who:\n    type: String\n    default: world\n")
    path = write(tmp_path, "local.yml", text)
    rc, view = send(dfleet, "--document-file", str(path), "-p", "who=there")
    assert rc == 0, view
    assert stdout_of(view) == "local there\n"
    assert view["document_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert view["document_version"] == "$LOCAL"
    rc, view = send(dfleet, "--document-file", str(path), "--document-hash",
                    hashlib.sha256(text.encode()).hexdigest())
    assert rc == 0 and stdout_of(view) == "local world\n"
    proc = dfleet.cli("send", "--document-file", str(tmp_path / "nope.yml"), "-i", AGENT)
    assert proc.returncode == 2 and "cannot read" in proc.stderr


PARAMS_DOC = doc(
    "echo {{ count }} {{ mode }} {{ tag | quote }} {{ owner | quote }}",
    parameters=("  count:\n    type: Integer\n    default: 1\n"
                "  mode:\n    type: String\n    default: fast\n    allowedValues: [fast, slow]\n"
                "  tag:\n    type: String\n    default: abc\n    allowedPattern: '^[a-z]+$'\n"
                "  owner:\n    type: String\n"), templating="jinja")


@pytest.mark.parametrize("params, expect", [
    (["owner=me", "count=many"], ["InvalidParameters", "'count'", "expected an integer", "'many'"]),
    (["owner=me", "mode=medium"], ["InvalidParameters", "'mode'", "allowedValues", "'medium'"]),
    (["owner=me", "tag=Bad1"], ["InvalidParameters", "'tag'", "allowedPattern", "'Bad1'"]),
    ([], ["InvalidParameters", "'owner'", "required"]),
    (["owner=me", "colour=red"], ["InvalidParameters", "unknown parameter 'colour'"]),
], ids=["wrong-type", "not-allowed", "pattern", "missing-required", "unknown"])
def test_parameter_errors_send_nothing(dfleet, tmp_path, params, expect):
    path = write(tmp_path, "params.yml", PARAMS_DOC)
    args = [arg for p in params for arg in ("-p", p)]
    refused(dfleet, "send", "--document-file", str(path), *args, "-i", AGENT, expect=expect)
    # the same rules apply locally, without a broker
    proc = dfleet.cli("documents", "render", str(path), *args)
    assert proc.returncode == 2 and all(text in proc.stderr for text in expect), proc.stderr


def test_valid_parameters_are_coerced(dfleet, tmp_path):
    path = write(tmp_path, "params.yml", PARAMS_DOC)
    rc, view = send(dfleet, "--document-file", str(path), "-p", "owner=o w", "-p", "count=7",
                    "-p", "mode=slow")
    assert rc == 0 and stdout_of(view) == "7 slow abc o w\n"
    assert view["parameters"] == {"count": 7, "mode": "slow", "tag": "abc", "owner": "o w"}


def test_integers_beyond_64_bits_are_refused_and_the_broker_lives_on(dfleet, tmp_path):
    """A stored SSM document renders in the broker's loop: a value msgpack cannot hold used to
    reach the store's group commit and stop the broker (OverflowError)."""
    text = doc("echo {{ count }} {{ extra }}",
               parameters=("  count:\n    type: Integer\n    default: 1\n"
                           "  extra:\n    type: StringMap\n    default: {}\n"))
    rc, _, err = run_json(dfleet, "documents", "create", "ops-big-integers", str(write(tmp_path, "big.yml", text)))
    assert rc == 0, err
    huge = "1" + "0" * 30
    refused(dfleet, "send", "ops-big-integers", "-p", f"count={huge}", "-i", AGENT,
            expect=["InvalidParameters", "'count'", "out of range"])
    refused(dfleet, "send", "ops-big-integers", "-p", f'extra=["{{\\"k\\": {huge}}}"]', "-i", AGENT,
            expect=["InvalidParameters", "'extra'", "out of range"])
    assert dfleet.broker.poll() is None, dfleet.broker_log()[-3000:]
    rc, view = send(dfleet, "ops-big-integers", "-p", f"count={2 ** 63 - 1}")
    assert rc == 0 and stdout_of(view) == f"{2 ** 63 - 1} {{}}\n", view


def test_timeout_seconds_from_a_parameter_that_is_no_number_means_the_default(dfleet, tmp_path):
    """``timeoutSeconds: '{{ t }}'`` with text that ``str.isdigit`` takes and ``int`` refuses
    (``²``) used to raise ValueError: InternalError from the broker's loop for a stored document,
    a crashed render worker for a local one. SSM's rule: not a number in range means 3600."""
    text = ("schemaVersion: '2.2'\ndescription: t\nparameters:\n  t: {type: String, default: '30'}\n"
            "mainSteps:\n  - action: aws:runShellScript\n    name: run\n"
            "    inputs: {runCommand: ['echo ran'], timeoutSeconds: '{{ t }}'}\n")
    path = write(tmp_path, "timeout.yml", text)
    rc, _, err = run_json(dfleet, "documents", "create", "ops-timeout-text", str(path))
    assert rc == 0, err
    for source in (["ops-timeout-text"], ["--document-file", str(path)]):
        rc, view = send(dfleet, *source, "-p", "t=\u00b2")
        assert rc == 0 and stdout_of(view) == "ran\n", view


def test_a_number_int_cannot_read_is_an_invalid_document_not_a_crashed_worker(dfleet, tmp_path):
    """``maxChars: '²'`` (a digit to str.isdigit, not to int) and a 5,000-digit number used to raise
    ValueError in the render worker that checks a document: it died, and the client was told the
    document "needed more memory than a render worker may use"."""
    for declaration, expect in (("{type: String, default: x, maxChars: '\u00b2'}", "maxChars must be"),
                                ("{type: Integer, allowedValues: [" + "9" * 5000 + "]}", "YAML")):
        path = write(tmp_path, "odd-number.yml", doc("echo {{ p }}", parameters=f"  p: {declaration}\n"))
        refused(dfleet, "documents", "create", "ops-odd-number", str(path), expect=["InvalidDocument", expect])
        refused(dfleet, "send", "--document-file", str(path), "-i", AGENT, expect=["InvalidDocument", expect])


def test_a_pattern_that_is_no_string_and_nan_are_invalid_documents_not_dead_workers(dfleet, tmp_path):
    """``allowedPattern: 5`` (TypeError from re.compile) and YAML's ``.nan`` in a step (ValueError
    when rendered) killed the render worker: a traceback in the broker's log, and the operator told
    that the document "needed more memory than a render worker may use"."""
    cases = ((doc("echo {{ p }}", parameters="  p: {type: String, default: '5', allowedPattern: 5}\n"),
              "allowedPattern must be a string"),
             (doc("echo {{ p }}", parameters="  p: {type: String, default: x}\n").replace(
                 "      runCommand:", "      workingDirectory: .nan\n      runCommand:"), "NaN or Infinity"))
    for text, expect in cases:
        path = write(tmp_path, "odd-type.yml", text)
        refused(dfleet, "documents", "create", "ops-odd-type", str(path), expect=["InvalidDocument", expect])
        refused(dfleet, "send", "--document-file", str(path), "-i", AGENT, expect=["InvalidDocument", expect])
    assert "Traceback" not in dfleet.broker_log()


def test_a_jinja_document_naming_a_parameter_none_is_refused_not_run_without_its_value(dfleet, tmp_path):
    """``{{ none }}`` in a longer Jinja string is Jinja's None: the command ran ``echo  x`` whatever
    the operator passed with ``-p none=...``."""
    text = doc("echo {{ none }} x", parameters="  none: {type: String, default: given}\n", templating="jinja")
    path = write(tmp_path, "jinja-none.yml", text)
    for args in (("documents", "create", "ops-jinja-none", str(path)),
                 ("send", "--document-file", str(path), "-p", "none=given", "-i", AGENT)):
        refused(dfleet, *args, expect=["InvalidDocument", "parameter 'none'", "rename it"])


def test_a_step_for_platform_type_linux_in_lower_case_runs_as_on_ssm(dfleet, tmp_path):
    """amazon-ssm-agent lower-cases the platform a precondition names: a step written for
    ``linux`` runs there, and here it was Skipped ("every step was skipped")."""
    text = doc("echo ran").replace("    name: run\n", "    name: run\n    precondition:\n"
                                   "      StringEquals: [platformType, linux]\n")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "lower-linux.yml", text)))
    assert rc == 0 and view["status"] == "Success" and stdout_of(view) == "ran\n", view


def test_a_parameter_holding_nul_is_refused_not_sent_to_fail_everywhere(dfleet):
    """Steps get every parameter in their environment, which cannot hold a NUL: the command was
    sent and each instance failed it with "agent error: embedded null byte"."""
    from zerorun.client import RequestFailed

    before = command_count(dfleet)
    with pytest.raises(RequestFailed) as err:
        dfleet.client().send("AWS-RunShellScript", {"commands": ["true"], "workingDirectory": "/tmp\x00x"},
                             instance_ids=[AGENT], wait=30)
    assert err.value.code == "InvalidParameters" and "'workingDirectory'" in str(err.value) and "NUL" in str(err.value)
    assert command_count(dfleet) == before


def test_a_string_map_is_held_to_its_allowed_pattern(dfleet, tmp_path):
    """A StringMap's allowedPattern (checked by SSM against its JSON) was ignored: a map holding
    shell syntax reached a script its author had guarded with that pattern."""
    pattern = '\\{("[a-z]+":"[a-z]+",?)*\\}'
    text = doc("echo '{{ labels }}'", parameters=f"  labels:\n    type: StringMap\n    default: {{}}\n"
                                                f"    allowedPattern: '{pattern}'\n")
    path = write(tmp_path, "stringmap-pattern.yml", text)
    refused(dfleet, "send", "--document-file", str(path), "-p", """labels={"a": "'; echo pwned #"}""", "-i", AGENT,
            expect=["InvalidParameters", "'labels'", "allowedPattern"])
    rc, view = send(dfleet, "--document-file", str(path), "-p", 'labels={"b": "x", "a": "y"}')
    assert rc == 0 and stdout_of(view) == '{"a":"y","b":"x"}\n', view


def test_allowed_pattern_is_read_as_ssm_reads_it(dfleet, tmp_path):
    """``allowedPattern`` is RE2 syntax with ASCII classes, as amazon-ssm-agent's Go ``regexp``
    reads it: ``^\\d+$`` let Arabic-Indic digits through to the script (Python's ``\\d`` is
    Unicode), ``[[:alnum:]]`` refused every ordinary value, ``\\z`` refused the document, and a
    lookahead (which SSM's agent cannot compile) was accepted."""
    text = doc("echo {{ port }}-{{ host }}", parameters=(
        "  port:\n    type: String\n    allowedPattern: '^\\d{1,5}\\z'\n"
        "  host:\n    type: String\n    allowedPattern: '^[[:alnum:].-]+$'\n"))
    rc, _, err = run_json(dfleet, "documents", "create", "ops-re2-pattern", str(write(tmp_path, "re2.yml", text)))
    assert rc == 0, err
    rc, view = send(dfleet, "ops-re2-pattern", "-p", "port=8080", "-p", "host=web-1.example")
    assert rc == 0 and stdout_of(view) == "8080-web-1.example\n", view
    refused(dfleet, "send", "ops-re2-pattern", "-p", "port=\u0668\u0660", "-p", "host=web", "-i", AGENT,
            expect=["InvalidParameters", "'port'", "allowedPattern"])
    lookahead = doc("echo {{ v }}", parameters="  v:\n    type: String\n    allowedPattern: '^(?!-).*$'\n")
    message = refused(dfleet, "documents", "create", "ops-re2-lookahead", str(write(tmp_path, "la.yml", lookahead)),
                      expect=["InvalidDocument", "allowedPattern", "lookahead", "RE2"])
    assert "Traceback" not in message
    rc, _, _ = run_json(dfleet, "documents", "show", "ops-re2-lookahead")
    assert rc != 0


def test_a_parameter_store_reference_in_a_string_map_is_refused(dfleet, tmp_path):
    """Refused in a String, it reached the script as literal text in a StringMap (where SSM's
    agent would have resolved it)."""
    path = write(tmp_path, "map-ssm.yml", doc("echo '{{ labels }}'", parameters=(
        "  labels:\n    type: StringMap\n    default: {}\n")))
    refused(dfleet, "send", "--document-file", str(path), "-p", 'labels={"pw": "{{ssm:/db/password}}"}', "-i", AGENT,
            expect=["InvalidParameters", "'labels'", "Parameter Store references are not supported"])
    rc, view = send(dfleet, "--document-file", str(path), "-p", 'labels={"a": "b"}')
    assert rc == 0 and stdout_of(view) == '{"a":"b"}\n', view


def test_a_misspelt_constraint_is_an_invalid_document_not_an_unguarded_parameter(dfleet, tmp_path):
    """``allowedpattern`` (any unknown key of a declaration) was ignored: the document was stored
    and ran any value, shell syntax included, in a script its author believed guarded."""
    text = doc("echo {{ name }}", parameters="  name:\n    type: String\n    allowedpattern: '^[a-z]+$'\n")
    refused(dfleet, "documents", "create", "ops-typo", str(write(tmp_path, "typo.yml", text)),
            expect=["InvalidDocument", "unknown key 'allowedpattern'", "did you mean 'allowedPattern'"])
    refused(dfleet, "send", "--document-file", str(tmp_path / "typo.yml"), "-p", "name=x; id", "-i", AGENT,
            expect=["InvalidDocument", "unknown key 'allowedpattern'"])


def test_a_precondition_ssm_would_fail_is_refused_before_anything_runs(dfleet, tmp_path):
    """``[platformType, "{{ os }}"]`` let a parameter choose the platform (SSM's agent fails the
    step), and a precondition on two constants was a silent skip (SSM fails it too)."""
    for operands, expect in (('[platformType, "{{ os }}"]', "cannot come from a parameter"),
                             ('["yes", "no"]', "at least one of operator's arguments")):
        text = ("schemaVersion: '2.2'\nparameters:\n  os:\n    type: String\n    default: Linux\nmainSteps:\n"
                f"  - action: aws:runShellScript\n    name: run\n    precondition: {{StringEquals: {operands}}}\n"
                "    inputs:\n      runCommand: [echo ran]\n")
        path = write(tmp_path, "pre.yml", text)
        refused(dfleet, "send", "--document-file", str(path), "-p", "os=Linux", "-i", AGENT,
                expect=["InvalidDocument", "step 'run': precondition StringEquals", expect])
    path = write(tmp_path, "pre.yml", text.replace('["yes", "no"]', '["{{ os }}", Linux]'))
    rc, view = send(dfleet, "--document-file", str(path), "-p", "os=Linux")
    assert rc == 0 and stdout_of(view) == "ran\n", view


def test_a_map_list_parameter_runs(dfleet, tmp_path):
    """MapList, SSM's sixth parameter type, made the document invalid ("unsupported type")."""
    path = write(tmp_path, "maplist.yml", doc("echo '{{ hosts }}'", 'echo "$ZERORUN_PARAM_hosts"', parameters=(
        "  hosts:\n    type: MapList\n    default: [{name: web}]\n    maxItems: 2\n")))
    rc, view = send(dfleet, "--document-file", str(path), "-p", 'hosts=[{"name": "db", "port": 5432}]')
    assert rc == 0 and stdout_of(view) == '[{"name":"db","port":5432}]\n' * 2, view
    refused(dfleet, "send", "--document-file", str(path), "-p", 'hosts=[{"a": "1"}, {"b": "2"}, {"c": "3"}]',
            "-i", AGENT, expect=["InvalidParameters", "'hosts' (MapList)", "maxItems 2"])


def test_an_unquoted_yaml_boolean_default_of_a_string_runs_as_ssm_substitutes_it(dfleet, tmp_path):
    """``default: true`` on a String reached the script as Python's ``True`` (SSM: ``true``)."""
    path = write(tmp_path, "bool-default.yml", doc("echo {{ flag }} {{ ratio }}", parameters=(
        "  flag:\n    type: String\n    default: true\n  ratio:\n    type: String\n    default: 2.0\n")))
    rc, view = send(dfleet, "--document-file", str(path))
    assert rc == 0 and stdout_of(view) == "true 2\n", view


def test_a_lone_surrogate_is_refused_and_the_broker_lives_on(dfleet, tmp_path):
    """JSON's ``\\ud800`` escape decodes to a lone surrogate, which msgpack cannot hold: a stored
    document holding one was accepted, and the first ``send`` of it stopped the broker
    (UnicodeEncodeError in its group commit); a StringMap given as such JSON text (by the client
    library or Ansible: the CLI refuses it itself) did the same."""
    from zerorun.client import RequestFailed

    path = write(tmp_path, "surrogate.json", r"""{"schemaVersion": "2.2", "description": "d", "mainSteps": [
        {"action": "aws:runShellScript", "name": "s", "inputs": {"runCommand": ["echo a\ud800b"]}}]}""")
    refused(dfleet, "documents", "create", "ops-surrogate", str(path), expect=["InvalidDocument", "lone surrogate"])
    refused(dfleet, "send", "--document-file", str(path), "-i", AGENT, expect=["InvalidDocument", "lone surrogate"])
    text = doc("echo '{{ m }}'", parameters="  m: {type: StringMap, default: {}}\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-map-text", str(write(tmp_path, "map.yml", text)))
    assert rc == 0, err
    with pytest.raises(RequestFailed) as failed:
        dfleet.client().send("ops-map-text", {"m": r'{"k": "a\ud800"}'}, instance_ids=[AGENT], wait=30)
    assert failed.value.code == "InvalidParameters" and "lone surrogate" in str(failed.value)
    assert dfleet.broker.poll() is None, dfleet.broker_log()[-3000:]
    rc, view = send(dfleet, "ops-map-text", "-p", 'm={"k": "v"}')
    assert rc == 0 and stdout_of(view) == '{"k":"v"}\n', view


def test_a_jinja_template_rendering_a_lone_surrogate_is_an_invalid_document(dfleet, tmp_path):
    """``{{ "\\ud800" }}`` renders a lone surrogate: the render worker died sending the result back
    (msgpack holds UTF-8 only), and the operator was told the document needed more memory."""
    text = doc('echo {{ "\\ud800" }}', templating="jinja")
    refused(dfleet, "send", "--document-file", str(write(tmp_path, "jinja-surrogate.yml", text)), "-i", AGENT,
            expect=["InvalidDocument", "step 'run'", "lone surrogate"])


def test_a_relative_working_directory_finds_what_a_download_put_there(dfleet, tmp_path):
    """SSM's pattern: download to a relative path, then run in that relative directory. The
    download went into the invocation's directory, the step looked for the directory relative to
    the agent's own one, and failed: "working directory fetched does not exist"."""
    text = ("schemaVersion: '2.2'\ndescription: d\nmainSteps:\n- action: aws:downloadContent\n  name: get\n"
            "  inputs:\n    sourceType: SSMDocument\n    sourceInfo: '{\"name\": \"RunShellScript\"}'\n"
            "    destinationPath: fetched/doc.yml\n- action: aws:runShellScript\n  name: use\n"
            "  inputs:\n    workingDirectory: fetched\n    runCommand: [ls]\n")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "relative.yml", text)))
    assert rc == 0 and view["status"] == "Success", view
    assert stdout_of(view).endswith("doc.yml\n"), view


def test_an_interpreter_with_an_unclosed_quote_is_an_invalid_document(dfleet, tmp_path):
    """shlex.split's ValueError on an unclosed quote killed the render worker: the operator was
    told the document needed more memory than a worker may use."""
    text = ("schemaVersion: '2.2'\ndescription: d\nmainSteps:\n- action: runScript\n  name: s\n"
            "  inputs: {script: 'print(1)', interpreter: \"python3 -c 'x\"}\n")
    refused(dfleet, "send", "--document-file", str(write(tmp_path, "quote.yml", text)), "-i", AGENT,
            expect=["InvalidDocument", "step 's' interpreter", "closing quotation"])


def test_a_script_longer_than_an_environment_variable_runs(dfleet):
    """AWS-RunShellScript with 200 KB of commands failed on every instance ("Argument list too
    long"): every parameter went into the environment, and Linux passes no variable longer than
    128 KiB. SSM runs it; so does Zerorun now, leaving that one value out of the environment."""
    commands = ["# " + "x" * 1000] * 200 + ["echo done"]
    view = dfleet.client(timeout=60).send("AWS-RunShellScript", {"commands": commands}, instance_ids=[AGENT], wait=60)
    (inv,) = view.invocations
    assert view.status == "Success" and inv.stdout == "done\n", (inv.status, inv.stderr)


def test_a_string_map_nested_absurdly_deep_is_an_invalid_parameter(dfleet, tmp_path):
    """A StringMap given as JSON nested 600 levels deep raised RecursionError in the broker's loop:
    the client got InternalError and the broker's log a traceback."""
    from zerorun.client import RequestFailed

    text = doc("echo '{{ m }}'", parameters="  m: {type: StringMap, default: {}}\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-deep-map", str(write(tmp_path, "deep.yml", text)))
    assert rc == 0, err
    with pytest.raises(RequestFailed) as failed:
        dfleet.client().send("ops-deep-map", {"m": '{"a": ' + "[" * 600 + "]" * 600 + "}"}, instance_ids=[AGENT])
    assert failed.value.code == "InvalidParameters" and "nested more than 64" in str(failed.value), failed.value
    assert "internal error" not in dfleet.broker_log()


def test_many_large_parameters_do_not_keep_a_step_from_starting(dfleet):
    """22 parameters of 100 KB, each small enough for one environment variable, came to more than
    Linux gives a program (ARG_MAX, 2 MiB): the step failed to start, "Argument list too long"."""
    params = "".join(f"  p{i:02d}: {{type: String}}\n" for i in range(22))
    text = doc("echo ran", parameters=params)
    view = dfleet.client(timeout=60).send(document_content=text, parameters={
        f"p{i:02d}": "x" * 100_000 for i in range(22)}, instance_ids=[AGENT], wait=60)
    (inv,) = view.invocations
    assert view.status == "Success" and inv.stdout == "ran\n", (inv.status, inv.stderr)


def test_a_pattern_that_would_backtrack_for_ever_is_answered_at_once(dfleet, tmp_path):
    """A stored document's ``allowedPattern`` is its author's regular expression: with Python's
    ``re``, ``(a+)+$`` on forty a's and a '!' backtracked for hours (one ``send`` froze every client
    and agent, until such patterns went to a worker under its deadline). RE2, as in SSM, matches in
    linear time: the value is refused at once, and the same parameters again are answered from
    memory."""
    text = doc("echo {{ name }}", parameters="  name:\n    type: String\n    allowedPattern: '^(a+)+$'\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-backtracking", str(write(tmp_path, "re.yml", text)))
    assert rc == 0, err
    refused(dfleet, "send", "ops-backtracking", "-p", "name=" + "a" * 40 + "!", "-i", AGENT,
            expect=["InvalidParameters", "'name'"])
    assert dfleet.client(timeout=10).ping()
    for _ in range(2):  # the second from memory
        rc, view = send(dfleet, "ops-backtracking", "-p", "name=aaa")
        assert rc == 0 and stdout_of(view) == "aaa\n", view
    refused(dfleet, "send", "ops-backtracking", "-p", "name=ab", "-i", AGENT, expect=["InvalidParameters", "'name'"])


def test_a_large_default_substituted_many_times_is_rendered_off_the_loop(dfleet, tmp_path):
    """The loop rendered a stored SSM document whenever the values a command gave were small,
    whatever its defaults: 100 KB of default substituted 8,000 times built an 800 MB string in the
    loop (seconds with every client and agent waiting, and memory the broker may not have) before
    the step cap refused it. Such a document now renders in a worker, under its limits."""
    text = doc("{{p}}" * 8000, parameters="  p: {type: String, default: '" + "x" * 100_000 + "'}\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-big-default", str(write(tmp_path, "big-default.yml", text)))
    assert rc == 0, err
    before = dfleet.client().ping()["rendering"]
    heavy = subprocess.run([dfleet.python, "-m", "zerorun.cli", "-c", str(dfleet.client_config), "send",
                            "ops-big-default", "-i", AGENT], capture_output=True, text=True, env=dfleet.env(),
                           timeout=120)
    assert heavy.returncode == 2 and "Traceback" not in heavy.stderr, (heavy.stdout, heavy.stderr)
    assert any(code in heavy.stderr for code in ("RenderTooLarge", "RenderFailed", "RenderTimeout")), heavy.stderr
    after = dfleet.client().ping()["rendering"]  # where it was rendered: in a worker, not the loop
    assert after["worker"] == before["worker"] + 1 and after["inline"] == before["inline"], (before, after)
    assert dfleet.broker.poll() is None


def test_a_long_list_against_many_allowed_values_does_not_hold_the_loop(dfleet, tmp_path):
    """A stored document with 20,000 allowedValues renders in the broker's loop (it has no
    allowedPattern), and each StringList item was compared with every allowed value in turn: a
    send of 40,000 items held every client and agent for seconds (100,000: minutes)."""
    import threading

    allowed = ", ".join(f"v{i:05d}" for i in range(20000))
    text = doc("echo {{ l }}", parameters=f"  l:\n    type: StringList\n    allowedValues: [{allowed}]\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-many-allowed", str(write(tmp_path, "many.yml", text)))
    assert rc == 0, err
    outcome: list = []

    from zerorun.client import Client, ClientConfig

    sending = dfleet.adopt(Client(ClientConfig.load(dfleet.client_config), timeout=120))  # one per thread

    def send_long_list():
        outcome.append(sending.send("ops-many-allowed", {"l": ["v19999"] * 40000}, instance_ids=[AGENT]))

    sender = threading.Thread(target=send_long_list)
    sender.start()
    pings = 0
    while sender.is_alive():  # answered all along (how fast is the unit test's: one comparison per item)
        dfleet.client(timeout=30).ping()
        pings += 1
        time.sleep(0.05)
    sender.join()
    assert outcome and outcome[0].command_id, outcome
    assert pings >= 1


def _parses(fleet, call):
    """What ``call()`` returns, and how many documents the broker parsed meanwhile: in its loop
    (``parsed_inline``) and in render workers (``parsed_worker``), as ping counts them."""
    before = fleet.client().ping()["rendering"]
    result = call()
    after = fleet.client().ping()["rendering"]
    return result, {key: after[key] - before[key] for key in ("parsed_inline", "parsed_worker")}


def test_show_parses_a_stored_version_once_and_never_in_the_loop(tmp_path):
    """``documents show`` parsed the stored version in the broker's loop (~0.5 s for 256 KiB, every
    client and agent waiting) whenever it was not among the last versions parsed: always, after a
    restart. What show needs is kept when a version is stored, and a version stored before (by
    an older broker, or before a restart) is parsed once, by a render worker."""
    fleet = LocalFleet(tmp_path / "fleet")
    try:
        fleet.start_broker()
        params = "  who: {type: String, description: whom, default: world}\n  pw: {type: SecureString, description: key}\n"
        for command, text in (("create", doc("echo {{ who }}", parameters=params)),
                              ("update", doc("echo hello {{ who }}", parameters=params))):
            rc, _, err = run_json(fleet, "documents", command, "ops-shown", str(write(tmp_path, "shown.yml", text)))
            assert rc == 0, err
        expected = {"who": {"type": "String", "description": "whom", "required": False, "secret": False},
                    "pw": {"type": "String", "description": "key", "required": True, "secret": True}}

        def show(version: str = ""):
            return _parses(fleet, lambda: fleet.client().get_document("ops-shown", version))

        for version in ("", "2"):  # kept when it was stored: nothing to parse
            info, parsed = show(version)
            assert info.parameters == expected and parsed == {"parsed_inline": 0, "parsed_worker": 0}, parsed
        fleet.stop_broker()
        fleet.start_broker()  # as a broker upgraded in place: versions stored, nothing kept of them
        info, parsed = show()
        assert info.version == 1 and info.is_default and "echo {{ who }}" in info.content
        assert info.parameters == expected and parsed == {"parsed_inline": 0, "parsed_worker": 1}, parsed
        again, parsed = show()
        assert again == info and parsed == {"parsed_inline": 0, "parsed_worker": 0}, parsed
        info, parsed = show("2")
        assert info.version == 2 and info.parameters == expected and parsed["parsed_inline"] == 0, parsed
        builtin, parsed = _parses(fleet, lambda: fleet.client().get_document("RunShellScript"))
        assert builtin.builtin and "commands" in builtin.parameters, builtin
        assert parsed == {"parsed_inline": 0, "parsed_worker": 0}, parsed
        rc, shown, err = run_json(fleet, "documents", "show", "ops-shown")
        assert rc == 0 and shown["parameters"]["who"]["default"] == "world", (shown, err)
    finally:
        fleet.close()


def test_a_send_leaves_parsing_a_long_stored_version_to_a_worker(tmp_path):
    """A send of a stored version not parsed yet (after a restart, or once 256 others were) parsed
    it in the broker's loop: a tenth of a second or more for 256 KiB of YAML, every client and
    agent waiting. A version longer than 16 KiB is parsed and rendered by a worker; a short one
    is still parsed in the loop, once, and rendered there."""
    from zmq_broker.rendering import PARSE_IN_LOOP_BYTES

    fleet = LocalFleet(tmp_path / "fleet")
    try:
        fleet.start_broker()
        fleet.start_agent(AGENT, {"role": "doc"})
        fleet.wait_online([AGENT])
        lines = [f"echo line {i} {'x' * 60}" for i in range(PARSE_IN_LOOP_BYTES // 60)]
        long_text = doc(*lines, "echo {{ who }}", parameters="  who: {type: String, default: world}\n")
        assert len(long_text) > PARSE_IN_LOOP_BYTES
        for name, text in (("ops-long", long_text), ("ops-short", doc("echo short"))):
            rc, _, err = run_json(fleet, "documents", "create", name, str(write(tmp_path, f"{name}.yml", text)))
            assert rc == 0, err
        fleet.stop_broker()
        fleet.start_broker()  # nothing parsed in this one yet
        fleet.wait_online([AGENT])

        def rendering():
            return fleet.client().ping()["rendering"]

        before = rendering()
        rc, view = send(fleet, "ops-long", "-p", "who=there")
        after = rendering()
        out = stdout_of(view).splitlines()
        assert rc == 0 and out[0] == f"line 0 {'x' * 60}" and out[-1] == "there" and len(out) == len(lines) + 1
        assert after["parsed_inline"] == before["parsed_inline"], (before, after)
        assert after["parse_left_to_worker"] == before["parse_left_to_worker"] + 1
        assert after["worker"] == before["worker"] + 1
        rc, view = send(fleet, "ops-short")
        short = rendering()
        assert rc == 0 and stdout_of(view) == "short\n"
        assert short["parsed_inline"] == after["parsed_inline"] + 1 and short["inline"] == after["inline"] + 1
    finally:
        fleet.close()


def test_secret_parameter_is_never_shown_but_reaches_the_agent(dfleet, tmp_path):
    secret = "s3cr3t-V@lue with 'quotes'"
    out = tmp_path / "secret.out"
    text = doc("printf '%s' {{ token | quote }} > {{ out | quote }}",
               "printf '%s' \"$ZERORUN_PARAM_token\" > {{ out | quote }}.env",
               "echo done",
               parameters="  token:\n    type: String\n    secret: true\n  out:\n    type: String\n",
               templating="jinja")
    path = write(tmp_path, "secret.yml", text)
    assert dfleet.cli("documents", "create", "ops-secret", str(path)).returncode == 0
    proc = dfleet.cli("send", "ops-secret", "-p", f"token={secret}", "-p", f"out={out}", "-i", AGENT, "--json")
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout)
    assert secret not in proc.stdout
    assert out.read_text() == secret  # the agent got the real value, in the script ...
    assert Path(f"{out}.env").read_text() == secret  # ... and in the environment
    assert view["parameters"]["token"] == "***"
    (step,) = view["steps"]
    assert "***" in step["script"] and step["env"]["ZERORUN_PARAM_token"] == "***"
    for args in (("show", view["command_id"], "--json"), ("show", view["command_id"], "--script"),
                 ("commands", "--json")):
        shown = dfleet.cli(*args)
        assert shown.returncode == 0 and shown.stdout
        assert secret not in shown.stdout and "s3cr3t" not in shown.stdout, args
    # a wrong value is reported without echoing it
    strict = write(tmp_path, "strict.yml", doc(
        "true", parameters="  token:\n    type: String\n    secret: true\n    allowedPattern: '^[a-z]+$'\n"))
    message = refused(dfleet, "send", "--document-file", str(strict), "-p", f"token={secret}", "-i", AGENT,
                      expect=["'token'", "***"])
    assert "s3cr3t" not in message


def test_env_var_interpolation_and_quote_filter_defeat_injection(dfleet, tmp_path):
    attack_file = tmp_path / "pwned"
    value = f"'; touch {attack_file} #"
    env_var_doc = doc("echo {{ value }}", parameters=(
        "  value:\n    type: String\n    interpolationType: ENV_VAR\n"))
    quoted_doc = doc("echo {{ value | quote }}", parameters="  value:\n    type: String\n", templating="jinja")
    for name, text in (("env.yml", env_var_doc), ("quoted.yml", quoted_doc)):
        rc, view = send(dfleet, "--document-file", str(write(tmp_path, name, text)), "-p", f"value={value}")
        assert rc == 0, view
        assert stdout_of(view) == value + "\n", name
        assert not attack_file.exists(), f"{name}: the value ran as shell code"
    # SSM-style ENV_VAR also exports SSM_<name>
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "ssmenv.yml", doc(
        'printf "%s|%s" "$SSM_value" "$ZERORUN_PARAM_value"',
        parameters="  value:\n    type: String\n    interpolationType: ENV_VAR\n"))), "-p", f"value={value}")
    assert stdout_of(view) == f"{value}|{value}"
    # the control: plain text substitution inside quotes is injectable, which is why the two above matter
    naive = write(tmp_path, "naive.yml", doc("echo '{{ value }}'", parameters="  value:\n    type: String\n"))
    send(dfleet, "--document-file", str(naive), "-p", f"value={value}")
    assert attack_file.exists()


def test_show_script_prints_the_rendered_steps(dfleet, tmp_path):
    path = write(tmp_path, "two.yml", doc("echo {{ a }}", "echo second",
                                          parameters="  a:\n    type: String\n"))
    rc, view = send(dfleet, "--document-file", str(path), "-p", "a=rendered-value")
    assert rc == 0
    proc = dfleet.cli("show", view["command_id"], "--script")
    assert proc.returncode == 0
    assert "--- step run (runShellScript)" in proc.stdout
    assert "echo rendered-value\necho second" in proc.stdout
    assert "{{" not in proc.stdout
    # dry run: rendered and resolved, nothing sent
    before = command_count(dfleet)
    dry = dfleet.cli("send", "--document-file", str(path), "-p", "a=dry", "-i", AGENT, "--dry-run")
    assert dry.returncode == 0 and "echo dry" in dry.stdout
    assert command_count(dfleet) == before


def test_aws_runshellscript_alias(dfleet):
    rc, view = send(dfleet, "AWS-RunShellScript", "-p", "commands=echo via alias", "-p", "commands=echo two")
    assert rc == 0 and stdout_of(view) == "via alias\ntwo\n"
    assert view["document_name"] == "RunShellScript"
    rc, shown, _ = run_json(dfleet, "documents", "show", "AWS-RunShellScript")
    assert rc == 0 and shown["name"] == "RunShellScript" and shown["builtin"] is True
    assert shown["parameters"]["commands"]["required"] is True


def test_builtin_documents_run(dfleet):
    rc, view = send(dfleet, "RunPythonScript", "-p", "commands=print(6 * 7)")
    assert rc == 0 and stdout_of(view) == "42\n", view
    rc, view = send(dfleet, "GetInstanceInfo")
    assert rc == 0 and "hostname: " in stdout_of(view) and "kernel: " in stdout_of(view)


def test_validate_and_render_work_without_a_broker(tmp_path):
    """No config, no broker: the local commands only import the document engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZERORUN_")}
    env["HOME"] = str(tmp_path)  # no ~/.config/zerorun either

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "zerorun.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)

    path = write(tmp_path, "p.yml", PARAMS_DOC)
    proc = cli("documents", "validate", str(path))
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stderr
    proc = cli("documents", "validate", str(path), "--json")
    report = json.loads(proc.stdout)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["parameters"]["owner"]["required"] is True
    proc = cli("documents", "render", str(path), "-p", "owner=it's me", "-p", "tag=x")
    assert proc.returncode == 0, proc.stderr
    assert "--- step run (runShellScript)" in proc.stdout
    assert "echo 1 fast x 'it'\"'\"'s me'" in proc.stdout
    proc = cli("documents", "render", str(path), "-p", "owner=me", "--json")
    (step,) = json.loads(proc.stdout)["steps"]
    assert step["script"] == "echo 1 fast abc me"
    broken = write(tmp_path, "broken.yml", "schemaVersion: '2.2'\nmainSteps: [{name: x}]\n")
    proc = cli("documents", "validate", str(broken))
    assert proc.returncode == 2 and "action is required" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("documents", "render", str(path), "-p", "novalue")
    assert proc.returncode == 2 and "NAME=VALUE" in proc.stderr
    # the broker-side commands still need a config, and say so
    proc = cli("documents", "list")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# -- SSM substitution and Jinja, each where it belongs (issue 21) ------------------------------

def test_literal_braces_and_double_dollar_run_as_ssm_runs_them(dfleet, tmp_path):
    """Go templates, ``${{ }}`` and undeclared tokens run as written; a value's ``$$`` becomes
    ``$`` inside a longer string and stays ``$$`` as a whole token."""
    lines = ["x='{{.Names}}'; y='${{ word }}'; z='{{ undeclared }}'",
             "printf '%s|%s|%s|%s\\n' \"$x\" \"$y\" \"$z\" '{{ word }}'",
             "{{ price }}"]
    path = write(tmp_path, "braces.yml", doc(*lines, parameters=(
        "  word:\n    type: String\n  price:\n    type: String\n")))
    rc, view = send(dfleet, "--document-file", str(path), "-p", "word=cost $$5", "-p", "price=echo 'a$$b'")
    assert rc == 0, view
    assert stdout_of(view) == "{{.Names}}|$cost $5|{{ undeclared }}|cost $5\na$$b\n"
    proc = dfleet.cli("show", view["command_id"], "--script")
    assert "x='{{.Names}}'" in proc.stdout and "y='$cost $5'" in proc.stdout
    # validate and render say which language applies; a Jinja-only construct is refused in an
    # SSM document with the fix in the message, and accepted with the marker
    report = json.loads(dfleet.cli("documents", "validate", str(path), "--json").stdout)
    assert report["templating"] == "ssm"
    assert "SSM substitution" in dfleet.cli("documents", "validate", str(path)).stdout
    assert "SSM substitution" in dfleet.cli("documents", "render", str(path), "-p", "word=w", "-p", "price=p").stdout
    quoted = write(tmp_path, "quoted.yml", doc("echo {{ word | quote }}", parameters="  word:\n    type: String\n"))
    refused(dfleet, "send", "--document-file", str(quoted), "-p", "word=w", "-i", AGENT,
            expect=["InvalidDocument", "{{ word | quote }}", "templating: jinja"])
    marked = write(tmp_path, "marked.yml", doc("echo {{ word | quote }}", parameters="  word:\n    type: String\n",
                                                 templating="jinja"))
    assert "Jinja2" in dfleet.cli("documents", "validate", str(marked)).stdout
    rc, view = send(dfleet, "--document-file", str(marked), "-p", "word=it's")
    assert rc == 0 and stdout_of(view) == "it's\n"


def test_null_default_means_required(dfleet, tmp_path):
    path = write(tmp_path, "nulldefault.json", json.dumps({
        "schemaVersion": "2.2", "parameters": {"target": {"type": "String", "default": None}},
        "mainSteps": [{"action": "aws:runShellScript", "name": "run",
                       "inputs": {"runCommand": ["echo target={{ target }}"]}}]}))
    assert dfleet.cli("documents", "validate", str(path)).returncode == 0
    message = refused(dfleet, "send", "--document-file", str(path), "-i", AGENT,
                      expect=["InvalidParameters", "'target'", "required and has no default"])
    assert "None" not in message and "null" not in message
    rc, view = send(dfleet, "--document-file", str(path), "-p", "target=db")
    assert rc == 0 and stdout_of(view) == "target=db\n"


# -- composite documents -----------------------------------------------------------------------

LEAF = """\
schemaVersion: '2.2'
templating: jinja
parameters:
  greeting: {type: String}
  token: {type: String, secret: true, default: leaf-default-token}
mainSteps:
  - action: aws:runShellScript
    name: quoted
    inputs:
      runCommand:
        - printf 'leaf %s %s\\n' {{ greeting | quote }} "${#ZERORUN_PARAM_token}"
"""

MIDDLE = """\
schemaVersion: '2.2'
parameters:
  who: {type: String}
  extra: {type: StringList, default: []}
mainSteps:
  - action: aws:runShellScript
    name: before
    inputs:
      runCommand: ["echo middle {{ who }} {{ extra }} '{{.Go}}'"]
  - action: aws:runDocument
    name: leaf
    inputs:
      documentType: SSMDocument
      documentPath: ops-leaf:1
      documentParameters: '{"greeting": "hi {{ who }}", "token": "{{ who }}-secret-token"}'
  - action: aws:runShellScript
    name: after
    inputs:
      runCommand: ["echo middle after"]
"""

TOP = """\
schemaVersion: '2.2'
parameters:
  name: {type: String}
mainSteps:
  - action: aws:runShellScript
    name: first
    inputs:
      runCommand: ["echo top {{ name }}"]
  - action: aws:runDocument
    name: mid
    inputs:
      documentType: SSMDocument
      documentPath: ops-middle
      documentParameters:
        who: "{{ name }}"
        extra: [x, y]
        unused: null
  - action: aws:runShellScript
    name: last
    inputs:
      runCommand: ["echo top last"]
"""


def test_two_level_composite_document(dfleet, tmp_path):
    for name, text in (("ops-leaf", LEAF), ("ops-middle", MIDDLE)):
        assert dfleet.cli("documents", "create", name, str(write(tmp_path, f"{name}.yml", text))).returncode == 0
    # a later leaf version is not the one ops-middle pins (ops-leaf:1)
    assert dfleet.cli("documents", "update", "ops-leaf", str(write(tmp_path, "leaf2.yml", LEAF.replace(
        "leaf %s", "LEAF-V2 %s"))), "--set-default").returncode == 0
    top = write(tmp_path, "top.yml", TOP.replace("        unused: null\n", ""))
    rc, view = send(dfleet, "--document-file", str(top), "-p", "name=ann")
    assert rc == 0, view
    (inv,) = view["invocations"]
    assert [(s["name"], s["status"]) for s in inv["steps"]] == [
        ("first", "Success"), ("mid/before", "Success"), ("mid/leaf/quoted", "Success"),
        ("mid/after", "Success"), ("last", "Success")]
    assert inv["stdout"] == ("top ann\nmiddle ann [x,y] {{.Go}}\nleaf hi ann 16\n"
                             "middle after\ntop last\n")
    leaf_step = next(s for s in inv["steps"] if s["name"] == "mid/leaf/quoted")
    assert leaf_step["stdout"] == "leaf hi ann 16\n"
    # show --script prints the rendered script of every level, with the nested secret hidden
    proc = dfleet.cli("show", view["command_id"], "--script")
    assert proc.returncode == 0
    for header, script in (("first", "echo top ann"), ("mid/before", "echo middle ann [\"x\",\"y\"] '{{.Go}}'"),
                           ("mid/leaf/quoted", "printf 'leaf %s %s\\n' 'hi ann'"),
                           ("mid/after", "echo middle after"), ("last", "echo top last")):
        assert f"--- step {header} (runShellScript)" in proc.stdout and script in proc.stdout, (header, proc.stdout)
    shown = dfleet.cli("show", view["command_id"], "--json")
    assert "ann-secret-token" not in shown.stdout and "ann-secret-token" not in proc.stdout
    # a null in documentParameters is dropped (the default applies) ...
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "top-null.yml", TOP)), "-p", "name=bo")
    assert rc == 0, view
    # ... and the dry run renders every level without sending anything
    before = command_count(dfleet)
    dry = dfleet.cli("send", "--document-file", str(top), "-p", "name=dry", "-i", AGENT, "--dry-run")
    assert dry.returncode == 0 and "--- step mid/leaf/quoted" in dry.stdout and "'hi dry'" in dry.stdout
    assert command_count(dfleet) == before


def test_composite_document_errors_send_nothing(dfleet, tmp_path):
    def run_doc(path: str, params: str = "{}", doc_type: str = "SSMDocument") -> Path:
        return write(tmp_path, "composite.yml", (
            "schemaVersion: '2.2'\nmainSteps:\n  - action: aws:runDocument\n    name: sub\n    inputs:\n"
            f"      documentType: {doc_type}\n      documentPath: {path}\n      documentParameters: '{params}'\n"))

    refused(dfleet, "send", "--document-file", str(run_doc("ops-nowhere")), "-i", AGENT,
            expect=["InvalidDocument", "step 'sub' (aws:runDocument)", "ops-nowhere"])
    refused(dfleet, "send", "--document-file", str(run_doc("ops-nowhere", doc_type="LocalPath")), "-i", AGENT,
            expect=["InvalidDocument", "step 'sub' (aws:runDocument)", "LocalPath", "not supported"])
    refused(dfleet, "send", "--document-file", str(run_doc("RunShellScript:7")), "-i", AGENT,
            expect=["step 'sub' (aws:runDocument)", "only version 1"])
    refused(dfleet, "send", "--document-file", str(run_doc("RunShellScript")), "-i", AGENT,
            expect=["InvalidParameters", "step 'sub' (aws:runDocument)", "'commands'", "required"])
    loop = write(tmp_path, "ops-loop.yml", "schemaVersion: '2.2'\nmainSteps:\n  - action: aws:runDocument\n"
                 "    name: again\n    inputs: {documentType: SSMDocument, documentPath: ops-loop}\n")
    assert dfleet.cli("documents", "create", "ops-loop", str(loop)).returncode == 0
    refused(dfleet, "send", "ops-loop", "-i", AGENT, expect=["step 'again/again/again/again' (aws:runDocument)",
                                                           "at most 3 levels"])
    # a built-in runs nested, as AWS-RunShellScript does in SSM
    rc, view = send(dfleet, "--document-file", str(run_doc("AWS-RunShellScript", '{"commands": ["echo nested"]}')))
    assert rc == 0 and stdout_of(view) == "nested\n"
    assert [s["name"] for s in view["invocations"][0]["steps"]] == ["sub/runShellScript"]


# -- a nested document's flow stays inside it, as in SSM (plugins/rundocument runs the document it
# names as one plugin step: runpluginutil.RunPlugins over that document's steps alone) ---------


def _shell(name: str, line: str, extra: str = "") -> str:
    return f"  - {{action: aws:runShellScript, name: {name}, inputs: {{runCommand: [{json.dumps(line)}]{extra}}}}}\n"


def _run(name: str, path: str, extra: str = "") -> str:
    return f"  - {{action: aws:runDocument, name: {name}, inputs: {{documentType: SSMDocument, documentPath: {path}{extra}}}}}\n"


def _doc(*steps: str) -> str:
    return "schemaVersion: '2.2'\ndescription: flow\nmainSteps:\n" + "".join(steps)


def _statuses(view) -> dict[str, str]:
    (inv,) = view["invocations"]
    return {s["name"]: s["status"] for s in inv["steps"]}


def test_a_nested_documents_finally_step_does_not_run_after_the_parent_stopped(dfleet, tmp_path):
    """The child's finallyStep is the last step of the child: it runs whatever happened in the
    child, but when the parent's flow stopped before the aws:runDocument step, that step (the
    whole child) is skipped. The child's steps were inlined and its finally step ran anyway."""
    child = _doc(_shell("work", "echo child-work"), _shell("cleanup", "echo child-cleanup", ", finallyStep: true"))
    assert dfleet.cli("documents", "create", "ops-flow-finally",
                      str(write(tmp_path, "child.yml", child))).returncode == 0
    parent = _doc(_shell("fails", "exit 3", ", onFailure: exit"), _run("call", "ops-flow-finally"))
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent.yml", parent)))
    assert _statuses(view) == {"fails": "Failed", "call/work": "Skipped", "call/cleanup": "Skipped"}, view
    assert stdout_of(view) == "" and rc == 1
    # inside the child, its finally step runs after the child's own exit
    parent = _doc(_run("call", "ops-flow-finally"), _shell("after", "echo parent-after"))
    child_exits = child.replace("echo child-work", "exit 169")
    assert dfleet.cli("documents", "update", "ops-flow-finally", str(write(tmp_path, "child2.yml", child_exits)),
                      "--set-default").returncode == 0
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent2.yml", parent)))
    assert _statuses(view) == {"call/work": "Failed", "call/cleanup": "Success", "after": "Success"}, view
    assert stdout_of(view) == "child-cleanup\nparent-after\n"


def test_a_nested_documents_exit_ends_that_document_only(dfleet, tmp_path):
    """168, 169 or onFailure: exit in the child skip the child's later steps; the parent goes on
    with the aws:runDocument step's aggregated status (Failed after 169, Success after 168), and
    that step's own onFailure/onSuccess decide for the parent."""
    child = _doc(_shell("first", "exit 169"), _shell("second", "echo child-second"))
    assert dfleet.cli("documents", "create", "ops-flow-exit", str(write(tmp_path, "child.yml", child))).returncode == 0
    parent = _doc(_run("call", "ops-flow-exit"), _shell("after", "echo parent-after"))
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent.yml", parent)))
    assert _statuses(view) == {"call/first": "Failed", "call/second": "Skipped", "after": "Success"}, view
    assert stdout_of(view) == "parent-after\n"
    assert view["invocations"][0]["status"] == "Failed" and rc == 1
    # 168 in the child: the child stops, a success; the parent goes on
    child168 = child.replace("exit 169", "exit 168")
    assert dfleet.cli("documents", "create", "ops-flow-exit168",
                      str(write(tmp_path, "child168.yml", child168))).returncode == 0
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent-168.yml", parent.replace(
        "ops-flow-exit}", "ops-flow-exit168}"))))
    assert _statuses(view) == {"call/first": "Success", "call/second": "Skipped", "after": "Success"}, view
    assert view["invocations"][0]["status"] == "Success" and rc == 0
    # the aws:runDocument step's onFailure: exit applies to the child's outcome, in the parent
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent-exit.yml", parent.replace(
        "documentPath: ops-flow-exit}", "documentPath: ops-flow-exit, onFailure: exit}"))))
    assert _statuses(view) == {"call/first": "Failed", "call/second": "Skipped", "after": "Skipped"}, view
    # ... and onFailure: successAndExit turns it into a success, as SSM does for the plugin step
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "parent-sae.yml", parent.replace(
        "documentPath: ops-flow-exit}", "documentPath: ops-flow-exit, onFailure: successAndExit}"))))
    assert _statuses(view) == {"call/first": "Success", "call/second": "Skipped", "after": "Skipped"}, view
    assert view["invocations"][0]["status"] == "Success" and rc == 0


def test_a_timed_out_step_exits_137_as_in_ssm(dfleet, tmp_path):
    """amazon-ssm-agent sets CommandStoppedPreemptivelyExitCode (137) for a timed-out step,
    whatever ended its process; here SIGTERM ended it and the step said 143."""
    text = ("schemaVersion: '2.2'\ndescription: timeouts\nmainSteps:\n"
            "  - {action: aws:runShellScript, name: slow, inputs: {runCommand: ['sleep 60'], timeoutSeconds: 1}}\n"
            "  - {action: aws:runShellScript, name: trapped, inputs: {runCommand: [\"trap 'exit 5' TERM; sleep 60 & wait\"],"
            " timeoutSeconds: 1}}\n")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "timeout-code.yml", text)))
    (inv,) = view["invocations"]
    assert [(s["status"], s["exit_code"]) for s in inv["steps"]] == [("TimedOut", 137), ("TimedOut", 137)], inv
    assert inv["status"] == "TimedOut" and inv["exit_code"] == 137, inv


def test_a_fractional_timeout_from_a_parameter_is_truncated_as_in_ssm(dfleet, tmp_path):
    """``timeoutSeconds: '{{ t }}'`` with ``t=1.9``: amazon-ssm-agent reads 1 s
    (``pluginutil.ValidateExecutionTimeout``); Zerorun read an hour and let the step run."""
    text = ("schemaVersion: '2.2'\ndescription: timeouts\nparameters:\n  t: {type: String}\nmainSteps:\n"
            "  - {action: aws:runShellScript, name: slow, inputs: {runCommand: ['sleep 20'], timeoutSeconds: '{{ t }}'}}\n")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "timeout-float.yml", text)), "-p", "t=1.9")
    (inv,) = view["invocations"]
    assert [(s["status"], s["exit_code"]) for s in inv["steps"]] == [("TimedOut", 137)], inv


# -- the step flow where it was not SSM's (amazon-ssm-agent's runpluginutil and docparser) -------


def test_a_timed_out_step_lets_the_later_steps_run_and_failed_outranks_timed_out(dfleet, tmp_path):
    """amazon-ssm-agent stops the flow only after 168/169, ``onFailure: exit`` on a Failed step
    or ``onSuccess: exit``: a TimedOut step stops nothing (here it ended the flow). The
    invocation is Failed when a step failed (its precedence: Failed > TimedOut > Success)."""
    text = ("schemaVersion: '2.2'\ndescription: timeout then more\nmainSteps:\n"
            "  - {action: aws:runShellScript, name: slow, inputs: {runCommand: ['sleep 60'], timeoutSeconds: 1}}\n"
            "  - {action: aws:runShellScript, name: after, inputs: {runCommand: ['echo after']}}\n"
            "  - {action: aws:runShellScript, name: fails, inputs: {runCommand: ['exit 3']}}\n")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "timeout-flow.yml", text)))
    (inv,) = view["invocations"]
    statuses = {s["name"]: s["status"] for s in inv["steps"]}
    assert statuses == {"slow": "TimedOut", "after": "Success", "fails": "Failed"}, inv
    assert inv["stdout"] == "after\n"
    assert inv["status"] == "Failed" and rc == 1, inv
    # without a failure the invocation is TimedOut, and onFailure: exit stops after a timeout
    text = text.replace("  - {action: aws:runShellScript, name: fails, inputs: {runCommand: ['exit 3']}}\n", "")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "timeout-flow-2.yml", text)))
    (inv,) = view["invocations"]
    assert [s["status"] for s in inv["steps"]] == ["TimedOut", "Success"], inv
    assert inv["status"] == "TimedOut" and inv["status_details"] == "ExecutionTimedOut", inv
    text = text.replace("timeoutSeconds: 1}", "timeoutSeconds: 1, onFailure: exit}")
    rc, view = send(dfleet, "--document-file", str(write(tmp_path, "timeout-flow-3.yml", text)))
    (inv,) = view["invocations"]
    assert [s["status"] for s in inv["steps"]] == ["TimedOut", "Skipped"], inv
    assert inv["status"] == "TimedOut", inv


REFUSED_FLOWS = {
    # amazon-ssm-agent honours finallyStep on the last step only and ignores it elsewhere
    # (runpluginutil: "Ignoring FinallyStep"): such a document is refused, not run as if it held
    "finally-first": (
        "  - {action: aws:runShellScript, name: cleanup, inputs: {runCommand: ['echo c'], finallyStep: true}}\n"
        "  - {action: aws:runShellScript, name: work, inputs: {runCommand: ['echo w']}}\n",
        "2.2", ["'cleanup'", "finallyStep is for the last step only"]),
    # SSM's onSuccess takes exit only; its agent ignores successAndExit there and runs on
    "on-success": (
        "  - {action: aws:runShellScript, name: first, inputs: {runCommand: ['echo 1'], onSuccess: successAndExit}}\n"
        "  - {action: aws:runShellScript, name: second, inputs: {runCommand: ['echo 2']}}\n",
        "2.2", ["'first'", "onSuccess must be exit"]),
    # amazon-ssm-agent fails such a step ("Precondition is not supported for document schema
    # version prior to 2.2"); here it was evaluated as in 2.2
    "pre-20": (
        "  - action: aws:runShellScript\n    name: linux\n"
        "    precondition:\n      StringEquals: [platformType, Linux]\n"
        "    inputs: {runCommand: ['echo ran']}\n",
        "2.0", ["'linux'", "precondition needs schemaVersion 2.2"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED_FLOWS))
def test_step_flow_that_ssm_would_run_otherwise_is_refused(dfleet, tmp_path, case):
    """Flow SSM ignores or fails (see each case) is refused when stored and when sent."""
    steps, schema, expect = REFUSED_FLOWS[case]
    text = f"schemaVersion: '{schema}'\ndescription: {case}\nmainSteps:\n{steps}"
    path = write(tmp_path, f"{case}.yml", text)
    for args in (("documents", "create", f"ops-{case}", str(path)),
                 ("send", "--document-file", str(path), "-i", AGENT)):
        refused(dfleet, *args, expect=["InvalidDocument", *expect])


def test_yaml_times_and_timestamps_are_text_as_amazon_ssm_agent_reads_them(dfleet, tmp_path):
    """gopkg.in/yaml.v2 has no base-60 numbers, keeps a timestamp as written and a plain key as
    text: PyYAML made 45000 of ``12:30:00``, reformatted ``2024-01-02T10:00:00Z`` and named the
    parameter ``on`` True."""
    text = doc("echo {{ at }} {{ on }}",
               parameters="  at:\n    type: String\n    default: 12:30:00\n"
                          "  on:\n    type: String\n    default: 2024-01-02T10:00:00Z\n")
    path = write(tmp_path, "times.yml", text)
    rc, _, err = run_json(dfleet, "documents", "create", "ops-yaml-times", str(path))
    assert rc == 0, err
    for source in (["ops-yaml-times"], ["--document-file", str(path)]):
        rc, view = send(dfleet, *source)
        assert rc == 0 and stdout_of(view) == "12:30:00 2024-01-02T10:00:00Z\n", view


def test_a_document_run_by_several_steps_is_parsed_once_per_command(dfleet, tmp_path):
    """Each aws:runDocument step had its render worker fetch and parse the document it names, so
    a composite document running one 256 KiB document in ten steps parsed it ten times (~0.5 s
    each, against the worker's deadline). It is parsed once per rendering now, however it is
    named (``ops-kid``, ``ops-kid:1`` when 1 is the default)."""
    kid = doc("echo kid {{ n }}", parameters="  n: {type: String}\n")
    rc, _, err = run_json(dfleet, "documents", "create", "ops-kid", str(write(tmp_path, "kid.yml", kid)))
    assert rc == 0, err
    steps = "".join(f"  - action: aws:runDocument\n    name: {step}\n    inputs: {{documentType: SSMDocument, "
                    f"documentPath: '{path}', documentParameters: {{n: '{step}'}}}}\n"
                    for step, path in (("a", "ops-kid"), ("b", "ops-kid"), ("c", "ops-kid:1")))
    parent = write(tmp_path, "parent.yml", f"schemaVersion: '2.2'\nmainSteps:\n{steps}")
    (rc, view), parsed = _parses(dfleet, lambda: send(dfleet, "--document-file", str(parent)))
    assert rc == 0 and stdout_of(view) == "kid a\nkid b\nkid c\n", view
    assert [s["name"] for s in view["invocations"][0]["steps"]] == ["a/run", "b/run", "c/run"]
    assert parsed == {"parsed_inline": 0, "parsed_worker": 2}, parsed  # the parent, then ops-kid once
