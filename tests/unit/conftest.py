"""Unit tests import the plugins by their collection path, as Ansible does.

The collection root is the checkout's collection/ link (collection/ansible_collections/zerorun/
fleet -> repository root) or, in a copy such as the sanity run's, the ansible_collections tree
above this file. Ansible's collection loader is installed for it, so plugin options, doc fragments
and ``ansible_collections.zerorun.fleet...`` imports resolve exactly as in ansible-playbook.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _collections_root() -> Path:
    for parent in Path(__file__).absolute().parents:
        if parent.name == "ansible_collections":
            return parent.parent
    return REPO / "collection"


if str(REPO) not in sys.path:  # the zerorun package, until it is pip-installed
    sys.path.append(str(REPO))

from ansible.plugins.loader import init_plugin_loader  # noqa: E402
from ansible.utils.collection_loader import AnsibleCollectionConfig  # noqa: E402

if AnsibleCollectionConfig.collection_finder is None:  # pytest-ansible may have installed it already
    init_plugin_loader([str(_collections_root())])


@pytest.fixture
def state_dir(tmp_path):
    directory = tmp_path / "rendezvous"
    directory.mkdir(mode=0o700)
    return str(directory)
