"""The broker's policy file: loaded at start (a bad file stops the broker), reloaded when it
changes and on SIGHUP. A reload that fails keeps the last good policy, and says so where an
operator looks: the log, the audit log (``policy.reload_failed``), ``zerorun ping`` (the policy's
load time, SHA-256 and last error) and a metric. The schema and the rules are in
``zerorun/policy.py``, shared with ``zerorun policy check``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from zerorun.policy import ADMIN, Policy, PolicyError, Role, load_policy

log = logging.getLogger("zerorun.broker.policy")

__all__ = ["ADMIN", "Policy", "PolicyError", "PolicyFile", "Role", "load_policy"]


class PolicyFile:
    def __init__(self, path: Path | None):
        self.path = path
        self._stamp = self._stat()
        self.policy: Policy = load_policy(path)
        self.loaded_at = time.time()
        self.last_error = ""
        self.failures = 0

    def _stat(self) -> tuple[float, int, int]:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return (0.0, 0, 0)
        return (st.st_mtime, st.st_ino, st.st_size) if st else (0.0, 0, 0)

    def reload_if_changed(self, force: bool = False) -> bool | str:
        """True when a new policy took effect; the error text when the file changed but could
        not be used (the previous policy stays); False when nothing changed."""
        stamp = self._stat()
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            self.failures += 1
            self.last_error = str(exc)
            log.error("%s; keeping the previous policy (loaded %s)", exc,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.loaded_at)))
            return self.last_error
        self.loaded_at, self.last_error = time.time(), ""
        log.info("policy reloaded from %s", self.path)
        return True

    def status(self) -> dict[str, object]:
        return {"path": str(self.path) if self.path else "", "loaded_at": self.loaded_at,
                "sha256": self.policy.sha256, "last_error": self.last_error, "reload_failures": self.failures}
