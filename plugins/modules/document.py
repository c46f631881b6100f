# -*- coding: utf-8 -*-
# Copyright: Zerorun Developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Documentation only: the work is done on the controller by plugins/action/document.py,
# whose argument spec is derived from the options below.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: document
short_description: Create, update and delete documents stored on a Zerorun broker
version_added: 0.1.0
description:
  - Manages a stored document (the broker's version of an SSM document) idempotently.
  - With O(state=present), the content is compared (by SHA-256) with every stored version of the document.
    A new version is made only when no version has this very content; the task then reports C(changed).
    Content identical to the default version changes nothing. Content identical to an older, non-default
    version changes nothing either, unless O(set_default=true), which makes that version the default.
  - With O(state=absent), the whole document is deleted, or only the version O(version).
  - Built-in documents (such as V(RunShellScript)) are read-only.
  - In check mode the content is validated on the controller and nothing is written.
    With C(--diff) the content of the default version is compared with the new content.
author:
  - Zerorun Developers (@zerorun)
extends_documentation_fragment:
  - zerorun.fleet.broker
  - zerorun.fleet.attributes
attributes:
  check_mode:
    support: full
    description: Validates the document on the controller and reports what would change, writing nothing.
  diff_mode:
    support: full
    description: Shows the default version's content before and the new content after.
options:
  name:
    description:
      - Name of the document.
    type: str
    required: true
  content:
    description:
      - The document, YAML or JSON text (schema 1.2 or 2.2, as SSM documents).
      - Required with O(state=present) unless O(src) is given.
      - Mark inline content C(!unsafe) when it uses document parameters (C({{ name }})), so that Ansible
        does not template them; O(src) files are read as they are.
    type: str
  src:
    description:
      - A local document file (YAML or JSON, UTF-8), read on the controller as C(zerorun documents create)
        reads it (line endings kept, so the version's SHA-256 is the file's).
      - Relative paths are looked up like M(ansible.builtin.copy) sources (role C(files/), playbook directory).
      - A file that is missing, cannot be read, is not UTF-8, or is not a valid document fails the task with a
        message naming it; nothing is stored.
    type: path
  state:
    description:
      - V(present) makes sure a version with this content exists; V(absent) deletes the document or one version.
    type: str
    choices: [present, absent]
    default: present
  set_default:
    description:
      - With O(state=present), make the version with this content the default version
        (the one run when a command names no version).
      - A new document's first version is always the default.
    type: bool
    default: false
  version:
    description:
      - With O(state=absent), delete only this version (a number, or V($LATEST)); the default version
        cannot be deleted alone. A version the document does not have changes nothing.
      - Refused with O(state=present) (the task fails, nothing is written).
    type: str
seealso:
  - module: zerorun.fleet.run_command
"""

EXAMPLES = r"""
- name: Store the baseline document (a new version only when the file changed)
  zerorun.fleet.document:
    name: WebBaseline
    src: files/web-baseline.yml
    set_default: true

# !unsafe keeps Ansible from templating the document's own {{ parameters }}
- name: A document written inline
  zerorun.fleet.document:
    name: Hello
    content: !unsafe |
      schemaVersion: "2.2"
      description: Say hello
      parameters:
        who:
          type: String
          default: world
      mainSteps:
        - action: aws:runShellScript
          name: hello
          inputs:
            runCommand:
              - echo "hello {{ who }}"

- name: Run it by tag
  zerorun.fleet.run_command:
    document: Hello
    parameters:
      who: fleet
    targets: tag:role=web

- name: Remove one old version
  zerorun.fleet.document:
    name: WebBaseline
    version: "3"
    state: absent

- name: Remove the whole document
  zerorun.fleet.document:
    name: Hello
    state: absent
"""

RETURN = r"""
name:
  description: Name of the document.
  returned: always
  type: str
  sample: WebBaseline
version:
  description:
    - The version that has the given content (O(state=present)), or the version deleted (O(state=absent) with O(version)).
    - V(null) in check mode when a new version would be made.
  returned: when O(state=present), or O(state=absent) with a O(version) the document has
  type: int
  sample: 4
sha256:
  description: SHA-256 of the content.
  returned: when O(state=present)
  type: str
default_version:
  description: The default version after the task.
  returned: when the document exists after the task
  type: int
  sample: 4
latest_version:
  description: The latest version after the task.
  returned: when the document exists after the task
  type: int
  sample: 4
created:
  description: Whether a new version was made (or would be, in check mode).
  returned: when O(state=present)
  type: bool
  sample: true
versions:
  description: Versions of the document after the task (version, sha256, is_default, created_at, created_by).
  returned: when the document exists after the task (not in check mode)
  type: list
  elements: dict
msg:
  description: What was done.
  returned: always
  type: str
  sample: document WebBaseline version 4 created and set as default
"""
