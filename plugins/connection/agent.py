# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
name: agent
short_description: Run tasks on Zerorun instances through the broker and their agents, without SSH
version_added: 0.1.0
description:
  - Runs any Ansible module on a Zerorun instance through the broker and the instance's agent.
    The instance needs no SSH daemon and no inbound port; its agent keeps one outgoing connection to the broker.
  - Each command is one request answered with its exit code and raw stdout and stderr (no output markers,
    no PTY, stdout and stderr kept apart). Module code is fed on stdin when pipelining is on (the default).
  - Files are transferred in chunks through the broker (never stored there), checked with SHA-256 at the end,
    and renamed into place atomically on the instance; large files are streamed, never loaded whole.
  - One broker connection serves every task. The first task starts a small multiplexer process on the
    controller (as SSH's ControlPersist does) that holds the CurveZMQ connection to the broker, and each
    task's worker talks to it through a unix socket in a private directory. It exits after
    O(persist_seconds) without traffic. With O(persistent=false), each task opens its own connection.
  - The client key must have the C(exec) permission in the broker policy (the broker's C(admin) key has it),
    for the instance (a role's C(targets) patterns are matched against C(instance:<id>)).
  - Privilege escalation works through the usual become plugins. Without a password (for example C(sudo)
    with C(NOPASSWD), or C(su) when connected as root) a command is one request. With a password
    (C(ansible_become_password)), the command runs in a session with a pseudo-terminal on the instance as its
    controlling terminal (stdout and stderr stay apart), and the plugin answers the prompt as Ansible's ssh
    connection does (the become plugin's C(check_password_prompt), C(check_success), incorrect and missing
    password messages). A wrong or missing password fails the task, never the host. This opens a broker
    connection of its own for the command (not the shared one).
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker.connection
options:
  instance_id:
    description:
      - Id of the Zerorun instance to run on.
      - Defaults to the inventory host name; the C(zerorun.fleet.instances) inventory plugin sets
        C(zerorun_instance_id) for its hosts, so this also works when hosts are named by host name.
    type: str
    vars:
      - name: inventory_hostname
      - name: zerorun_instance_id
  agent_user:
    description:
      - The user the instance's agent runs commands as, reported to Ansible as the remote user (the user
        an SSH connection would log in as). Ansible skips C(become) when O(agent_user) is already the
        C(become_user), as it does with the local connection, so that C(become) to root needs no C(sudo)
        when the agent runs as root.
      - When not set, it is asked of the agent (C(id -un), one round trip per task and host) only for tasks
        that use C(become). C(ansible_user) is not used; the agent does not log in as anyone.
    type: str
    vars:
      - name: ansible_zerorun_agent_user
  exec_timeout:
    description:
      - Seconds a command may run on the instance before the agent kills its process group.
      - V(0) uses the agent's default (one hour); a negative number is refused.
    type: float
    default: 0
    env:
      - name: ZERORUN_EXEC_TIMEOUT
    vars:
      - name: zerorun_exec_timeout
  persistent:
    description:
      - Share one broker connection across tasks and forks through a local multiplexer process
        (C(python -m zerorun.mux)), started on first use.
      - When the multiplexer cannot be used (for example the control directory is not private), the task
        warns and connects directly.
    type: boolean
    default: true
    env:
      - name: ZERORUN_PERSISTENT
    vars:
      - name: zerorun_persistent
  persist_seconds:
    description:
      - Seconds the multiplexer stays up without traffic once no task uses it (0 or more).
    type: float
    default: 60
    env:
      - name: ZERORUN_PERSIST_SECONDS
    vars:
      - name: zerorun_persist_seconds
  control_path_dir:
    description:
      - Directory of the multiplexer's unix socket, lock and log files. Created with mode 0700; refused when
        it belongs to another user or others can enter it (whoever can open the socket acts with the client key).
    type: path
    default: ~/.ansible/cp
    env:
      - name: ZERORUN_CONTROL_PATH_DIR
    vars:
      - name: zerorun_control_path_dir
  pipelining:
    description:
      - Feed module code on stdin instead of transferring it as a file first (fewer round trips).
      - On by default here, unlike SSH, because this connection never has a terminal, so C(requiretty)
        questions do not arise.
    type: boolean
    default: true
    env:
      - name: ANSIBLE_PIPELINING
    ini:
      - section: defaults
        key: pipelining
      - section: connection
        key: pipelining
    vars:
      - name: ansible_pipelining
      - name: zerorun_pipelining
notes:
  - Needs the Python package C(zerorun) (with pyzmq and msgspec) on the controller only.
  - A task's C(timeout) keyword still applies; O(exec_timeout) is enforced on the instance.
  - The broker settings come from host or group variables (C(ansible_zerorun_config), set by the
    C(zerorun.fleet.instances) inventory plugin with C(set_connection=true) from its own C(config_file)),
    from C(ansible.cfg) (section C([zerorun_connection])) or from the environment (E(ZERORUN_CONFIG)).
  - Interpreter discovery runs through the agent and takes the first C(python3) it finds, which may not be
    the one you want (for example an inactive pyenv shim). Set C(ansible_python_interpreter) for these hosts,
    for example with the inventory plugin's C(compose) option.
seealso:
  - plugin: zerorun.fleet.instances
    plugin_type: inventory
"""

EXAMPLES = r"""
# inventory: fleet.zerorun.yml
# plugin: zerorun.fleet.instances
# set_connection: true

- name: Configure web servers through Zerorun agents
  hosts: tag_role_web
  tasks:
    - name: Install the site
      ansible.builtin.copy:
        src: site/
        dest: /srv/www/
        mode: "0644"

# Or per host, without the inventory plugin
# web-1 ansible_connection=zerorun.fleet.agent zerorun_instance_id=i-0123456789 ansible_zerorun_config=~/.config/zerorun/client.yaml
"""

import math
import os
import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.zerorun.fleet.plugins.plugin_utils import broker

display = Display()

# Broker answers that mean "the instance cannot be reached now", reported as unreachable.
UNREACHABLE_CODES = ("AgentUnavailable", "AccessDenied", "Unauthorized")


def _plain(value):
    """A plain str: ansible-core 2.19 hands plugins tagged str subclasses, which msgspec refuses."""
    return broker.builtin_data(to_text(value))


def _seconds(plugin, option):
    """A seconds option: a finite number, 0 or more. A negative one or NaN was taken without a
    word (a negative exec_timeout meant the agent's default hour, a NaN persist_seconds a
    multiplexer that never stopped)."""
    value = plugin.get_option(option)
    seconds = float(value or 0)
    if not math.isfinite(seconds) or seconds < 0:
        raise AnsibleError("zerorun.fleet.agent: %s must be a number of seconds, 0 or more, got %s"
                           % (option, to_text(value)))
    return seconds


def _reason(exc, writing=None):
    """What is wrong with a local file, in words ("Is a directory"), not Python's text of the
    error ("[Errno 21] Is a directory: '...'", which may name a temporary file): the message
    names the file itself."""
    if writing is not None and isinstance(exc, FileNotFoundError):
        return "directory %s does not exist" % (os.path.dirname(to_text(writing)) or ".")
    return to_text(exc.strerror or exc)


class Connection(ConnectionBase):
    """Exec and file transfer through a Zerorun broker to the instance's agent."""

    transport = "zerorun.fleet.agent"
    has_pipelining = True
    has_tty = False

    def __init__(self, *args, **kwargs):
        self._agent_user = None
        super(Connection, self).__init__(*args, **kwargs)
        self._client = None
        self._context = None

    # -- connection ---------------------------------------------------------------------------

    @property
    def instance_id(self):
        value = self.get_option("instance_id") or self._play_context.remote_addr
        if not value:
            raise AnsibleConnectionFailure("zerorun.fleet.agent: no instance id (set zerorun_instance_id)")
        return _plain(value)

    def _connect(self):
        if self._connected and self._client is not None:
            return self
        options = broker.builtin_data({name: self.get_option(name) for name in broker.BROKER_OPTIONS})
        timeout = broker.request_timeout(options)
        try:
            config = broker.client_config(options, "connection")  # also: is zerorun installed?
        except broker.BrokerError as exc:
            raise AnsibleConnectionFailure("zerorun.fleet.agent: %s" % exc.message)
        import zmq
        from zerorun import client as zclient
        # A context of our own: this runs in a forked worker, never share the parent's.
        self._context = zmq.Context()
        via = "broker %s" % config.endpoint
        if self.get_option("persistent"):
            from zerorun import mux

            try:
                self._client = mux.attach(config, _plain(self.get_option("control_path_dir")),
                                          persist=_seconds(self, "persist_seconds"),
                                          timeout=timeout, context=self._context)
                via += " (shared connection %s)" % self._client.control_path
            except (mux.MuxError, OSError) as exc:
                display.warning("zerorun.fleet.agent: cannot share the broker connection (%s); "
                                "connecting directly" % exc)
        if self._client is None:
            self._client = zclient.Client(config, timeout=timeout, context=self._context)
        display.vvv("ZERORUN CONNECT to instance %s via %s" % (self.instance_id, via), host=self.instance_id)
        try:
            self._client.ping()  # broker reachable and this key accepted: fail fast and clearly
        except zclient.RequestFailed as exc:
            if exc.code != "AccessDenied":  # a role with exec but without read: the exec decides
                self.close()
                raise AnsibleConnectionFailure("zerorun.fleet.agent: %s" % broker.describe_error(exc, "connection"))
        except zclient.ZerorunError as exc:
            self.close()
            raise AnsibleConnectionFailure(
                "zerorun.fleet.agent: cannot use the Zerorun broker at %s: %s"
                % (config.endpoint, broker.describe_error(exc, "connection")))
        self._connected = True
        return self

    @property
    def default_user(self):
        """The agent's user, for Ansible's "is become needed?" test (ActionBase._get_remote_user
        reads it because this plugin has no remote_user option): become to the user the agent
        already runs as is skipped, as over ssh with the login user. Asked of the agent only when
        the task uses become, once per connection; empty otherwise (as before)."""
        if self._agent_user is None:
            try:
                configured = self.get_option("agent_user")
            except KeyError:
                configured = None
            if configured:
                self._agent_user = _plain(configured)
            elif self.become is None:
                return ""
            else:
                self._agent_user = self._ask_agent_user()
        return self._agent_user

    @default_user.setter
    def default_user(self, value):
        self._agent_user = value

    def _ask_agent_user(self):
        from zerorun import client as zclient

        self._connect()
        try:
            reply = self._client.exec(self.instance_id, "id -un", timeout=30.0)
        except zclient.ZerorunError as exc:
            raise self._failure("finding the agent's user (id -un)", exc)
        user = to_text(reply.stdout).strip()
        if reply.rc != 0 or not user:
            raise AnsibleConnectionFailure(
                "zerorun.fleet.agent: cannot tell which user the agent of %s runs as (id -un: rc %s, %s);"
                " set ansible_zerorun_agent_user" % (self.instance_id, reply.rc, to_text(reply.stderr).strip()))
        display.vvv("ZERORUN agent user: %s" % user, host=self.instance_id)
        return user

    def _failure(self, what, exc):
        """A client error as an Ansible error: broker or agent unreachable -> AnsibleConnectionFailure."""
        from zerorun import client as zclient

        code = getattr(exc, "code", "")
        message = "zerorun.fleet.agent: %s on instance %s failed: %s" % (
            what, self.instance_id, broker.describe_error(exc, "connection"))
        if code == "AgentUnavailable":
            message = "zerorun.fleet.agent: %s (%s)" % (exc, what)
        if isinstance(exc, (zclient.BrokerUnavailable, zclient.Unauthorized, zclient.ConfigError)) \
                or code in UNREACHABLE_CODES or code in ("Timeout", "ExecFailed", "SessionLost"):
            return AnsibleConnectionFailure(message)
        return AnsibleError(message)

    # -- commands -----------------------------------------------------------------------------

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super(Connection, self).exec_command(cmd, in_data=in_data, sudoable=sudoable)
        from zerorun import client as zclient

        becoming = bool(sudoable and self.become and getattr(self.become, "_id", ""))
        if becoming and self.become.expect_prompt():
            return self._exec_with_terminal(_plain(cmd), bytes(to_bytes(in_data or b"")))
        display.vvv("ZERORUN EXEC %s" % to_text(cmd), host=self.instance_id)
        try:
            reply = self._client.exec(self.instance_id, _plain(cmd), stdin=bytes(to_bytes(in_data or b"")),
                                      timeout=_seconds(self, "exec_timeout"))
        except zclient.ZerorunError as exc:
            raise self._failure("command", exc)
        stdout, stderr = reply.stdout, reply.stderr
        if becoming and self.become.success and self.become.check_success(stdout):
            stdout = self.become.strip_become_success(stdout)
        elif becoming and (self.become.check_missing_password(stderr) or self.become.check_missing_password(stdout)):
            # As the ssh connection: a become that wanted a password nobody gave fails the task
            # with the same message (sudo -n says "sudo: a password is required").
            raise AnsibleError("zerorun.fleet.agent: Missing %s password" % self.become.name)
        return reply.rc, stdout, stderr

    def _exec_with_terminal(self, cmd, in_data):
        """A become that answers a password prompt, as the ssh connection does: the command runs
        with a terminal; the prompt (on the terminal, or on stderr with sudo -S) is answered on the
        stream that reads the password; then module data goes to stdin. What is refused (a wrong or
        missing password) is an AnsibleError: the task fails, the host stays reachable."""
        from zerorun import client as zclient
        from zerorun.session import TerminalExec

        options = broker.builtin_data({name: self.get_option(name) for name in broker.BROKER_OPTIONS})
        try:
            config = broker.client_config(options, "connection")
        except broker.BrokerError as exc:
            raise AnsibleConnectionFailure("zerorun.fleet.agent: %s" % exc.message)
        display.vvv("ZERORUN EXEC (with a terminal for %s's password prompt) %s" % (self.become.name, to_text(cmd)),
                    host=self.instance_id)
        term = TerminalExec(config, self.instance_id, cmd, stdin_tty=not in_data,
                            timeout=broker.request_timeout(options))
        try:
            term.start()
        except zclient.ZerorunError as exc:
            term.close()
            raise self._failure("command (become %s)" % self.become.name, exc)
        try:
            return self._negotiate_become(term, in_data)
        finally:
            term.close()

    def _negotiate_become(self, term, in_data):
        from zerorun import client as zclient

        become = self.become
        name = become.name
        timeout = float(getattr(self._play_context, "timeout", 10) or 10) + 2
        out = {"": [], "stderr": [], "tty": []}
        rest = {"": b"", "stderr": b"", "tty": b""}
        state = "prompt"  # prompt -> escalation -> ready
        deadline = time.monotonic() + timeout
        try:
            while state != "ready":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnsibleError("zerorun.fleet.agent: timeout (%ds without output) waiting for the privilege "
                                       "escalation prompt of %s: %s" % (timeout, name, to_text(b"".join(out[""] + out["tty"]))))
                events = term.read(min(remaining, 1.0))
                if not events and term.ended:
                    break
                if events:  # as over ssh, the timeout is for silence, not for the whole negotiation
                    deadline = time.monotonic() + timeout
                for stream, data in events:
                    flags, kept, rest[stream] = self._examine(rest[stream] + data)
                    out[stream].append(kept)
                    if "prompt" in flags:
                        if state == "escalation":
                            raise AnsibleError("zerorun.fleet.agent: Incorrect %s password" % name)
                        password = become.get_option("become_pass", playcontext=self._play_context)
                        display.debug("zerorun.fleet.agent: answering the %s prompt on %s" % (name, stream or "stdin"))
                        term.send(to_bytes(password, errors="surrogate_or_strict") + b"\n",
                                  "tty" if stream == "tty" else "")
                        state = "escalation"
                    if "success" in flags:
                        state = "ready"
                    elif "incorrect" in flags:
                        raise AnsibleError("zerorun.fleet.agent: Incorrect %s password" % name)
                    elif "missing" in flags:
                        raise AnsibleError("zerorun.fleet.agent: Missing %s password" % name)
            for stream in rest:
                out[stream].append(rest[stream])
            if state == "ready" and not term.ended:
                if in_data:
                    term.send(in_data, "", eof=True)
                elif not term.request.stdin_tty:
                    term.send(b"", "", eof=True)
            timeout_option = _seconds(self, "exec_timeout")
            for stream, data in term.wait(timeout_option or None):
                out[stream].append(data)
        except zclient.ZerorunError as exc:
            raise self._failure("command (become %s)" % name, exc)
        if term.error or term.exit_code < 0:
            lost = zclient.ZerorunError(term.error or "ended without a status", "SessionLost")
            raise self._failure("command (become %s)" % name, lost)
        stdout = b"".join(out[""])
        stderr = b"".join(out["stderr"] + out["tty"])
        return term.exit_code, stdout, stderr

    def _examine(self, data):
        """As the ssh connection's _examine_output: flags for the prompt, success and the become
        plugin's error messages; prompt and success lines removed; an incomplete last line kept
        for the next chunk (unless it is the prompt, which has no newline)."""
        become = self.become
        flags = set()
        kept = []
        lines = data.splitlines(True)
        for line in lines:
            if become.expect_prompt() and become.check_password_prompt(line):
                flags.add("prompt")
                continue
            if become.success and become.check_success(line):
                flags.add("success")
                continue
            if become.check_incorrect_password(line):
                flags.add("incorrect")
            elif become.check_missing_password(line):
                flags.add("missing")
            kept.append(line)
        remainder = b""
        if kept and not kept[-1].endswith(b"\n"):
            remainder = kept.pop()
        return flags, b"".join(kept), remainder

    # -- files --------------------------------------------------------------------------------

    def put_file(self, in_path, out_path):
        super(Connection, self).put_file(in_path, out_path)
        from zerorun import client as zclient

        display.vvv("ZERORUN PUT %s TO %s" % (in_path, out_path), host=self.instance_id)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound("file or module does not exist: %s" % to_text(in_path))
        try:
            self._client.put_file(self.instance_id, _plain(in_path), _plain(out_path))
        except zclient.ZerorunError as exc:
            raise self._failure("upload of %s to %s" % (in_path, out_path), exc)
        except FileNotFoundError:  # gone since the check above: what ansible's own plugins say
            raise AnsibleFileNotFound("file or module does not exist: %s" % to_text(in_path)) from None
        except OSError as exc:  # the local file only: the agent's failures are ZerorunErrors
            raise AnsibleError("zerorun.fleet.agent: cannot read %s: %s" % (to_text(in_path), _reason(exc))) from None

    def fetch_file(self, in_path, out_path):
        super(Connection, self).fetch_file(in_path, out_path)
        from zerorun import client as zclient

        display.vvv("ZERORUN FETCH %s TO %s" % (in_path, out_path), host=self.instance_id)
        try:
            self._client.fetch_file(self.instance_id, _plain(in_path), _plain(out_path))
        except zclient.RequestFailed as exc:
            if exc.code == "FileNotFound":  # the agent's code, relayed by the broker
                raise AnsibleFileNotFound("zerorun.fleet.agent: %s" % exc)
            raise self._failure("download of %s" % in_path, exc)
        except zclient.ZerorunError as exc:
            raise self._failure("download of %s" % in_path, exc)
        except OSError as exc:  # the local file only: the agent's failures are ZerorunErrors
            raise AnsibleError("zerorun.fleet.agent: cannot write %s: %s" % (to_text(out_path), _reason(exc, out_path))) from None

    # -- end ----------------------------------------------------------------------------------

    def close(self):
        client, context = self._client, self._context
        self._client = self._context = None
        if client is not None:
            client.close()
        if context is not None:
            context.term()
        self._connected = False

    def reset(self):
        self.close()
