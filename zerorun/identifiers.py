"""What an instance id and a tag may look like: checked by the agent at start, by the broker at
HELLO and in every target, so that no id or tag can carry a control character, a line break or a
look-alike character into logs, listings or policy decisions.

- Instance ids (SSM-like): 1-128 characters, ASCII letters, digits, ``.``, ``_``, ``-``, starting
  with a letter or digit. Ids are compared exactly, but the broker refuses a new id that differs
  from a known one only by case (``WEB-1`` beside ``web-1``).
- Tag keys (1-128 characters) and values (0-256): letters and digits of any script, spaces and
  ``_ . : / = + - @`` (AWS's tag alphabet). No commas (a comma separates values in a target).
- Client names (what a client key is registered as, and what the policy binds a role to): 1-128
  ASCII letters, digits, ``.``, ``_``, ``@``, ``-``, starting with a letter or digit.
"""

from __future__ import annotations

import os
import re
import time

INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")  # fullmatch: "$" would let a final newline in
_TAG_TEXT = re.compile(r"[\w .:/=+\-@]*")
MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TAGS = 128, 256, 50


def instance_id_problem(instance_id: str) -> str | None:
    """None for a valid instance id, else what is wrong (without echoing control characters)."""
    if INSTANCE_ID.fullmatch(instance_id):
        return None
    return (f"invalid instance id {printable(instance_id)}: use 1-128 ASCII letters, digits, '.', '_' "
            "or '-', starting with a letter or digit")


def client_name_problem(name: str) -> str | None:
    """None for a valid client name, else what is wrong (without echoing control characters)."""
    if CLIENT_NAME.fullmatch(name):
        return None
    return (f"invalid client name {printable(name)}: use 1-128 ASCII letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit (it names the key's files and its policy entry)")


def tag_problem(key: str, value: str | None = None) -> str | None:
    """None for a valid tag key (and value), else what is wrong."""
    if not key or len(key) > MAX_TAG_KEY or not _TAG_TEXT.fullmatch(key) or key.strip() != key:
        return (f"invalid tag key {printable(key)}: 1-{MAX_TAG_KEY} letters, digits, spaces or _ . : / = + - @, "
                "no leading or trailing space")
    if value is not None and (len(value) > MAX_TAG_VALUE or not _TAG_TEXT.fullmatch(value)):
        return (f"invalid value {printable(value)} for tag {key!r}: at most {MAX_TAG_VALUE} letters, digits, "
                "spaces or _ . : / = + - @")
    return None


def tags_problem(tags: dict[str, str]) -> str | None:
    if len(tags) > MAX_TAGS:
        return f"at most {MAX_TAGS} tags per instance, not {len(tags)}"
    for key, value in tags.items():
        problem = tag_problem(key, value)
        if problem:
            return problem
    return None


def printable(text: str, limit: int = 80) -> str:
    """``text`` quoted for a log line or a terminal: control and format characters escaped, cut
    to ``limit`` characters."""
    escaped = "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
                      for c in text[:limit])
    return f"'{escaped}'" + ("..." if len(text) > limit else "")


def one_line(text: str, limit: int = 1024) -> str:
    """What a peer says (why something failed) as one line for a log, a view or the store, as it
    was written but with control and format characters escaped, cut to ``limit`` characters."""
    if len(text) <= limit and text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text[:limit]) + ("..." if len(text) > limit else "")


USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")
"""A run-as user name (``send --run-as``, a step's ``runAs``): what useradd accepts, 1-32 characters."""


def user_name_problem(name: str) -> str | None:
    """None for a valid run-as user name, else what is wrong."""
    if USER_NAME.fullmatch(name):
        return None
    return (f"invalid run-as user {printable(name)}: 1-32 ASCII letters, digits, '_', '.' or '-' (not starting "
            "with '.' or '-'), optionally ending in '$'")


_VARIANT = "89ab89ab89ab89ab"  # a random hex digit's two low bits, with RFC 4122's variant bits


def time_ordered_ids(count: int) -> list[str]:
    """``count`` UUIDv7s (RFC 9562) as 32 hex digits: the creation time in milliseconds, then 74
    random bits, from one read of the system's random source. Command and invocation ids are
    these: ids that sort by time land at the end of the store's indexes on them, a page or two per
    group commit, where UUID4s land anywhere in them, a page each (a fifth of SQLite's CPU per
    1-instance command: bench/README.md, round seventeen)."""
    prefix = f"{int(time.time() * 1000) & 0xFFFFFFFFFFFF:012x}7"
    h = os.urandom(10 * count).hex()
    return [f"{prefix}{h[i:i + 3]}{_VARIANT[int(h[i + 3], 16)]}{h[i + 4:i + 19]}" for i in range(0, 20 * count, 20)]
