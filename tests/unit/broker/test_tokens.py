"""Enrolment tokens in the SQLite store: hashed, counted exactly, refused for every reason."""

from __future__ import annotations

import threading
import time

from zmq_broker import tokens
from zmq_broker.model import TokenRecord
from zmq_broker.store.base import TokenRow
from zmq_broker.store.sqlite import SqliteStore


def _token(store, uses=2, expires_in=600.0, prefix="", token_id="tok-1"):
    secret = tokens.new_secret()
    now = time.time()
    store.create_token(TokenRecord(token_id, {"role": "web"}, uses, now + expires_in, now, "admin", prefix),
                       tokens.digest(secret))
    return secret


def test_a_token_is_stored_as_its_digest_and_used_up(tmp_path):
    store = SqliteStore(tmp_path / "broker.db")
    secret = _token(store)
    assert secret.startswith(tokens.TOKEN_PREFIX) and len(secret) > 40
    digest = tokens.digest(secret)
    first = store.redeem_token(digest, "web-1", time.time())
    assert first is not None and first.uses_left == 1 and first.record.tags == {"role": "web"}
    assert store.redeem_token(digest, "web-2", time.time()).uses_left == 0
    assert store.redeem_token(digest, "web-3", time.time()) is None
    row = store.token_by_digest(digest)
    assert tokens.state(row) == "used" and tokens.refusal_reason(row, "web-3", time.time()) == "token used up"
    assert store.redeem_token(tokens.digest(secret + "x"), "web-3", time.time()) is None
    assert tokens.refusal_reason(store.token_by_digest(tokens.digest(secret + "x")), "web-3", 0) == "unknown token"
    store.close()
    assert secret.encode() not in (tmp_path / "broker.db").read_bytes()


def test_expired_revoked_and_foreign_prefix_take_nothing(tmp_path):
    store = SqliteStore(tmp_path / "broker.db")
    expired = tokens.digest(_token(store, expires_in=0.001, token_id="tok-e"))
    revoked = tokens.digest(_token(store, token_id="tok-r"))
    prefixed = tokens.digest(_token(store, prefix="web-", token_id="tok-p"))
    time.sleep(0.01)
    assert store.revoke_token("tok-r") and not store.revoke_token("tok-r") and not store.revoke_token("nope")
    now = time.time()
    for digest, instance_id, reason in ((expired, "web-1", "token expired"), (revoked, "web-1", "token revoked"),
                                        (prefixed, "db-1", "instance id outside the token's prefix 'web-'")):
        assert store.redeem_token(digest, instance_id, now) is None
        row = store.token_by_digest(digest)
        assert row.uses_left == 2 and tokens.refusal_reason(row, instance_id, now) == reason
    assert store.redeem_token(prefixed, "web-1", now).uses_left == 1
    states = {r.record.token_id: tokens.state(r) for r in store.tokens()}
    assert states == {"tok-e": "expired", "tok-r": "revoked", "tok-p": "active"}
    store.close()


def test_two_connections_redeeming_at_once_take_each_use_once(tmp_path):
    path = tmp_path / "broker.db"
    stores = [SqliteStore(path) for _ in range(3)]
    digest = tokens.digest(_token(stores[0], uses=30))
    taken: list[int] = []
    barrier = threading.Barrier(len(stores))

    def redeem(store):
        barrier.wait()
        for i in range(20):
            row = store.redeem_token(digest, f"i-{i}", time.time())
            if row is not None:
                taken.append(row.uses_left)

    threads = [threading.Thread(target=redeem, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(taken) == list(range(30))
    for store in stores:
        store.close()


def test_a_views_secret_is_only_what_it_is_given():
    now = time.time()
    row = TokenRow(TokenRecord("tok-1", {"a": "b"}, 3, now + 10, now), 3, False)
    assert tokens.view(row).token == "" and tokens.view(row, "zrt1_x").token == "zrt1_x"
    assert tokens.view(row).state == "active"
