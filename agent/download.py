"""``aws:downloadContent`` on the agent: ``python -m agent.download SPEC_FILE``, run as the step.

The spec is JSON rendered by the broker (``zerorun/documents/render.py``): ``sourceType`` HTTP
(``url``, optional ``sha256``) or SSMDocument (``name``, ``content``), and ``destinationPath``.
A relative or empty destination is taken in the step's working directory (empty: the URL's last
path segment, or the document's name). The file is written beside its destination and renamed
into place only once complete and, when a SHA-256 is given, verified: a wrong one leaves nothing.
An ``error`` in the spec (an unsupported source) fails the step with it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

TIMEOUT = 60.0
CHUNK = 1 << 16


class DownloadError(Exception):
    pass


def destination(spec: dict, default_name: str) -> Path:
    path = Path(spec.get("destinationPath") or default_name)
    if spec.get("destinationPath", "").endswith("/") or path.is_dir():
        path = path / default_name
    return path if path.is_absolute() else Path.cwd() / path


def write_atomically(target: Path, chunks, sha256: str = "") -> tuple[int, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise DownloadError(f"sha256 mismatch: the content has {got}, the document expects {sha256}; "
                                f"nothing was written to {target}")
        os.replace(tmp, target)
        return size, got
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def http_chunks(url: str):
    """The body's chunks; a body that ends before its Content-Length is an error (``read(n)``
    returns what came and then nothing, as if complete), as is a broken chunked one."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            expected, got = response.length, 0
            while chunk := response.read(CHUNK):
                got += len(chunk)
                yield chunk
            if expected is not None and got < expected:
                raise DownloadError(f"cannot download {url}: the connection closed early ({got} bytes read, "
                                    f"{expected - got} more expected)")
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"cannot download {url}: {exc!r}" if isinstance(exc, http.client.HTTPException)
                            else f"cannot download {url}: {exc}") from None


def run(spec: dict) -> str:
    if spec.get("error"):
        raise DownloadError(spec["error"])
    kind = spec.get("sourceType")
    if kind == "HTTP":
        url = spec["url"]
        name = Path(urllib.parse.urlparse(url).path).name or "download"
        target = destination(spec, name)
        size, digest = write_atomically(target, http_chunks(url), spec.get("sha256", ""))
        return f"downloaded {url} to {target} ({size} bytes, sha256 {digest})"
    if kind == "SSMDocument":
        target = destination(spec, spec["name"])
        size, digest = write_atomically(target, [spec["content"].encode()])
        return f"wrote document {spec['name']} to {target} ({size} bytes, sha256 {digest})"
    raise DownloadError(f"unsupported sourceType {kind!r}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(Path(args[0]).read_text())
        print(run(spec))
        return 0
    except DownloadError as exc:
        print(f"aws:downloadContent failed: {exc}", file=sys.stderr)
    except (OSError, IndexError, KeyError, ValueError) as exc:
        print(f"aws:downloadContent failed: {exc!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
