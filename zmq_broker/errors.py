"""The broker's one error type, at the bottom of the package so that every part may raise it."""

from __future__ import annotations


class BrokerError(Exception):
    """A request the broker refuses or cannot serve.

    ``code`` is machine-readable and becomes the reply's ``ErrorInfo.code`` (NotFound,
    InvalidTarget, AccessDenied, ...); the message is one line for people. Domain code raises it;
    the request dispatcher is the one place that turns it into a reply.
    """

    def __init__(self, code: str, message: str, before_any_change: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        # refused before the request changed anything: answered at once, not after the next
        # commit (which may be the thing that cannot happen)
        self.before_any_change = before_any_change
