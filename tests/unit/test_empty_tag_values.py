"""An empty tag value (``zerorun tags set ID KEY=``, an agent's ``--tag KEY=``, EC2's empty tag
values) can be targeted: ``tag:KEY=`` reaches the instances whose KEY is empty, in the parsers of
targets and of scopes, and the broker's fleet index."""

from __future__ import annotations

import pytest

from zerorun.protocol import Target
from zerorun.scope import ScopeError, parse_pattern
from zerorun.targets import TargetError, match_all, parse_target, to_target
from zmq_broker.fleet import FleetIndex
from zmq_broker.model import InstanceRecord


def test_tag_key_equals_nothing_is_the_empty_value():
    target = parse_target("tag:owner=")
    assert target == Target("tag", "owner", ("",)) and str(target) == "tag:owner="
    assert parse_target(str(target)) == target and to_target(target) == target
    assert to_target("tag:owner=") == target  # text from an older client, parsed by the broker
    assert parse_target("tag:owner") == Target("tag", "owner")  # key present, any value: unchanged
    assert match_all([target], "i-1", {"owner": ""})
    assert not match_all([target], "i-1", {"owner": "ops"})
    assert not match_all([target], "i-1", {})
    assert match_all([parse_target("tag:owner")], "i-1", {"owner": ""})


@pytest.mark.parametrize("text", ["tag:owner=ops,", "tag:owner=,ops", "tag:owner=ops,,dev"])
def test_an_empty_value_in_a_list_is_refused_with_the_way_to_write_it(text):
    with pytest.raises(TargetError, match=r"tag:owner= alone targets the empty value"):
        parse_target(text)
    with pytest.raises(TargetError, match=r"tag:owner= alone targets the empty value"):
        to_target(Target("tag", "owner", ("ops", "")))  # typed, from the wire: the same rule


def test_the_fleet_index_finds_empty_values():
    fleet = FleetIndex([InstanceRecord("a", "key-a", tags={"owner": ""}),
                        InstanceRecord("b", "key-b", tags={"owner": "ops"}),
                        InstanceRecord("c", "key-c", tags={})], None)
    assert [r.instance_id for r in fleet.matching(["tag:owner="])] == ["a"]
    assert [r.instance_id for r in fleet.matching(["tag:owner"])] == ["a", "b"]
    assert [r.instance_id for r in fleet.matching([Target("tag", "owner", ("",))])] == ["a"]


def test_scope_patterns_take_the_empty_value_too():
    pattern = parse_pattern("tag:owner=")
    assert pattern.matches("i-1", {"owner": ""}) and not pattern.matches("i-1", {"owner": "ops"})
    with pytest.raises(ScopeError, match="alone means the empty value"):
        parse_pattern("tag:owner=ops,")
