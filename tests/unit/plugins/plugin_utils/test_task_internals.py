"""The adapter over ansible-core's private task attributes, on real Play objects of the installed
ansible-core (tests/integration/test_ansible_versions.py runs coalescing under the others)."""

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.play import Play
from ansible.vars.manager import VariableManager

from ansible_collections.zerorun.fleet.plugins.plugin_utils import task_internals


def _play(tasks, handlers=(), strategy=None):
    loader = DataLoader()
    ds = {"name": "p", "hosts": "all", "gather_facts": False, "tasks": tasks, "handlers": list(handlers)}
    if strategy:
        ds["strategy"] = strategy
    return Play.load(ds, variable_manager=VariableManager(loader=loader), loader=loader)


def _tasks(play):
    return [task for block in play.compile() for task in block.block]


def test_uuids_name_the_task_and_its_play():
    play = _play([{"zerorun.fleet.run_command": {"commands": "a"}},
                  {"zerorun.fleet.run_command": {"commands": "b"}}])
    first, second = [t for t in _tasks(play) if t.action == "zerorun.fleet.run_command"]
    assert task_internals.task_uuid(first) != task_internals.task_uuid(second)
    assert task_internals.play_uuid(first) == task_internals.play_uuid(second) == play._uuid
    assert task_internals.play_strategy(first) == "linear"


def test_raw_arguments_are_the_written_ones():
    play = _play([{"zerorun.fleet.run_command": {"commands": "echo {{ inventory_hostname }}"}},
                  {"name": "free form", "zerorun.fleet.run_command": "commands=uptime"}])
    templated, free_form = [t for t in _tasks(play) if t.action == "zerorun.fleet.run_command"]
    assert task_internals.raw_arguments(templated) == {"commands": "echo {{ inventory_hostname }}"}
    assert task_internals.raw_arguments(free_form)["commands"] == "uptime"


def test_raw_arguments_of_a_task_without_raw_data():
    play = _play([{"zerorun.fleet.run_command": {"commands": "a"}}])
    task = [t for t in _tasks(play) if t.action == "zerorun.fleet.run_command"][0]
    task._ds = None
    with pytest.raises(task_internals.Unknown, match="no raw task"):
        task_internals.raw_arguments(task)


def test_loops_handlers_and_parents():
    play = _play([{"block": [{"zerorun.fleet.run_command": {"commands": "a"}, "loop": [1, 2]}]}],
                 handlers=[{"name": "h", "zerorun.fleet.run_command": {"commands": "h"}}])
    task = [t for t in _tasks(play) if t.action == "zerorun.fleet.run_command"][0]
    assert task_internals.is_looped(task)
    assert not task_internals.is_handler(task)
    assert list(task_internals.parents(task))  # the block (and the play's implicit ones)
    assert not task_internals.in_dynamic_include(task)
    handler = play.handlers[0].block[0]
    assert task_internals.is_handler(handler)
