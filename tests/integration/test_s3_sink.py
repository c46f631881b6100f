"""The optional S3 sink (issue 22): whole outputs copied to an S3-compatible bucket, here a moto
server started by the test on 127.0.0.1 (skipped, saying so, where moto or boto3 is missing)."""

from __future__ import annotations

import logging
import time

import pytest

from tests.cli_support import run_json

boto3 = pytest.importorskip("boto3", reason="the S3 sink needs boto3 (pip install 'zerorun[s3]')")
moto_server = pytest.importorskip("moto.server", reason="the S3 test needs moto's server mode (pip install "
                                                        "'moto[server]')")


@pytest.fixture
def s3(monkeypatch):
    for name, value in (("AWS_ACCESS_KEY_ID", "zerorun-test"), ("AWS_SECRET_ACCESS_KEY", "zerorun-test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)  # the broker process inherits them
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="zr-outputs")
    yield endpoint, client
    server.stop()


def _object(client, key: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_object(Bucket="zr-outputs", Key=key)
        except client.exceptions.NoSuchKey:
            assert time.monotonic() < deadline, f"no object {key}"
            time.sleep(0.1)


def test_finished_outputs_are_copied_to_the_bucket(fleet_factory, s3, tmp_path):
    endpoint, client = s3
    fleet = fleet_factory("s3")
    fleet.start_broker("--s3-bucket", "zr-outputs", "--s3-prefix", "runs/", "--s3-endpoint-url", endpoint)
    fleet.start_agent("box-1", {"role": "box"}, "--max-output-bytes", "65536")
    fleet.wait_online(["box-1"])
    script = tmp_path / "big.py"
    script.write_text("import sys\nsys.stdout.buffer.write(bytes(range(256)) * 4000)\nsys.stderr.write('warn\\n')\n")
    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=box", "-p",
                               f"commands=python3 {script}")
    assert code == 0, err
    cid = view["command_id"]
    stdout = _object(client, f"runs/{cid}/box-1/stdout")
    assert stdout["Body"].read() == bytes(range(256)) * 4000  # whole: beyond the agent's 64 KiB cap
    assert stdout["Metadata"]["whole"] == "yes"
    assert stdout["Metadata"]["invocation-id"] == view["invocations"][0]["invocation_id"]
    assert _object(client, f"runs/{cid}/box-1/stderr")["Body"].read() == b"warn\n"

    code, view, err = run_json(fleet, "send", "RunShellScript", "-t", "tag:role=box", "-p", "commands=echo small")
    assert _object(client, f"runs/{view['command_id']}/box-1/stdout")["Body"].read() == b"small\n"
