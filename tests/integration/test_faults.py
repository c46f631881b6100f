"""Faults survived, with real processes: frozen agents, a broker that goes away, live output."""

from __future__ import annotations

import signal
import time

import zmq

from zerorun import keys, protocol
from zerorun.testing import wait_until

from tests import raw_agent_support as raw_agent
from tests.small_disk_support import small_disk_at


def test_frozen_agent_is_detected_by_application_heartbeats(web_db_fleet):
    """SIGSTOP keeps the TCP connection (libzmq would still answer ZMTP pings), yet the agent
    must show ConnectionLost; after SIGCONT it is Online again."""
    fleet = web_db_fleet
    proc = fleet.agents["db-1"]
    proc.send_signal(signal.SIGSTOP)
    try:
        fleet.wait_status("db-1", "ConnectionLost", timeout=15)
    finally:
        proc.send_signal(signal.SIGCONT)
    fleet.wait_status("db-1", "Online", timeout=15)
    view = fleet.client().send("RunShellScript", {"commands": ["echo thawed"]}, ["tag:role=db"])
    assert fleet.client().wait(view.command_id, timeout=20).invocations[0].stdout == "thawed\n"


def test_result_finished_while_broker_is_away_arrives_after_reconnect(web_db_fleet):
    fleet = web_db_fleet
    view = fleet.client().send("RunShellScript", {"commands": ["sleep 1.5; echo while-away"]}, ["tag:role=db"])
    fleet.wait_invocations(view.command_id, "InProgress")
    fleet.stop_broker()  # a clean stop, the command still running on the agent
    fleet._clients.clear()
    fleet.wait_executed("db-1", view.command_id)  # it finishes now; the result waits in the agent's outbox
    fleet.start_broker()
    final = fleet.client().wait(view.command_id, timeout=30)
    assert final.status == "Success"
    assert final.invocations[0].stdout == "while-away\n"


def test_a_long_poll_on_a_broker_that_went_away_gives_it_the_request_timeout_to_come_back(web_db_fleet):
    """A `wait` waited out its whole long poll plus the request timeout when its broker was
    killed (with a slice of 200 s: 203 s); the closed connection now leaves the broker the
    request timeout to come back, and says that it went away."""
    import threading
    from zerorun.client import BrokerUnavailable, Client, ClientConfig

    fleet = web_db_fleet
    view = fleet.client().send("RunShellScript", {"commands": ["sleep 60"]}, ["tag:role=db"])
    client = fleet.adopt(Client(ClientConfig.load(fleet.client_config), timeout=3))
    assert client.get_command(view.command_id).status in ("Pending", "InProgress")  # connected
    outcome: list = []

    def wait() -> None:
        try:
            outcome.append(client.wait(view.command_id, timeout=400, poll_interval=200))
        except BrokerUnavailable as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.5)  # the long poll is at the broker
    fleet.kill_broker()
    waiter.join(60)
    assert outcome, "the wait still waits for a broker that went away"
    assert isinstance(outcome[0], BrokerUnavailable) and "went away" in str(outcome[0]), outcome


def test_big_results_finished_while_the_broker_is_away_all_arrive(fleet):
    """Three results of 4.3 MB that is not UTF-8 (about 25 MiB each once decoded, step and
    invocation) used to be resent after the Welcome in one message, over the 64 MiB MAXMSGSIZE:
    the broker dropped the connection, and the agent sent them again after every Welcome."""
    fleet.start_agents({"big-1": {"role": "big"}})
    client = fleet.client()
    script = "sleep 2; head -c 4300000 /dev/zero | tr '\\0' '\\377'"
    ids = [client.send("RunShellScript", {"commands": [script]}, ["tag:role=big"]).command_id for _ in range(3)]
    for command_id in ids:
        fleet.wait_invocations(command_id, "InProgress")
    fleet.stop_broker()
    fleet._clients.clear()
    for command_id in ids:
        fleet.wait_executed("big-1", command_id)
    fleet.start_broker()
    for command_id in ids:
        final = fleet.client().wait(command_id, timeout=60)
        assert final.status == "Success" and final.invocations[0].stdout_size == 4_300_000, final.status


def test_big_live_output_of_several_steps_keeps_the_connection(fleet):
    """Three steps writing 4.3 MB that is not UTF-8 on both streams at once: the live output read
    in one tick (about 75 MiB once decoded) went in one message, over the 64 MiB MAXMSGSIZE, and
    the broker dropped the agent's connection."""
    fleet.start_agents({"live-1": {"role": "live"}})
    client = fleet.client()
    script = ("sleep 1; head -c 4300000 /dev/zero | tr '\\0' '\\377'; "
              "head -c 4300000 /dev/zero | tr '\\0' '\\376' >&2; sleep 2")
    ids = [client.send("RunShellScript", {"commands": [script]}, ["tag:role=live"]).command_id for _ in range(3)]
    for command_id in ids:
        assert fleet.client().wait(command_id, timeout=60).status == "Success"
    assert "disconnected from broker" not in fleet.agent_log("live-1")


def test_live_output_streams_while_the_step_runs(web_db_fleet):
    fleet = web_db_fleet
    client = fleet.client()
    script = "for i in 1 2 3; do echo line-$i; echo err-$i >&2; sleep 0.6; done"
    view = client.send("RunShellScript", {"commands": [script]}, ["tag:role=web"])
    cursors: dict[str, int] = {}
    seen: dict[tuple[str, str], str] = {}
    first_chunk_at = None
    deadline = time.time() + 30
    while time.time() < deadline:
        update = client.follow(view.command_id, cursors, timeout=5)
        cursors = update.cursors
        for chunk in update.chunks:
            key = (chunk.invocation_id, chunk.stream)
            seen[key] = seen.get(key, "") + chunk.data
            if first_chunk_at is None and "line-1" in chunk.data:
                first_chunk_at = time.time()
        if update.done:
            break
    final = client.get_command(view.command_id)
    assert final.status == "Success"
    assert first_chunk_at is not None and first_chunk_at < final.invocations[0].ended_at - 0.5, \
        "output must arrive while the step still runs"
    for inv in final.invocations:
        assert seen[(inv.instance_id, "stdout")] == "line-1\nline-2\nline-3\n"
        assert seen[(inv.instance_id, "stderr")] == "err-1\nerr-2\nerr-3\n"
    # following a finished command returns everything at once
    replay = client.follow(view.command_id, {}, instance_ids=["web-1"], timeout=0)
    assert replay.done and {c.stream for c in replay.chunks} == {"stdout", "stderr"}
    assert all(c.invocation_id == "web-1" for c in replay.chunks)


def test_live_output_that_is_not_utf8_is_followed_as_the_result_shows_it(web_db_fleet):
    """Bytes that are not UTF-8, and a character cut between two reads of the output file: the
    follower's text is the result's, each byte once (a cursor counts characters of both)."""
    client = web_db_fleet.client()
    script = r"printf 'caf\303'; sleep 0.6; printf '\251 \377 binary\n'; sleep 0.6; printf 'end\n'"
    view = client.send("RunShellScript", {"commands": [script]}, ["tag:role=db"])
    cursors: dict[str, int] = {}
    seen, live = "", ""
    deadline = time.time() + 30
    while time.time() < deadline:
        update = client.follow(view.command_id, cursors, timeout=5)
        cursors = update.cursors
        for chunk in update.chunks:
            if chunk.stream == "stdout":
                seen += chunk.data
                if not update.done:
                    live += chunk.data
        if update.done:
            break
    final = client.get_command(view.command_id).invocations[0]
    assert final.status == "Success" and final.stdout == "caf\u00e9 \ufffd binary\nend\n"
    assert "\ufffd binary" in live, "the replaced byte must have been read while the step ran"
    assert seen == final.stdout


def test_output_cap_truncates_with_a_marker_and_keeps_the_size(fleet_factory):
    fleet = fleet_factory("cap")
    fleet.start_broker("--max-output-bytes", "1000")
    fleet.start_agents({"big-1": {"role": "big"}})
    view = fleet.client().send("RunShellScript", {"commands": ["yes x | head -c 50000"]},
                               ["tag:role=big"])
    inv = fleet.client().wait(view.command_id, timeout=30).invocations[0]
    assert inv.status == "Success"
    assert inv.stdout_size == 50000
    assert inv.stdout.startswith("x\n" * 500) and "output truncated by the broker: 50000 bytes" in inv.stdout


def test_output_cap_holds_for_every_text_of_a_result(fleet_factory, tmp_path):
    """The cap holds for the steps' output too, whatever the agent sends: an honest agent keeps
    more per step than a broker with a smaller cap, and a hostile one sends what it likes (steps
    it was never given, megabytes of details); the store keeps the capped text."""
    fleet = fleet_factory("cap")
    fleet.start_broker("--max-output-bytes", "1000")
    fleet.start_agents({"big-1": {"role": "big"}})
    view = fleet.client().send("RunShellScript", {"commands": ["yes x | head -c 50000"]}, ["tag:role=big"])
    inv = fleet.client().wait(view.command_id, timeout=30).invocations[0]
    assert inv.status == "Success" and len(inv.steps) == 1
    assert len(inv.steps[0].stdout) < 1100 and "output truncated by the broker: 50000 bytes" in inv.steps[0].stdout
    assert inv.steps[0].stdout_size == 50000

    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    try:
        raw_agent.hello(sock, "raw-1", tags={"role": "raw"})
        view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        deliveries = [m for m in raw_agent.receive(sock, 5, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        (delivered,) = deliveries[0].invocations
        big = "y" * 50000
        steps = [protocol.StepResult(f"step-{n}", "Success", exit_code=0, stdout=big, stderr=big, detail=big)
                 for n in range(20)]
        sock.send_multipart(protocol.frames(protocol.Results([protocol.InvocationResult(
            delivered.invocation_id, "Success", status_details=big, exit_code=0, stdout="ok\n", steps=steps)])))
        inv = fleet.client().wait(view.command_id, timeout=30).invocations[0]
    finally:
        sock.close(0)
        ctx.term()
    assert inv.status == "Success" and inv.stdout == "ok\n"
    assert len(inv.steps) == len(delivered.steps) == 1, "steps it was never given are not kept"
    assert len(inv.status_details) <= 1100
    for step in inv.steps:
        assert max(len(step.stdout), len(step.stderr), len(step.detail)) < 1100, step


def test_an_agent_refusal_is_kept_at_the_size_of_a_detail(fleet, tmp_path):
    """A Refuse's message becomes the invocation's stderr: like every text of a result, it is
    kept cut (it went to the store and every view whole, whatever its size)."""
    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    try:
        raw_agent.hello(sock)
        view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["instance:raw-1"])
        (deliver,) = [m for m in raw_agent.receive(sock, 5, until=protocol.Deliver) if isinstance(m, protocol.Deliver)]
        sock.send_multipart(protocol.frames(protocol.Refuse([protocol.Refusal(
            deliver.invocations[0].invocation_id, "invalid", "r" * 5_000_000)])))
        inv = fleet.client().wait(view.command_id, timeout=30).invocations[0]
    finally:
        sock.close(0)
        ctx.term()
    assert inv.status == "Failed" and inv.status_details == "invalid"
    assert inv.stderr.startswith("rrr") and len(inv.stderr) <= 1100, len(inv.stderr)


def test_an_interactive_request_answered_as_another_kind_fails_at_once(fleet, tmp_path):
    """An exec answered with a FileDone (a broken or hostile agent) was taken off the broker's
    books and never answered: the client waited for its own timeout. It hears now."""
    import threading

    from zerorun.client import RequestFailed

    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    outcome: list = []

    def run_exec() -> None:
        try:
            outcome.append(fleet.client(timeout=60).exec("raw-1", "true"))
        except RequestFailed as exc:
            outcome.append(exc)

    try:
        raw_agent.hello(sock)
        caller = threading.Thread(target=run_exec, daemon=True)
        caller.start()
        (asked,) = [m for m in raw_agent.receive(sock, 10, until=protocol.AgentExec)
                    if isinstance(m, protocol.AgentExec)]
        sock.send_multipart(protocol.frames(protocol.FileDone(asked.request_id, ok=True)))
        caller.join(30)  # the client's own timeout is 60 s
    finally:
        sock.close(0)
        ctx.term()
    assert not caller.is_alive() and len(outcome) == 1, outcome
    assert isinstance(outcome[0], RequestFailed) and outcome[0].code == "AgentError", outcome
    assert "answered the exec request as a file one" in str(outcome[0])
    assert fleet.client().ping()["instances"] == 1  # the broker goes on


def test_an_agent_closing_a_stream_again_and_again_is_told_once(fleet, tmp_path):
    """Each end of a session's stream an agent sent was kept until the client's next poll: a
    broken or hostile agent repeating it grew the broker's memory for as long as nobody polled."""
    import threading

    keys.create_keypair(tmp_path / "raw", "agent")
    ctx = zmq.Context()
    sock = raw_agent.connect(ctx, fleet.runtime(), tmp_path / "raw")
    opened: list = []
    client = fleet.client(timeout=30)
    try:
        raw_agent.hello(sock)
        opener = threading.Thread(target=lambda: opened.append(client.request(
            protocol.OpenSession(instance_id="raw-1", kind="shell"))), daemon=True)
        opener.start()
        (start,) = [m for m in raw_agent.receive(sock, 10, until=protocol.SessionStart)
                    if isinstance(m, protocol.SessionStart)]
        sock.send_multipart(protocol.frames(protocol.SessionStarted(start.session_id)))
        opener.join(10)
        for seq in range(1, 2001):
            sock.send_multipart(protocol.frames(protocol.SessionData(start.session_id, seq=seq, eof=True)))
        told: list[str] = []
        while True:  # every poll until one in which nothing comes for a second
            update = protocol.convert(client.request(protocol.SessionIO(session_id=start.session_id, wait=1.0)),
                                      protocol.SessionUpdate)
            if not update.eof:
                break
            told += update.eof
    finally:
        sock.close(0)
        ctx.term()
    assert len(opened) == 1
    assert told == [""], (len(told), told[:5])
    assert fleet.client().ping()["instances"] == 1  # the broker goes on


def test_canary_stops_after_a_failing_first_instance(fleet):
    fleet.start_agents({f"c-{n}": {"role": "canary"} for n in range(4)})
    view = fleet.client().send("RunShellScript", {"commands": ["exit 1"]}, ["tag:role=canary"], first=1,
                               max_errors="100%")
    final = fleet.client().wait(view.command_id, timeout=30)
    assert final.counts == {"Failed": 1, "Cancelled": 3}
    assert final.status == "Failed"
    assert {i.status_details for i in final.invocations if i.status == "Cancelled"} == {protocol.TERMINATED}


def test_execution_timeout_lets_cleanup_traps_run(web_db_fleet, tmp_path):
    """SIGTERM to the whole group first: a trap gets to clean up before SIGKILL."""
    cleaned = tmp_path / "cleaned"
    script = f"trap 'echo cleaned > {cleaned}; exit 143' TERM; sleep 30 & wait"
    view = web_db_fleet.client().send("RunShellScript", {"commands": [script]}, ["tag:role=db"],
                                      execution_timeout=1)
    inv = web_db_fleet.client().wait(view.command_id, timeout=30).invocations[0]
    assert inv.status == "TimedOut" and inv.status_details == "ExecutionTimedOut"
    assert cleaned.read_text() == "cleaned\n"


def test_pending_work_of_a_deleted_instance_is_undeliverable(web_db_fleet):
    fleet = web_db_fleet
    fleet.stop_agent("db-1")
    fleet.wait_status("db-1", "ConnectionLost")
    view = fleet.client().send("RunShellScript", {"commands": ["true"]}, ["tag:role=db"])
    fleet.client().key_action("delete", "db-1")
    final = fleet.client().wait(view.command_id, timeout=20)
    assert final.invocations[0].status == "Undeliverable"
    assert "deleted" in final.invocations[0].status_details


def test_sigterm_drains_running_work(web_db_fleet, tmp_path):
    """A stopping agent lets a running command finish and reports it before it exits."""
    fleet = web_db_fleet
    view = fleet.client().send("RunShellScript", {"commands": ["sleep 1; echo drained"]}, ["tag:role=db"])
    fleet.wait_invocations(view.command_id, "InProgress")
    fleet.stop_agent("db-1")
    inv = fleet.client().wait(view.command_id, timeout=20).invocations[0]
    assert inv.status == "Success" and inv.stdout == "drained\n"
    assert "draining" in fleet.agent_log("db-1")


def test_insecure_mode_works_and_says_so(fleet_factory):
    fleet = fleet_factory("insecure", insecure=True)
    fleet.start_broker()
    fleet.start_agents({"plain-1": {"role": "plain"}})
    proc = fleet.cli("send", "RunShellScript", "-t", "tag:role=plain", "-p", "commands=echo plaintext")
    assert proc.returncode == 0 and "plaintext" in proc.stdout
    assert "INSECURE MODE" in fleet.broker_log()


def test_a_full_disk_stops_no_broker_and_loses_nothing_it_acknowledged(fleet_factory):
    """A commit SQLite could not write (a full disk) stopped the broker, and with it every command of
    the fleet. It keeps what is queued, refuses requests with one clear error (a ping says why),
    and commits all of it, and serves again, once there is room."""
    fleet = fleet_factory("full")
    try:
        with small_disk_at(fleet.broker_dir, "8m") as disk:
            fleet.start_broker()
            fleet.start_agents({"f-1": {"role": "full"}})
            marker = fleet.root / "go"
            running = fleet.client().send("RunShellScript", {"commands": [
                f"while [ ! -e {marker} ]; do sleep 0.1; done", "head -c 400000 /dev/zero | tr '\\0' z",
                "echo; echo finished-while-full"]}, ["tag:role=full"])
            fleet.wait_invocations(running.command_id, "InProgress")
            disk.fill()
            marker.touch()  # its result arrives and cannot be committed
            wait_until(lambda: fleet.broker.poll() is not None or fleet.client().ping().get("store", {}).get("failed"),
                       "the broker to find it cannot commit")
            assert fleet.broker.poll() is None, fleet.broker_log()[-2000:]
            refused = fleet.cli("send", "RunShellScript", "-t", "tag:role=full", "-p", "commands=echo refused")
            assert refused.returncode != 0, refused.stdout
            assert "StoreUnavailable" in refused.stderr and "disk is full" in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr
            pinged = fleet.cli("ping")
            assert pinged.returncode == 0 and "database cannot be written (database or disk is full)" in pinged.stdout
            assert fleet.broker.poll() is None
            disk.free()
            wait_until(lambda: not fleet.client().ping()["store"]["failed"], "the broker to commit again")
            done = fleet.client().wait(running.command_id, timeout=30)
            assert done.status == "Success" and done.invocations[0].stdout == "z" * 400000 + "\nfinished-while-full\n"
            after = fleet.cli("send", "RunShellScript", "-t", "tag:role=full", "-p", "commands=echo after")
            assert after.returncode == 0 and "after" in after.stdout, after.stderr
            assert "cannot write the broker's database" in fleet.broker_log()
            assert "Traceback" not in fleet.broker_log()
    finally:
        fleet.close()


def _broker_that_cannot_commit(fleet, disk, instance_id: str, role: str, char: str):
    """A broker and an agent, the broker's disk filled, and a command whose result (400,000 times
    ``char``) the broker cannot commit; returns that command's view once the broker knows."""
    fleet.start_broker()
    fleet.start_agents({instance_id: {"role": role}})
    disk.fill()
    big = fleet.client().send("RunShellScript", {"commands": [f"head -c 400000 /dev/zero | tr '\\0' {char}"]},
                              [f"tag:role={role}"])
    wait_until(lambda: fleet.client().ping().get("store", {}).get("failed"), "the broker to find it cannot commit")
    return big


def test_a_broker_that_cannot_commit_keeps_its_agents_and_tells_new_ones_why(fleet_factory):
    """While the broker could not commit, nothing answered its agents (a Pong waited for the commit
    like everything else), so every agent found it silent and reconnected, again and again, and
    one that connected then waited for a Welcome that could not come. Pongs go at once; a HELLO
    is answered at once that the broker cannot write, and the agent says HELLO again later."""
    fleet = fleet_factory("full-agents")
    try:
        with small_disk_at(fleet.broker_dir, "8m") as disk:
            big = _broker_that_cannot_commit(fleet, disk, "k-1", "keep", "z")
            fleet.start_agent("k-2", {"role": "keep"})
            wait_until(lambda: "cannot write its database" in fleet.agent_log("k-2"),
                       "the agent that came meanwhile to be told why it is not welcomed")
            time.sleep(10 * fleet.heartbeat_interval * 3)  # ten of the agents' liveness windows
            for iid in ("k-1", "k-2"):
                assert "reconnecting" not in fleet.agent_log(iid), fleet.agent_log(iid)[-2000:]
            disk.free()
            wait_until(lambda: not fleet.client().ping()["store"]["failed"], "the broker to commit again")
            fleet.wait_online(["k-1", "k-2"])
            assert fleet.client().wait(big.command_id, timeout=30).invocations[0].stdout == "z" * 400000
            done = fleet.cli("send", "RunShellScript", "-t", "tag:role=keep", "-p", "commands=echo back")
            assert done.returncode == 0 and done.stdout.count("back") == 2, done.stdout + done.stderr
            assert fleet.broker.poll() is None and "Traceback" not in fleet.broker_log()
    finally:
        fleet.close()


def test_a_broker_stopped_while_it_cannot_commit_says_so_and_loses_nothing_acknowledged(fleet_factory):
    """Stopping a broker whose disk was full ended in a traceback (its last commit raised out of
    closing the store). It says what it could not write; a result not committed was never
    acknowledged, so its agent sends it again to the broker started once there is room."""
    fleet = fleet_factory("full-stop")
    try:
        with small_disk_at(fleet.broker_dir, "8m") as disk:
            big = _broker_that_cannot_commit(fleet, disk, "s-1", "stop", "y")
            assert fleet.stop_broker() == 0, fleet.broker_log()[-3000:]
            assert "closing with uncommitted writes, none of them acknowledged" in fleet.broker_log()
            assert "Traceback" not in fleet.broker_log(), fleet.broker_log()[-3000:]
            disk.free()
            fleet.start_broker()
            done = fleet.client().wait(big.command_id, timeout=30)
            assert done.status == "Success" and done.invocations[0].stdout == "y" * 400000
    finally:
        fleet.close()


def test_a_whole_output_the_full_disk_cannot_take_is_incomplete_and_its_result_is_kept(fleet_factory):
    """A whole output the broker could not write (a full disk) raised out of the handler: the
    read from the agent never ended. It ends incomplete, saying why; the result is kept."""
    fleet = fleet_factory("full-output")
    try:
        with small_disk_at(fleet.broker_dir / "outputs", "64k") as outputs:
            outputs.fill()
            fleet.start_broker("--max-output-bytes", "100000")
            fleet.start_agent("o-1", {"role": "full"}, "--max-output-bytes", "100000")
            fleet.wait_online(["o-1"])
            view = fleet.client().send("RunShellScript", {"commands": ["head -c 400000 /dev/zero | tr '\\0' z"]},
                                       ["tag:role=full"])
            done = fleet.client().wait(view.command_id, timeout=30)
            (inv,) = done.invocations
            assert inv.status == "Success" and inv.stdout.startswith("z" * 1000)
            whole = wait_until(lambda: (s := fleet.client().output_slice(view.command_id, "o-1")).pending is False and s,
                               "the whole output's read to end")
            assert not whole.complete and "could not store it: No space left on device" in whole.note, whole.note
            assert fleet.broker.poll() is None and "Traceback" not in fleet.broker_log()
    finally:
        fleet.close()
