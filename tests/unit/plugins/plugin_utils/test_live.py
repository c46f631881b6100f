"""plugin_utils/live.py: progress counts and lines, their rate limit, output lines, who shows what,
and the Watch loop over a scripted client and a fake clock."""

from types import SimpleNamespace

import pytest

from ansible_collections.zerorun.fleet.plugins.plugin_utils import coalesce, live
from zerorun import protocol


# -- progress --------------------------------------------------------------------------------------

def test_status_vocabulary_matches_the_protocol():
    assert live.TERMINAL == protocol.TERMINAL_STATUSES
    assert live.RUNNING == {protocol.IN_PROGRESS, protocol.CANCELLING}


def test_progress_from_counts_counts_every_ended_non_success_as_failed():
    progress = live.Progress.from_counts({"Success": 2, "Failed": 1, "Cancelled": 1, "TimedOut": 1,
                                          "InProgress": 3, "Cancelling": 1, "Pending": 2}, 11)
    assert progress == live.Progress(done=5, running=4, failed=3, pending=2, total=11)


def test_progress_total_covers_instances_not_counted_yet():
    assert live.Progress.from_counts({"Success": 1}, 4) == live.Progress(1, 0, 0, 3, 4)
    assert live.Progress.from_counts({"Success": 1, "Pending": 1}) == live.Progress(1, 0, 0, 1, 2)


def test_progress_from_follow_statuses():
    statuses = {"a": "Success", "b": "InProgress", "c": "Undeliverable", "d": "Pending"}
    assert live.Progress.from_statuses(statuses) == live.Progress(done=2, running=1, failed=1, pending=1, total=4)


def test_progress_line():
    line = live.progress_line("c0ffee", live.Progress(2, 2, 1, 1, 5), 20.7)
    assert line == "zerorun: command c0ffee: 2/5 done, 2 running, 1 failed, 1 pending (20s)"


# -- the rate limit of progress lines -----------------------------------------------------------------

P1 = live.Progress(0, 1, 0, 0, 1)
P2 = live.Progress(1, 0, 0, 0, 1)


def test_no_line_before_one_interval_of_waiting():
    gate = live.ProgressGate(10, started=100.0)
    assert not gate.due(109.9, P1)
    assert gate.due(110.0, P1)


def test_then_at_most_one_line_per_interval_when_counts_change():
    gate = live.ProgressGate(10, started=100.0)
    gate.shown(110.0, P1)
    assert not gate.due(115.0, P2)  # changed, but too soon
    assert gate.due(120.0, P2)
    assert not gate.due(120.0, P1)  # unchanged: only a heartbeat later


def test_unchanged_counts_give_a_heartbeat_every_few_intervals():
    gate = live.ProgressGate(10, started=0.0, heartbeat=6)
    gate.shown(10.0, P1)
    assert not gate.due(69.9, P1)
    assert gate.due(70.0, P1)


def test_interval_zero_shows_no_progress():
    gate = live.ProgressGate(0, started=0.0)
    assert not gate.enabled and not gate.due(1000.0, P1) and not gate.shown_any


# -- output lines -------------------------------------------------------------------------------------

def test_lines_are_prefixed_by_the_instance_as_the_cli_does():
    assert live.output_line("web-1", "stdout", "hello", 6) == "web-1  | hello"
    assert live.output_line("web-1", "stderr", "oops", 6) == "web-1  ! oops"
    assert live.end_line("db-1", "Failed", 6) == "db-1   -- Failed"


def test_prefix_width_is_capped():
    assert live.prefix_width(["a", "abc"]) == 3
    assert live.prefix_width([]) == 0
    assert live.prefix_width(["x" * 100]) == live.MAX_PREFIX


def test_line_assembler_keeps_a_line_until_its_end_arrives():
    lines = live.LineAssembler()
    assert lines.feed("a", "stdout", "one\ntw") == ["one"]
    assert lines.feed("b", "stdout", "other\n") == ["other"]
    assert lines.feed("a", "stderr", "err") == []
    assert lines.feed("a", "stdout", "o\r\nthree") == ["two"]
    assert lines.flush("a") == [("a", "stderr", "err"), ("a", "stdout", "three")]
    assert lines.flush() == []


def test_line_assembler_empty_lines_are_kept():
    assert live.LineAssembler().feed("a", "stdout", "\n\nx\n") == ["", "", "x"]


# -- who shows what --------------------------------------------------------------------------------

def test_one_process_per_command_shows_it():
    assert live.shows_live(explicit=True, leader=False)
    assert live.shows_live(explicit=False, leader=True)
    assert not live.shows_live(explicit=False, leader=False)


def test_output_is_followed_only_with_v_and_never_for_no_log():
    assert not live.follows_output(0) and live.follows_output(1) and live.follows_output(4)
    assert not live.follows_output(3, no_log=True)


def test_followers_wait_for_the_leader_only_when_it_prints():
    assert live.awaits_leader(True, False, 10)
    assert live.awaits_leader(True, True, 0)
    assert not live.awaits_leader(True, False, 0)
    assert not live.awaits_leader(False, True, 10)


def test_result_dump_is_hidden_only_when_all_its_output_was_shown():
    assert live.hide_result_dump(1, ["a", "b"], {"a", "b", "c"})
    assert not live.hide_result_dump(1, ["a", "b"], {"a"})
    assert not live.hide_result_dump(0, ["a"], {"a"})
    assert not live.hide_result_dump(1, [], {"a"})


def test_the_leader_says_what_it_showed_and_followers_wait_for_it(state_dir):
    rendezvous = coalesce.Rendezvous("k" * 64, state_dir)
    leader = rendezvous.join("a", "i-a", {"a": "i-a", "b": "i-b"})
    follower = rendezvous.join("b", "i-b", None)
    assert rendezvous.await_shown(follower, 0.1) is None  # not yet: bounded
    rendezvous.record_shown(leader, {"i-b", "i-a"})
    assert rendezvous.await_shown(follower, 0.1) == ["i-a", "i-b"]


def test_a_leader_that_stopped_releases_its_followers(state_dir):
    rendezvous = coalesce.Rendezvous("f" * 64, state_dir)
    leader = rendezvous.join("a", "i-a", {"a": "i-a", "b": "i-b"})
    follower = rendezvous.join("b", "i-b", None)
    rendezvous.finish(leader)
    assert rendezvous.await_shown(follower, 5) == []


# -- the Watch, over a scripted client --------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def update(chunks=(), statuses=None, done=False):
    return protocol.OutputUpdate(command_id="c1", status="Success" if done else "InProgress", done=done,
                                 chunks=[protocol.OutputChunk(i, s, d) for i, s, d in chunks],
                                 cursors={"n": 1}, statuses=statuses or {})


def view(status, counts, target_count=2):
    return SimpleNamespace(status=status, counts=counts, target_count=target_count, command_id="c1")


class Scripted:
    """Answers follow/wait from a script; each answer advances the clock as a long-poll would."""

    def __init__(self, clock, follows=(), waits=()):
        self.clock, self.follows, self.waits = clock, list(follows), list(waits)
        self.calls = []

    def follow(self, command_id, cursors, instance_ids=(), timeout=10.0):
        self.calls.append(("follow", timeout))
        elapsed, answer = self.follows.pop(0)
        self.clock.now += elapsed
        return answer

    def wait(self, command_id, timeout=None, include_output=True, on_progress=None, poll_interval=15.0,
             instance_ids=()):
        self.calls.append(("wait", timeout, include_output, poll_interval))
        while True:
            elapsed, answer = self.waits.pop(0)
            self.clock.now += elapsed
            if answer.status in live.TERMINAL or on_progress is None:
                return answer
            on_progress(answer)

    def get_command(self, command_id, include_output=True, instance_ids=()):
        self.calls.append(("get", list(instance_ids)))
        return view("Success", {"Success": 2})


def test_follow_shows_lines_as_they_come_then_each_end():
    clock, shown = Clock(), []
    client = Scripted(clock, follows=[
        (0.2, update([("web-1", "stdout", "one\ntw")], {"web-1": "InProgress", "db-1": "Pending"})),
        (0.3, update([("web-1", "stdout", "o"), ("db-1", "stderr", "oops\n")], {"web-1": "Success", "db-1": "InProgress"})),
        (0.1, update([], {"web-1": "Success", "db-1": "Failed"}, done=True)),
    ])
    watch = live.Watch(client, "c1", lambda text, out: shown.append((text, out)), follow=True, progress_interval=10,
                       width=5, instance_ids=["web-1"], clock=clock)
    final = watch.run(None)
    assert final.status == "Success" and client.calls[-1] == ("get", ["web-1"])
    assert shown == [("web-1 | one", True),
                     ("db-1  ! oops\nweb-1 | two\nweb-1 -- Success", True),
                     ("db-1  -- Failed", True)]
    assert watch.shown == {"web-1", "db-1"}
    assert [c[1] for c in client.calls if c[0] == "follow"] == [10, 10, 10]  # slices of one interval


def test_follow_stops_at_the_deadline_and_shows_the_unfinished_line():
    clock, shown = Clock(), []
    client = Scripted(clock, follows=[(5.0, update([("a", "stdout", "no newline yet")], {"a": "InProgress"}))])
    watch = live.Watch(client, "c1", lambda text, out: shown.append(text), follow=True, progress_interval=0,
                       clock=clock)
    watch.run(5)
    assert client.calls[0] == ("follow", 5)
    assert shown == ["a | no newline yet"] and watch.shown == set()


def test_follow_shows_progress_on_a_slow_command_and_a_last_line():
    clock, shown = Clock(), []
    client = Scripted(clock, follows=[
        (10.0, update([], {"a": "InProgress", "b": "Pending"})),
        (10.0, update([], {"a": "Success", "b": "InProgress"})),
        (3.0, update([], {"a": "Success", "b": "Success"}, done=True)),
    ])
    live.Watch(client, "c1", lambda text, out: shown.append((text, out)), follow=True, progress_interval=10,
               clock=clock).run(None)
    progress = [text for text, out in shown if not out]
    assert progress == ["zerorun: command c1: 0/2 done, 1 running, 0 failed, 1 pending (10s)",
                        "zerorun: command c1: 1/2 done, 1 running, 0 failed, 0 pending (20s)",
                        "zerorun: command c1: 2/2 done, 0 running, 0 failed, 0 pending (23s)"]


def test_a_quick_command_costs_one_wait_and_shows_nothing():
    clock, shown = Clock(), []
    client = Scripted(clock, waits=[(0.5, view("Success", {"Success": 2}))])
    final = live.Watch(client, "c1", lambda text, out: shown.append(text), follow=False, progress_interval=10,
                       clock=clock).run(None)
    assert final.status == "Success" and shown == []
    assert client.calls == [("wait", 10, True, 15.0)]


def test_a_slow_command_shows_progress_and_fetches_the_output_once():
    clock, shown = Clock(), []
    client = Scripted(clock, waits=[
        (10.0, view("InProgress", {"InProgress": 2})),
        (10.0, view("InProgress", {"InProgress": 2})),  # unchanged: no line
        (10.0, view("InProgress", {"InProgress": 1, "Success": 1})),
        (4.0, view("Success", {"Success": 2})),
    ])
    live.Watch(client, "c1", lambda text, out: shown.append(text), follow=False, progress_interval=10,
               instance_ids=["a"], clock=clock).run(None)
    assert client.calls == [("wait", 10, True, 15.0), ("wait", None, False, 10), ("get", ["a"])]
    assert shown == ["zerorun: command c1: 0/2 done, 2 running, 0 failed, 0 pending (10s)",
                     "zerorun: command c1: 1/2 done, 1 running, 0 failed, 0 pending (30s)",
                     "zerorun: command c1: 2/2 done, 0 running, 0 failed, 0 pending (34s)"]


def test_without_progress_the_wait_is_the_plain_one():
    clock = Clock()
    client = Scripted(clock, waits=[(30.0, view("Success", {"Success": 2}))])
    live.Watch(client, "c1", lambda text, out: None, follow=False, progress_interval=0, clock=clock).run(60)
    assert client.calls == [("wait", 60, True, 15.0)]


@pytest.mark.parametrize("follow", [True, False])
def test_the_wait_timeout_bounds_the_watch(follow):
    clock = Clock()
    client = Scripted(clock, follows=[(7.0, update([], {"a": "InProgress"}))],
                      waits=[(7.0, view("InProgress", {"InProgress": 1}, 1))])
    watch = live.Watch(client, "c1", lambda text, out: None, follow=follow, progress_interval=10, clock=clock)
    watch.run(7)
    assert client.calls[0][1] == 7 and len([c for c in client.calls if c[0] in ("wait", "follow")]) == 1
