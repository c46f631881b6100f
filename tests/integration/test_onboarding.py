"""Onboarding a client as an admin does it: `zerorun clients create`, the role line in the
broker's policy, then the new client used by the CLI and by ansible-playbook; and the AWX custom
credential type (meta/awx_credential_type.yml) loaded and injected the way AWX injects it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared Ansible helpers
import ansible_support  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CREDENTIAL_TYPE = REPO / "meta" / "awx_credential_type.yml"

POLICY = """
roles:
  operator:
    allow: [read, run, exec]
    documents: ["*"]
    targets: ["tag:role=web", "instance:web-*"]
clients:
"""


def zerorun(config: Path | None, *args: str, env: dict | None = None, cwd: Path | None = None):
    argv = [sys.executable, "-m", "zerorun.cli"] + (["-c", str(config)] if config else []) + list(args)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    print(f"$ zerorun {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return proc


def set_policy(fleet, clients: dict[str, str]) -> None:
    text = POLICY + "".join(f"  {name}: {role}\n" for name, role in clients.items())
    path = fleet.broker_dir / "policy.yaml"
    path.write_text(text)
    stamp = time.time() + 5 + len(clients)  # a new mtime even within the clock's resolution
    os.utime(path, (stamp, stamp))


def wait_until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_clients_create_then_the_cli_and_ansible_playbook_use_it(web_db_fleet, tmp_path):
    fleet = web_db_fleet
    endpoint = fleet.runtime()["client_endpoint"]
    out = tmp_path / "made" / "alice"
    created = fleet.cli("clients", "create", "alice", "--role", "operator", "--endpoint", endpoint,
                        "--out", str(out))
    assert created.returncode == 0, created.stderr
    assert "    alice: operator" in created.stdout and "not set yet" in created.stdout
    assert "only reaches the broker from its own host" in created.stdout  # 127.0.0.1: said so

    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("alice.key_secret", "alice.key", "client.yaml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    config = yaml.safe_load((out / "client.yaml").read_text())
    assert config == {"endpoint": endpoint, "broker_public_key": fleet.runtime()["broker_public_key"],
                      "client_key_file": "alice.key_secret"}
    listed = json.loads(fleet.cli("clients", "list", "--json").stdout)
    assert [(k["name"], k["state"]) for k in listed if k["name"] == "alice"] == [("alice", "accepted")]

    # self-contained: moved elsewhere and used from another directory, it still works
    moved = tmp_path / "laptop" / "zerorun"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = {k: v for k, v in fleet.env().items() if not k.startswith("ZERORUN_")}
    denied = zerorun(moved / "client.yaml", "ping", env=env, cwd=elsewhere)
    assert denied.returncode == 2 and "has no role in the broker policy" in denied.stderr

    set_policy(fleet, {"alice": "operator"})
    wait_until(lambda: zerorun(moved / "client.yaml", "ping", env=env, cwd=elsewhere).returncode == 0,
               "the policy to give alice her role")
    sent = zerorun(moved / "client.yaml", "send", "RunShellScript", "-t", "tag:role=web", "-p",
                   "commands=echo from-alice", "--json", env=env, cwd=elsewhere)
    assert sent.returncode == 0, sent.stderr
    view = json.loads(sent.stdout)
    assert view["requested_by"].startswith("alice ") and {i["stdout"] for i in view["invocations"]} == {"from-alice\n"}
    outside = zerorun(moved / "client.yaml", "send", "RunShellScript", "-t", "tag:role=db", "-p", "commands=true",
                      env=env, cwd=elsewhere)
    assert outside.returncode == 2 and "outside its scope" in outside.stderr and "db-1" in outside.stderr

    # the same client from ansible-playbook: the inventory plugin and run_command read ZERORUN_CONFIG
    (tmp_path / "ansible").mkdir()
    run = ansible_support.AnsibleRun(fleet, tmp_path / "ansible", "plugin: zerorun.fleet.instances\ntargets: tag:role=web\n",
                                     ZERORUN_CONFIG=str(moved / "client.yaml"),
                                     ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    proc = run.playbook("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: per host
              zerorun.fleet.run_command:
                commands: echo "host {{ inventory_hostname }}"
            - name: through the agent
              ansible.builtin.command: echo agent
              vars:
                ansible_connection: zerorun.fleet.agent
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    per_host = run.by_host("per host")
    assert {h: r["result"]["stdout"] for h, r in per_host.items()} == {"web-1": "host web-1", "web-2": "host web-2"}
    assert {h: r["result"]["stdout"] for h, r in run.by_host("through the agent").items()} == \
        {"web-1": "agent", "web-2": "agent"}
    (fleet.broker_dir / "policy.yaml").unlink()


def test_clients_create_refuses_what_it_cannot_do_and_leaves_nothing(fleet, tmp_path):
    first = fleet.cli("clients", "create", "bob", "--role", "operator", "--out", str(tmp_path / "bob"))
    assert first.returncode == 0, first.stderr
    again = fleet.cli("clients", "create", "bob", "--role", "operator", "--out", str(tmp_path / "bob2"))
    assert again.returncode == 2 and "a client named 'bob' exists already" in again.stderr
    assert not (tmp_path / "bob2").exists()
    full = fleet.cli("clients", "create", "carol", "--role", "operator", "--out", str(tmp_path / "bob"))
    assert full.returncode == 2 and "refusing to overwrite" in full.stderr
    assert sorted(p.name for p in (tmp_path / "bob").iterdir()) == ["bob.key", "bob.key_secret", "client.yaml"]
    for name, says in (("admin", "every permission"), ("../x", "use letters, digits")):
        bad = fleet.cli("clients", "create", name, "--role", "operator", "--out", str(tmp_path / "bad"))
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()
    names = [k["name"] for k in json.loads(fleet.cli("keys", "--json").stdout) if k["kind"] == "client"]
    assert names.count("admin") == 1 and "carol" not in names


def test_clients_create_into_an_out_that_cannot_be_a_directory_is_one_line(fleet, tmp_path):
    """--out naming a file, or a path under one, was a FileExistsError / NotADirectoryError
    traceback; it is refused before the broker hears of the key."""
    (tmp_path / "home").mkdir()
    a_file = tmp_path / "home" / "notes.txt"
    a_file.write_text("mine\n")
    for out, says in ((a_file, "is not a directory"), (a_file / "sub", "Not a directory")):
        proc = fleet.cli("clients", "create", "frank", "--role", "operator", "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("zerorun: BadRequest: ")
        assert says in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert a_file.read_text() == "mine\n" and sorted(p.name for p in a_file.parent.iterdir()) == ["notes.txt"]
    names = [k["name"] for k in json.loads(fleet.cli("keys", "--json").stdout) if k["kind"] == "client"]
    assert "frank" not in names


def test_clients_create_refuses_an_out_directory_that_is_not_empty(fleet, tmp_path):
    """As documented: `--out ~` or `--out /tmp` wrote the secret key among other files, in a
    directory that stays as open as it was (0700 is only for a directory it makes)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "notes.txt").write_text("mine\n")
    proc = fleet.cli("clients", "create", "grace", "--role", "operator", "--out", str(home))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"zerorun: Conflict: refusing to write into {home}, which is not empty: choose an empty" \
                          " --out directory\n"
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    names = [k["name"] for k in json.loads(fleet.cli("keys", "--json").stdout) if k["kind"] == "client"]
    assert "grace" not in names
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fleet.cli("clients", "create", "grace", "--role", "operator", "--out", str(empty)).returncode == 0


def test_clients_create_refuses_an_endpoint_no_client_could_use(fleet, tmp_path):
    """--endpoint broker.example.com:7451 (no tcp://) registered the key and wrote a client.yaml
    that every later command refused, while saying only that the role was not set yet."""
    out = tmp_path / "heidi"
    proc = fleet.cli("clients", "create", "heidi", "--role", "operator", "--out", str(out),
                     "--endpoint", "broker.example.com:7451")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == ("zerorun: BadRequest: --endpoint: broker endpoint 'broker.example.com:7451' is not"
                           " tcp://HOST:PORT (port 1-65535) or ipc://PATH\n")
    assert not out.exists()
    names = [k["name"] for k in json.loads(fleet.cli("keys", "--json").stdout) if k["kind"] == "client"]
    assert "heidi" not in names


def test_clients_create_reports_a_role_the_policy_already_gives(fleet, tmp_path):
    set_policy(fleet, {"dave": "operator"})
    wait_until(lambda: "policy reloaded" in fleet.broker_log(), "the broker to read the policy")
    made = fleet.cli("clients", "create", "dave", "--role", "operator", "--out", str(tmp_path / "dave"))
    assert made.returncode == 0, made.stderr
    assert "the broker's policy already names dave" in made.stdout and "not set yet" not in made.stdout
    other = fleet.cli("clients", "create", "erin", "--role", "auditor", "--out", str(tmp_path / "erin"), "--json")
    assert json.loads(other.stdout)["role_in_effect"] is False
    assert json.loads(other.stdout)["policy"] == {"clients": {"erin": "auditor"}}
    (fleet.broker_dir / "policy.yaml").unlink()


# -- AWX ----------------------------------------------------------------------------------------------

def awx_inject(credential_type: dict, inputs: dict, private_data_dir: Path) -> dict[str, str]:
    """What AWX's CredentialType.inject_credential does with a custom type: render each file
    template into a new file (mode 0660) in <private data dir>/env, expose the paths as
    tower.filename[.LABEL], then render the env templates; all in Jinja2's immutable sandbox."""
    from types import SimpleNamespace

    from jinja2 import sandbox

    env_dir = private_data_dir / "env"
    env_dir.mkdir(parents=True, exist_ok=True)
    tower = SimpleNamespace()
    namespace = dict(inputs, tower=tower)
    jinja = sandbox.ImmutableSandboxedEnvironment()
    for label, template in credential_type["injectors"].get("file", {}).items():
        path = env_dir / f"tmp{label.replace('.', '_')}"
        path.write_text(jinja.from_string(template).render(**namespace))
        path.chmod(0o660)
        if "." not in label:
            tower.filename = str(path)
        else:
            if not hasattr(tower, "filename"):
                tower.filename = SimpleNamespace()
            setattr(tower.filename, label.split(".", 1)[1], str(path))
    return {name: jinja.from_string(template).render(**namespace)
            for name, template in credential_type["injectors"].get("env", {}).items()}


def test_the_awx_credential_type_loads_and_its_injection_works(web_db_fleet, tmp_path):
    credential_type = yaml.safe_load(CREDENTIAL_TYPE.read_text())
    assert set(credential_type) == {"name", "kind", "description", "inputs", "injectors"}
    assert credential_type["kind"] in ("cloud", "net")
    fields = {f["id"]: f for f in credential_type["inputs"]["fields"]}
    assert len(fields) == len(credential_type["inputs"]["fields"])
    assert set(credential_type["inputs"]["required"]) <= set(fields)
    assert all(f["type"] in ("string", "boolean") and f.get("label") for f in fields.values())
    assert fields["client_secret_key"]["secret"] is True and fields["client_secret_key"]["multiline"] is True
    assert set(credential_type["injectors"]) <= {"file", "env", "extra_vars"}
    assert credential_type["injectors"]["env"]["ZERORUN_CONFIG"] == "{{ tower.filename.config }}"
    assert not [k for k in credential_type["injectors"]["env"] if k.startswith("ANSIBLE_")]  # AWX refuses those

    fleet = web_db_fleet
    made = tmp_path / "awx-prod"
    proc = fleet.cli("clients", "create", "awx-prod", "--role", "operator", "--out", str(made), "--json")
    assert proc.returncode == 0, proc.stderr
    client_yaml = yaml.safe_load((made / "client.yaml").read_text())
    inputs = {"endpoint": client_yaml["endpoint"], "broker_public_key": client_yaml["broker_public_key"],
              "client_secret_key": (made / "awx-prod.key_secret").read_text()}
    injected = awx_inject(credential_type, inputs, tmp_path / "private_data_dir")
    shutil.rmtree(made)  # from here on only what AWX injected exists
    set_policy(fleet, {"awx-prod": "operator"})
    env = {k: v for k, v in fleet.env().items() if not k.startswith("ZERORUN_")}
    env.update(injected)
    assert stat.S_IMODE(os.stat(env["ZERORUN_CONFIG"]).st_mode) == 0o660  # as AWX writes it
    wait_until(lambda: zerorun(None, "ping", env=env).returncode == 0, "the policy to give awx-prod a role")
    sent = zerorun(None, "send", "RunShellScript", "-t", "tag:role=web", "-p", "commands=echo awx", "--json", env=env)
    assert sent.returncode == 0 and json.loads(sent.stdout)["requested_by"].startswith("awx-prod ")

    # an AWX job: the inventory source and the playbook see only the injected environment
    workdir = tmp_path / "job"
    workdir.mkdir()
    run = ansible_support.AnsibleRun(fleet, workdir, "plugin: zerorun.fleet.instances\nset_connection: true\n"
                                     "targets: tag:role=web\n", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    run.env = {k: v for k, v in run.env.items() if not k.startswith("ZERORUN_") or k in
               ("ZERORUN_TEST_RECORD", "ZERORUN_CONTROL_PATH_DIR")}
    run.env.update(injected)
    proc = run.playbook(textwrap.dedent("""
        - hosts: all
          gather_facts: false
          tasks:
            - name: ping through the agent
              ansible.builtin.ping:
            - name: run by tag
              zerorun.fleet.run_command:
                commands: echo tagged
                targets: tag:role=web
              delegate_to: localhost
              run_once: true
              vars:
                ansible_connection: local
    """))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {h: r["result"]["ping"] for h, r in run.by_host("ping through the agent").items()} == \
        {"web-1": "pong", "web-2": "pong"}
    tagged = next(iter(run.by_host("run by tag").values()))["result"]
    assert sorted(i["instance_id"] for i in tagged["invocations"]) == ["web-1", "web-2"]
    (fleet.broker_dir / "policy.yaml").unlink()
