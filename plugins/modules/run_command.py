# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done on the controller by plugins/action/run_command.py,
# whose argument spec is derived from the options below.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: run_command
short_description: Run a document on Zerorun instances selected by tag or id
version_added: 0.1.0
description:
  - Sends a command (a document plus parameters) to the Zerorun broker, which runs it on the
    agents of the matching instances, and waits for the results, like AWS SSM Run Command.
  - With O(targets) or O(instance_ids), the task sends one command and returns every invocation
    (typically with C(hosts=localhost)). It does so for each host it runs for, so in a play of several hosts
    each sends its own command and the instances run it once per host. Add C(run_once=true) (or use
    C(hosts=localhost)) unless each host's targets differ.
  - Without them, the task runs per inventory host (for example hosts from the
    M(zerorun.fleet.instances) inventory plugin) on the instance named by the host variable
    C(zerorun_instance_id) (or the inventory hostname). The hosts of the play batch are
    coalesced into one broker command, and each host's result looks like the result of
    M(ansible.builtin.command) (rc, stdout, stderr, ...) for its own instance.
  - In check mode the broker validates and renders the document and resolves the targets, but
    records and sends nothing. With C(--diff) the rendered scripts are shown. An instance id the
    broker does not know fails the check, as it fails the run (V(Undeliverable)).
  - Parameters that the document marks as secret are redacted by the broker in every result;
    use C(no_log) on the task to keep its whole result out of logs.
  - While it waits (O(wait=true)), the task shows what the command does, through Ansible's display,
    before the task ends. Without C(-v), a progress line (instances done, running, failed,
    pending) when the command has run for O(progress_interval) seconds, then at most one per
    interval, when the counts changed or, unchanged, every sixth interval, and a last line with
    the final counts. Progress goes to stderr, so that a machine-readable stdout callback stays
    parsable. With C(-v), also each instance's output lines as they arrive, as
    C(zerorun send --follow) prints them, C(INSTANCE | line) (C(INSTANCE ! line) for stderr), and
    C(INSTANCE -- STATUS) when an instance ends; these are C(-v) messages (stdout, or stderr with
    E(ANSIBLE_VERBOSE_TO_STDERR)). A C(no_log) task shows no output lines.
  - In per-host mode one host of the batch (the one that sent the command) shows these lines for
    the whole batch; the other hosts return their results after it printed its last line.
  - With C(-v), C(ansible-playbook) does not dump a result whose output was shown live again
    (only C(changed) or C(ok) and the host are printed; C(register) the result to see it all).
    Ansible dumps a failed result whatever the verbosity, output included, and ad-hoc C(ansible)
    dumps every result.
  - When the stdout of C(ansible-playbook) goes to a pipe (a CI log, C(| tee)) rather than a
    terminal, Python buffers it; set E(PYTHONUNBUFFERED=1) to see the lines as they come.
  - Runs on the controller only; C(async) is refused with an error. O(wait=false) and
    M(zerorun.fleet.command_info) do what C(async) with C(poll=0) does, O(wait_timeout) bounds
    the wait as the C(async) time limit would.
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker
  - zerorun.fleet.attributes
attributes:
  check_mode:
    support: full
    description: Dry run on the broker; nothing is sent to any instance.
  diff_mode:
    support: full
    description: Shows the rendered script of every step.
  async:
    support: none
    description:
      - Refused with an error naming the alternative, O(wait=false) and M(zerorun.fleet.command_info).
options:
  document:
    description:
      - Name of a stored or built-in document, for example V(RunShellScript).
      - Ignored when O(document_file) or O(document_content) is given.
    type: str
    default: RunShellScript
  document_version:
    description:
      - Version of a stored document, V($DEFAULT), V($LATEST) or a number. Empty means the default version.
    type: str
  document_hash:
    description:
      - SHA-256 (hex) the document must have; the broker refuses to run another content.
    type: str
  document_file:
    description:
      - A local document file (YAML or JSON, UTF-8), read on the controller as C(zerorun send --document-file)
        reads it (line endings kept, so the document's SHA-256 is the file's) and sent as O(document_content).
      - Relative paths are looked up like M(ansible.builtin.copy) sources (role C(files/), playbook directory).
      - A file that is missing, cannot be read, is not UTF-8, or is not a YAML or JSON mapping fails the task
        with a message naming it; nothing is sent.
      - The command is recorded under the file's name without its extension, with version V($LOCAL).
    type: path
  document_content:
    description:
      - The text of a document, rendered by the broker without storing it.
      - The command is recorded as document V(local-document), version V($LOCAL).
    type: str
  parameters:
    description:
      - Document parameters, name to value (a string or a list of strings, as in SSM).
    type: dict
  commands:
    description:
      - Short form for V(RunShellScript) (or the document in O(document)) with C(parameters.commands).
      - A string is one command line (it may span several lines); a list gives one line per item.
    type: raw
  targets:
    description:
      - Target expressions, the same syntax as the C(zerorun) CLI, AND-ed together.
      - V(tag:KEY=V1,V2) matches instances whose tag KEY has one of the values, V(tag:KEY) any
        instance that has the tag, V(tag:KEY=) instances whose tag KEY has the empty value,
        V(instance:ID1,ID2) the listed instances.
      - A single string is one target (commas in it separate values, not targets).
    type: list
    elements: str
  instance_ids:
    description:
      - Instance ids to run on, in addition to or instead of O(targets).
    type: list
    elements: str
  timeout:
    description:
      - Delivery timeout in seconds; an instance that did not start the command by then is
        reported V(Undeliverable) or V(TimedOut) (C(DeliveryTimedOut)). The broker's default when unset.
    type: int
  execution_timeout:
    description:
      - Seconds each instance may run the document; by default the document's own timeout.
    type: int
  max_concurrency:
    description:
      - How many instances run the command at the same time, a number (V(10)) or a percentage (V(10%)) of the targets.
    type: raw
  max_errors:
    description:
      - Stop sending to more instances after this many errors, a number or a percentage of the targets.
      - Invocations already running still finish, so the number of errors can exceed it.
    type: raw
  first:
    description:
      - Canary. Run the command on this many instances first; only when all of them succeeded does
        it go on to the others (at O(max_concurrency)). If any of them fails, nothing else is started and
        the rest end V(Cancelled) (C(Terminated)), whatever O(max_errors) says.
    type: int
    default: 0
  wait:
    description:
      - Wait until the command is complete on every instance.
      - With V(false), return as soon as the broker accepted the command (use M(zerorun.fleet.command_info) later).
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait when O(wait=true); the task fails when the command is still running by then
        (the command itself goes on). No limit when unset (the command's own timeouts apply).
    type: int
  progress_interval:
    description:
      - Seconds between progress lines while the task waits; the first comes after the command
        has run this long, so a command that ends sooner shows none. See the description for the rule.
      - V(0) shows no progress lines (the output lines of C(-v) still come).
    type: int
    default: 10
  comment:
    description:
      - Free text recorded with the command (shown by C(zerorun commands)).
    type: str
  run_as:
    description:
      - Run every step (except those whose document step names its own C(runAs)) as this user
        on the instance, with its uid, gid and groups, a login environment (C(HOME), C(USER),
        C(LOGNAME), C(SHELL), C(PATH)) and its home directory as the working directory.
      - The broker's policy says which users a client's role may run as (C(run_as) in the role; root
        only by default). An instance where the user does not exist fails its invocation before
        anything runs.
    type: str
  notify:
    description:
      - Webhooks the broker POSTs a signed JSON summary to when the command ends (no output, no
        secret values; header C(X-Zerorun-Signature)); each a name the broker configures, or a URL
        the client's role allows (C(webhook_urls) in the policy).
      - Delivery is retried by the broker, across its restarts; C(zerorun show) says how it went.
    type: list
    elements: str
  notify_invocations:
    description:
      - With O(notify), also POST when each instance's invocation ends.
    type: bool
    default: false
notes:
  - The broker connection can be set once per play with
    C(module_defaults) for the action group C(group/zerorun.fleet.fleet).
  - Per-host mode coalesces the hosts that run the task with the same arguments. When every host
    of the batch provably runs the task (no C(when), C(loop), C(until), C(run_once), C(delegate_to),
    dynamic include or templated arguments, linear strategy) one command covers the whole batch
    whatever C(forks) is; otherwise the hosts that arrive together (up to C(forks)) share one command.
seealso:
  - module: zerorun.fleet.command_info
  - module: zerorun.fleet.instance_info
"""

EXAMPLES = r"""
- name: Run a shell command on all web servers (one command, all results)
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Uptime of the web tier
      zerorun.fleet.run_command:
        targets:
          - tag:role=web
        commands:
          - uptime
          - hostname
      register: uptime

    - name: Show each instance's output
      ansible.builtin.debug:
        msg: "{{ item.instance_id }}: {{ item.stdout }}"
      loop: "{{ uptime.invocations }}"

- name: Per host, from the zerorun.fleet.instances inventory
  hosts: tag_role_web
  gather_facts: false
  module_defaults:
    group/zerorun.fleet.fleet:
      config_file: ~/.config/zerorun/client.yaml
  tasks:
    - name: Restart nginx, two instances at a time, stop at the first error
      zerorun.fleet.run_command:
        document: RunShellScript
        parameters:
          commands:
            - systemctl restart nginx
        max_concurrency: 2
        max_errors: 0
        comment: rolling restart

- name: A long upgrade, watched live with ansible-playbook -v
  hosts: localhost
  gather_facts: false
  tasks:
    # ansible-playbook -v upgrade.yml prints, while the task runs:
    #   zerorun: command 9f0c...: 3/40 done, 8 running, 0 failed, 29 pending (30s)
    #   web-01 | Setting up nginx (1.24.0-2) ...
    #   web-01 -- Success
    - name: Upgrade nginx, eight instances at a time
      zerorun.fleet.run_command:
        commands: apt-get install -y --only-upgrade nginx
        targets: tag:role=web
        max_concurrency: 8
        progress_interval: 30

- name: A local document, fire and forget (what async with poll 0 would do)
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Send without waiting
      zerorun.fleet.run_command:
        document_file: files/collect-logs.yml
        parameters:
          since: 1h
        targets: tag:env=prod
        wait: false
      register: sent

    - name: Poll until done
      zerorun.fleet.command_info:
        command_id: "{{ sent.command_id }}"
      register: info
      until: info.done
      retries: 60
      delay: 10
"""

RETURN = r"""
command_id:
  description: Id of the broker command (null in check mode).
  returned: always
  type: str
  sample: 9f0c6a1e7f0e4a559d551c1f7a0c2b11
status:
  description:
    - Status of the command (explicit targets) or of this host's invocation (per-host mode).
    - One of V(Pending), V(InProgress), V(Success), V(Failed), V(Cancelled), V(TimedOut), V(Undeliverable);
      V(DryRun) in check mode.
  returned: always
  type: str
  sample: Success
status_details:
  description: Detail of the status, for example V(DeliveryTimedOut), V(ExecutionTimedOut) or V(Terminated).
  returned: success
  type: str
  sample: ""
document:
  description: The document that ran.
  returned: always
  type: dict
  contains:
    name:
      description: Document name.
      type: str
      sample: RunShellScript
    version:
      description: Document version.
      type: str
      sample: "1"
    sha256:
      description: SHA-256 of the document content.
      type: str
      sample: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
counts:
  description: Number of invocations per status (empty in check mode).
  returned: explicit targets
  type: dict
  sample: {"Success": 3, "Failed": 1}
target_count:
  description: Number of instances the command targets.
  returned: explicit targets
  type: int
  sample: 4
invocations:
  description:
    - One entry per targeted instance.
    - Empty in check mode, where nothing runs (RV(would_run_on) lists the instances), so that a loop over it
      works in both modes.
  returned: explicit targets
  type: list
  elements: dict
  contains:
    instance_id:
      description: The instance.
      type: str
      sample: i-0abc
    invocation_id:
      description: Id of this instance's invocation.
      type: str
    status:
      description: Invocation status.
      type: str
      sample: Success
    status_details:
      description: Detail of the status.
      type: str
    rc:
      description: Exit code of the document on the instance (-1 when it did not run).
      type: int
      sample: 0
    stdout:
      description:
        - Standard output (trailing newlines removed; the broker may truncate it).
        - With C(-v) it was also shown line by line while the task waited, so the task's result is
          not dumped again when it succeeded.
      type: str
    stderr:
      description: Standard error.
      type: str
    stdout_lines:
      description: RV(invocations[].stdout) split into lines.
      type: list
      elements: str
    stderr_lines:
      description: RV(invocations[].stderr) split into lines.
      type: list
      elements: str
    stdout_truncated:
      description: Whether the instance produced more output than the broker kept.
      type: bool
    stderr_truncated:
      description: Whether the instance produced more error output than the broker kept.
      type: bool
    stdout_size:
      description: Bytes of standard output the instance produced (the result may hold fewer).
      type: int
    stderr_size:
      description: Bytes of standard error the instance produced.
      type: int
    output_note:
      description:
        - Empty when the result holds the whole output; else where it was cut and the command that
          prints the whole of it (C(zerorun show ID --instance I --output full)), which the broker
          keeps up to its own larger limit.
      type: str
    steps:
      description: Per-step results (name, status, exit_code, stdout, stderr, started_at, ended_at).
      type: list
      elements: dict
    start:
      description: When the instance started the document (controller local time).
      type: str
      sample: "2025-01-31 12:00:00.000000"
    end:
      description: When the instance finished.
      type: str
    delta:
      description: Run time.
      type: str
      sample: "0:00:00.410000"
rc:
  description: Exit code on this host's instance (-1 when it did not run, as in check mode).
  returned: per-host mode
  type: int
  sample: 0
stdout:
  description:
    - Standard output of this host's instance (empty in check mode).
    - With C(-v) the batch's output was also shown line by line while the task waited, so the
      task's result is not dumped again when it succeeded.
  returned: per-host mode
  type: str
  sample: " 12:00:00 up 3 days,  2:01,  0 users,  load average: 0.00, 0.01, 0.05"
stderr:
  description: Standard error of this host's instance (empty in check mode).
  returned: per-host mode
  type: str
  sample: ""
stdout_lines:
  description: RV(stdout) split into lines.
  returned: per-host mode
  type: list
  elements: str
stderr_lines:
  description: RV(stderr) split into lines.
  returned: per-host mode
  type: list
  elements: str
start:
  description: When this host's instance started the document (null in check mode).
  returned: per-host mode
  type: str
end:
  description: When this host's instance finished (null in check mode).
  returned: per-host mode
  type: str
delta:
  description: Run time on this host's instance (null in check mode).
  returned: per-host mode
  type: str
output_note:
  description:
    - Empty when RV(stdout) and RV(stderr) are whole; else where they were cut and how to get the rest
      (C(zerorun show ID --instance I --output full)). Also the RV(msg) of a successful host.
  returned: per-host mode
  type: str
instance_id:
  description: The instance this host ran on.
  returned: per-host mode
  type: str
  sample: i-0abc
zerorun_invocation:
  description:
    - This host's full invocation, as in RV(invocations) (null in check mode).
    - Not named C(invocation), which Ansible keeps for a module's arguments and leaves out of registered results.
  returned: per-host mode
  type: dict
would_run_on:
  description: Instances the command would run on (not those the broker does not know).
  returned: check mode
  type: list
  elements: str
steps:
  description: The rendered steps (name, action, script) that would run.
  returned: check mode
  type: list
  elements: dict
msg:
  description: What happened; names the instance and the reason when something failed.
  returned: always
  type: str
  sample: "instance i-0abc: Failed, exit code 2"
"""
