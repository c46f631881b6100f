"""Run-as helpers of the agent without running a step: who a user is, what its step gets, and the
kept whole output read across steps."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from agent import runas
from agent.executor import KeptOutput


def test_an_unknown_or_malformed_user_is_refused_with_the_reason():
    with pytest.raises(runas.RunAsError, match="run-as user 'no-such-user-zr' does not exist on this instance"):
        runas.lookup("no-such-user-zr")
    with pytest.raises(runas.RunAsError, match="invalid run-as user"):
        runas.lookup("../root")


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent switches users as root")
def test_another_users_step_gets_its_ids_login_environment_and_a_directory_it_can_enter(tmp_path):
    nobody = runas.lookup("nobody")
    assert runas.spawn_options(nobody) == {"user": nobody.uid, "group": nobody.gid,
                                           "extra_groups": list(nobody.groups)}
    env = runas.environment({"LANG": "C.UTF-8", "ZERORUN_SECRET": "x", "PATH": "/opt/agent/bin"}, nobody)
    assert env == {"LANG": "C.UTF-8", "HOME": nobody.home, "USER": "nobody", "LOGNAME": "nobody",
                   "SHELL": nobody.shell, "PATH": runas.USER_PATH}
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert not runas.can_enter(str(private), nobody)
    with pytest.raises(runas.RunAsError, match="cannot enter the working directory"):
        runas.working_directory(str(private), nobody)
    open_dir = Path(tempfile.mkdtemp())  # tmp_path's parents are root's own (0700)
    try:
        inner = open_dir / "inner"
        inner.mkdir(mode=0o711)
        open_dir.chmod(0o755)
        assert runas.can_enter(str(inner), nobody)
        assert runas.working_directory(str(inner), nobody) == str(inner)
    finally:
        shutil.rmtree(open_dir)
    me = runas.lookup(pwd.getpwuid(os.geteuid()).pw_name)
    assert runas.spawn_options(me) == {} and runas.script_directory(tmp_path, me) == tmp_path
    scripts = runas.script_directory(tmp_path, nobody)
    try:
        assert scripts.stat().st_mode & 0o777 == 0o711
        runas.write_script(scripts / "s.sh", "id -un\n", nobody)
        info = (scripts / "s.sh").stat()
        assert (info.st_uid, info.st_mode & 0o777) == (nobody.uid, 0o500)
    finally:
        runas.remove_directory(scripts)


def test_a_kept_whole_output_reads_across_steps(tmp_path):
    fds = []
    for i, text in enumerate((b"first-", b"", b"second-step")):
        path = tmp_path / f"out{i}"
        path.write_bytes(text)
        fds.append((os.open(path, os.O_RDONLY), len(text)))
    kept = KeptOutput({"stdout": fds})
    assert kept.size("stdout") == 17 and kept.size("stderr") == 0
    assert kept.read("stdout", 0, 100) == b"first-second-step"
    assert kept.read("stdout", 4, 5) == b"t-sec" and kept.read("stdout", 17, 5) == b""
    assert kept.read("stderr", 0, 5) == b""
    kept.close()
