"""The Zerorun agent: runs on each instance, connects out to the broker, executes commands."""
