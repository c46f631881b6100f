"""zerorun.fleet.instances: naming, groups, host vars and options, against a fake broker."""

import contextlib
import hashlib

import pytest
from ansible.errors import AnsibleParserError
from ansible.inventory.data import InventoryData
from ansible.parsing.dataloader import DataLoader
from ansible.plugins.loader import inventory_loader
from ansible.utils.display import Display

from ansible_collections.zerorun.fleet.plugins.inventory import instances as inv
from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker
from zerorun import protocol


def view(instance_id, tags, status="Online", hostname=""):
    return protocol.InstanceView(
        instance_id=instance_id, tags=tags, hostname=hostname or instance_id + ".example", platform="Linux",
        platform_version="6.1", agent_version="0.1.0", ping_status=status, first_seen=1.0, last_seen=2.0,
        key_fingerprint="SHA256:abc")


FLEET = [
    view("i-web1", {"role": "web", "env": "prod"}),
    view("i-web2", {"role": "web", "env": "prod-eu"}, status="ConnectionLost"),
    view("i-db1", {"role": "db"}, status="Inactive"),
]


class FakeClient:
    def __init__(self, fleet, calls):
        self.fleet, self.calls = fleet, calls

    def instances(self, targets, include_offline=True):
        self.calls.append({"targets": list(targets), "include_offline": include_offline})
        return list(self.fleet)


@pytest.fixture
def fake_broker(monkeypatch):
    calls, seen_options = [], []

    @contextlib.contextmanager
    def connect(options, kind="module"):
        seen_options.append(dict(options))
        yield FakeClient(FLEET, calls)

    monkeypatch.setattr(broker, "connect", connect)
    return calls, seen_options


def load(tmp_path, text, name="fleet.zerorun.yml", cache=False):
    path = tmp_path / name
    path.write_text(text)
    inventory = InventoryData()
    plugin = inventory_loader.get("zerorun.fleet.instances")
    assert plugin.verify_file(str(path))
    plugin.parse(inventory, DataLoader(), str(path), cache=cache)
    with contextlib.suppress(AttributeError):  # as InventoryManager does after parse
        plugin.update_cache_if_changed()
    return inventory


def test_hostvars_are_prefixed_and_never_tags():
    hostvars = inv.instance_hostvars(protocol.to_builtins(FLEET[0]))
    assert "tags" not in hostvars
    assert all(name.startswith("zerorun_") for name in hostvars)
    assert hostvars["zerorun_instance_id"] == "i-web1"
    assert hostvars["zerorun_tags"] == {"role": "web", "env": "prod"}
    for name in ("zerorun_platform", "zerorun_hostname", "zerorun_ping_status", "zerorun_agent_version",
                 "zerorun_last_seen"):
        assert name in hostvars


def test_tag_groups_keep_their_names_when_no_other_tag_shares_them():
    groups, warnings = inv.tag_groups(protocol.to_builtins(FLEET), inv.InventoryModule._sanitize_group_name)
    assert groups == {("role", "web"): "tag_role_web", ("env", "prod"): "tag_env_prod",
                      ("env", "prod-eu"): "tag_env_prod_eu", ("role", "db"): "tag_role_db"}
    assert warnings == []


COLLIDING = [
    view("i-1", {"a b": "c", "role": "web"}),
    view("i-2", {"a_b": "c"}),
    view("i-3", {"a": "b_c"}),
    view("i-4", {"a_b": "c", "owner": ""}),
]


def test_tags_giving_one_group_name_get_groups_of_their_own(tmp_path, monkeypatch):
    """`a b=c`, `a_b=c` and `a=b_c` all gave the group tag_a_b_c: the hosts of three tags merged
    without a word, and a play for one of them ran on the others."""
    @contextlib.contextmanager
    def connect(options, kind="module"):
        yield FakeClient(COLLIDING, [])

    warned = []
    monkeypatch.setattr(broker, "connect", connect)
    monkeypatch.setattr(Display, "warning", lambda self, msg, *args, **kwargs: warned.append(msg))
    inventory = load(tmp_path, "plugin: zerorun.fleet.instances\n")

    def hosts(group):
        return sorted(h.name for h in inventory.groups[group].get_hosts())

    own = {tag: "tag_a_b_c_" + hashlib.sha256(("%s\0%s" % tag).encode()).hexdigest()[:8]
           for tag in (("a b", "c"), ("a_b", "c"), ("a", "b_c"))}
    assert "tag_a_b_c" not in inventory.groups
    assert hosts(own[("a b", "c")]) == ["i-1"]
    assert hosts(own[("a_b", "c")]) == ["i-2", "i-4"]
    assert hosts(own[("a", "b_c")]) == ["i-3"]
    assert hosts("tag_role_web") == ["i-1"] and hosts("tag_owner_") == ["i-4"]  # no collision: names kept
    assert len(warned) == 1, warned
    for tag, group in own.items():
        assert "%s (tag '%s=%s')" % (group, *tag) in warned[0]
    assert "'a=b_c', 'a b=c' and 'a_b=c' all give the group name tag_a_b_c" in warned[0]
    assert "no host is put in tag_a_b_c" in warned[0]


def test_an_own_group_never_takes_another_tags_name():
    digest = hashlib.sha256(b"a b\0c").hexdigest()
    taken = "tag_a_b_c_" + digest[:8]  # what `a b=c` would get, already another tag's plain name
    instances = [{"tags": {"a b": "c"}}, {"tags": {"a_b": "c"}}, {"tags": {"a": "b_c_" + digest[:8]}}]
    groups, _ = inv.tag_groups(instances, inv.InventoryModule._sanitize_group_name)
    assert groups[("a", "b_c_" + digest[:8])] == taken
    assert groups[("a b", "c")] == "tag_a_b_c_" + digest[:16]
    assert len(set(groups.values())) == 3


def test_visible_hides_inactive_unless_asked():
    plain = protocol.to_builtins(FLEET)
    assert [i["instance_id"] for i in inv.visible(plain, False)] == ["i-web1", "i-web2"]
    assert len(inv.visible(plain, True)) == 3


def test_host_names_fall_back_to_instance_id():
    plain = [{"instance_id": "i-1", "hostname": "web"}, {"instance_id": "i-2", "hostname": "web"},
             {"instance_id": "i-3", "hostname": ""}]
    assert inv.host_names(plain, "hostname") == ["web", "i-2", "i-3"]
    assert inv.host_names(plain, "instance_id") == ["i-1", "i-2", "i-3"]


def test_a_host_name_that_is_another_instances_id_is_not_taken():
    """app-7 reported the host name web-1, the id of another instance, whose own host name was then
    taken: both were named web-1, one inventory host for two instances."""
    fleet = [{"instance_id": "app-7", "hostname": "web-1"}, {"instance_id": "web-1", "hostname": "web-1"},
             {"instance_id": "web-2", "hostname": "db"}]
    assert inv.host_names(fleet, "hostname") == ["app-7", "web-1", "db"]


def test_verify_file_wants_the_suffix(tmp_path):
    plugin = inventory_loader.get("zerorun.fleet.instances")
    for name, ok in (("fleet.zerorun.yml", True), ("zerorun.yaml", True), ("fleet.yml", False),
                     ("zerorun.yml.bak", False)):
        (tmp_path / name).write_text("plugin: zerorun.fleet.instances\n")
        assert plugin.verify_file(str(tmp_path / name)) is ok, name


def test_parse_builds_groups_and_vars(tmp_path, fake_broker):
    calls, _ = fake_broker
    inventory = load(tmp_path, "plugin: zerorun.fleet.instances\ntargets: ['tag:role=web,db']\n")
    assert sorted(inventory.hosts) == ["i-web1", "i-web2"]  # i-db1 is Inactive
    assert calls == [{"targets": ["tag:role=web,db"], "include_offline": True}]
    assert set(inventory.groups["tag_role_web"].get_hosts()) == {inventory.hosts["i-web1"], inventory.hosts["i-web2"]}
    assert "zerorun_online" in inventory.groups and "zerorun_connectionlost" in inventory.groups
    # Ansible's own sanitising decides about '-' (TRANSFORM_INVALID_GROUP_CHARS); the name is one of these
    assert {"tag_env_prod-eu", "tag_env_prod_eu"} & set(inventory.groups)
    host_vars = inventory.hosts["i-web1"].vars
    assert host_vars["zerorun_ping_status"] == "Online"
    assert "ansible_connection" not in host_vars


def test_a_target_string_is_one_target(tmp_path, fake_broker):
    """Commas separate tag values: a plain string must not be split into 'tag:role=web' and 'db'."""
    calls, _ = fake_broker
    load(tmp_path, "plugin: zerorun.fleet.instances\ntargets: tag:role=web,db\n")
    assert calls == [{"targets": ["tag:role=web,db"], "include_offline": True}]


def test_targets_of_the_wrong_shape_are_a_clean_error(tmp_path, fake_broker):
    with pytest.raises(AnsibleParserError, match="targets must be"):
        load(tmp_path, "plugin: zerorun.fleet.instances\ntargets: {role: web}\n")


def test_include_offline_hostnames_and_connection(tmp_path, fake_broker):
    inventory = load(tmp_path, "\n".join([
        "plugin: zerorun.fleet.instances",
        "include_offline: true",
        "hostnames: hostname",
        "set_connection: true",
        "endpoint: tcp://127.0.0.1:1",
    ]) + "\n")
    assert sorted(inventory.hosts) == ["i-db1.example", "i-web1.example", "i-web2.example"]
    assert "zerorun_inactive" in inventory.groups
    assert inventory.hosts["i-db1.example"].vars["ansible_connection"] == "zerorun.fleet.agent"
    _, seen_options = fake_broker
    assert seen_options[-1]["endpoint"] == "tcp://127.0.0.1:1"
    # the connection plugin gets this file's broker settings as its own variables
    assert inventory.hosts["i-db1.example"].vars["ansible_zerorun_endpoint"] == "tcp://127.0.0.1:1"


def test_set_connection_passes_the_config_file_on(tmp_path, fake_broker, monkeypatch):
    monkeypatch.delenv("ZERORUN_CONFIG", raising=False)
    config = tmp_path / "client.yaml"
    inventory = load(tmp_path, "plugin: zerorun.fleet.instances\nset_connection: true\nconfig_file: %s\n" % config)
    for host in inventory.hosts.values():
        assert host.vars["ansible_zerorun_config"] == str(config)
        assert "ansible_zerorun_broker_timeout" not in host.vars  # the default is the connection's too
    plain = load(tmp_path, "plugin: zerorun.fleet.instances\nconfig_file: %s\n" % config)
    assert not any("ansible_zerorun_config" in h.vars for h in plain.hosts.values())


def test_constructed_options(tmp_path, fake_broker):
    inventory = load(tmp_path, "\n".join([
        "plugin: zerorun.fleet.instances",
        "compose:",
        "  ansible_host: zerorun_hostname",
        "groups:",
        "  production: zerorun_tags.env == 'prod'",
        "keyed_groups:",
        "  - key: zerorun_platform",
        "    prefix: platform",
    ]) + "\n")
    assert inventory.hosts["i-web1"].vars["ansible_host"] == "i-web1.example"
    assert [h.name for h in inventory.groups["production"].get_hosts()] == ["i-web1"]
    assert "platform_Linux" in inventory.groups


def test_broker_options_from_environment(tmp_path, fake_broker, monkeypatch):
    monkeypatch.setenv("ZERORUN_ENDPOINT", "tcp://from-env:5556")
    monkeypatch.setenv("ZERORUN_BROKER_TIMEOUT", "3")
    load(tmp_path, "plugin: zerorun.fleet.instances\n")
    _, seen_options = fake_broker
    assert seen_options[-1]["endpoint"] == "tcp://from-env:5556"
    assert float(seen_options[-1]["broker_timeout"]) == 3.0


def test_cache_serves_second_parse(tmp_path, fake_broker):
    calls, _ = fake_broker
    config = "plugin: zerorun.fleet.instances\ncache: true\ncache_plugin: ansible.builtin.jsonfile\n" \
        "cache_connection: %s\n" % (tmp_path / "cache")
    load(tmp_path, config, cache=False)  # refresh: fetches and fills the cache
    load(tmp_path, config, cache=True)
    assert len(calls) == 1


def test_bad_target_is_a_clean_error(tmp_path, fake_broker):
    with pytest.raises(AnsibleParserError, match="invalid target"):
        load(tmp_path, "plugin: zerorun.fleet.instances\ntargets: [role=web]\n")


def test_broker_error_is_a_clean_error(tmp_path, monkeypatch):
    @contextlib.contextmanager
    def connect(options, kind="module"):
        raise broker.BrokerError("no answer from the broker at tcp://x within 10s")
        yield  # pragma: no cover

    monkeypatch.setattr(broker, "connect", connect)
    with pytest.raises(AnsibleParserError, match="no answer from the broker"):
        load(tmp_path, "plugin: zerorun.fleet.instances\n")


def test_facts_are_host_variables_for_keyed_groups(tmp_path, monkeypatch):
    reported = protocol.Facts(os=protocol.OsFacts(id="ubuntu", version="22.04"), ip=["10.0.0.7"], cpus=8)
    with_facts = [protocol.InstanceView(**{**protocol.to_builtins(FLEET[0]), "facts": reported,
                                           "pending_tags": {"role": "db"}}), FLEET[1]]

    @contextlib.contextmanager
    def connect(options, kind="module"):
        yield FakeClient([protocol.convert(protocol.to_builtins(v), protocol.InstanceView) for v in with_facts], [])

    monkeypatch.setattr(broker, "connect", connect)
    inventory = load(tmp_path, "plugin: zerorun.fleet.instances\nkeyed_groups:\n  - key: zerorun_facts.os.id\n"
                               "    prefix: os\ncompose:\n  first_ip: zerorun_facts.ip | first | default('none')\n")
    assert set(inventory.groups["os_ubuntu"].get_hosts()) == {inventory.hosts["i-web1"]}
    web1, web2 = inventory.hosts["i-web1"].vars, inventory.hosts["i-web2"].vars
    assert web1["zerorun_facts"]["cpus"] == 8 and web1["first_ip"] == "10.0.0.7"
    assert web1["zerorun_pending_tags"] == {"role": "db"}
    assert web2["zerorun_facts"]["os"]["id"] == "" and web2["first_ip"] == "none"  # no facts: every key, empty
    assert "os_" not in inventory.groups


def test_set_connection_passes_on_only_the_settings_written_in_the_file(tmp_path, fake_broker, monkeypatch):
    """ZERORUN_CONFIG (and the other variables) of the inventory run became host variables, which
    beat the environment of the run that used the hosts: under AWX, the inventory update's
    injected config file, deleted with it, was where every job's connection looked."""
    monkeypatch.setenv("ZERORUN_CONFIG", str(tmp_path / "inventory-update.yaml"))
    monkeypatch.setenv("ZERORUN_ENDPOINT", "tcp://from-env:5556")
    monkeypatch.setenv("ZERORUN_BROKER_TIMEOUT", "3")
    inventory = load(tmp_path, "plugin: zerorun.fleet.instances\nset_connection: true\nbroker_key: %s\n"
                     % (tmp_path / "broker.key"))
    _, seen_options = fake_broker
    assert seen_options[-1]["config_file"] == str(tmp_path / "inventory-update.yaml")  # used to list them
    for host in inventory.hosts.values():
        given = {k: v for k, v in host.vars.items() if k.startswith("ansible_")}
        assert given == {"ansible_connection": "zerorun.fleet.agent",
                         "ansible_zerorun_broker_key": str(tmp_path / "broker.key")}
