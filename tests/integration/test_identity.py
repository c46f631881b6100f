"""Who says what an instance is (issue 18), with a real broker and real agents: tags that the
broker owns (an agent only proposes them), enrolment tokens, and the facts agents report.

Each attack is played as an instance or a client would play it: an accepted agent restarted with
other tags, agents presenting wrong, expired, used-up, revoked and foreign tokens, a restricted
role moving an instance out of its scope, a policy that scopes by facts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from zerorun import keys, protocol
from zerorun.client import Client, RequestFailed
from zerorun.testing import FleetError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers
from ansible_support import AnsibleRun  # noqa: E402
from cli_support import run_json  # noqa: E402

REFUSED = "enrolment refused: the enrolment token is not valid for this agent"


def wait_for(predicate, what: str, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def instance(fleet, instance_id: str) -> protocol.InstanceView | None:
    return next((v for v in fleet.client().instances([f"instance:{instance_id}"])), None)


def audit(fleet, event: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (fleet.broker_dir / "audit.jsonl").read_text().splitlines()]
    return [e for e in lines if event is None or e["event"] == event]


def reached(fleet, *targets: str) -> list[str]:
    args = [a for t in targets for a in ("-t", t)]
    code, view, err = run_json(fleet, "send", "RunShellScript", "-p", "commands=echo $ZERORUN_INSTANCE_ID", *args,
                               "--wait-timeout", "30")
    if code == 2 and "NoInstancesInTag" in err:
        return []
    assert code == 0, err
    assert {i["stdout"] for i in view["invocations"]} == {f"{i['instance_id']}\n" for i in view["invocations"]}
    return sorted(i["instance_id"] for i in view["invocations"])


def client_for(fleet, name: str, tmp_path: Path) -> Client:
    return fleet.add_client(name, tmp_path / "clients")


def refused(call, code: str = "AccessDenied") -> str:
    with pytest.raises(RequestFailed) as exc:
        call()
    assert exc.value.code == code, exc.value
    return str(exc.value)


# -- tags belong to the broker ---------------------------------------------------------------------


def test_a_retagged_agent_keeps_its_approved_tags_until_an_operator_approves(fleet):
    fleet.start_agents({"app-1": {"env": "dev"}, "prod-1": {"env": "prod"}})
    assert instance(fleet, "app-1").tags == {"env": "dev"}
    # the attack of issue 18: the same accepted agent, started again claiming other tags
    fleet.stop_agent("app-1")
    fleet.start_agent("app-1", {"env": "prod", "role": "db"})
    proposed = {"env": "prod", "role": "db"}
    wait_for(lambda: (v := instance(fleet, "app-1")) and v.ping_status == "Online" and v.pending_tags == proposed,
             "the proposal to be pending")
    assert instance(fleet, "app-1").tags == {"env": "dev"}
    assert reached(fleet, "tag:env=prod") == ["prod-1"]  # not the agent that claims env=prod
    assert reached(fleet, "tag:role=db") == []
    assert reached(fleet, "tag:env=dev") == ["app-1"]
    # shown to operators, audited with the old and the proposed values, logged at warning
    [entry] = audit(fleet, "tags.proposed")
    assert (entry["instance_id"], entry["old"], entry["new"]) == ("app-1", {"env": "dev"}, proposed)
    assert "app-1" in entry["agent"]
    assert "WARNING zerorun.broker.tags: instance app-1 proposes tags env=prod,role=db" in fleet.broker_log()
    table = fleet.cli("instances", check=True)
    assert "env=dev (proposed: env=prod,role=db)" in table.stdout and "tags approve" in table.stderr
    _, listed, _ = run_json(fleet, "keys", "list")
    [key] = [k for k in listed if k["name"] == "app-1"]
    assert (key["tags"], key["proposed_tags"]) == ({"env": "dev"}, proposed)
    assert "env=prod,role=db" in fleet.cli("keys", "list", check=True).stdout
    # a reconnect proposing the same again is not audited again
    fleet.stop_agent("app-1")
    fleet.restart_agent("app-1")
    fleet.wait_online(["app-1"])
    assert len(audit(fleet, "tags.proposed")) == 1
    # an operator approves: now it is reached by its new tags
    approved = fleet.cli("tags", "approve", "app-1", check=True)
    assert approved.stdout.strip() == "app-1: env=prod,role=db"
    assert sorted(reached(fleet, "tag:env=prod")) == ["app-1", "prod-1"]
    assert reached(fleet, "tag:role=db") == ["app-1"]
    [entry] = audit(fleet, "tags.approve")
    assert (entry["old"], entry["new"], entry["client"].split()[0]) == ({"env": "dev"}, proposed, "admin")
    assert instance(fleet, "app-1").pending_tags is None


def test_operators_set_unset_approve_and_reject_within_their_scope(fleet_factory, tmp_path):
    fleet = fleet_factory("scoped")
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(
        "roles:\n"
        "  tagger: {allow: [read, tags], documents: [], targets: ['tag:env=dev']}\n"
        "  reader: {allow: [read], documents: [], targets: ['*']}\n"
        "clients: {tagger: tagger, reader: reader}\n")
    fleet.start_broker()
    fleet.start_agents({"dev-1": {"env": "dev"}, "prod-1": {"env": "prod"}})
    tagger, reader = client_for(fleet, "tagger", tmp_path), client_for(fleet, "reader", tmp_path)
    try:
        view = tagger.set_tags("dev-1", {"team": "blue", "tier": "2"})
        assert view.tags == {"env": "dev", "team": "blue", "tier": "2"}
        assert tagger.unset_tags("dev-1", ["tier"]).tags == {"env": "dev", "team": "blue"}
        assert reached(fleet, "tag:team=blue") == ["dev-1"]
        entries = audit(fleet, "tags.set") + audit(fleet, "tags.unset")
        assert [(e["old"], e["new"]) for e in entries] == [
            ({"env": "dev"}, {"env": "dev", "team": "blue", "tier": "2"}),
            ({"env": "dev", "team": "blue", "tier": "2"}, {"env": "dev", "team": "blue"})]
        assert all(e["client"].startswith("tagger ") for e in entries)
        # never outside its scope, never out of it
        assert "prod-1" in refused(lambda: tagger.set_tags("prod-1", {"team": "blue"}))
        assert "dev-1" in refused(lambda: tagger.set_tags("dev-1", {"env": "prod"}))
        assert instance(fleet, "dev-1").tags == {"env": "dev", "team": "blue"}
        assert "lacks permission 'tags'" in refused(lambda: reader.set_tags("dev-1", {"x": "y"}))
        assert "has no tag 'nope'" in refused(lambda: tagger.unset_tags("dev-1", ["nope"]), "NotFound")
        assert "proposes no tags" in refused(lambda: tagger.approve_tags("dev-1"), "NotFound")
        assert "no instance" in refused(lambda: tagger.set_tags("ghost-1", {"a": "b"}), "NotFound")
        assert "invalid tag" in refused(lambda: tagger.set_tags("dev-1", {"bad,key": "x"}), "InvalidTag")
        # a proposal rejected: dropped, audited, the approved tags stay
        fleet.stop_agent("dev-1")
        fleet.start_agent("dev-1", {"env": "dev", "team": "red"})
        wait_for(lambda: instance(fleet, "dev-1").pending_tags == {"env": "dev", "team": "red"}, "a proposal")
        assert fleet.cli("tags", "reject", "dev-1", check=True).stdout.strip() == "dev-1: env=dev,team=blue"
        assert instance(fleet, "dev-1").pending_tags is None
        assert audit(fleet, "tags.reject")[0]["proposed"] == {"env": "dev", "team": "red"}
        # the CLI's own errors
        bad = fleet.cli("tags", "set", "dev-1", "novalue")
        assert bad.returncode == 2 and "must look like KEY=VALUE" in bad.stderr
    finally:
        tagger.close()
        reader.close()


def _keeper_fleet(fleet_factory, name: str):
    """A broker (keys not accepted by themselves) whose client ``keeper`` may read and manage keys
    within ``tag:env=dev``."""
    fleet = fleet_factory(name, auto_accept=False)
    fleet.broker_dir.mkdir(parents=True, exist_ok=True)
    (fleet.broker_dir / "policy.yaml").write_text(
        "roles:\n"
        "  keeper: {allow: [read, keys], documents: [], targets: ['tag:env=dev']}\n"
        "clients: {keeper: keeper}\n")
    fleet.start_broker()
    return fleet


def test_a_restricted_keys_role_manages_only_the_keys_of_instances_in_its_scope(fleet_factory, tmp_path):
    """A role with ``keys`` and a scope may not cut off, replace (and so impersonate) or enrol
    an instance outside it: accepting a key gives the instance its agent's proposed tags, and
    a key added without tags gives none, so both must keep the instance inside the scope."""
    fleet = _keeper_fleet(fleet_factory, "keeper")
    for name, env in (("dev-1", "dev"), ("prod-1", "prod"), ("new-dev", "dev"), ("new-prod", "prod")):
        fleet.start_agent(name, {"env": env})
    wait_for(lambda: len([k for k in fleet.client().keys() if k.state == "pending"]) == 4, "four pending keys")
    for name in ("dev-1", "prod-1"):
        fleet.cli("keys", "accept", name, check=True)
    fleet.wait_online(["dev-1", "prod-1"])
    keeper = client_for(fleet, "keeper", tmp_path)
    try:
        stranger, _ = keys.ensure_keypair(tmp_path / "stranger", "agent")
        for action in ("reject", "revoke", "delete"):
            assert "prod-1" in refused(lambda: keeper.key_action(action, "prod-1")), action
        assert "prod-1" in refused(lambda: keeper.key_action("replace", "prod-1", stranger.decode()))
        assert "new-prod" in refused(lambda: keeper.key_action("accept", "new-prod"))
        assert "prod-2" in refused(lambda: keeper.add_key("agent", "prod-2", stranger.decode()))
        # inside its scope, it manages keys as before
        assert keeper.key_action("accept", "new-dev").state == "accepted"
        fleet.wait_online(["new-dev"])
        assert keeper.key_action("reject", "dev-1").state == "rejected"
    finally:
        keeper.close()
    views = {k.name: k.state for k in fleet.client().keys() if k.kind == "agent"}
    assert views == {"dev-1": "rejected", "prod-1": "accepted", "new-dev": "accepted", "new-prod": "pending"}
    assert instance(fleet, "prod-1").ping_status == "Online"
    denied = [e for e in audit(fleet, "access.denied") if e.get("op") in ("KeyAction", "AddKey")]
    assert len(denied) == 6 and all("outside its scope" in e["reason"] for e in denied)


def test_a_restricted_keys_role_lists_and_revokes_only_tokens_inside_its_scope(fleet_factory, tmp_path):
    """As it creates only tokens that enrol instances inside its scope, a restricted role may
    not revoke (and stop the enrolment of) another scope's token, nor list it."""
    fleet = _keeper_fleet(fleet_factory, "token-keeper")
    prod = fleet.client().create_token({"env": "prod"}, uses=5, instance_prefix="prod-")
    keeper = client_for(fleet, "keeper", tmp_path)
    try:
        assert "tag:env=dev" in refused(lambda: keeper.create_token({"env": "prod"}))
        dev = keeper.create_token({"env": "dev"})
        assert [t.token_id for t in keeper.tokens()] == [dev.token_id]
        assert "outside its scope" in refused(lambda: keeper.revoke_token(prod.token_id))
        assert keeper.revoke_token(dev.token_id).state == "revoked"
    finally:
        keeper.close()
    states = {t.token_id: t.state for t in fleet.client().tokens()}
    assert states == {prod.token_id: "active", dev.token_id: "revoked"}
    assert [e["op"] for e in audit(fleet, "access.denied")] == ["CreateToken", "RevokeToken"]


def test_a_pending_key_shows_its_proposal_and_accepting_it_gives_those_tags(fleet_factory):
    fleet = fleet_factory("manual", auto_accept=False)
    fleet.start_broker()
    fleet.start_agent("new-1", {"role": "web", "env": "test"})
    key = wait_for(lambda: next((k for k in fleet.client().keys() if k.name == "new-1" and k.state == "pending"),
                                None), "the pending key")
    assert key.proposed_tags == {"role": "web", "env": "test"}
    assert "env=test,role=web" in fleet.cli("keys", "list", check=True).stdout
    fleet.cli("keys", "accept", "new-1", check=True)
    fleet.wait_online(["new-1"])
    view = instance(fleet, "new-1")
    assert (view.tags, view.pending_tags) == ({"role": "web", "env": "test"}, None)
    assert audit(fleet, "tags.enrol")[-1]["new"] == {"role": "web", "env": "test"}


def test_a_pending_key_cannot_swap_its_claim_before_it_is_accepted(fleet_factory):
    """An operator reads ``keys list`` and accepts: the key's first claim is what is accepted. A
    pending key that came back with other tags (or another id) in between got those approved,
    a prod role for a key the operator took for a web server's."""
    fleet = fleet_factory("sticky", auto_accept=False)
    fleet.start_broker()
    fleet.start_agent("new-1", {"role": "web"})
    wait_for(lambda: next((k for k in fleet.client().keys() if k.name == "new-1" and k.state == "pending"), None),
             "the pending key")
    fleet.stop_agent("new-1")
    fleet.start_agent("new-1", {"role": "db", "env": "prod"})  # the same key, claiming more
    wait_for(lambda: "pending agent key" in fleet.broker_log() and "now claims new-1 with tags env=prod,role=db"
             in fleet.broker_log(), "the second claim to be seen")
    (key,) = [k for k in fleet.client().keys() if k.kind == "agent"]
    assert (key.name, key.state, key.proposed_tags) == ("new-1", "pending", {"role": "web"})
    assert "keys delete new-1" in fleet.agent_log("new-1")
    fleet.cli("keys", "accept", "new-1", check=True)
    fleet.wait_online(["new-1"])
    view = wait_for(lambda: (v := instance(fleet, "new-1")) and v.pending_tags is not None and v, "the new proposal")
    assert (view.tags, view.pending_tags) == ({"role": "web"}, {"role": "db", "env": "prod"}), \
        "accepted as shown; what it claims now waits for an operator, as any instance's proposal"
    # deleted while pending, a key claims anew
    fleet.start_agent("new-2", {"role": "web"})
    wait_for(lambda: any(k.name == "new-2" and k.state == "pending" for k in fleet.client().keys()), "new-2 pending")
    fleet.stop_agent("new-2")
    fleet.cli("keys", "delete", "new-2", check=True)
    fleet.start_agent("new-2", {"role": "cache"})
    key = wait_for(lambda: next((k for k in fleet.client().keys() if k.name == "new-2" and k.state == "pending"),
                                None), "new-2 pending again")
    assert key.proposed_tags == {"role": "cache"}


def test_keys_add_pre_registers_tags_and_the_agent_only_proposes(fleet_factory):
    fleet = fleet_factory("preregistered", auto_accept=False)
    fleet.start_broker()
    public, _ = keys.ensure_keypair(fleet.agent_dir("pre-1"), "agent")
    added = fleet.cli("keys", "add", "agent", "pre-1", public.decode(), "--tag", "role=db", "--tag", "env=prod",
                      "--json", check=True)
    assert json.loads(added.stdout)["tags"] == {"role": "db", "env": "prod"}
    fleet.start_agent("pre-1", {"role": "web"})
    fleet.wait_online(["pre-1"])
    view = wait_for(lambda: (v := instance(fleet, "pre-1")) and v.pending_tags is not None and v, "a proposal")
    assert (view.tags, view.pending_tags) == ({"role": "db", "env": "prod"}, {"role": "web"})
    assert audit(fleet, "key.add")[-1]["tags"] == {"role": "db", "env": "prod"}
    # a key added without tags: nothing approved, what its agent says waits for an operator
    public, _ = keys.ensure_keypair(fleet.agent_dir("pre-2"), "agent")
    fleet.cli("keys", "add", "agent", "pre-2", public.decode(), check=True)
    fleet.start_agent("pre-2", {"role": "web"})
    view = wait_for(lambda: (v := instance(fleet, "pre-2")) and v.pending_tags is not None and v, "a proposal")
    assert (view.tags, view.pending_tags) == ({}, {"role": "web"})
    bad = fleet.cli("keys", "add", "client", "c-1", public.decode(), "--tag", "a=b")
    assert bad.returncode == 2 and "agent keys only" in bad.stderr



def test_the_brokers_own_public_key_is_neither_a_client_nor_an_agent_key(fleet):
    """`keys add client ops broker.key` (the wrong file copied) was taken: a client key whose
    secret is the broker's, or a mistake."""
    broker_public = keys.load_public(fleet.broker_key).decode()
    for kind, name in (("client", "ops"), ("agent", "web-9")):
        proc = fleet.cli("keys", "add", kind, name, broker_public)
        assert proc.returncode == 2 and "the broker's own public key" in proc.stderr, proc
    (fleet.root / "ops").mkdir()
    public, _ = keys.ensure_keypair(fleet.root / "ops", "ops")
    fleet.cli("keys", "add", "client", "ops", public.decode(), check=True)
    proc = fleet.cli("keys", "replace", "ops", broker_public)
    assert proc.returncode == 2 and "the broker's own public key" in proc.stderr, proc
    assert {r.name for r in fleet.client().keys() if r.kind == "client"} == {"admin", "ops"}


def test_agent_tags_trusted_keeps_the_lab_behaviour(fleet_factory):
    fleet = fleet_factory("lab")
    fleet.start_broker("--agent-tags", "trusted")
    assert "--agent-tags trusted: every agent sets its own tags" in fleet.broker_log()
    fleet.start_agents({"lab-1": {"env": "dev"}})
    fleet.stop_agent("lab-1")
    fleet.start_agent("lab-1", {"env": "prod"})
    wait_for(lambda: instance(fleet, "lab-1").tags == {"env": "prod"}, "the agent's own tags")
    assert instance(fleet, "lab-1").pending_tags is None
    assert audit(fleet, "tags.agent_set")[-1]["new"] == {"env": "prod"}


# -- enrolment tokens ------------------------------------------------------------------------------


def _token_file(tmp_path: Path, name: str, token: str) -> Path:
    path = tmp_path / f"{name}.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _denials(fleet, instance_id: str) -> list[str]:
    return [line.split("the broker denied this agent: ", 1)[1] for line in fleet.agent_log(instance_id).splitlines()
            if "the broker denied this agent: " in line]


def test_enrolment_tokens_join_agents_with_their_tags_and_refuse_alike(fleet_factory, tmp_path):
    fleet = fleet_factory("tokens", auto_accept=False)
    fleet.start_broker()
    made = fleet.cli("tokens", "create", "--tag", "role=web", "--tag", "env=prod", "--uses", "2", "--expires", "2h",
                     "--instance-prefix", "web-", check=True)
    secret = made.stdout.strip()
    assert secret.startswith("zrt1_") and "\n" not in secret and "only time the token is shown" in made.stderr
    token_id = next(t.token_id for t in fleet.client().tokens())
    good = _token_file(tmp_path, "good", secret)
    # two agents join with the token's tags, their own proposals ignored
    fleet.start_agent("web-1", {"role": "db"}, "--enrol-token-file", str(good))
    fleet.start_agent("web-2", None, "--enrol-token-file", str(good))
    fleet.wait_online(["web-1", "web-2"])
    for name in ("web-1", "web-2"):
        view = instance(fleet, name)
        assert (view.tags, view.pending_tags) == ({"role": "web", "env": "prod"}, None), name
    uses = audit(fleet, "token.use")
    assert sorted(e["uses_left"] for e in uses) == [0, 1] and {e["token_id"] for e in uses} == {token_id}
    [listed] = fleet.client().tokens()
    assert (listed.state, listed.uses_left, listed.token) == ("used", 0, "")
    # an enrolled agent started again speaks with its key: no use taken, no token sent (the broker
    # says Online when it sends the Welcome; the agent marks itself enrolled when that arrives)
    deadline = time.monotonic() + 10
    while not (fleet.agent_dir("web-1") / "enrolled").exists():
        assert time.monotonic() < deadline, "web-1 never marked itself enrolled"
        time.sleep(0.05)
    fleet.stop_agent("web-1")
    fleet.restart_agent("web-1")
    fleet.wait_online(["web-1"])
    assert len(audit(fleet, "token.use")) == 2 and (fleet.agent_dir("web-1") / "enrolled").exists()

    # used up, expired, revoked, wrong, for another prefix: the same refusal, each audited with why
    _, expiring, _ = run_json(fleet, "tokens", "create", "--uses", "5", "--expires", "1s")
    _, revoked, _ = run_json(fleet, "tokens", "create", "--uses", "5", "--expires", "1h")
    assert run_json(fleet, "tokens", "revoke", revoked["token_id"])[1]["state"] == "revoked"
    _, prefixed, _ = run_json(fleet, "tokens", "create", "--uses", "5", "--instance-prefix", "web-")
    wait_for(lambda: time.time() > expiring["expires_at"], "the token to expire")
    attempts = {"web-3": secret, "exp-1": expiring["token"], "rev-1": revoked["token"],
                "bad-1": "zrt1_" + "A" * 43, "db-9": prefixed["token"]}
    for name, token in attempts.items():
        fleet.start_agent(name, {"role": "web"}, "--enrol-token-file", str(_token_file(tmp_path, name, token)))
    wait_for(lambda: all(_denials(fleet, n) for n in attempts), "every agent to be refused")
    reasons = {r for n in attempts for r in _denials(fleet, n)}
    assert len(reasons) == 1 and next(iter(reasons)).startswith(REFUSED), reasons
    why = {e["instance_id"]: e["reason"] for e in audit(fleet, "token.refused")}
    assert why == {"web-3": "token used up", "exp-1": "token expired", "rev-1": "token revoked",
                   "bad-1": "unknown token", "db-9": "instance id outside the token's prefix 'web-'"}
    listed = {k.name for k in fleet.client().keys()}
    assert not listed & set(attempts)  # refused like an unknown key: nothing recorded
    online = {v.instance_id for v in fleet.client().instances() if v.ping_status == "Online"}
    assert online == {"web-1", "web-2"}
    states = {t.token_id: t.state for t in fleet.client().tokens()}
    assert states == {token_id: "used", expiring["token_id"]: "expired", revoked["token_id"]: "revoked",
                      prefixed["token_id"]: "active"}
    table = fleet.cli("tokens", "list", check=True).stdout
    assert token_id in table and "2/2" in table and "web-*" in table
    assert {e["event"] for e in audit(fleet) if e["event"].startswith("token.")} == {
        "token.create", "token.use", "token.revoke", "token.refused"}

    # never in clear: not in the database (only its SHA-256), the audit log or the broker's log
    fleet.stop_broker()
    stored = b"".join(p.read_bytes() for p in fleet.broker_dir.glob("broker.db*"))

    for token in (secret, expiring["token"], revoked["token"], prefixed["token"]):
        for text in (stored, (fleet.broker_dir / "audit.jsonl").read_bytes(), fleet.broker_log().encode()):
            assert token.encode() not in text
        assert token[5:].encode() not in stored
    db = sqlite3.connect(str(fleet.broker_dir / "broker.db"))
    digests = {row[0] for row in db.execute("SELECT digest FROM enrol_tokens")}
    db.close()
    assert hashlib.sha256(secret.encode()).hexdigest() in digests


def test_token_options_are_checked(fleet):
    for args, message in ((["--uses", "0"], "uses must be from 1"), (["--expires", "soon"], "cannot read duration"),
                          (["--tag", "a,b=c"], "invalid tag key"), (["--instance-prefix=-x"], "instance prefix")):
        proc = fleet.cli("tokens", "create", *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    # a comment was cut to 200 characters without a word; a newline in it broke `tokens list`
    for comment, message in (("x" * 201, "at most 200 characters, not 201"), ("a\nb", "one line of printable")):
        proc = fleet.cli("tokens", "create", "--comment", comment)
        assert proc.returncode == 2 and message in proc.stderr, (comment, proc.stderr)
    proc = fleet.cli("tokens", "revoke", "tok-nope")
    assert proc.returncode == 2 and "no enrolment token" in proc.stderr
    assert fleet.client().tokens() == []


# -- facts -----------------------------------------------------------------------------------------

UBUNTU = 'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\nPRETTY_NAME="Ubuntu 22.04.4 LTS"\n'
DEBIAN = 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n'

INVENTORY = """\
plugin: zerorun.fleet.instances
keyed_groups:
  - key: zerorun_facts.os.id
    prefix: os
groups:
  ubuntu_web: zerorun_facts.os.id == 'ubuntu' and zerorun_tags.role == 'web'
compose:
  primary_ip: zerorun_facts.ip | first | default('none')
  cpus: zerorun_facts.cpus
"""


def test_fact_targets_views_and_the_inventory_use_what_agents_report(fleet, tmp_path, monkeypatch):
    ubuntu, debian = tmp_path / "ubuntu-release", tmp_path / "debian-release"
    ubuntu.write_text(UBUNTU)
    debian.write_text(DEBIAN)
    for name, release, tags in (("u-1", ubuntu, {"role": "web"}), ("d-1", debian, {"role": "web"}),
                                ("d-2", debian, {"role": "db"})):
        monkeypatch.setenv("ZERORUN_OS_RELEASE", str(release))  # the agent reads this os-release file
        fleet.start_agent(name, tags, "--facts-interval", "0.5")
    fleet.wait_online(["u-1", "d-1", "d-2"])
    assert reached(fleet, "fact:os.id=ubuntu") == ["u-1"]
    assert reached(fleet, "fact:os.id=ubuntu,debian", "tag:role=web") == ["d-1", "u-1"]  # several -t: AND
    assert reached(fleet, "fact:os.like=debian") == ["u-1"]
    assert reached(fleet, "fact:os.id=debian", "fact:os.version=12") == ["d-1", "d-2"]
    assert reached(fleet, f"fact:kernel={os.uname().release}", "tag:role=db") == ["d-2"]
    assert reached(fleet, "fact:os.id=windows") == []
    bad = fleet.cli("send", "RunShellScript", "-p", "commands=true", "-t", "fact:colour=blue")
    assert bad.returncode == 2 and "unknown fact 'colour'" in bad.stderr
    # instances: the platform columns, --json carries every fact, --filter fact: works
    code, listed, _ = run_json(fleet, "instances", "--filter", "fact:os.id=debian")
    assert code == 0 and sorted(v["instance_id"] for v in listed) == ["d-1", "d-2"]
    facts = listed[0]["facts"]
    assert facts["os"] == {"id": "debian", "version": "12", "name": "Debian GNU/Linux", "like": []}
    assert facts["kernel"] == os.uname().release and facts["arch"] == os.uname().machine
    assert facts["cpus"] >= 1 and facts["memory_mb"] > 0 and facts["boot_time"] > 0
    assert facts["hostname"] and facts["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["agent_version"] == listed[0]["agent_version"]
    table = fleet.cli("instances", check=True).stdout.splitlines()
    assert table[0].split() == ["INSTANCE", "PING", "PLATFORM", "VERSION", "AGENT", "IP", "LAST", "SEEN", "TAGS"]
    assert any(line.startswith("u-1") and "Ubuntu" in line and "22.04" in line and "Online" in line
               for line in table)
    # facts that change reach the broker without a reconnect
    ubuntu.write_text(UBUNTU.replace('"22.04"', '"24.04"'))
    wait_for(lambda: instance(fleet, "u-1").facts.os.version == "24.04", "the new facts")
    assert reached(fleet, "fact:os.version=24.04") == ["u-1"]
    assert "facts changed; telling the broker" in fleet.agent_log("u-1")
    # the inventory plugin: facts as host variables, groups by fact, without a setup run
    ansible = AnsibleRun(fleet, tmp_path, INVENTORY)
    proc = ansible.run("ansible-inventory", "-i", str(ansible.inventory), "--list")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data["os_ubuntu"]["hosts"]) == {"u-1"}
    assert set(data["os_debian"]["hosts"]) == {"d-1", "d-2"}
    assert set(data["ubuntu_web"]["hosts"]) == {"u-1"}
    hostvars = data["_meta"]["hostvars"]["d-2"]
    assert str(hostvars["cpus"]) == str(facts["cpus"])
    assert _unwrap(hostvars["zerorun_facts"])["os"]["id"] == "debian"


def _unwrap(value):
    """ansible-core 2.19 marks untrusted strings in ``--list`` output as {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def test_a_policy_scope_naming_a_fact_is_refused_at_load(fleet_factory, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("roles:\n  ubuntu-ops:\n    allow: [read, run]\n    documents: ['*']\n"
                      "    targets: ['fact:os.id=ubuntu']\nclients: {ops: ubuntu-ops}\n")
    fleet = fleet_factory("facts-policy")
    check = fleet.cli("policy", "check", str(policy))
    assert check.returncode == 2 and "role 'ubuntu-ops'" in check.stderr and "may not use facts" in check.stderr
    with pytest.raises(FleetError):
        fleet.start_broker("--policy", str(policy))
    assert "may not use facts" in fleet.broker_log()
    # a running broker keeps its last good policy and says why the new one was refused
    policy.write_text("roles: {}\n")
    fleet.start_broker("--policy", str(policy))
    policy.write_text(policy.read_text().replace("roles: {}", "roles:\n  x: {allow: [read], targets: ['fact:arch=x86_64']}"))
    status = wait_for(lambda: fleet.client().ping()["policy"].get("last_error"), "the reload to fail")
    assert "may not use facts" in status
