"""The ZAP handler (RFC 27): decides every CURVE handshake on the broker's two sockets.

Without an answering ZAP handler a CURVE server accepts any client key; the sockets also set
ZAP_ENFORCE_DOMAIN, so that a missing handler fails closed. An allowed handshake gets the z85
public key as its User-Id, which every later frame of that connection carries.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import zmq
import zmq.utils.z85

from zerorun import keys as keyfiles
from zerorun.zmqutil import NOBLOCK, readable

log = logging.getLogger("zerorun.broker")


class ZapHandler:
    def __init__(self, sock: zmq.Socket, allows: Callable[[str, str], tuple[bool, str]], stats: Counter[str]):
        """``allows(domain, z85 public key)`` -> (allowed, reason)."""
        self.sock = sock
        self.allows = allows
        self.stats = stats

    def drain(self, batch: int) -> int:
        """Answers up to ``batch`` waiting requests; returns how many."""
        for count in range(batch):
            if not readable(self.sock):
                return count
            try:
                req = self.sock.recv_multipart(NOBLOCK)
            except zmq.Again:
                return count
            self.sock.send_multipart(self.answer(req))
        return batch

    def answer(self, req: list[bytes]) -> list[bytes]:
        version, request_id = (req + [b"", b""])[:2]
        status, text, user = b"400", b"malformed ZAP request", b""
        try:
            domain, mechanism = req[2].decode(), req[5]
            if version == b"1.0" and mechanism == b"CURVE" and len(req) >= 7 and len(req[6]) == 32:
                public_key = zmq.utils.z85.encode(req[6]).decode()
                allowed, reason = self.allows(domain, public_key)
                if allowed:
                    status, text, user = b"200", b"OK", public_key.encode()
                    self.stats[f"zap_allowed_{domain}"] += 1
                else:
                    text = reason.encode()
                    self.stats[f"zap_denied_{domain}"] += 1
                    log.info("refused %s connection from %s: %s", domain, keyfiles.fingerprint(public_key), reason)
        except Exception:
            log.exception("bad ZAP request")
        return [b"1.0", request_id, status, text, user, b""]
