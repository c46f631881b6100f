"""The optional S3 sink: every finished invocation's whole output copied to an S3-compatible bucket,
as SSM users keep outputs (``--s3-bucket``, ``--s3-prefix``, ``--s3-endpoint-url``; needs the
``zerorun[s3]`` extra, boto3, which finds its credentials as usual: environment, shared files,
instance profile).

Keys: ``<prefix><command id>/<instance id>/stdout`` and ``.../stderr`` (only the streams that have
bytes), with the invocation id, the bytes produced and whether the copy is whole as object metadata.
One worker thread uploads, streaming from the output store (multipart for large outputs), never
in the broker's loop; an upload that fails is tried again three times, then counted as failed
(metric ``zerorun_s3_copies{outcome="failed"}``) and logged. The queue is in memory: copies not
yet made when the broker stops are not made after it restarts (the output store still has them).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from typing import Any

from .errors import BrokerError
from .model import OutputRecord

log = logging.getLogger("zerorun.broker.s3")

ATTEMPTS = 3
STREAMS = ("stdout", "stderr")


class _StoreStream(io.RawIOBase):
    """A whole output in the output store as a file to read (what boto3 uploads from)."""

    def __init__(self, data: Any, rec: OutputRecord, stream: str):
        self.data, self.rec, self.stream = data, rec, stream
        self.offset = 0
        self.size = getattr(rec, f"{stream}_have")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.size - self.offset, 1 << 20)
        if want <= 0:
            return 0
        chunk = self.data.read(self.rec.command_id, self.rec.invocation_id, self.stream, self.offset, want)
        buffer[:len(chunk)] = chunk
        self.offset += len(chunk)
        return len(chunk)


class S3Sink:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str, data: Any, reader: Any = None):
        try:
            import boto3  # the zerorun[s3] extra
        except ImportError:
            raise BrokerError("S3Unavailable", "--s3-bucket needs boto3: pip install 'zerorun[s3]'") from None
        self.bucket, self.prefix = bucket, prefix
        self._client = boto3.client("s3", endpoint_url=endpoint_url or None)
        self._data = reader if reader is not None else data  # what the worker thread may read with
        self._jobs: queue.SimpleQueue[tuple[OutputRecord, dict[str, bytes] | None] | None] = queue.SimpleQueue()
        self.stats = {"copied": 0, "failed": 0, "retried": 0}
        self._thread = threading.Thread(target=self._work, name="s3-sink", daemon=True)
        self._thread.start()

    def finished(self, rec: OutputRecord, inline: dict[str, bytes] | None = None) -> None:
        """An invocation's whole output is final (from the loop): copy it. ``inline``: the bytes of
        streams the view holds whole (the output store has no copy of those)."""
        self._jobs.put((rec, inline))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5.0)

    def key(self, rec: OutputRecord, stream: str) -> str:
        return f"{self.prefix}{rec.command_id}/{rec.instance_id}/{stream}"

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            rec, inline = job
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    self._copy(rec, inline)
                    self.stats["copied"] += 1
                    break
                except Exception as exc:  # the worker never dies of one upload
                    if attempt == ATTEMPTS:
                        self.stats["failed"] += 1
                        log.error("cannot copy the output of invocation %s to s3://%s: %s", rec.invocation_id[:8],
                                  self.bucket, exc)
                    else:
                        self.stats["retried"] += 1
                        time.sleep(attempt)

    def _copy(self, rec: OutputRecord, inline: dict[str, bytes] | None) -> None:
        for stream in STREAMS:
            source: Any
            if inline is not None and stream in inline:
                if not inline[stream]:
                    continue
                source, size, produced = io.BytesIO(inline[stream]), len(inline[stream]), len(inline[stream])
            else:
                size, produced = getattr(rec, f"{stream}_have"), getattr(rec, f"{stream}_size")
                if not size:
                    continue
                source = io.BufferedReader(_StoreStream(self._data, rec, stream), buffer_size=1 << 20)
            self._client.upload_fileobj(source, self.bucket, self.key(rec, stream), ExtraArgs={"Metadata": {
                "invocation-id": rec.invocation_id, "produced-bytes": str(produced),
                "whole": "yes" if size >= produced else "no"}})
