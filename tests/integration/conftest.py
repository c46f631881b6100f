"""Integration fixtures: a real broker and real agents on 127.0.0.1, stopped after each test."""

from __future__ import annotations

import uuid

import pytest

from zerorun.testing import LocalFleet
from zerorun.testing.cluster import LocalCluster

from tests.small_disk_support import small_disk_at


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def _dump_logs(fleet: LocalFleet) -> None:
    print("----- broker log -----")
    print(fleet.broker_log()[-6000:])
    for instance_id in fleet.agents:
        print(f"----- agent {instance_id} log -----")
        print(fleet.agent_log(instance_id)[-3000:])


@pytest.fixture
def small_disk(tmp_path):
    """A full disk for real (``tests.small_disk_support``). Ask for it before the fixture whose
    processes write there, so that they stop before it goes."""
    with small_disk_at(tmp_path / "small-disk") as disk:
        yield disk


@pytest.fixture
def small_disk_few_inodes(tmp_path):
    """``small_disk`` whose fill() leaves no room for a new file or directory either."""
    with small_disk_at(tmp_path / "small-disk", inodes=200) as disk:
        yield disk


@pytest.fixture
def fleet_factory(tmp_path, request):
    """Builds LocalFleets (auto-accept by default); every process is stopped afterwards."""
    made: list[LocalFleet] = []

    def make(name: str = "fleet", **kwargs) -> LocalFleet:
        fleet = LocalFleet(tmp_path / name, **kwargs)
        made.append(fleet)
        return fleet

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for fleet in made:
        if failed:
            _dump_logs(fleet)
        fleet.close()


@pytest.fixture
def fleet(fleet_factory):
    """A running broker (auto-accept on), no agents yet."""
    f = fleet_factory()
    f.start_broker()
    return f


@pytest.fixture
def web_db_fleet(fleet):
    """Broker plus web-1, web-2 (role=web) and db-1 (role=db, env=prod)."""
    fleet.start_agents({"web-1": {"role": "web", "env": "prod"}, "web-2": {"role": "web", "env": "dev"},
                        "db-1": {"role": "db", "env": "prod"}})
    return fleet


@pytest.fixture
def cluster_factory(postgres_server, tmp_path, request):
    """Builds LocalClusters: N brokers on a fresh database of the test PostgreSQL server, started
    with ``broker_args``; every process is stopped and the database dropped afterwards."""
    made: list[tuple[LocalCluster, str]] = []

    def make(brokers: int, *broker_args: str, auto_accept: bool = True) -> LocalCluster:
        dsn = postgres_server.create_database("cl_" + uuid.uuid4().hex[:10])
        cluster = LocalCluster(tmp_path / f"cluster{len(made) or ''}", brokers, dsn, postgres_server.password_file)
        if not auto_accept:  # tokens and operators accept agents, not --auto-accept
            for fleet in cluster.fleets:
                fleet.auto_accept = False
        made.append((cluster, dsn))
        cluster.start(*broker_args)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster, dsn in made:
        if failed:
            print(cluster.logs())
            for fleet in cluster.fleets:
                for instance_id in fleet.agents:
                    print(f"----- agent {instance_id} -----\n{fleet.agent_log(instance_id)[-2000:]}")
        cluster.close()
        postgres_server.drop_database(dsn.rsplit("/", 1)[1])
