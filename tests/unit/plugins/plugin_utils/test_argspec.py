"""The action plugins' argument specs come from the module stubs' docs, and agree with ansible-doc."""

import pytest
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.plugins.loader import fragment_loader, module_loader
from ansible.utils.plugin_docs import get_docstring

from ansible_collections.zerorun.fleet.plugins.doc_fragments.broker import (
    CONNECTION_INI_SECTION, CONNECTION_VARS, ENV_VARS, ModuleDocFragment)
from ansible_collections.zerorun.fleet.plugins.plugin_utils import argspec, broker

MODULES = ("run_command", "command_info", "instance_info", "document")


@pytest.mark.parametrize("name", MODULES)
def test_spec_matches_what_ansible_doc_renders(name):
    path = module_loader.find_plugin("zerorun.fleet." + name)
    doc = get_docstring(path, fragment_loader, collection_name="zerorun.fleet", is_module=True)[0]
    rendered = doc["options"]
    derived = argspec.module_argument_spec(name)
    assert set(derived) == set(rendered)
    for option, entry in derived.items():
        assert entry["type"] == rendered[option].get("type", "str"), option
        for key in ("default", "choices", "elements", "required", "aliases"):
            assert entry.get(key) == rendered[option].get(key), (option, key)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_the_broker_options_with_env_fallbacks(name):
    spec = argspec.module_argument_spec(name)
    for option in broker.BROKER_OPTIONS:
        assert spec[option]["fallback"][1] == [ENV_VARS[option]]


def test_env_fallback_fills_options(monkeypatch):
    monkeypatch.setenv("ZERORUN_ENDPOINT", "tcp://env:1")
    result = ArgumentSpecValidator(argspec.module_argument_spec("instance_info")).validate({})
    assert result.validated_parameters["endpoint"] == "tcp://env:1"
    assert result.validated_parameters["include_offline"] is False


def test_spec_copies_are_independent():
    first = argspec.module_argument_spec("run_command")
    first["wait"]["default"] = False
    assert argspec.module_argument_spec("run_command")["wait"]["default"] is True


def test_fragment_variants_agree():
    """The module and plugin variants are written out twice (sanity wants literals): same options,
    same types, defaults and texts, the env var named in the module text and set in the plugin's."""
    modules = argspec.fragment_options("zerorun.fleet.broker")
    plugin = argspec.fragment_options("zerorun.fleet.broker.plugin")
    assert list(modules) == list(plugin) == list(ENV_VARS) and set(ENV_VARS) == set(broker.BROKER_OPTIONS)
    assert "env:" not in ModuleDocFragment.DOCUMENTATION
    for name, env in ENV_VARS.items():
        assert plugin[name]["env"] == [{"name": env}]
        assert modules[name]["description"][-1] == "The environment variable E(%s) is used when this is not set." % env
        assert modules[name]["description"][:-1] == plugin[name]["description"]
        for key in ("type", "default"):
            assert modules[name].get(key) == plugin[name].get(key)


def test_connection_variant_adds_vars_and_ini():
    """The connection plugin takes the same settings from host/group variables and ansible.cfg too."""
    plugin = argspec.fragment_options("zerorun.fleet.broker.plugin")
    connection = argspec.fragment_options("zerorun.fleet.broker.connection")
    assert list(connection) == list(plugin) == list(CONNECTION_VARS)
    for name, var in CONNECTION_VARS.items():
        assert connection[name]["vars"] == [{"name": var}]
        assert connection[name]["ini"] == [{"section": CONNECTION_INI_SECTION, "key": name}]
        for key in ("type", "default", "env", "description"):
            assert connection[name].get(key) == plugin[name].get(key), (name, key)


def test_foreign_fragments_are_ignored():
    assert argspec.fragment_options("ansible.builtin.action_common_attributes") == {}


def test_suboptions_become_nested_specs():
    spec = argspec.options_to_argspec({"outer": {"type": "dict", "suboptions": {"inner": {"type": "int", "default": 1}}}})
    assert spec == {"outer": {"type": "dict", "options": {"inner": {"type": "int", "default": 1}}}}


def test_keep_strings_whole():
    assert argspec.keep_strings_whole({"targets": "tag:a=b,c"}, "targets") == {"targets": ["tag:a=b,c"]}
    assert argspec.keep_strings_whole({"targets": ["x"]}, "targets") == {"targets": ["x"]}
