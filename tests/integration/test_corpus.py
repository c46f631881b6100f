"""Every public SSM Command document in tests/data/ssm-documents, on a real broker and agent.

Supported documents are validated (``zerorun documents validate``), stored (``documents create``;
the stored SHA-256 must equal the one SOURCES.md records for the file), sent by name with
``--document-hash`` and representative parameters, and executed by a real agent. Each must reach
a terminal status with the outcome listed in ``OUTCOMES`` (Success unless explained there).
The documents SOURCES.md marks EXPECTED UNSUPPORTED are refused by ``zerorun send`` with exit 2 and a
one-line message naming the step and its action (or, for ``{{ssm:...}}`` defaults, the parameter),
and nothing is sent. The one whose only other steps are ``aws:runDocument`` of stored documents
(``COMPOSITE``) is refused until those documents are stored, then for its malformed
documentParameters; repaired, it runs on the agent with SSM's shared-input flow.

**The agent runs these documents with a PATH shim.** Its PATH starts with a directory of harmless
stand-ins, so that nothing here changes the test machine or touches the network (the tests may
run as root):

* stubs that print their name and arguments to stderr and exit 0, running nothing: package
  managers (yum, apt, apt-get, zypper, amazon-linux-extras, yum-config-manager), network clients
  (curl, wget, dig, aws), system changers (sudo, systemctl, service, sysctl, killall, tc, at, atd,
  stress-ng, xmlstarlet, unzip); ``ip`` prints one fake ``eth0`` line;
* guards for mkdir, chmod, cp, mv, rm, sed, touch: a call naming a system path (/etc, /opt, /usr,
  /var, ...) is stubbed as above, any other call runs the real tool;
* ``which``/``ifconfig`` stand-ins only where the machine lacks them.

Absolute paths (``/bin/aws``, ``/etc/amazon/ssm/seelog.xml``) cannot be shimmed: ``OUTCOMES``
explains the documents that legitimately fail because of them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from zerorun.testing import LocalFleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared corpus helper
from ssm_corpus import (COMPOSITE, CORPUS, FILES, SUPPORTED, UNSUPPORTED, VALUES,  # noqa: E402
                        first_unrunnable_step, read, recorded_sha256, stored_documents_run,
                        uses_parameter_store)

AGENT = "corpus-1"
STUBS = ("yum", "apt", "apt-get", "zypper", "amazon-linux-extras", "yum-config-manager", "curl", "wget",
         "dig", "aws", "sudo", "systemctl", "service", "sysctl", "killall", "tc", "at", "atd", "stress-ng",
         "xmlstarlet", "unzip")
GUARDED = ("mkdir", "chmod", "cp", "mv", "rm", "sed", "touch")
SYSTEM_PATHS = "/etc/*|/opt/*|/usr/*|/var/*|/bin/*|/sbin/*|/lib*|/boot/*|/root/*|/srv/*|/home/*"
STUB = '#!/bin/sh\necho "[stub] $(basename "$0") $*" >&2\nexit 0\n'

# Parameters this test adds to VALUES (the shared table of representative values).
EXTRA: dict[str, dict[str, object]] = {
    "chaos-cpu-stress.yml": {"DurationSeconds": "1"},
    "chaos-network-latency.yml": {"DurationSeconds": "1"},
    "ssmconverge-run.json": {"Config": base64.b64encode(b"echo converge config ran\n").decode()},
    # InstallPath (a tmp dir holding an empty lib.sh) is added by the fixture
}

# Expected outcome per document: (command status, {step: (status, exit code or None)}, stdout part).
# Unlisted steps must be Success; unlisted documents must be Success.
OUTCOMES: dict[str, tuple[str, dict[str, tuple[str, int | None]], str]] = {
    "aws-runshellscript.json": ("Success", {}, "hello\n"),
    "ssm-agent-testdata-v2.0-oneline.json": ("Success", {}, "foo\n"),
    "awsdocs-runshellscript-timeout.yml": ("Success", {}, "Hello World\n"),
    "cdk-test-params-boolean.yml": ("Success", {}, "Hello World!\n"),
    "ssmconverge-run.json": ("Success", {}, "converge config ran\n"),
    "chaos-kill-process.yml": ("Success", {}, "Done with command"),
    "chaos-cpu-stress.yml": ("Success", {}, "Finished CPU stress."),
    "eks-log-collector.json": ("Success", {}, "* Logs uploaded to S3"),  # the last line is an echo
    # step 1 runs `sudo apt install` only for action=Install: skipped by its parameter precondition
    "awsdocs-parameter-precondition.yml": ("Success", {"InstallAwsCLI": ("Skipped", None)}, ""),
    # the sample's command is the literal placeholder `cmds`: "command not found", exit 127
    "awsdocs-cross-platform-precondition.json": (
        "Failed", {"PatchWindows": ("Skipped", None), "PatchLinux": ("Failed", 127)}, ""),
    # /etc/amazon/ssm/seelog.xml (an absolute path, no SSM agent here) is missing: the script
    # says so and exits 1; the Windows step is skipped by its precondition
    "ssm-agent-logs-to-cloudwatch.json": (
        "Failed", {"UploadSSMAgentLogsInWindows": ("Skipped", None),
                   "UploadSSMAgentLogsInLinux": ("Failed", 1)}, "Template Not Present"),
    # tc, at, atd, dig, curl and ip are stubs; it injects (stub) latency for 1 s, then rolls back
    "chaos-network-latency.yml": ("Success", {}, "Rollback done."),
}


def _make_shims(shim: Path) -> None:
    shim.mkdir()

    def put(name: str, text: str) -> None:
        (shim / name).write_text(text)
        (shim / name).chmod(0o755)

    for name in STUBS:
        put(name, STUB)
    put("ip", '#!/bin/sh\necho "[stub] ip $*" >&2\necho "2: eth0: <BROADCAST,UP> mtu 1500 (stub)"\n')
    for name in GUARDED:
        real = shutil.which(name)
        assert real, f"{name} is needed by the corpus documents"
        put(name, f'#!/bin/sh\nfor a in "$@"; do case "$a" in {SYSTEM_PATHS})\n'
                  f'  echo "[stub] {name} $*" >&2; exit 0;; esac; done\nexec {real} "$@"\n')
    if shutil.which("which") is None:
        put("which", '#!/bin/sh\nrc=1\nfor a in "$@"; do command -v "$a" && rc=0; done\nexit $rc\n')
    if shutil.which("ifconfig") is None:
        put("ifconfig", '#!/bin/sh\necho "eth0: flags=4163<UP> mtu 1500 (stub)"\n')


@pytest.fixture(scope="module")
def cfleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    shim = root / "shim"
    _make_shims(shim)
    fleet = LocalFleet(root / "fleet")
    try:
        fleet.start_broker()
        # LocalFleet.env() copies os.environ when a process starts: only the agent gets the shim
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PATH", f"{shim}{os.pathsep}{os.environ.get('PATH', '')}")
            fleet.start_agent(AGENT, {"role": "corpus"}, max_concurrency=len(FILES))
        fleet.wait_online([AGENT])
        yield fleet
    finally:
        fleet.close()


def _cli_json(fleet, *args):
    proc = fleet.cli(*args, "--json")
    data = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
    return proc, data


def _params(name: str, install_path: Path) -> list[str]:
    values = {**VALUES.get(name, {}), **EXTRA.get(name, {})}
    if name == "ssmconverge-run.json":
        values["InstallPath"] = str(install_path)
    return [arg for key, value in values.items()
            for arg in ("-p", f"{key}={value if isinstance(value, str) else json.dumps(value)}")]


@pytest.fixture(scope="module")
def results(cfleet, tmp_path_factory):
    """Validate, store and send every supported document at once, then wait for them all."""
    install = tmp_path_factory.mktemp("ssm-converge")
    (install / "lib.sh").write_text("# stand-in for ssm-converge's library\n")
    recorded = recorded_sha256()

    def run(name: str) -> dict:
        started = time.monotonic()
        out: dict = {"name": name}
        out["validate"] = cfleet.cli("documents", "validate", str(CORPUS / name), "--json")
        stored_name = "corpus-" + name.rsplit(".", 1)[0]
        out["create"], out["stored"] = _cli_json(cfleet, "documents", "create", stored_name, str(CORPUS / name))
        # send waits for the command to end and prints it with its output
        proc = cfleet.cli("send", stored_name, "--document-hash", recorded[name], *_params(name, install),
                          "-i", AGENT, "--wait-timeout", "60", "--json")
        out["send"], out["view"] = proc, json.loads(proc.stdout) if proc.stdout.strip() else None
        out["seconds"] = time.monotonic() - started
        return out

    with ThreadPoolExecutor(max_workers=4) as pool:
        return {r["name"]: r for r in pool.map(run, SUPPORTED)}


def test_corpus_shape():
    assert len(FILES) == 23 and len(UNSUPPORTED) == 8 and len(SUPPORTED) == 15
    assert set(OUTCOMES) <= set(SUPPORTED)
    assert set(recorded_sha256()) == set(FILES)


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_document_runs_on_a_real_agent(results, name):
    r = results[name]
    validate = r["validate"]
    assert validate.returncode == 0, validate.stderr
    report = json.loads(validate.stdout)
    assert report["valid"] and all(s["runs_on_linux"] for s in report["steps"])
    assert r["create"].returncode == 0, r["create"].stderr
    assert r["stored"]["sha256"] == recorded_sha256()[name] == report["sha256"]
    view = r["view"]
    assert view is not None, (r["send"].returncode, r["send"].stderr)

    status, steps, stdout = OUTCOMES.get(name, ("Success", {}, ""))
    (inv,) = view["invocations"]
    detail = json.dumps(inv["steps"], indent=1)[:4000]
    assert view["status"] in ("Success", "Failed") and inv["status"] == status, detail
    assert r["send"].returncode == (0 if status == "Success" else 1), r["send"].stderr
    for step in inv["steps"]:
        want_status, want_code = steps.get(step["name"], ("Success", 0))
        assert step["status"] == want_status, (step["name"], detail)
        if want_code is not None:
            assert step.get("exit_code", -1) == want_code, (step["name"], detail)
    assert stdout in inv.get("stdout", ""), (inv.get("stdout", "")[-2000:], inv.get("stderr", "")[-2000:])


def test_stubs_stood_in_for_harmful_commands(results):
    """The shim was in effect: the harmful commands reached a stub, not the real tool."""
    def stderr(name: str) -> str:
        return results[name]["view"]["invocations"][0].get("stderr", "")

    assert "[stub] killall -SIGTERM sleep" in stderr("chaos-kill-process.yml")
    assert "[stub] stress-ng --cpu 0" in stderr("chaos-cpu-stress.yml")
    assert "[stub] sudo apt remove aws-cli" in stderr("awsdocs-parameter-precondition.yml")
    assert "[stub] rm -vf /var/log/eks_i*" in stderr("eks-log-collector.json")
    assert "[stub] curl -L https://s3.amazonaws.com/dd-agent" in stderr("datadog-install-agent.yaml")
    assert "[stub] mkdir -p /opt/ssm-converge" in stderr("ssmconverge-webserver-baseline.json")
    assert "[stub] aws s3 sync" in stderr("ssmconverge-webserver-baseline.json")
    assert "[stub] service nginx running enabled" in stderr("ssmconverge-webserver-baseline.json")


@pytest.mark.parametrize("name", sorted(UNSUPPORTED - COMPOSITE))
def test_unsupported_document_is_refused_and_nothing_sent(cfleet, name):
    def count() -> int:
        return len(cfleet.client().commands(limit=10000))

    before = count()
    proc = cfleet.cli("send", "--document-file", str(CORPUS / name), *_params(name, Path("/nonexistent")),
                      "-i", AGENT)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    text = read(name)
    if uses_parameter_store(text):
        assert "Parameter Store references are not supported" in message and "'commands'" in message
    else:
        step, action = first_unrunnable_step(yaml.safe_load(text))
        assert f"step {step!r}" in message and f"action {action!r}" in message, message
        assert "not supported on Linux" in message
    assert count() == before
    # validate agrees, without a broker: a Parameter Store default is invalid, an unsupported
    # action is reported as refused on Linux
    check = subprocess.run([sys.executable, "-m", "zerorun.cli", "documents", "validate", str(CORPUS / name),
                            "--json"], capture_output=True, text=True, timeout=60)
    if uses_parameter_store(text):
        assert check.returncode == 2 and "Parameter Store" in check.stderr
    else:
        assert check.returncode == 0
        report = json.loads(check.stdout)
        source_types = [str((s.get("inputs") or {}).get("sourceType", ""))
                        for s in yaml.safe_load(text).get("mainSteps") or [] if s.get("name") == step]
        templated = any("{{" in t for t in source_types)
        # a download whose sourceType is a parameter may run, or not: known once rendered
        assert templated or any(not s["runs_on_linux"] and s["name"] == step for s in report["steps"])


def _step_doc(line: str) -> str:
    return ("schemaVersion: '2.2'\nparameters:\n  documentParameter: {type: String, default: none}\n"
            f"mainSteps:\n  - action: aws:runShellScript\n    name: run\n    inputs:\n"
            f"      runCommand: [{json.dumps(line)}]\n")


@pytest.mark.parametrize("name", sorted(COMPOSITE))
def test_composite_document_runs_once_its_documents_are_stored(cfleet, tmp_path, name):
    text = read(name)
    runs = stored_documents_run(yaml.safe_load(text))
    (first_step, first_doc), *_ = runs
    check = subprocess.run([sys.executable, "-m", "zerorun.cli", "documents", "validate", str(CORPUS / name),
                            "--json"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert all(s["runs_on_linux"] for s in report["steps"]), report["steps"]
    assert [s["runs_document"] for s in report["steps"]] == [path for _, path in runs]

    def refused(path: Path, *fragments: str) -> None:
        before = len(cfleet.client().commands(limit=10000))
        proc = cfleet.cli("send", "--document-file", str(path), *_params(name, Path("/nonexistent")), "-i", AGENT)
        message = proc.stderr.strip()
        assert proc.returncode == 2 and len(message.splitlines()) == 1, (proc.stdout, message)
        assert f"step {first_step!r} (aws:runDocument)" in message, message
        assert all(f in message for f in fragments), message
        assert len(cfleet.client().commands(limit=10000)) == before

    refused(CORPUS / name, "InvalidDocument", first_doc)  # the documents it runs are not stored
    for step, path in runs:
        doc_file = tmp_path / f"{path}.yml"
        doc_file.write_text(_step_doc(f"echo {step}: {{{{ documentParameter }}}}"))
        assert cfleet.cli("documents", "create", path, str(doc_file)).returncode == 0
    refused(CORPUS / name, "documentParameters is neither valid JSON nor valid YAML")
    # Repaired as the page surely meant it, the sample runs with SSM's shared inputs: the first
    # document succeeds (onSuccess: exit), so the second is skipped and the finallyStep one runs
    repaired = tmp_path / "repaired.yml"
    repaired.write_text(text.replace("""'"documentParameter":{{customDocumentParameter}}}'""",
                                     """'{"documentParameter":"{{customDocumentParameter}}"}'"""))
    proc = cfleet.cli("send", "--document-file", str(repaired), "-p", "customDocumentParameter=given",
                      "-i", AGENT, "--wait-timeout", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    (inv,) = json.loads(proc.stdout)["invocations"]
    assert [(s["name"], s["status"]) for s in inv["steps"]] == [
        (f"{runs[0][0]}/run", "Success"), (f"{runs[1][0]}/run", "Skipped"), (f"{runs[2][0]}/run", "Success")]
    assert inv["stdout"] == f"{runs[0][0]}: given\n{runs[2][0]}: none\n"
