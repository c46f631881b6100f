"""The broker and agent roles' metadata agree with their defaults, READMEs and the daemons' flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
ROLES = REPO / "roles"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def defaults(role: str) -> dict:
    return load(ROLES / role / "defaults" / "main.yml")


def spec(role: str) -> dict:
    return load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", ["broker", "agent"])
def test_argument_specs_document_every_default(role):
    d, s = defaults(role), spec(role)
    assert sorted(d) == sorted(s), "defaults/main.yml and meta/argument_specs.yml list different variables"
    for name, option in s.items():
        assert option.get("description"), name
        assert "default" in option, name
        assert option["default"] == d[name], f"{name}: spec default {option['default']!r} != {d[name]!r}"


@pytest.mark.parametrize("role", ["broker", "agent"])
def test_readme_lists_every_variable(role):
    readme = (ROLES / role / "README.md").read_text()
    missing = [name for name in defaults(role) if f"`{name}`" not in readme]
    assert not missing


def test_shared_variables_have_the_same_defaults():
    b, a = defaults("broker"), defaults("agent")
    shared = {k for k in b if not k.startswith(("zerorun_broker_", "zerorun_agent_"))}
    assert shared == {k for k in a if not k.startswith(("zerorun_broker_", "zerorun_agent_"))}
    assert {k: b[k] for k in shared} == {k: a[k] for k in shared}


@pytest.mark.parametrize("template", sorted(ROLES.glob("*/templates/*.j2")), ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_templates_start_with_ansible_managed(template):
    assert template.read_text().startswith("{{ ansible_managed | comment }}\n")


@pytest.mark.parametrize("role", ["broker", "agent"])
def test_handlers_listen(role):
    handlers = load(ROLES / role / "handlers" / "main.yml")
    assert handlers and all(h.get("listen") for h in handlers)


@pytest.mark.parametrize("role, module", [("broker", "zmq_broker.main"), ("agent", "agent.main")])
def test_config_keys_are_daemon_options(role, module):
    """Every key the role writes into the daemon's YAML config is one of the daemon's flags."""
    import importlib

    parser = importlib.import_module(module).build_parser()
    known = {a.dest for a in parser._actions} - {"help", "config", "version"}
    written = set(load(ROLES / role / "vars" / "main.yml")[f"_zerorun_{role}_config"])
    assert written <= known, written - known


@pytest.mark.parametrize("role", ["broker", "agent"])
def test_default_package_is_the_wheel_make_dist_builds(role):
    """roles/ROLE/../../dist/ is <checkout>/dist/, where `make dist` writes the wheel of this version."""
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert load(REPO / "galaxy.yml")["version"] == version
    package = defaults(role)["zerorun_package"]
    assert package == "{{ role_path | dirname | dirname }}/dist/zerorun-%s-py3-none-any.whl" % version
    makefile = (REPO / "Makefile").read_text()
    assert "DIST ?= dist" in makefile and "pip wheel" in makefile
