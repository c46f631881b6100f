"""Live output of running invocations, kept in memory until their result arrives.

The final output is stored with the result; these buffers only serve followers
(``zerorun logs --follow``) while a step runs, capped per stream like the stored output.
"""

from __future__ import annotations


class LiveOutput:
    def __init__(self, limit: int):
        self.limit = limit
        self._parts: dict[tuple[str, str], list[str]] = {}
        self._sizes: dict[tuple[str, str], int] = {}

    def append(self, invocation_id: str, stream: str, data: str) -> bool:
        key = (invocation_id, stream)
        size = self._sizes.get(key, 0)
        if size >= self.limit or stream not in ("stdout", "stderr"):
            return False
        data = data[: self.limit - size]
        self._parts.setdefault(key, []).append(data)
        self._sizes[key] = size + len(data)
        return True

    def text(self, invocation_id: str, stream: str) -> str:
        parts = self._parts.get((invocation_id, stream))
        if not parts:
            return ""
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0]

    def drop(self, invocation_id: str) -> None:
        for stream in ("stdout", "stderr"):
            self._parts.pop((invocation_id, stream), None)
            self._sizes.pop((invocation_id, stream), None)
