"""Agent versions against the broker's --min-agent-version."""

from __future__ import annotations

import pytest

from zerorun.versions import older_than, version_key


@pytest.mark.parametrize(("version", "minimum", "older"), [
    ("0.1.0", "0.2.0", True),
    ("0.2.0", "0.2.0", False),
    ("0.2", "0.2.0", False),
    ("0.10.0", "0.9.1", False),
    ("0.2.0rc1", "0.2.0", True),
    ("0.2.0.dev3", "0.2.0a1", True),
    ("0.2.0+fleetsim", "0.2.0", False),
    ("1.0.0", "0.2.0", False),
    ("", "0.1.0", True),
    ("not-a-version", "0.1.0", True),
])
def test_older_than(version, minimum, older):
    assert older_than(version, minimum) is older


def test_a_minimum_that_is_not_a_version_is_an_error():
    assert version_key("soon") is None
    with pytest.raises(ValueError, match="not a version"):
        older_than("0.1.0", "soon")
