"""Tags and enrolment tokens with several brokers on one PostgreSQL store (issues 18 and 20): a
tag approved through one broker retargets the instance held by another, and a token's last use
is taken once, whichever brokers its agents reach at the same moment."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from zmq_broker import tokens
from zmq_broker.model import TokenRecord
from zmq_broker.store.postgresql import PostgresStore

REFUSED = "enrolment refused: the enrolment token is not valid for this agent"


@pytest.fixture
def cluster(cluster_factory):
    return cluster_factory(2, auto_accept=False)


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def view(client, instance_id: str):
    return next((v for v in client.instances([f"instance:{instance_id}"])), None)


def test_a_tag_approved_through_one_broker_retargets_on_the_other(cluster, tmp_path):
    c0, c1 = cluster.client(0), cluster.client(1)
    token = c1.create_token({"role": "web"}, uses=1)  # created on broker 1, used on broker 0
    path = tmp_path / "app.token"
    path.write_text(token.token)
    path.chmod(0o600)
    cluster.start_agent(0, "app-1", {"role": "db"}, "--enrol-token-file", str(path))
    online = wait_for(lambda: (v := view(c1, "app-1")) and v.ping_status == "Online" and v, "app-1 Online")
    assert online.tags == {"role": "web"} and online.broker_id == c0.ping()["broker_id"]
    assert [t.uses_left for t in c0.tokens()] == [0]
    # restarted proposing role=db: pending on both brokers, the approved tags still target it
    cluster.fleets[0].stop_agent("app-1")
    cluster.start_agent(0, "app-1", {"role": "db"})
    wait_for(lambda: (v := view(c1, "app-1")) and v.pending_tags == {"role": "db"} and v.ping_status == "Online",
             "the proposal on broker 1")
    assert next(k for k in c1.keys() if k.name == "app-1").proposed_tags == {"role": "db"}
    assert [i.instance_id for i in c0.send("RunShellScript", {"commands": ["true"]}, ["tag:role=web"],
                                           wait=30).invocations] == ["app-1"]
    # approved through broker 1: broker 0, which holds the agent's session, targets it by role=db
    assert c1.approve_tags("app-1").tags == {"role": "db"}
    wait_for(lambda: view(c0, "app-1").tags == {"role": "db"}, "broker 0 to learn the approval")
    sent = c0.send("RunShellScript", {"commands": ["echo $ZERORUN_INSTANCE_ID"]}, ["tag:role=db"], wait=30)
    assert [(i.instance_id, i.stdout) for i in sent.invocations] == [("app-1", "app-1\n")]
    assert view(c0, "app-1").pending_tags is None
    # set through broker 0, seen by broker 1
    c0.set_tags("app-1", {"tier": "1"})
    wait_for(lambda: view(c1, "app-1").tags == {"role": "db", "tier": "1"}, "broker 1 to learn the new tag")


def test_a_tokens_last_use_is_taken_once_by_agents_on_two_brokers(cluster, tmp_path):
    c0 = cluster.client(0)
    token = c0.create_token({"role": "race"}, uses=2, expires_in=600)
    path = tmp_path / "race.token"
    path.write_text(token.token)
    path.chmod(0o600)
    names = [f"race-{i}" for i in range(6)]
    for i, name in enumerate(names):  # three agents say HELLO to each broker, together
        cluster.start_agent(i % 2, name, None, "--enrol-token-file", str(path))

    def settled():
        joined = [v.instance_id for v in c0.instances() if v.ping_status == "Online"]
        refused = [n for i, n in enumerate(names) if REFUSED in cluster.fleets[i % 2].agent_log(n)]
        return (joined, refused) if len(joined) + len(refused) == len(names) else None

    joined, refused = wait_for(settled, "every agent to be enrolled or refused", timeout=60)
    assert len(joined) == 2 and len(refused) == 4, (joined, refused)
    assert [t.uses_left for t in cluster.client(1).tokens()] == [0]
    assert all(view(c0, n).tags == {"role": "race"} for n in joined)


def test_token_uses_are_exact_under_concurrent_redemption(postgres_server):
    """Two brokers' stores redeeming the same token from several threads at once: exactly its uses."""
    dsn = postgres_server.create_database("tk_" + uuid.uuid4().hex[:10])
    stores = [PostgresStore(dsn, postgres_server.password) for _ in range(4)]
    try:
        secret = tokens.new_secret()
        now = time.time()
        stores[0].create_token(TokenRecord("tok-race", {"role": "x"}, 25, now + 600, now), tokens.digest(secret))
        taken: list[int] = []
        barrier = threading.Barrier(len(stores))

        def redeem(store):
            barrier.wait()
            for i in range(20):
                row = store.redeem_token(tokens.digest(secret), f"i-{i}", time.time())
                if row is not None:
                    taken.append(row.uses_left)

        threads = [threading.Thread(target=redeem, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(taken) == list(range(25))  # every use once, none twice
        assert stores[1].token_by_digest(tokens.digest(secret)).uses_left == 0
    finally:
        for store in stores:
            store.close()
        postgres_server.drop_database(dsn.rsplit("/", 1)[1])
