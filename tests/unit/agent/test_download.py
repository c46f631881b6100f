"""``aws:downloadContent``'s HTTP source against a real server on 127.0.0.1 that breaks off."""

from __future__ import annotations

import json
import socket
import threading

from agent import download


def _server_that_stops_short() -> tuple[socket.socket, threading.Thread]:
    """Says 100,000 bytes follow, sends ten and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n0123456789")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_download_cut_short_fails_the_step_in_one_line_and_leaves_nothing(tmp_path, capsys):
    listener, thread = _server_that_stops_short()
    try:
        port = listener.getsockname()[1]
        spec = tmp_path / "spec.json"
        target = tmp_path / "out" / "file.bin"
        spec.write_text(json.dumps({"sourceType": "HTTP", "url": f"http://127.0.0.1:{port}/file.bin",
                                    "destinationPath": str(target)}))
        assert download.main([str(spec)]) == 1
    finally:
        thread.join(10)
        listener.close()
    err = capsys.readouterr().err
    assert err.startswith("aws:downloadContent failed: cannot download http://127.0.0.1:") and "Traceback" not in err
    assert "10 bytes read, 99990 more expected" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not target.exists() and list(target.parent.iterdir()) == []
