"""Test and demo harnesses: real processes on 127.0.0.1, never used by the daemons themselves."""

from .localfleet import FleetError, LocalFleet
from .postgres import PostgresServer, PostgresUnavailable
from .waits import WaitTimeout, wait_until

__all__ = ["FleetError", "LocalFleet", "PostgresServer", "PostgresUnavailable", "WaitTimeout", "wait_until"]
