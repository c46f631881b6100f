"""Target scopes are evaluated against instances (id and tags), never against request text."""

from __future__ import annotations

import pytest

from zerorun.scope import Scope, ScopeError, parse_pattern

WEB1 = ("web-1", {"role": "web", "env": "prod"})
WEB2 = ("web-2", {"role": "web", "env": "dev"})
DB1 = ("db-1", {"role": "db", "env": "prod"})
DEV_DB = ("db-9", {"role": "db", "env": "dev-eu"})
BARE = ("nosuch", {})


@pytest.mark.parametrize("patterns,instance,inside", [
    (["tag:env=dev*"], WEB2, True),
    (["tag:env=dev*"], DEV_DB, True),
    (["tag:env=dev*"], WEB1, False),  # the value is matched, not "dev,prod" as written in a target
    (["instance:web-*"], WEB1, True),
    (["instance:web-*"], DB1, False),
    (["instance:web-1,db-*"], DB1, True),
    (["tag:role=web"], WEB1, True),  # an instance target of a tag-scoped role: by the instance's tags
    (["tag:role=web"], BARE, False),
    (["tag:role"], DB1, True),
    (["tag:ro*"], DB1, True),
    (["tag:role=web,db"], DB1, True),
    (["*"], BARE, True),
    ([], BARE, True),  # no patterns: unrestricted (as before the strict policy schema)
])
def test_scope_contains(patterns, instance, inside):
    assert Scope.parse(patterns).contains(*instance) is inside


def test_outside_names_every_instance_outside_in_order():
    scope = Scope.parse(["tag:env=dev*", "instance:web-1"])
    assert scope.outside([WEB1, DB1, WEB2, DEV_DB, BARE]) == ["db-1", "nosuch"]


def test_an_empty_scope_can_mean_nothing():
    scope = Scope.parse([], empty_means_everything=False)
    assert not scope.everything and scope.outside([WEB1]) == ["web-1"]


@pytest.mark.parametrize("text", ["tag:", "tag:=x", "tag:role=web,", "tag:role=,web", "instance:", "host:web-1", "role=web",
                                  "fact:os.id=ubuntu"])
def test_malformed_patterns_are_refused(text):
    with pytest.raises(ScopeError):
        parse_pattern(text)


def test_facts_are_refused_with_the_reason():
    with pytest.raises(ScopeError) as exc:
        parse_pattern("fact:arch=x86_64")
    assert "could lie" in str(exc.value)
