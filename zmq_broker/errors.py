"""The broker's one error type, at the bottom of the package so that every part may raise it."""

from __future__ import annotations


class BrokerError(Exception):
    """A request the broker refuses or cannot serve.

    ``code`` is machine-readable and becomes the reply's ``ErrorInfo.code`` (NotFound,
    InvalidTarget, AccessDenied, ...); the message is one line for people. Domain code raises it;
    the request dispatcher is the one place that turns it into a reply.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
