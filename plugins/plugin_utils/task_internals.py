# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""The private parts of ansible-core that batch coalescing reads, behind one small adapter.

Coalescing (plugin_utils/coalesce.py) must tell whether every host of a play batch runs a task
with the same arguments, and must name the task and the play in a key that all forks compute
alike. ansible-core has no public API for either: the answers sit in private attributes
(``_uuid``, ``_parent``, ``_ds``) and in ``ModuleArgsParser``. Every such access is here and
nowhere else, so that a change in ansible-core breaks one file, which
tests/integration/test_ansible_versions.py runs under each supported ansible-core (2.15 and up).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping


class Unknown(Exception):
    """ansible-core did not give what was asked for (raw task data, parsable arguments)."""


def task_uuid(task: Any) -> str:
    """Unique per task of the playbook, equal in every fork."""
    return task._uuid


def play_uuid(task: Any) -> str | None:
    play = task.get_play() if hasattr(task, "get_play") else None
    return getattr(play, "_uuid", None)


def play_strategy(task: Any) -> str | None:
    play = task.get_play() if hasattr(task, "get_play") else None
    return None if play is None else (play.strategy or "linear")


def is_handler(task: Any) -> bool:
    from ansible.playbook.handler import Handler

    return isinstance(task, Handler)


def is_looped(task: Any) -> bool:
    return task.loop is not None or bool(getattr(task, "loop_with", None))


def parents(task: Any) -> Iterator[Any]:
    """The blocks and includes around a task, innermost first."""
    parent = getattr(task, "_parent", None)
    while parent is not None:
        yield parent
        parent = getattr(parent, "_parent", None)


def in_dynamic_include(task: Any) -> bool:
    """Inside an include_* (not import_*): only the hosts that include it run the task."""
    from ansible.playbook.task_include import TaskInclude

    return any(isinstance(p, TaskInclude) and not p.statically_loaded for p in parents(task))


def raw_arguments(task: Any) -> Mapping[str, Any]:
    """The task's module arguments as written in the playbook, before templating (so that a
    ``{{ }}`` in them is seen); raises Unknown when ansible-core does not give them."""
    raw = getattr(task, "_ds", None)
    if not isinstance(raw, Mapping):
        raise Unknown("no raw task")
    from ansible.parsing.mod_args import ModuleArgsParser

    try:
        _action, args, _delegate = ModuleArgsParser(raw, collection_list=task.collections).parse(
            skip_action_validation=True)
    except Exception:  # pylint: disable=broad-except
        raise Unknown("unparsable task") from None
    return args or {}
