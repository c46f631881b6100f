"""The Zerorun broker: routes commands from clients to agents and keeps their state durably."""
