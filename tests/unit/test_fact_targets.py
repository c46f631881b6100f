"""fact: targets (zerorun/targets.py) and the fleet index's tags and facts (zmq_broker/fleet.py)."""

from __future__ import annotations

import pytest

from zerorun import protocol
from zerorun.protocol import Facts, OsFacts, Target
from zerorun.targets import FACT_NAMES, TargetError, flat_facts, match_all, parse_target, to_target
from zmq_broker.errors import BrokerError
from zmq_broker.fleet import FleetIndex
from zmq_broker.model import InstanceRecord, TagRecord
from zmq_broker.store.sqlite import SqliteStore

UBUNTU = Facts(os=OsFacts(id="ubuntu", version="22.04", name="Ubuntu", like=["debian"]), kernel="6.1.0", arch="x86_64",
               hostname="web-1", fqdn="web-1.example", ip=["10.0.0.5", "fd00::5"], cpus=4, memory_mb=7900,
               boot_time=1700000000.5, agent_version="0.1.0", python_version="3.11.7")


def test_fact_targets_parse_like_tag_targets():
    target = parse_target("fact:os.id=ubuntu,debian")
    assert target == Target("fact", "os.id", ("ubuntu", "debian"))
    assert str(target) == "fact:os.id=ubuntu,debian"
    assert parse_target("FACT:fqdn") == Target("fact", "fqdn")
    assert to_target("fact:ip=10.0.0.5") == Target("fact", "ip", ("10.0.0.5",))
    with pytest.raises(TargetError, match="unknown fact 'colour'"):
        to_target("fact:colour=blue")
    with pytest.raises(TargetError, match="empty fact value"):
        to_target("fact:arch=x86_64,")
    with pytest.raises(TargetError, match="fact value"):
        to_target(Target("fact", "os.id", ("ubuntu\n[fake log line]",)))


def test_flat_facts_names_every_fact_once():
    flat = flat_facts(UBUNTU)
    assert set(flat) == set(FACT_NAMES)
    assert flat["os.id"] == ("ubuntu",) and flat["os.like"] == ("debian",)
    assert flat["ip"] == ("10.0.0.5", "fd00::5") and flat["cpus"] == ("4",) and flat["boot_time"] == ("1700000000",)
    assert flat_facts(None) == {} and flat_facts(Facts()) == {}


def test_fact_matching_ors_values_ands_targets():
    flat = flat_facts(UBUNTU)
    tags = {"role": "web"}
    assert match_all([to_target("fact:os.id=debian,ubuntu")], "web-1", tags, flat)
    assert match_all([to_target("fact:ip=fd00::5"), to_target("tag:role=web")], "web-1", tags, flat)
    assert not match_all([to_target("fact:ip=fd00::5"), to_target("tag:role=db")], "web-1", tags, flat)
    assert match_all([to_target("fact:fqdn")], "web-1", tags, flat)
    assert not match_all([to_target("fact:fqdn")], "web-1", tags, flat_facts(Facts()))
    assert not match_all([to_target("fact:os.id=ubuntu")], "web-1", tags, None)


def _record(instance_id: str, tags: dict, facts: Facts | None = None) -> InstanceRecord:
    return InstanceRecord(instance_id, "key-" + instance_id, tags=tags, facts=facts)


def test_the_index_sees_approved_tags_only_and_follows_their_changes():
    fleet = FleetIndex([_record("a", {"env": "prod"}), _record("b", {"env": "dev"})], None,
                       [TagRecord("a", {"env": "dev"}, proposed={"env": "prod"})])
    assert fleet.get("a").tags == {"env": "dev"}  # what the record was written with does not count
    assert [r.instance_id for r in fleet.matching(["tag:env=dev"])] == ["a", "b"]
    assert fleet.matching(["tag:env=prod"]) == []
    assert fleet.pending_tags("a") == {"env": "prod"}
    fleet.set_tags(TagRecord("a", {"env": "prod"}))
    assert [r.instance_id for r in fleet.matching(["tag:env=prod"])] == ["a"]
    assert [r.instance_id for r in fleet.matching(["tag:env=dev"])] == ["b"]
    fleet.put(_record("a", {"env": "dev", "role": "db"}))  # a HELLO's record: the approved tags win
    assert fleet.get("a").tags == {"env": "prod"} and fleet.matching(["tag:role"]) == []


def test_the_index_matches_facts_alone_or_with_tags():
    debian = Facts(os=OsFacts(id="debian", version="12"))
    fleet = FleetIndex([_record("u", {"role": "web"}, UBUNTU), _record("d", {"role": "web"}, debian),
                        _record("x", {"role": "db"})], None)
    assert [r.instance_id for r in fleet.matching(["fact:os.id=ubuntu,debian"])] == ["d", "u"]
    assert [r.instance_id for r in fleet.matching(["fact:os.id=debian", "tag:role=web"])] == ["d"]
    assert fleet.set_facts("x", debian) and not fleet.set_facts("x", debian)
    assert [r.instance_id for r in fleet.matching(["fact:os.version=12"])] == ["d", "x"]
    with pytest.raises(BrokerError) as exc:
        fleet.matching(["fact:nope=1"])
    assert exc.value.code == "InvalidTarget"


def test_instances_from_before_owned_tags_keep_them_approved(tmp_path):
    store = SqliteStore(tmp_path / "broker.db")
    store.put_instance(_record("old-1", {"role": "web"}))
    store.flush()
    fleet = FleetIndex.from_store(store, None)
    assert fleet.tag_record("old-1").tags == {"role": "web"}
    store.flush()
    assert [r.tags for r in store.load_tags()] == [{"role": "web"}]
    assert store.get_tags(["old-1", "nope"])[0].updated_by == "adopted at upgrade"
    store.close()


def test_facts_on_the_wire_are_bounded():
    hello = protocol.Hello("i-1", facts=Facts(ip=["10.0.0.1"] * 33))
    with pytest.raises(protocol.ValidationError):
        protocol.agent_message_decoder.decode(protocol.encode(hello))
    assert protocol.agent_message_decoder.decode(protocol.encode(protocol.FactsUpdate(UBUNTU))).facts == UBUNTU


def test_facts_updates_are_rate_limited_per_instance():
    fleet = FleetIndex([_record("a", {})], None)
    versions = [Facts(kernel=str(i)) for i in range(8)]
    accepted = [fleet.set_facts("a", f, now=100.0) for f in versions[:5]]
    assert accepted == [True, True, True, False, False]  # a burst, then dropped
    assert fleet.set_facts("a", versions[5], now=111.0)  # one more after FACT_UPDATES_EVERY
    assert fleet.get("a").facts == versions[5]
