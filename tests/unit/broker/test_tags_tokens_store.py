"""Tag records and enrolment tokens in both store backends (SQLite migration 2, PostgreSQL 3)."""

from __future__ import annotations

import time
import uuid

import pytest

from zmq_broker import tokens
from zmq_broker.model import TagRecord, TokenRecord
from zmq_broker.store.postgresql import PostgresStore
from zmq_broker.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "broker.db")
        yield made
        made.close()
        return
    server = request.getfixturevalue("postgres_server")
    name = "tt_" + uuid.uuid4().hex[:12]
    made = PostgresStore(server.create_database(name), server.password)
    yield made
    made.close()
    server.drop_database(name)


def test_tag_records_are_queued_and_committed_with_the_state(store):
    store.put_tags(TagRecord("web-1", {"role": "web"}, proposed={"role": "db"}, proposed_at=1.0))
    assert store.dirty
    store.flush()
    store.put_tags(TagRecord("web-2", {}))
    store.put_tags(TagRecord("web-1", {"role": "db"}))  # the last write of a batch wins
    store.flush()
    assert {r.instance_id: (r.tags, r.proposed) for r in store.load_tags()} == {
        "web-1": ({"role": "db"}, None), "web-2": ({}, None)}
    assert [r.instance_id for r in store.get_tags(["web-2", "nope"])] == ["web-2"]


def test_tokens_hashed_counted_revoked(store):
    secret = tokens.new_secret()
    now = time.time()
    store.create_token(TokenRecord("tok-a", {"role": "web"}, 2, now + 60, now, "admin", "web-"), tokens.digest(secret))
    digest = tokens.digest(secret)
    assert store.redeem_token(digest, "db-1", now) is None  # outside the prefix: nothing taken
    assert store.redeem_token(digest, "web-1", now).uses_left == 1
    assert store.redeem_token(digest, "web-1", now + 61) is None  # expired by then
    assert store.revoke_token("tok-a") and not store.revoke_token("tok-a")
    assert store.redeem_token(digest, "web-2", now) is None
    [row] = store.tokens()
    assert (row.record.token_id, row.uses_left, row.revoked, tokens.state(row, now)) == ("tok-a", 1, True, "revoked")
    assert store.token_by_digest(digest).record.instance_prefix == "web-"
    assert store.token_by_digest(tokens.digest("zrt1_other")) is None
