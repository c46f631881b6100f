# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
name: instances
short_description: Zerorun instances as an inventory, grouped by tag
version_added: 0.1.0
description:
  - Lists the instances known to a Zerorun broker and makes each one an inventory host.
  - Each host is put in one group per tag, C(tag_<key>_<value>), and in a group for its ping status
    (C(zerorun_online), C(zerorun_connectionlost), C(zerorun_inactive)).
  - "A tag group's name has every character other than letters, digits and C(_) replaced with C(_)
    (as ansible-core's C(constructed) does), so different tags can give the same name, for example
    V(a b=c), V(a_b=c) and V(a=b_c) all give C(tag_a_b_c). Hosts of different tags are never merged this
    way. When the instances listed have two or more tags that give the same name, no host is put in the
    group of that name; each of those tags gets a group of its own, C(tag_<key>_<value>_<hash>), where
    C(<hash>) is 8 hexadecimal digits of the tag's SHA-256 (the same group for that tag on every run while
    the collision lasts); and a warning names the tags and their groups. A tag whose name no other tag
    shares keeps C(tag_<key>_<value>). To select hosts by an exact tag whatever its group name, use
    O(groups) with C(zerorun_tags), for example C('a b' in zerorun_tags and zerorun_tags['a b'] == 'c')."
  - A tag with an empty value gives C(tag_<key>_); the target V(tag:<key>=) selects its instances.
  - Uses a YAML configuration file whose name ends with C(zerorun.yml) or C(zerorun.yaml).
  - "Host variables it sets on every host: C(zerorun_instance_id), C(zerorun_tags) (a mapping), C(zerorun_platform),
    C(zerorun_platform_version), C(zerorun_hostname), C(zerorun_ping_status) (V(Online), V(ConnectionLost) or
    V(Inactive)), C(zerorun_agent_version), C(zerorun_last_seen) (Unix time), C(zerorun_key_fingerprint),
    C(zerorun_pending_tags) (the tags its agent proposes, awaiting C(zerorun tags approve); V(None) when none)
    and C(zerorun_facts). Use them in C(compose), C(groups) and C(keyed_groups)."
  - "C(zerorun_facts) is what the agent last reported about its machine, without a C(setup) run: C(os) (C(id),
    C(version), C(name), C(like)), C(kernel), C(arch), C(hostname), C(fqdn), C(ip) (a list), C(cpus),
    C(memory_mb), C(boot_time), C(agent_version), C(python_version); empty values when the agent reported none.
    Facts are the instance's own claims; the tags are the broker's."
  - "With O(set_connection=true) also C(ansible_connection=zerorun.fleet.agent), and the broker settings written
    in this file (C(ansible_zerorun_config) from O(config_file), C(ansible_zerorun_endpoint),
    C(ansible_zerorun_broker_key), C(ansible_zerorun_client_key_file), C(ansible_zerorun_broker_timeout)),
    so that the connection plugin reaches the broker the same way without further settings. Settings that come
    from the environment (E(ZERORUN_CONFIG)...) are not made host variables: the connection reads the
    environment of the run that uses it (under AWX, a job's credential gives it a config file of its own)."
  - Works as an AWX/AAP inventory source; the broker connection then comes from environment variables
    (for example injected by a custom credential type).
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker.plugin
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks the file as a configuration of this plugin.
    type: str
    required: true
    choices: ['zerorun.fleet.instances']
  targets:
    description:
      - Target expressions with the syntax of the C(zerorun) CLI (V(tag:role=web), V(tag:env), V(instance:ID)), AND-ed.
      - All instances when empty.
      - One target as a string, or a list of targets. A string is always one target, so
        V(tag:role=web,db) means role web or db (commas separate tag values, as in the CLI).
    type: raw
    default: []
  include_offline:
    description:
      - Also list instances whose agent never connected or is gone (ping status V(Inactive)).
      - By default only V(Online) and V(ConnectionLost) instances are hosts, each flagged by its ping status group.
    type: bool
    default: false
  hostnames:
    description:
      - What names the inventory hosts.
      - V(hostname) uses the host name reported by the agent, and falls back to the instance id when it is
        empty, already taken by another instance, or the id of another instance.
    type: str
    choices: ['instance_id', 'hostname']
    default: instance_id
  set_connection:
    description:
      - Set C(ansible_connection=zerorun.fleet.agent) on every host, so that ordinary modules run through the
        agent instead of SSH, and pass this file's broker settings on to that connection (host variables
        C(ansible_zerorun_config) and friends).
      - Set C(ansible_python_interpreter) too (for example with O(compose)); interpreter discovery through the
        agent takes the first C(python3) it finds.
    type: bool
    default: false
"""

EXAMPLES = r"""
# fleet.zerorun.yml: every online instance, grouped by tag
plugin: zerorun.fleet.instances
config_file: ~/.config/zerorun/client.yaml

# agents.zerorun.yml: run any module through the agents (ansible -i agents.zerorun.yml all -m ping)
plugin: zerorun.fleet.instances
config_file: ~/.config/zerorun/client.yaml
set_connection: true
compose:
  ansible_python_interpreter: "'/usr/bin/python3'"

# web.zerorun.yml: production web servers, named by host name, with extra groups
plugin: zerorun.fleet.instances
targets:
  - tag:env=prod
  - tag:role=web
hostnames: hostname
keyed_groups:
  - key: zerorun_platform
    prefix: platform
  - key: zerorun_facts.os.id
    prefix: os
groups:
  canary: zerorun_tags.canary | default('no') == 'yes'
  big: zerorun_facts.memory_mb > 16000
compose:
  ansible_host: zerorun_facts.ip | first | default(zerorun_hostname)
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/zerorun-inventory
cache_timeout: 300

# AWX: a project file naming the plugin; a credential of the type in
# meta/awx_credential_type.yml sets ZERORUN_CONFIG and ZERORUN_CLIENT_SECRET_KEY.
plugin: zerorun.fleet.instances
"""

import hashlib
from typing import Any, Callable, Iterable

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

from ansible_collections.zerorun.fleet.plugins.doc_fragments.broker import CONNECTION_VARS
from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker

CONNECTION_PLUGIN = "zerorun.fleet.agent"
SHOWN_BY_DEFAULT = ("Online", "ConnectionLost")


def instance_hostvars(instance: dict[str, Any]) -> dict[str, Any]:
    """Host variables of one instance, all prefixed ``zerorun_`` (never ``tags``: reserved)."""
    return {
        "zerorun_instance_id": instance["instance_id"],
        "zerorun_tags": dict(instance.get("tags") or {}),
        "zerorun_platform": instance.get("platform", ""),
        "zerorun_platform_version": instance.get("platform_version", ""),
        "zerorun_hostname": instance.get("hostname", ""),
        "zerorun_ping_status": instance.get("ping_status", ""),
        "zerorun_agent_version": instance.get("agent_version", ""),
        "zerorun_last_seen": instance.get("last_seen", 0.0),
        "zerorun_key_fingerprint": instance.get("key_fingerprint", ""),
        "zerorun_pending_tags": instance.get("pending_tags"),
        "zerorun_facts": facts_of(instance),
    }


EMPTY_FACTS = {"os": {"id": "", "version": "", "name": "", "like": []}, "kernel": "", "arch": "", "hostname": "",
               "fqdn": "", "ip": [], "cpus": 0, "memory_mb": 0, "boot_time": 0.0, "agent_version": "",
               "python_version": ""}


def facts_of(instance: dict[str, Any]) -> dict[str, Any]:
    """The instance's facts with every key present (empty when its agent reported none), so that
    ``keyed_groups`` and ``compose`` expressions never meet an undefined name."""
    reported = instance.get("facts") or {}
    facts = dict(EMPTY_FACTS, **{k: v for k, v in reported.items() if k in EMPTY_FACTS})
    facts["os"] = dict(EMPTY_FACTS["os"], **(reported.get("os") or {}))
    return facts


def tag_groups(instances: Iterable[dict[str, Any]],
               sanitize: Callable[[str], str]) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The group of every (key, value) tag of these instances, and a warning per collision.

    A tag's group is its sanitised ``tag_<key>_<value>``, unless another tag gives the same name
    (``a b=c`` and ``a_b=c``): then none of them gets that name, each gets that name and 8 hex
    digits of its own SHA-256 (more, should that be taken too), and the warning names them."""
    by_name: dict[str, set[tuple[str, str]]] = {}
    for instance in instances:
        for key, value in (instance.get("tags") or {}).items():
            by_name.setdefault(sanitize("tag_%s_%s" % (key, value)), set()).add((key, value))
    groups: dict[tuple[str, str], str] = {}
    warnings: list[str] = []
    taken = set(by_name)
    for name, tags in sorted(by_name.items()):
        if len(tags) == 1:
            groups[next(iter(tags))] = name
            continue
        own = []
        for key, value in sorted(tags):
            digest = hashlib.sha256(("%s\0%s" % (key, value)).encode("utf-8")).hexdigest()
            size = 8
            while name + "_" + digest[:size] in taken and size < len(digest):
                size += 8
            groups[(key, value)] = group = name + "_" + digest[:size]
            taken.add(group)
            own.append("%s (tag %s)" % (group, _tag_text(key, value)))
        warnings.append("zerorun.fleet.instances: the tags %s all give the group name %s; so that their hosts "
                        "are not merged, no host is put in %s and each tag has its own group: %s"
                        % (_and(_tag_text(k, v) for k, v in sorted(tags)), name, name, ", ".join(own)))
    return groups, warnings


def _tag_text(key: str, value: str) -> str:
    return "'%s=%s'" % (key, value)


def _and(texts: Iterable[str]) -> str:
    texts = list(texts)
    return ", ".join(texts[:-1]) + " and " + texts[-1]


def raw_group_names(instance: dict[str, Any]) -> list[str]:
    """Unsanitised names of the built-in groups: one per tag, one for the ping status."""
    names = ["tag_%s_%s" % (key, value) for key, value in sorted((instance.get("tags") or {}).items())]
    if instance.get("ping_status"):
        names.append("zerorun_%s" % instance["ping_status"].lower())
    return names


def target_list(value: Any) -> list[str]:
    """The targets option as a list of target strings; a string is ONE target (never split at
    commas, which separate the values of a tag target)."""
    value = broker.builtin_data(value)
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise AnsibleParserError("zerorun.fleet.instances: targets must be a target string or a list of them, got %r"
                             % (value,))


def visible(instances: Iterable[dict[str, Any]], include_offline: bool) -> list[dict[str, Any]]:
    """Online and ConnectionLost instances, or all of them with include_offline."""
    return [i for i in instances if include_offline or i.get("ping_status") in SHOWN_BY_DEFAULT]


def host_names(instances: list[dict[str, Any]], naming: str) -> list[str]:
    """Inventory names, unique: a missing or duplicate host name falls back to the instance id, and
    so does a host name that is another instance's id (that instance may need its id as its name:
    both were one inventory host, one instance's variables lost)."""
    names: list[str] = []
    taken: set[str] = set()
    ids = {instance["instance_id"] for instance in instances}
    for instance in instances:
        name = instance["instance_id"]
        hostname = instance.get("hostname") if naming == "hostname" else ""
        if hostname and hostname not in taken and (hostname == name or hostname not in ids):
            name = hostname
        taken.add(name)
        names.append(name)
    return names


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "zerorun.fleet.instances"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("zerorun.yml", "zerorun.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._written = set(self._read_config_data(path) or ())
        instances = self._cached_or_fetched(path, cache)
        self._populate(visible(instances, self.get_option("include_offline")))

    def _cached_or_fetched(self, path: str, cache: bool) -> list[dict[str, Any]]:
        """aws_ec2's cache rule: read the cache when enabled and allowed, refresh it otherwise."""
        cache_key = self.get_cache_key(path)
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        if use_cache:
            try:
                return self._cache[cache_key]
            except KeyError:
                update_cache = True
        instances = self._fetch()
        if update_cache:
            self._cache[cache_key] = instances
        return instances

    def _fetch(self) -> list[dict[str, Any]]:
        options = broker.builtin_data({name: self.get_option(name) for name in broker.BROKER_OPTIONS})
        targets = target_list(self.get_option("targets"))
        try:
            broker.check_targets(targets)
            # Always ask for offline ones too, so the cache serves both include_offline settings.
            with broker.connect(options, "inventory") as client:
                return broker.plain(client.instances(targets, include_offline=True))
        except broker.BrokerError as exc:
            raise AnsibleParserError("zerorun.fleet.instances: %s" % exc.message) from None

    def connection_vars(self) -> dict[str, Any]:
        """set_connection: the connection plugin's variables for the broker settings this file gives.

        Only those written in the file: a setting from the environment (ZERORUN_CONFIG...) is read
        by the connection from its own environment. Made a host variable, it was the inventory
        run's value frozen into the hosts, and beat the job's own: under AWX, whose inventory
        update and jobs each get a config file of their own from the credential, every task went
        to a file deleted with the inventory update."""
        found = {"ansible_connection": CONNECTION_PLUGIN}
        for option, var in CONNECTION_VARS.items():
            if option not in getattr(self, "_written", ()):
                continue
            value = broker.builtin_data(self.get_option(option))
            if value not in (None, "") and not (option == "broker_timeout" and value == broker.DEFAULT_BROKER_TIMEOUT):
                found[var] = value
        return found

    def _populate(self, instances: list[dict[str, Any]]) -> None:
        strict = self.get_option("strict")
        names = host_names(instances, self.get_option("hostnames"))
        connection = self.connection_vars() if self.get_option("set_connection") else {}
        groups_of_tags, collisions = tag_groups(instances, self._sanitize_group_name)
        for warning in collisions:
            self.display.warning(warning)
        for name, instance in zip(names, instances):
            self.inventory.add_host(name)
            hostvars = instance_hostvars(instance)
            hostvars.update(connection)
            for var, value in hostvars.items():
                self.inventory.set_variable(name, var, value)
            groups = [groups_of_tags[tag] for tag in sorted((instance.get("tags") or {}).items())]
            if instance.get("ping_status"):
                groups.append(self._sanitize_group_name("zerorun_%s" % instance["ping_status"].lower()))
            for group in groups:
                group = self.inventory.add_group(group)
                self.inventory.add_child(group, name)
            self._set_composite_vars(self.get_option("compose"), hostvars, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, name, strict=strict)
