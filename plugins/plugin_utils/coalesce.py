# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

"""Coalescing the hosts of a play batch into ONE broker command.

Why: a ``run_command`` task without explicit targets runs once per inventory host, each in its
own fork (a separate process). One command per host would cost 100 broker commands for 100 hosts
and tie the fan-out to ``forks``; fan-out is the broker's job. So the hosts of a batch that run
the same task with the same arguments meet in a small state file; one of them (the leader)
sends one command for all of them, the others (followers) wait for its command id and then
read their own invocation from the broker.

The rendezvous:

- Directory ``<tmp>/zerorun-ansible-<uid>`` (mode 0700, checked to be ours). One lock file
  ``.lock`` taken with ``fcntl.flock`` and never deleted (no unlink race), one JSON state file
  per key, replaced atomically.
- Key: SHA-256 of (the forks' parent pid = this ansible run, play uuid, task uuid, the batch's
  host names, check mode, a fingerprint of the validated arguments without the broker connection
  options). Hosts running the task with different (templated) arguments get different keys and
  hence different commands.
- State: a list of rounds. A round has ``members`` (host -> instance id), ``claimed`` hosts, an
  ``open`` flag, a ``leader``, then ``command_id`` or ``error``, and the hosts ``done`` with it.
- An arriving host, under the lock: (1) claims the first round that lists it and that it has not
  claimed yet (it was pre-assigned by a leader); else (2) joins a round still open; else (3)
  opens a new round and leads it. A host never claims the same round twice, so a repeated task
  (retries, loop items with equal arguments) runs again instead of reusing an old result.
- A leader fills its round in one of two ways:

  * pre-assigned: when every host of the batch provably runs this task with these very
    arguments (see ``preassignment_blocker``), the leader lists the whole batch at once and
    sends immediately. Hosts whose fork starts later (``forks`` < batch size) find their
    invocation waiting: one command per batch whatever ``forks`` is.
  * gathering: otherwise the round stays open while hosts join, and closes when every batch
    host joined, or nobody joined for ``QUIET`` seconds, or after ``MAX_GATHER`` seconds. Only
    hosts that really run the task are in the command; a host that comes later leads a new
    round. With ``forks`` smaller than the batch this gives one command per wave of forks.

- The leader sends outside the lock, then records the command id or its error. Followers poll
  the state (bounded by a timeout) and fail with the leader's error if it failed. Everyone then
  waits for the command at the broker on its own, so no result depends on the leader's process
  after the send (only the order of the lines on screen does, see below).
- While the command runs, the leader alone shows its progress and live output (plugin_utils/
  live.py), then records which instances' output it showed (``shown``); a follower waits for
  that (bounded) before returning its result, so that the lines come before the results.
- Clean-up: each host marks itself done (after its wait); when every member of every round is
  done and no round is open, the state file is removed. State files of aborted runs are removed
  after three days by the next arrival.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from ansible_collections.zerorun.fleet.plugins.plugin_utils import task_internals

QUIET = 1.0
"""Gathering: close the round when nobody joined for this many seconds."""
MAX_GATHER = 10.0
"""Gathering: close the round after this many seconds whatever happens."""
POLL = 0.05
STALE_AFTER = 3 * 86400.0
LINEAR_STRATEGIES = ("linear", "ansible.builtin.linear", "ansible.legacy.linear")


class CoalesceError(Exception):
    """The batch's leader could not send the command, or never said anything."""


@dataclass
class Ticket:
    key: str
    index: int
    host: str
    leader: bool
    members: dict[str, str] = field(default_factory=dict)


def batch_key(run_id: Any, play_id: Any, task_id: Any, batch: Iterable[str], check_mode: bool,
              arguments: Mapping[str, Any]) -> str:
    material = json.dumps([run_id, play_id, task_id, sorted(batch), check_mode, arguments],
                          sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def claim(state: dict, host: str, instance_id: str,
          preassigned: Mapping[str, str] | Callable[[], Mapping[str, str]] | None,
          now: float) -> tuple[int, bool]:
    """Pure step (1)-(3) of the rendezvous on a loaded state; returns (round index, leader?).

    ``preassigned`` may be a callable: it is called only by the host that opens a round, so the
    other hosts of a batch never build the whole batch's member list (that would be quadratic)."""
    rounds = state.setdefault("rounds", [])
    for index, rnd in enumerate(rounds):
        if host in rnd["members"] and host not in rnd["claimed"]:
            rnd["claimed"].append(host)
            return index, False
    for index, rnd in enumerate(rounds):
        if rnd["open"] and host not in rnd["claimed"]:
            rnd["members"][host] = instance_id
            rnd["claimed"].append(host)
            return index, False
    if callable(preassigned):
        preassigned = preassigned()
    members = dict(preassigned) if preassigned else {}
    members[host] = instance_id
    rounds.append({"members": members, "claimed": [host], "open": not preassigned, "leader": host,
                   "command_id": None, "error": None, "done": [], "created": now})
    return len(rounds) - 1, True


def gathering_complete(members: Mapping[str, str], expected: set, started: float, last_join: float,
                       now: float, quiet: float = QUIET, max_gather: float = MAX_GATHER) -> bool:
    return set(members) >= expected or now - last_join >= quiet or now - started >= max_gather


def all_done(state: dict) -> bool:
    return all(not rnd["open"] and set(rnd["members"]) <= set(rnd["done"]) for rnd in state.get("rounds", []))


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_has_template(k) or _has_template(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_template(v) for v in value)
    return False


def preassignment_blocker(task: Any, ignored_keys: Iterable[str] = ()) -> str | None:
    """Why the whole batch cannot be pre-assigned to this task, or None when it can.

    Pre-assigning is only safe when every host of ``ansible_play_batch`` will run this task
    exactly once with the same arguments; anything that makes that host-dependent blocks it
    (the gathering mode then takes only the hosts that really arrive). What ansible-core keeps
    private is read through task_internals.
    """
    if task_internals.is_handler(task):
        return "handler"
    if task_internals.is_looped(task):
        return "loop"
    if task.when:
        return "when"
    if task.until:
        return "until"
    if task.run_once:
        return "run_once"
    if task.delegate_to:
        return "delegate_to"
    if task_internals.play_strategy(task) not in LINEAR_STRATEGIES:
        return "strategy"
    if task_internals.in_dynamic_include(task):
        return "dynamic include"
    try:
        raw_args = task_internals.raw_arguments(task)
    except task_internals.Unknown as exc:
        return str(exc)
    ignored = set(ignored_keys)
    if _has_template({k: v for k, v in raw_args.items() if k not in ignored}):
        return "templated arguments"
    for defaults in task.module_defaults or []:
        for entry in (defaults or {}).values():
            if isinstance(entry, Mapping) and _has_template({k: v for k, v in entry.items() if k not in ignored}):
                return "templated module_defaults"
    return None


class Rendezvous:
    """The state file of one key, guarded by the directory's lock file."""

    def __init__(self, key: str, directory: str | None = None):
        self.key = key
        self.directory = directory or os.path.join(tempfile.gettempdir(), "zerorun-ansible-%d" % os.getuid())
        self._ensure_directory()
        self._lock_path = os.path.join(self.directory, ".lock")
        self._state_path = os.path.join(self.directory, key + ".json")

    def _ensure_directory(self) -> None:
        try:
            os.mkdir(self.directory, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise CoalesceError("refusing to use %s: not a private directory of this user" % self.directory)

    @contextlib.contextmanager
    def _locked_state(self) -> Iterator[dict]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                self._write(state)
        finally:
            os.close(fd)

    def _read(self) -> dict:
        try:
            with open(self._state_path) as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {"rounds": []}

    def _write(self, state: dict) -> None:
        if not state.get("rounds") or all_done(state):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._state_path)
            return
        tmp = self._state_path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(state, handle)
        os.replace(tmp, self._state_path)

    def _remove_stale(self, now: float) -> None:
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".json") and path != self._state_path:
                with contextlib.suppress(OSError):
                    if now - os.stat(path).st_mtime > STALE_AFTER:
                        os.unlink(path)

    # -- the protocol ----------------------------------------------------------------------

    def join(self, host: str, instance_id: str,
             preassigned: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None) -> Ticket:
        with self._locked_state() as state:
            now = time.time()
            self._remove_stale(now)
            index, leader = claim(state, host, instance_id, preassigned, now)
            members = dict(state["rounds"][index]["members"])
        return Ticket(self.key, index, host, leader, members)

    def gather(self, ticket: Ticket, expected: set, quiet: float = QUIET, max_gather: float = MAX_GATHER) -> dict:
        """Leader of an open round: waits for the batch to join, closes the round, returns members."""
        started = last_join = time.time()
        seen = 0
        while True:
            with self._locked_state() as state:
                rnd = state["rounds"][ticket.index]
                now = time.time()
                if len(rnd["members"]) != seen:
                    seen, last_join = len(rnd["members"]), now
                if gathering_complete(rnd["members"], expected, started, last_join, now, quiet, max_gather):
                    rnd["open"] = False
                    ticket.members = dict(rnd["members"])
                    return ticket.members
            time.sleep(POLL)

    def publish(self, ticket: Ticket, command_id: str | None = None, error: str | None = None) -> None:
        with self._locked_state() as state:
            rnd = state["rounds"][ticket.index]
            rnd["open"] = False
            rnd["command_id"] = command_id
            rnd["error"] = error if command_id is None else None
            if command_id is None and not error:
                rnd["error"] = "the leader stopped before sending"

    def await_command(self, ticket: Ticket, timeout: float) -> str:
        """Follower: the command id the round's leader sent, or CoalesceError."""
        deadline = time.time() + timeout
        while True:
            with self._locked_state() as state:
                rnd = state["rounds"][ticket.index]
                if rnd["command_id"]:
                    return rnd["command_id"]
                if rnd["error"]:
                    raise CoalesceError("host %s sent this batch's command and failed: %s" % (rnd["leader"], rnd["error"]))
            if time.time() > deadline:
                raise CoalesceError("host %s, which sends this batch's command, did not send it within %gs"
                                    % (rnd["leader"], timeout))
            time.sleep(POLL)

    def record_shown(self, ticket: Ticket, instance_ids: Iterable[str]) -> None:
        """Leader: it has printed all it will print about the command (live output and progress);
        ``instance_ids`` are the instances whose output it showed up to their end."""
        with self._locked_state() as state:
            if ticket.index < len(state.get("rounds", [])):
                state["rounds"][ticket.index]["shown"] = sorted(instance_ids)

    def await_shown(self, ticket: Ticket, timeout: float) -> list[str] | None:
        """Follower: the instances the leader showed, once it is through (its lines then come
        before this host's result); None when it never said so within ``timeout``."""
        deadline = time.time() + timeout
        while True:
            with self._locked_state() as state:
                rounds = state.get("rounds", [])
                if ticket.index >= len(rounds):
                    return None
                rnd = rounds[ticket.index]
                if "shown" in rnd:
                    return list(rnd["shown"])
                if rnd["leader"] in rnd["done"]:
                    return []
            if time.time() > deadline:
                return None
            time.sleep(POLL)

    def finish(self, ticket: Ticket) -> None:
        with self._locked_state() as state:
            if ticket.index < len(state.get("rounds", [])):
                rnd = state["rounds"][ticket.index]
                if ticket.host not in rnd["done"]:
                    rnd["done"].append(ticket.host)
                if ticket.leader and rnd["open"]:
                    rnd["open"] = False
                    rnd["error"] = rnd["error"] or "the leader stopped before sending"
