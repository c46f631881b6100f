"""Live output read from a running step's output file: what a follower is sent while the step runs
must be the start of the text the result carries, because its cursor counts characters in both."""

from __future__ import annotations

from agent.executor import _Tail
from agent.steps import capped_text

PIECES = [b"caf\xc3", b"\xa9 \xff\xfe binary\n", b"euro \xe2\x82", b"\xac and \xe2\x82 cut short\n", b"end\n"]


def _read_as_written(path, pieces, limit):
    path.write_bytes(b"")
    tail = _Tail.open(path, "stdout", "run", limit, at_end=False)
    assert tail is not None
    reads = []
    try:
        for piece in pieces:
            with path.open("ab") as f:
                f.write(piece)
            reads.append(tail.read())
        reads.append(tail.read())  # nothing new: nothing more
    finally:
        tail.close()
    return reads


def test_bytes_that_are_not_utf8_are_replaced_once_and_nothing_is_read_twice(tmp_path):
    written = b"".join(PIECES)
    reads = _read_as_written(tmp_path / "00.stdout", PIECES, limit=1 << 20)
    assert "".join(reads) == written.decode("utf-8", errors="replace") == capped_text(written, len(written), 1 << 20)
    assert reads[0] == "caf" and reads[1].startswith("\u00e9 \ufffd\ufffd binary")  # the cut character waited
    assert reads[-1] == ""


def test_live_text_up_to_the_limit_is_the_start_of_the_capped_result(tmp_path):
    written = b"".join(PIECES)
    for limit in range(1, len(written) + 1):
        live = "".join(_read_as_written(tmp_path / "00.stdout", PIECES, limit))
        final = capped_text(written, len(written), limit)
        assert final.startswith(live), (limit, live, final)
        assert len(final.split("\n[output truncated")[0]) - len(live) <= 1  # at most a character cut at the limit
