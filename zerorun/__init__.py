"""Zerorun: tag-targeted command execution on fleets of VMs, over ZeroMQ."""

__version__ = "0.1.0"
