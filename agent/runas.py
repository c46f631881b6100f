"""Running a step as another user: who that user is here, and what the step's process gets.

A step with ``run_as`` runs with that user's uid, gid and supplementary groups (set by
``subprocess.Popen(user=, group=, extra_groups=)``, no ``preexec_fn``), a login-like environment
(HOME, USER, LOGNAME, SHELL, PATH, as ``su -`` gives; of the agent's own environment only the
locale and time zone are kept) and a working directory that user can enter (its home, else ``/``).
Its script goes into a directory of its own (root's, mode 0711: the user can read its script by
name, list nothing) as a file the user owns (0500); its output goes to files it only inherits as
open descriptors, never by name.

Every user an invocation names is looked up before its first step starts: an unknown user (or an
agent that cannot switch users) fails the whole invocation with the reason, and nothing runs.

``spawn_options`` is all that the process spawn needs (``supervisor.Supervisor._run_step``: one
``**`` in its ``Popen`` call, and the script written with ``write_script``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

import msgspec

from zerorun.identifiers import user_name_problem

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
KEPT_ENV = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")


class RunAsError(Exception):
    """The invocation cannot run as asked; the message says why, for the operator."""


class Account(msgspec.Struct, frozen=True):
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @property
    def switches(self) -> bool:
        """Whether the process must change user (running as the agent's own user does not)."""
        return self.uid != os.geteuid()


def lookup(name: str) -> Account:
    """The account of a user name, or RunAsError naming what is wrong."""
    problem = user_name_problem(name)
    if problem:
        raise RunAsError(problem)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RunAsError(f"run-as user {name!r} does not exist on this instance") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    account = Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/",
                      entry.pw_shell or "/bin/sh")
    if account.switches and os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        raise RunAsError(f"the agent runs as {me!r} and cannot run steps as {name!r} (run the agent as root)")
    return account


def resolve(names: Iterable[str]) -> dict[str, Account]:
    """Every named user, looked up once; RunAsError for the first that cannot be used."""
    return {name: lookup(name) for name in sorted(set(n for n in names if n))}


def environment(base: dict[str, str], account: Account) -> dict[str, str]:
    """A login-like environment for ``account`` (the step's own variables are added later)."""
    env = {key: base[key] for key in KEPT_ENV if key in base}
    env.update(HOME=account.home, USER=account.name, LOGNAME=account.name, SHELL=account.shell,
               PATH=ROOT_PATH if account.uid == 0 else USER_PATH)
    return env


def can_enter(path: str, account: Account) -> bool:
    """Whether ``account`` may search every directory on the way to ``path`` and ``path`` itself
    (mode bits; ACLs are not consulted). ``chdir`` happens before the switch of user, so this
    is checked here."""
    if account.uid == 0:
        return os.path.isdir(path)
    current = Path("/")
    for part in Path(os.path.abspath(path)).parts[1:] + ("",):
        try:
            info = os.stat(current)
        except OSError:
            return False
        if not stat.S_ISDIR(info.st_mode):
            return False
        if info.st_uid == account.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in account.groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return False
        if part:
            current = current / part
    return True


def working_directory(requested: str, account: Account) -> str:
    """The step's directory: the one it asks for (RunAsError if the user cannot enter it), else
    the user's home, else ``/``."""
    if requested:
        if not can_enter(requested, account):
            raise RunAsError(f"user {account.name!r} cannot enter the working directory {requested}")
        return requested
    return account.home if can_enter(account.home, account) else "/"


def spawn_options(account: Account) -> dict[str, Any]:
    """Keyword arguments of ``subprocess.Popen`` that switch to the account."""
    if not account.switches:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups)}


def script_directory(work_dir: Path, account: Account) -> Path:
    """Where the account's scripts go: the invocation's own work directory when no switch is
    needed, else a new directory under the system's temporary directory (root's, 0711)."""
    if not account.switches:
        return work_dir
    path = Path(tempfile.mkdtemp(prefix=f"zerorun-{account.name}-"))
    os.chmod(path, 0o711)
    return path


def write_script(path: Path, text: str, account: Account | None) -> None:
    """The step's script file: 0700 and the agent's; for another user, that user's and 0500."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    try:
        if account is not None and account.switches:
            os.fchown(fd, account.uid, account.gid)
            os.fchmod(fd, 0o500)
        with os.fdopen(fd, "w") as handle:
            fd = -1
            handle.write(text)
    finally:
        if fd >= 0:
            os.close(fd)


def remove_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

