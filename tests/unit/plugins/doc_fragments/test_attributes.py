"""The modules' shared attributes come from the zerorun.fleet.attributes fragment, as ansible-doc
renders them, and no module writes them out again."""

import pytest
import yaml
from ansible.plugins.loader import fragment_loader, module_loader
from ansible.utils.plugin_docs import get_docstring

from ansible_collections.zerorun.fleet.plugins.doc_fragments.attributes import ModuleDocFragment

MODULES = ("run_command", "command_info", "instance_info", "document")
READ_ONLY = ("command_info", "instance_info")


def rendered(name):
    path = module_loader.find_plugin("zerorun.fleet." + name)
    return get_docstring(path, fragment_loader, collection_name="zerorun.fleet", is_module=True)[0]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_the_shared_attributes(name):
    attributes = rendered(name)["attributes"]
    shared = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)["attributes"]
    assert attributes["platform"] == shared["platform"]
    assert {"check_mode", "diff_mode", "platform"} <= set(attributes)
    if name in READ_ONLY:
        assert attributes["diff_mode"]["support"] == "none"


@pytest.mark.parametrize("name", MODULES)
def test_no_module_repeats_the_fragment(name):
    stub = __import__("ansible_collections.zerorun.fleet.plugins.modules." + name, fromlist=["DOCUMENTATION"])
    own = yaml.safe_load(stub.DOCUMENTATION).get("attributes") or {}
    assert "platform" not in own
    if name in READ_ONLY:
        assert not own
