"""The broker and agent roles, for real: rendered units pass ``systemd-analyze verify``; both roles
run into a temporary root on localhost (connection local, no systemd, services not managed),
check mode writes nothing, a second run changes nothing, and the installed broker and three agents
(one registered with ``zerorun keys add``, one with the introduce-and-accept fallback, one that
enrols with a token from ``zerorun tokens create``), started by hand from the written configs, run
a command sent with the installed CLI.

The roles install the ``zerorun`` package into a fresh virtualenv inside the temporary root,
from the wheel that ``make dist`` builds (into a temporary DIST), copied from the controller as
the role does by default. Dependencies come from the machine's pip configuration (index or
wheel cache); that install is most of the test's time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
DEPLOY = REPO / "playbooks" / "deploy.yml"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(), reason="ansible-core is not installed")

RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


# -- helpers ------------------------------------------------------------------------------------

def ansible_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_PIPELINING": "1",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-tmp"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    })
    return env


def playbook(tmp: Path, book: Path, inventory: Path, *args: str, expect_ok: bool = True
             ) -> tuple[subprocess.CompletedProcess, dict[str, dict[str, int]]]:
    proc = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", str(inventory), str(book), *args],
                          cwd=REPO, env=ansible_env(tmp), capture_output=True, text=True, timeout=600)
    recap = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
             for m in RECAP.finditer(proc.stdout)}
    if expect_ok:
        assert proc.returncode == 0 and recap, f"ansible-playbook {' '.join(args)} failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    return proc, recap


def changed_tasks(output: str, with_host: bool = False) -> list:
    """The tasks that reported a change: names, or (name without role prefix, host) pairs."""
    found, task = [], ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed: ["):
            host = line.split("[", 1)[1].split("]", 1)[0]
            found.append((task.split(" : ", 1)[-1], host) if with_host else task)
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def public_key(path: Path) -> str:
    return re.search(r'public-key\s*=\s*"([^"]+)"', path.read_text())[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify_units(*units: Path) -> None:
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, units)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # verify exits 0 on unknown directives and unparsable values: only its warnings show them
    assert not proc.stderr.strip(), proc.stderr
    assert not proc.stdout.strip(), proc.stdout


def built_wheel(dist: Path) -> Path:
    """The wheel `make dist` builds (with this interpreter's environment; -o: never reinstall it)."""
    venv = Path(sys.prefix)
    proc = subprocess.run(["make", "-o", str(venv / ".installed-stamp"), "dist", f"DIST={dist}", f"VENV={venv}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(dist.glob("zerorun-*.whl"))
    assert len(wheels) == 1, proc.stdout
    return wheels[0]


class Daemon:
    def __init__(self, argv: list[str], log: Path):
        self.log = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


# -- 1. the units render and pass systemd-analyze verify ------------------------------------------

@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
def test_units_render_and_verify(tmp_path):
    root = tmp_path / "root"
    book = tmp_path / "units.yml"
    # Only the unit tasks, with the production defaults except the root and a virtualenv that
    # exists (verify checks that ExecStart is executable): this interpreter's.
    book.write_text(yaml.safe_dump([{
        "name": "Render the units",
        "hosts": "localhost",
        "gather_facts": False,
        "vars": {"zerorun_root": str(root), "zerorun_venv": sys.prefix},
        "tasks": [
            {"ansible.builtin.include_role": {"name": "zerorun.fleet.broker", "tasks_from": "unit"}},
            {"ansible.builtin.include_role": {"name": "zerorun.fleet.agent", "tasks_from": "unit"}},
        ],
    }], sort_keys=False))
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    _, recap = playbook(tmp_path, book, inventory)
    assert recap["localhost"]["failed"] == 0

    units = root / "etc" / "systemd" / "system"
    broker, agent = units / "zerorun-broker.service", units / "zerorun-agent.service"
    for unit in (broker, agent):
        lines = unit.read_text().splitlines()
        assert lines[0] == "#" and lines[1] == "# Ansible managed", lines[:3]  # {{ ansible_managed | comment }}
    b = broker.read_text()
    for line in ("User=zerorun", "Group=zerorun", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "Restart=on-failure", "LimitNOFILE=65536",
                 f"ReadWritePaths={root}/var/lib/zerorun/broker",
                 f"ExecStart={sys.prefix}/bin/zerorun-broker --config {root}/etc/zerorun/broker.yaml"):
        assert line in b.splitlines(), line
    a = agent.read_text()
    for line in ("User=root", "Restart=on-failure", "KillMode=process",
                 f"ExecStart={sys.prefix}/bin/zerorun-agent --config {root}/etc/zerorun/agent.yaml"):
        assert line in a.splitlines(), line

    verify_units(broker, agent)

    # verify runs without systemd as PID 1 here; show that it does check what it reads
    broken = tmp_path / "broken" / "zerorun-broker.service"
    broken.parent.mkdir()
    broken.write_text(b.replace("Restart=on-failure", "Restart=sometimes").replace("ProtectHome=yes", "ProtectHom=yes"))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "sometimes" in proc.stderr and "ProtectHom" in proc.stderr, proc.stderr


def test_install_step_names_a_missing_package_file(tmp_path):
    """The default package is the wheel `make dist` builds; when the file is missing the role
    says what to do instead of handing pip a path it cannot read."""
    root = tmp_path / "root"
    book = tmp_path / "install.yml"
    missing = tmp_path / "dist" / "zerorun-9.9.9-py3-none-any.whl"
    book.write_text(yaml.safe_dump([{
        "name": "Install only", "hosts": "localhost", "gather_facts": False,
        "vars": {"zerorun_root": str(root), "zerorun_package": str(missing)},
        "tasks": [{"ansible.builtin.include_role": {"name": "zerorun.fleet.agent", "tasks_from": "install"}}],
    }], sort_keys=False))
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    proc, recap = playbook(tmp_path, book, inventory, expect_ok=False)
    assert proc.returncode != 0 and recap["localhost"]["failed"] == 1
    assert "is not a file, on the controller or on the host" in proc.stdout and "make dist" in proc.stdout
    assert not (root / "opt" / "zerorun" / "venv").exists()


# -- 2. both roles for real, idempotence, then a command through the installed daemons ----------

# Three agents on this host: web-1 registers with `zerorun keys add` (pre-authorisation, what
# "auto" picks with this broker), web-2 with the fallback for older brokers (introduce + accept),
# web-3 with an enrolment token (its own tags are a proposal the token's tags override).
AGENTS = {
    "web-1": {"method": "auto", "tags": {"role": "web", "env": "test"}},
    "web-2": {"method": "accept", "tags": {"role": "web", "env": "other"}},
    "web-3": {"method": "token", "tags": {"role": "db"}},
}
TOKEN_TAGS = {"role": "web", "env": "token"}


def test_deploy_roles_for_real_then_run_a_command(tmp_path):
    root = tmp_path / "root"
    agent_port, client_port = free_ports(2)
    package = built_wheel(tmp_path / "dist")
    venv = root / "opt" / "zerorun" / "venv"
    cli = venv / "bin" / "zerorun"
    broker_state = root / "var" / "lib" / "zerorun" / "broker"
    etc = root / "etc" / "zerorun"
    client_config = broker_state / "client.yaml"

    def agent_paths(root: Path, name: str) -> dict[str, Path]:
        # web-1 keeps the defaults; web-2 gets its own files so that both fit on one host
        if name == "web-1":
            return {"state": root / "var/lib/zerorun/agent", "config": root / "etc/zerorun/agent.yaml",
                    "units": root / "etc/systemd/system"}
        return {"state": root / f"var/lib/zerorun/agent-{name}", "config": root / f"etc/zerorun/agent-{name}.yaml",
                "units": root / f"etc/systemd/system-{name}"}

    def write_inventory(path: Path, root: Path, token: str = "") -> Path:
        agents = {}
        for name, spec in AGENTS.items():
            paths = agent_paths(root, name)
            agents[name] = {"zerorun_agent_tags": spec["tags"]}
            if spec["method"] == "token":
                agents[name]["zerorun_agent_enrol_token"] = token
            else:
                agents[name]["zerorun_agent_registration_method"] = spec["method"]
            if name != "web-1":
                agents[name].update({"zerorun_agent_state_dir": str(paths["state"]),
                                     "zerorun_agent_config_file": str(paths["config"]),
                                     "zerorun_systemd_dir": str(paths["units"])})
        path.write_text(yaml.safe_dump({"all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "zerorun_become": False,
                "zerorun_root": str(root),
                "zerorun_package": str(package),
                "zerorun_manage_service": False,
                # tests run as root and create no users
                "zerorun_broker_create_user": False,
                "zerorun_broker_user": "root",
                "zerorun_broker_group": "root",
                "zerorun_broker_agent_bind": f"tcp://127.0.0.1:{agent_port}",
                "zerorun_broker_client_bind": f"tcp://127.0.0.1:{client_port}",
                "zerorun_agent_broker": f"tcp://127.0.0.1:{agent_port}",
                "zerorun_agent_introduce_seconds": 3,
            },
            "children": {
                "zerorun_broker": {"hosts": {"broker-1": {}}},
                "zerorun_agents": {"hosts": agents},
            },
        }}, sort_keys=False))
        return path

    inventory = write_inventory(tmp_path / "inventory.yml", root)
    all_hosts = {"broker-1", *AGENTS}
    daemons: list[Daemon] = []
    timings: dict[str, float] = {}

    def timed(name, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return playbook(tmp_path, DEPLOY, inventory, *args, **kwargs)
        finally:
            timings[name] = round(time.monotonic() - t0, 1)

    def zerorun(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(cli), "-c", str(client_config), *args], capture_output=True, text=True,
                              timeout=timeout)

    # check mode on a host where nothing is installed yet: runs through, writes nothing. Run
    # alongside the first real run (another root) to save time.
    fresh = tmp_path / "fresh-root"
    check_fresh = subprocess.Popen(
        [str(ANSIBLE_PLAYBOOK), "-i", str(write_inventory(tmp_path / "fresh.yml", fresh)), str(DEPLOY), "--check"],
        cwd=REPO, env=ansible_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # 1. the broker role alone: package, user-less state dir, keys, config, unit
        _, recap = timed("broker", "--limit", "zerorun_broker")
        out_fresh = check_fresh.communicate(timeout=600)[0]
        recap_fresh = {m[1]: (int(m[3]), int(m[5])) for m in RECAP.finditer(out_fresh)}
        assert check_fresh.returncode == 0 and set(recap_fresh) == all_hosts, out_fresh[-6000:]
        assert all(changed > 0 and failed == 0 for changed, failed in recap_fresh.values()), recap_fresh
        assert not fresh.exists(), sorted(str(p) for p in fresh.rglob("*"))[:20]

        assert recap["broker-1"]["changed"] > 0
        for exe in ("zerorun", "zerorun-broker", "zerorun-agent"):
            assert (venv / "bin" / exe).exists(), exe
        # installed from the wheel make dist built, copied from the controller next to the venv
        copied = root / "opt" / "zerorun" / "dist" / package.name
        assert copied.read_bytes() == package.read_bytes()
        origin = next((venv / "lib").glob("python3*/site-packages/zerorun-*.dist-info/direct_url.json"))
        assert json.loads(origin.read_text())["url"] == copied.as_uri()
        config = yaml.safe_load((etc / "broker.yaml").read_text())
        assert config["state_dir"] == str(broker_state)
        assert config["agent_bind"] == f"tcp://127.0.0.1:{agent_port}"
        assert config["client_bind"] == f"tcp://127.0.0.1:{client_port}"
        assert config["auto_accept"] is False
        assert mode(broker_state) == 0o700 and mode(broker_state / "keys") == 0o700
        key_files = sorted(p.name for p in (broker_state / "keys").iterdir())
        assert key_files == ["admin.key", "admin.key_secret", "broker.key", "broker.key_secret"]
        for name in key_files:
            assert mode(broker_state / "keys" / name) == 0o600, name
        assert mode(etc / "broker.yaml") == 0o640

        # 2. key registration needs a running broker: start it by hand from the written config
        broker = Daemon([str(venv / "bin" / "zerorun-broker"), "--config", str(etc / "broker.yaml")],
                        tmp_path / "broker.log")
        daemons.append(broker)
        deadline = time.monotonic() + 30
        while (ping := zerorun("ping")).returncode != 0:
            assert broker.proc.poll() is None, broker.text()
            assert time.monotonic() < deadline, f"broker does not answer: {ping.stderr}\n{broker.text()}"
            time.sleep(0.3)
        # the broker kept the keys the role generated
        assert public_key(broker_state / "broker.key") == public_key(broker_state / "keys" / "broker.key")

        # an enrolment token for web-3, given to the role through the inventory
        made = zerorun("tokens", "create", "--tag", "role=web", "--tag", "env=token", "--uses", "1", "--json")
        assert made.returncode == 0, made.stderr
        token = json.loads(made.stdout)["token"]
        write_inventory(inventory, root, token)

        # 3. the agent play alone (so without the broker role's facts: the role reads the broker
        # key from the broker host and uses the default CLI paths): installed and registered
        out, recap = timed("agents", "--limit", "zerorun_agents")
        assert token not in out.stdout  # no_log
        listed = json.loads(zerorun("keys", "list", "--json").stdout)
        fingerprints = {}
        for name, spec in AGENTS.items():
            assert recap[name]["changed"] > 0 and recap[name]["failed"] == 0
            paths = agent_paths(root, name)
            agent_config = yaml.safe_load(paths["config"].read_text())
            assert agent_config["instance_id"] == name
            assert agent_config["tags"] == spec["tags"]
            assert agent_config["broker"] == f"tcp://127.0.0.1:{agent_port}"
            assert agent_config["state_dir"] == str(paths["state"])
            assert Path(agent_config["broker_key"]) == etc / "broker.key"
            assert mode(paths["config"]) == 0o640
            assert mode(paths["state"]) == 0o700
            assert sorted(p.name for p in paths["state"].iterdir()) == ["agent.key", "agent.key_secret"]
            for key_file in ("agent.key", "agent.key_secret"):
                assert mode(paths["state"] / key_file) == 0o600, key_file
            mine = [k for k in listed if k["public_key"] == public_key(paths["state"] / "agent.key")]
            if spec["method"] == "token":  # nothing registered: the agent enrols itself when it starts
                token_file = Path(agent_config["enrol_token_file"])
                assert token_file.read_text().strip() == token and mode(token_file) == 0o600
                assert mine == []
                continue
            assert "enrol_token_file" not in agent_config
            assert mine[0]["tags"] == spec["tags"]  # registered with the key
            assert len(mine) == 1 and mine[0]["kind"] == "agent" and mine[0]["name"] == name, listed
            assert mine[0]["state"] == "accepted", listed
            fingerprints[name] = mine[0]["fingerprint"]
            unit = paths["units"] / "zerorun-agent.service"
            assert unit.read_text().startswith("#\n# Ansible managed\n")
            assert f"ExecStart={venv}/bin/zerorun-agent --config {paths['config']}" in unit.read_text()
        assert public_key(etc / "broker.key") == public_key(broker_state / "keys" / "broker.key")
        # which way each agent was registered
        changed = changed_tasks(out.stdout, with_host=True)
        assert ("Pre-authorise the agent key on the broker (zerorun keys add agent ID KEY)", "web-1 -> broker-1") in changed
        assert ("Introduce the agent key to the broker (run the agent for a few seconds)", "web-2") in changed
        assert ("Accept the agent key on the broker", "web-2 -> broker-1") in changed
        assert not [c for c in changed if c[0].startswith(("Introduce", "Accept")) and c[1].startswith("web-1")], changed
        assert not [c for c in changed if c[1].startswith("web-3") and c[0].startswith(
            ("Pre-authorise", "Introduce", "Accept", "Set this", "Remove tags"))], changed
        units = root / "etc" / "systemd" / "system"
        assert (units / "zerorun-broker.service").read_text().startswith("#\n# Ansible managed\n")
        if SYSTEMD_ANALYZE:
            verify_units(units / "zerorun-broker.service", units / "zerorun-agent.service")

        # 4. idempotence: the whole playbook, then a check-mode run, change nothing
        out, recap = timed("again")
        assert {h: r["changed"] for h, r in recap.items()} == dict.fromkeys(all_hosts, 0), changed_tasks(out.stdout)
        out, recap = timed("check", "--check")
        assert {h: r["changed"] for h, r in recap.items()} == dict.fromkeys(all_hosts, 0), changed_tasks(out.stdout)

        # 5. start the installed agents from their configs and run a command through them
        agents = {name: Daemon([str(venv / "bin" / "zerorun-agent"), "--config", str(agent_paths(root, name)["config"])],
                               tmp_path / f"{name}.log") for name in AGENTS}
        daemons.extend(agents.values())
        deadline = time.monotonic() + 30
        while True:  # the broker knows an instance once its agent said HELLO with an accepted key
            listed = zerorun("instances", "--json")
            online = {i["instance_id"]: i for i in json.loads(listed.stdout or "[]") if i["ping_status"] == "Online"}
            if set(AGENTS) <= set(online):
                break
            for name, agent in agents.items():
                assert agent.proc.poll() is None, agent.text()
            assert time.monotonic() < deadline, f"not Online: {listed.stdout}\n" + "\n".join(a.text() for a in agents.values())
            time.sleep(0.3)
        for name, spec in AGENTS.items():
            if spec["method"] == "token":
                assert online[name]["tags"] == TOKEN_TAGS and online[name]["pending_tags"] is None
                continue
            assert online[name]["tags"] == spec["tags"]
            assert online[name]["key_fingerprint"] == fingerprints[name]
        sent = zerorun("send", "RunShellScript", "-p", "commands=true", "-t", "tag:role=web",
                       "--wait-timeout", "60", "--json", timeout=90)
        assert sent.returncode == 0, (f"{sent.stdout}\n{sent.stderr}\n--- broker\n{broker.text()}\n"
                                      + "\n".join(f"--- {n}\n{a.text()}" for n, a in agents.items()))
        view = json.loads(sent.stdout)
        assert view["status"] == "Success"
        assert sorted((i["instance_id"], i["status"]) for i in view["invocations"]) == [
            ("web-1", "Success"), ("web-2", "Success"), ("web-3", "Success")]

        # 6. the inventory changes web-1's tags: the role sets them on the broker (it owns them)
        AGENTS["web-1"]["tags"] = {"role": "web", "tier": "1"}
        try:
            write_inventory(inventory, root, token)
            out, recap = timed("retag", "--limit", "web-1")
        finally:
            AGENTS["web-1"]["tags"] = {"role": "web", "env": "test"}
        changed = [task for task, _ in changed_tasks(out.stdout, with_host=True)]
        assert "Set this instance's tags on the broker (zerorun tags set)" in changed, changed
        assert "Remove tags the inventory no longer gives this instance (zerorun tags unset)" in changed, changed
        tags = {i["instance_id"]: i["tags"] for i in json.loads(zerorun("instances", "--json").stdout)}
        assert tags["web-1"] == {"role": "web", "tier": "1"}
    finally:
        if check_fresh.poll() is None:
            check_fresh.kill()
            check_fresh.communicate()
        for daemon in reversed(daemons):
            daemon.stop()
        print("playbook run times (s):", timings)
    for daemon in daemons:
        assert daemon.proc.returncode == 0, daemon.text()[-3000:]


# -- 3. two brokers on one PostgreSQL store: one keypair, one policy, agents know both -------------

# Both brokers live on this one machine, in one root, sharing one virtualenv: one host at a time,
# or two pips would build that virtualenv at once. Real brokers are separate hosts.
ONE_AT_A_TIME = ("--forks", "1")

CLUSTER_POLICY = {"roles": {"operator": {"allow": ["read", "run"], "documents": ["RunShellScript"],
                                         "targets": ["tag:role=web"]}},
                  "clients": {"ci-bot": "operator"}}


def test_deploy_two_brokers_on_one_postgresql_store(tmp_path, postgres_server):
    """The broker role deploys a cluster: broker-2 copies broker-1's keys, both get the DSN, the
    password file (0600) and the same policy; the agent role lists both brokers. The installed
    brokers, started from the written configs, act as one: an agent registered through broker-1
    runs a command sent through broker-2."""
    root = tmp_path / "root"
    ports = free_ports(4)
    package = built_wheel(tmp_path / "dist")
    venv = root / "opt" / "zerorun" / "venv"
    etc = root / "etc" / "zerorun"
    dsn = postgres_server.create_database("roles_cluster")
    password = postgres_server.password_file.read_text().strip()
    state = {"broker-1": root / "var/lib/zerorun/broker", "broker-2": root / "var/lib/zerorun/broker-2"}
    config = {"broker-1": etc / "broker.yaml", "broker-2": etc / "broker-2.yaml"}
    brokers = {
        "broker-1": {"ansible_host": "127.0.0.1",
                     "zerorun_broker_agent_bind": f"tcp://127.0.0.1:{ports[0]}",
                     "zerorun_broker_client_bind": f"tcp://127.0.0.1:{ports[1]}"},
        "broker-2": {"ansible_host": "127.0.0.1",
                     "zerorun_broker_agent_bind": f"tcp://127.0.0.1:{ports[2]}",
                     "zerorun_broker_client_bind": f"tcp://127.0.0.1:{ports[3]}",
                     "zerorun_broker_state_dir": str(state["broker-2"]),
                     "zerorun_broker_config_file": str(config["broker-2"]),
                     "zerorun_broker_store_password_file": str(etc / "store-password-2"),
                     "zerorun_systemd_dir": str(root / "etc/systemd/system-broker-2")},
    }
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {
        "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "zerorun_become": False,
            "zerorun_root": str(root),
            "zerorun_package": str(package),
            "zerorun_manage_service": False,
            "zerorun_broker_create_user": False,
            "zerorun_broker_user": "root",
            "zerorun_broker_group": "root",
            "zerorun_broker_store": dsn,
            "zerorun_broker_store_password": password,
            "zerorun_broker_policy": CLUSTER_POLICY,
        },
        "children": {
            "zerorun_broker": {"hosts": brokers},
            "zerorun_agents": {"hosts": {"web-1": {"zerorun_agent_tags": {"role": "web"},
                                                   "zerorun_agent_registration_method": "preauthorize"}}},
        },
    }}, sort_keys=False))
    daemons: list[Daemon] = []

    def zerorun(broker: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "zerorun"), "-c", str(state[broker] / "client.yaml"), *args],
                              capture_output=True, text=True, timeout=timeout)

    def wait_until(what: str, check, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (result := check()):
            for daemon in daemons:
                assert daemon.proc.poll() is None, daemon.text()[-3000:]
            assert time.monotonic() < deadline, f"{what}\n" + "\n".join(d.text()[-2000:] for d in daemons)
            time.sleep(0.3)
        return result

    # the role installs the same driver as the package's `postgresql` extra
    import tomllib
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["postgresql"]
    assert yaml.safe_load((REPO / "roles/broker/vars/main.yml").read_text())["_zerorun_broker_store_requirements"] == extra

    try:
        out, recap = playbook(tmp_path, DEPLOY, inventory, *ONE_AT_A_TIME, "--limit", "zerorun_broker")
        assert recap["broker-1"]["failed"] == recap["broker-2"]["failed"] == 0
        # one keypair for the cluster, copied with the modes the broker insists on
        names = ["admin.key", "admin.key_secret", "broker.key", "broker.key_secret"]
        for name in names:
            first, second = state["broker-1"] / "keys" / name, state["broker-2"] / "keys" / name
            assert first.read_bytes() == second.read_bytes(), name
            assert mode(second) == 0o600, name
        assert mode(state["broker-2"] / "keys") == 0o700
        assert "(censored due to no_log)" in out.stdout and "key_secret" not in out.stdout
        assert password not in out.stdout
        for name, path in config.items():
            written = yaml.safe_load(path.read_text())
            assert written["store"] == dsn
            assert written["policy"] == str(etc / "policy.yaml")
            password_file = Path(written["store_password_file"])
            assert password_file.read_text().strip() == password and mode(password_file) == 0o600
        assert yaml.safe_load((etc / "policy.yaml").read_text()) == CLUSTER_POLICY

        for name in brokers:
            daemons.append(Daemon([str(venv / "bin" / "zerorun-broker"), "--config", str(config[name])],
                                  tmp_path / f"{name}.log"))
        for name in brokers:
            wait_until(f"{name} does not answer", lambda name=name: zerorun(name, "ping").returncode == 0)

        # the agent role lists both brokers and registers the key once, for the whole cluster
        playbook(tmp_path, DEPLOY, inventory, *ONE_AT_A_TIME, "--limit", "zerorun_agents")
        agent_config = yaml.safe_load((etc / "agent.yaml").read_text())
        assert agent_config["broker"] == [f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[2]}"]
        keys = json.loads(zerorun("broker-2", "keys", "list", "--json").stdout)
        assert [(k["name"], k["state"]) for k in keys if k["kind"] == "agent"] == [("web-1", "accepted")]

        # a second run changes nothing, on the brokers (keys, password, policy) or the agent
        out, recap = playbook(tmp_path, DEPLOY, inventory, *ONE_AT_A_TIME)
        assert {h: r["changed"] for h, r in recap.items()} == {"broker-1": 0, "broker-2": 0, "web-1": 0}, \
            changed_tasks(out.stdout)

        daemons.append(Daemon([str(venv / "bin" / "zerorun-agent"), "--config", str(etc / "agent.yaml")],
                              tmp_path / "web-1.log"))
        online = wait_until("web-1 is not Online", lambda: [
            i for i in json.loads(zerorun("broker-2", "instances", "--json").stdout or "[]")
            if i["instance_id"] == "web-1" and i["ping_status"] == "Online"])
        sent = zerorun("broker-2", "send", "RunShellScript", "-p", "commands=echo from-the-cluster",
                       "-t", "tag:role=web", "--wait-timeout", "60", "--json", timeout=90)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        view = json.loads(sent.stdout)
        assert view["status"] == "Success", view
        assert online[0]["broker_id"], online

        # a broker with a keypair of its own is refused, its keys left as they are
        from zerorun import keys as keyfiles
        shutil.rmtree(state["broker-2"] / "keys")
        keyfiles.ensure_keypair(state["broker-2"] / "keys", "broker")
        own = (state["broker-2"] / "keys" / "broker.key").read_bytes()
        out, recap = playbook(tmp_path, DEPLOY, inventory, *ONE_AT_A_TIME, "--limit", "broker-2", expect_ok=False)
        assert recap["broker-2"]["failed"] == 1, out.stdout[-3000:]
        assert "is not the" in out.stdout and "cluster's" in out.stdout, out.stdout[-3000:]
        assert (state["broker-2"] / "keys" / "broker.key").read_bytes() == own
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
