"""Comparing agent versions (``--min-agent-version``) without a dependency: the PEP 440 subset
Zerorun's own versions use: a release ``N(.N)*``, an optional pre-release or dev suffix (``a1``,
``b2``, ``rc1``, ``.dev3``: lower than the release) and a local part (``+fleetsim``: ignored)."""

from __future__ import annotations

import re

_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(?:[._-]?(a|b|rc|dev)[._-]?(\d*))?(?:\.post\d+)?(?:\+[A-Za-z0-9.]+)?$")
_PRE_RANK = {"dev": 0, "a": 1, "b": 2, "rc": 3}
_RELEASE = 4


def version_key(text: str) -> tuple[tuple[int, ...], int, int] | None:
    """A sortable key for ``text``; None when it is not a version this understands."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    release = tuple(int(part) for part in match.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:  # 1.0 == 1.0.0
        release = release[:-1]
    pre = match.group(2)
    return release, (_PRE_RANK[pre] if pre else _RELEASE), int(match.group(3) or 0)


def older_than(version: str, minimum: str) -> bool:
    """Whether ``version`` is below ``minimum``; a version that cannot be read counts as older."""
    have, need = version_key(version), version_key(minimum)
    if need is None:
        raise ValueError(f"not a version: {minimum!r}")
    return have is None or have < need
