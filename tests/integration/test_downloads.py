"""aws:downloadContent on real agents (issue 21): HTTP from a local server started by the test
(with a right and a wrong SHA-256), a stored document (SSMDocument), and a clear error naming
the step for the sources Zerorun does not support (the command is refused before anything runs)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared CLI helpers
from cli_support import run_json  # noqa: E402

HTTP_DOC = """schemaVersion: '2.2'
description: download a file over HTTP, then show it
parameters:
  url: {type: String}
  sha: {type: String, default: ""}
  dest: {type: String}
mainSteps:
  - action: aws:downloadContent
    name: fetch
    inputs:
      sourceType: HTTP
      sourceInfo: '{"url": "{{ url }}", "sha256": "{{ sha }}"}'
      destinationPath: "{{ dest }}"
  - action: aws:runShellScript
    name: show
    inputs:
      runCommand: ["cat {{ dest }}"]
"""

STORED_DOC = """schemaVersion: '2.2'
description: write a stored document to a file
parameters:
  dest: {type: String}
mainSteps:
  - action: aws:downloadContent
    name: fetch
    inputs:
      sourceType: SSMDocument
      sourceInfo:
        name: dl-payload
      destinationPath: "{{ dest }}"
"""

S3_DOC = """schemaVersion: '2.2'
description: an S3 download, then a step that still runs
mainSteps:
  - action: aws:downloadContent
    name: fetch
    inputs:
      sourceType: S3
      sourceInfo: '{"path": "https://bucket.s3.amazonaws.com/key"}'
  - action: aws:runShellScript
    name: after
    inputs:
      runCommand: ["echo after"]
"""

PAYLOAD_DOC = """schemaVersion: '2.2'
description: only content to be written by another document
mainSteps:
  - action: aws:runShellScript
    name: run
    inputs:
      runCommand: ["echo payload"]
"""


@pytest.fixture
def served(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.txt").write_bytes(b"hello from the server\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.txt", hashlib.sha256(b"hello from the server\n").hexdigest()
    server.shutdown()
    server.server_close()


def create(fleet, tmp_path, name, text):
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    proc = fleet.cli("documents", "create", name, str(path))
    assert proc.returncode == 0, proc.stderr


def test_http_download_with_the_right_and_a_wrong_sha256(web_db_fleet, tmp_path, served):
    url, sha = served
    create(web_db_fleet, tmp_path, "dl-http", HTTP_DOC)
    dest = tmp_path / "got" / "file.txt"
    rc, view, err = run_json(web_db_fleet, "send", "dl-http", "-p", f"url={url}", "-p", f"sha={sha}",
                             "-p", f"dest={dest}", "-i", "db-1")
    assert rc == 0, (err, view)
    inv = view["invocations"][0]
    assert inv["status"] == "Success", inv
    assert f"downloaded {url} to {dest}" in inv["steps"][0]["stdout"]
    assert inv["steps"][1]["stdout"] == "hello from the server\n"
    assert dest.read_bytes() == b"hello from the server\n"

    wrong = tmp_path / "wrong.txt"
    rc, view, _ = run_json(web_db_fleet, "send", "dl-http", "-p", f"url={url}", "-p", "sha=" + "0" * 64,
                           "-p", f"dest={wrong}", "-i", "db-1")
    fetch = view["invocations"][0]["steps"][0]
    assert fetch["status"] == "Failed" and "sha256 mismatch" in fetch["stderr"], fetch
    assert not wrong.exists() and not list(tmp_path.glob(".wrong.txt.*"))


def test_ssm_document_source_writes_the_stored_content(web_db_fleet, tmp_path):
    create(web_db_fleet, tmp_path, "dl-payload", PAYLOAD_DOC)
    create(web_db_fleet, tmp_path, "dl-stored", STORED_DOC)
    dest = tmp_path / "payload.yml"
    rc, view, err = run_json(web_db_fleet, "send", "dl-stored", "-p", f"dest={dest}", "-i", "db-1")
    assert rc == 0, (err, view)
    assert dest.read_text() == PAYLOAD_DOC


def test_unsupported_sources_are_refused_naming_the_step(web_db_fleet, tmp_path):
    create(web_db_fleet, tmp_path, "dl-s3", S3_DOC)
    proc = web_db_fleet.cli("send", "dl-s3", "-i", "db-1")
    assert proc.returncode != 0
    assert "step 'fetch': action 'aws:downloadContent' with sourceType 'S3' is not supported on Linux" in proc.stderr
    assert "Traceback" not in proc.stderr
