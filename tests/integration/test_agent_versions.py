"""The broker refuses agents below --min-agent-version, with a message that says why (issue 19)."""

from __future__ import annotations

from zerorun import __version__
from zerorun.testing import wait_until


def test_an_agent_below_the_minimum_version_is_refused_with_a_clear_message(fleet_factory):
    fleet = fleet_factory()
    fleet.start_broker("--min-agent-version", "99.0")
    fleet.start_agent("old-1", {"role": "x"})
    wait_until(lambda: "older than this broker's minimum 99.0" in fleet.agent_log("old-1"),
               "the agent to log why it is refused")
    assert f"agent version {__version__} is older" in fleet.agent_log("old-1")
    assert "old-1" not in {v.instance_id for v in fleet.client().instances() if v.ping_status == "Online"}
    assert "older than the minimum 99.0" in fleet.broker_log()


def test_agents_at_the_minimum_version_are_welcomed_and_listed_with_it(fleet_factory):
    fleet = fleet_factory()
    fleet.start_broker("--min-agent-version", __version__)
    fleet.start_agents({"new-1": {"role": "x"}})
    proc = fleet.cli("instances")
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_a_minimum_that_is_not_a_version_is_refused_at_start(fleet_factory):
    fleet = fleet_factory()
    proc = fleet.start_broker("--min-agent-version", "soon", wait=False)
    assert proc.wait(timeout=30) == 2
    assert "is not a version" in fleet.broker_log() and "Traceback" not in fleet.broker_log()
