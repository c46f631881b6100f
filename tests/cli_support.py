"""What the CLI integration tests share."""

from __future__ import annotations

import json

import pytest


def run_json(fleet, *args, timeout=120):
    """Runs ``zerorun ARGS --json`` against the fleet: (exit code, decoded JSON, stderr)."""
    proc = fleet.cli(*args, "--json", timeout=timeout)
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        pytest.fail(f"not JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, data, proc.stderr
