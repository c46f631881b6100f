"""The batch rendezvous: pure state steps, the pre-assignment rule, and real processes."""

import multiprocessing
import os

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.play import Play
from ansible.vars.manager import VariableManager

from ansible_collections.zerorun.fleet.plugins.plugin_utils import coalesce


def test_first_host_leads_preassigned_round_and_others_claim_it():
    state = {}
    assert coalesce.claim(state, "a", "i-a", {"a": "i-a", "b": "i-b"}, 1.0) == (0, True)
    assert coalesce.claim(state, "b", "i-b", {"a": "i-a", "b": "i-b"}, 1.1) == (0, False)
    assert state["rounds"][0]["open"] is False
    # the same host again (a retry, a repeated item): a new round, never the old result
    assert coalesce.claim(state, "a", "i-a", {"a": "i-a", "b": "i-b"}, 2.0) == (1, True)


def test_gathering_round_takes_arrivals_until_closed():
    state = {}
    assert coalesce.claim(state, "a", "i-a", None, 1.0) == (0, True)
    assert coalesce.claim(state, "b", "i-b", None, 1.1) == (0, False)
    assert state["rounds"][0]["members"] == {"a": "i-a", "b": "i-b"}
    state["rounds"][0]["open"] = False
    assert coalesce.claim(state, "c", "i-c", None, 1.2) == (1, True)


@pytest.mark.parametrize("members, now, last_join, done", [
    ({"a": 1, "b": 1}, 1.0, 1.0, True),  # everyone expected arrived
    ({"a": 1}, 1.5, 1.0, False),  # still within the quiet period
    ({"a": 1}, 2.1, 1.0, True),  # quiet for long enough
    ({"a": 1}, 11.0, 10.9, True),  # gathering too long
])
def test_gathering_complete(members, now, last_join, done):
    assert coalesce.gathering_complete(members, {"a", "b"}, 0.5, last_join, now, quiet=1.0, max_gather=10.0) is done


def test_all_done():
    rnd = {"members": {"a": 1, "b": 1}, "done": ["a"], "open": False}
    assert not coalesce.all_done({"rounds": [rnd]})
    rnd["done"].append("b")
    assert coalesce.all_done({"rounds": [rnd]})


def test_key_depends_on_arguments_and_batch_order_does_not_matter():
    key = coalesce.batch_key(1, "p", "t", ["a", "b"], False, {"commands": "x"})
    assert key == coalesce.batch_key(1, "p", "t", ["b", "a"], False, {"commands": "x"})
    assert key != coalesce.batch_key(1, "p", "t", ["a", "b"], False, {"commands": "y"})


def _task(**keywords):
    loader = DataLoader()
    task_ds = dict({"zerorun.fleet.run_command": keywords.pop("args", {"commands": "uptime"})}, **keywords)
    play_ds = {"hosts": "all", "gather_facts": False, "tasks": [task_ds]}
    if "strategy" in keywords:
        play_ds["strategy"] = task_ds.pop("strategy")
    play = Play.load(play_ds, loader=loader, variable_manager=VariableManager(loader=loader))
    return [t for b in play.compile() for t in b.block if t.action == "zerorun.fleet.run_command"][0]


@pytest.mark.parametrize("keywords, blocker", [
    ({}, None),
    ({"args": {"commands": "uptime", "endpoint": "{{ broker }}"}}, None),  # connection options may vary
    ({"when": "x"}, "when"),
    ({"loop": [1, 2]}, "loop"),
    ({"until": "r is success", "register": "r"}, "until"),
    ({"run_once": True}, "run_once"),
    ({"delegate_to": "localhost"}, "delegate_to"),
    ({"strategy": "free"}, "strategy"),
    ({"args": {"commands": "echo {{ inventory_hostname }}"}}, "templated arguments"),
])
def test_preassignment_blocker(keywords, blocker):
    assert coalesce.preassignment_blocker(_task(**keywords), ("endpoint",)) == blocker


def _join_and_get(directory, host, batch, queue):
    rendezvous = coalesce.Rendezvous("k", directory)
    ticket = rendezvous.join(host, "i-" + host, {h: "i-" + h for h in batch})
    if ticket.leader:
        rendezvous.publish(ticket, command_id="cmd-" + host)
        command_id = "cmd-" + host
    else:
        command_id = rendezvous.await_command(ticket, timeout=10)
    rendezvous.finish(ticket)
    queue.put((host, ticket.leader, command_id))


def test_processes_agree_on_one_leader_and_clean_up(state_dir):
    batch = ["h%d" % i for i in range(6)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_join_and_get, args=(state_dir, h, batch, queue)) for h in batch]
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=20) for _ in batch]
    for p in procs:
        p.join(10)
    leaders = [host for host, leader, _ in outcomes if leader]
    assert len(leaders) == 1
    assert {command_id for _, _, command_id in outcomes} == {"cmd-" + leaders[0]}
    assert [name for name in os.listdir(state_dir) if name.endswith(".json")] == []


def test_follower_times_out_when_the_leader_never_sends(state_dir):
    rendezvous = coalesce.Rendezvous("k", state_dir)
    rendezvous.join("a", "i-a", {"a": "i-a", "b": "i-b"})
    follower = rendezvous.join("b", "i-b", {"a": "i-a", "b": "i-b"})
    with pytest.raises(coalesce.CoalesceError, match="host a, .* did not send it"):
        rendezvous.await_command(follower, timeout=0.1)


def test_refuses_a_shared_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(coalesce.CoalesceError, match="not a private directory"):
        coalesce.Rendezvous("k", str(shared))
