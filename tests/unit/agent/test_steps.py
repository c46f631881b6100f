"""The SSM step flow without processes: the runner is a table of exit codes (the same flow runs
real steps in tests/integration/test_spine.py::test_ssm_step_flow_and_exit_codes)."""

from __future__ import annotations

from agent import steps
from zerorun.protocol import CANCELLED, FAILED, SKIPPED, SUCCESS, TIMED_OUT, Invocation, Precondition, Scope, Step


def walk(step_list: list[Step], codes: dict[str, int], cancel_before: str = "", platform: str = "Linux",
         timeouts: tuple[str, ...] = ()):
    inv = Invocation("inv", "cmd", "i-1", "doc", "1", "sha", step_list, 0.0, 0.0)
    flow = steps.StepFlow(inv, platform, started_at=1.0)
    ran = []
    cancelled = False
    while (next_step := flow.next_step(cancelled)) is not None:
        index, step = next_step
        if step.name == cancel_before:
            cancelled = True
            flow.report(steps.cancelled_before_start(step))
            continue
        ran.append(step.name)
        timed_out = step.name in timeouts
        flow.report(steps.process_step_result(step, -9 if timed_out else codes.get(step.name, 0),
                                              timed_out=timed_out, cancelled=False,
                                              stdout=f"{step.name}\n", stdout_size=len(step.name) + 1,
                                              stderr="", stderr_size=0, started_at=1.0))
    result = flow.result(ended_at=2.0)
    return ran, {s.name: s.status for s in result.steps}, result


def test_168_succeeds_and_stops_finally_steps_still_run():
    ran, statuses, result = walk([Step("a"), Step("b"), Step("c"), Step("z", finally_step=True)], {"a": 168})
    assert ran == ["a", "z"]
    assert statuses == {"a": SUCCESS, "b": SKIPPED, "c": SKIPPED, "z": SUCCESS}
    assert result.status == SUCCESS and result.stdout == "a\nz\n"


def test_169_fails_and_stops():
    ran, statuses, result = walk([Step("a"), Step("b")], {"a": 169})
    assert ran == ["a"] and statuses == {"a": FAILED, "b": SKIPPED}
    assert result.status == FAILED and result.exit_code == 169 and result.status_details == "step a failed"


def test_a_failure_goes_on_unless_on_failure_says_otherwise():
    ran, _, result = walk([Step("a"), Step("b")], {"a": 3})
    assert ran == ["a", "b"] and result.status == FAILED and result.exit_code == 3
    ran, _, _ = walk([Step("a", on_failure="exit"), Step("b")], {"a": 3})
    assert ran == ["a"]
    ran, statuses, result = walk([Step("a", on_failure="successAndExit"), Step("b")], {"a": 3})
    assert ran == ["a"] and statuses["a"] == SUCCESS and result.status == SUCCESS


def test_on_success_exit_stops_after_a_success():
    ran, _, result = walk([Step("a", on_success="exit"), Step("b")], {})
    assert ran == ["a"] and result.status == SUCCESS


def test_a_timed_out_step_is_timed_out_and_the_later_steps_run_as_in_ssm():
    """amazon-ssm-agent's runpluginutil stops the flow only after 168/169, a Failed step with
    onFailure: exit, or a success with onSuccess: exit: a TimedOut step stops nothing."""
    ran, statuses, result = walk([Step("a"), Step("b"), Step("c")], {}, timeouts=("a",))
    assert ran == ["a", "b", "c"]
    assert statuses == {"a": TIMED_OUT, "b": SUCCESS, "c": SUCCESS}
    assert result.status == TIMED_OUT and result.status_details == "ExecutionTimedOut"
    assert result.exit_code == 137 and result.stdout == "a\nb\nc\n"
    # kept on purpose (SSM runs on: it reads onFailure for Failed steps only): a step that asks to
    # stop the document on failure stops it after a timeout too, and is no success
    for on_failure in ("exit", "successAndExit"):
        ran, statuses, result = walk([Step("a", on_failure=on_failure), Step("b"), Step("z", finally_step=True)],
                                     {}, timeouts=("a",))
        assert ran == ["a", "z"], on_failure
        assert statuses == {"a": TIMED_OUT, "b": SKIPPED, "z": SUCCESS}
        assert result.status == TIMED_OUT


def test_failed_outranks_timed_out_as_in_ssm():
    """contracts.DocumentResultAggregator: Failed > TimedOut > Cancelled > Success."""
    _, statuses, result = walk([Step("a"), Step("b")], {"b": 3}, timeouts=("a",))
    assert statuses == {"a": TIMED_OUT, "b": FAILED}
    assert result.status == FAILED and result.status_details == "step b failed" and result.exit_code == 3
    _, _, result = walk([Step("a"), Step("b")], {"a": 3}, timeouts=("b",))
    assert result.status == FAILED and result.status_details == "step a failed"


def test_precondition_for_another_platform_skips_never_fails():
    windows = Precondition("StringEquals", ["platformType", "Windows"])
    ran, statuses, result = walk([Step("w", precondition=windows), Step("l")], {})
    assert ran == ["l"] and statuses["w"] == SKIPPED and result.status == SUCCESS
    _, _, result = walk([Step("w", precondition=windows)], {})
    assert result.status_details == "every step was skipped"
    ran, _, _ = walk([Step("w", precondition=windows)], {}, platform="Windows")
    assert ran == ["w"]


def test_cancel_stops_the_flow_and_marks_the_rest_cancelled():
    ran, statuses, result = walk([Step("a"), Step("b"), Step("c"), Step("z", finally_step=True)], {},
                                 cancel_before="b")
    assert ran == ["a"]
    assert statuses == {"a": SUCCESS, "b": CANCELLED, "c": SKIPPED, "z": CANCELLED}
    assert result.status == CANCELLED


def test_a_step_that_failed_before_a_cancel_leaves_the_invocation_failed():
    """amazon-ssm-agent's ``contracts.DocumentResultAggregator``: Failed > TimedOut > Cancelled."""
    ran, statuses, result = walk([Step("a"), Step("b"), Step("c")], {"a": 3}, cancel_before="b")
    assert ran == ["a"]
    assert statuses == {"a": FAILED, "b": CANCELLED, "c": SKIPPED}
    assert (result.status, result.status_details, result.exit_code) == (FAILED, "step a failed", 3)
    _, statuses, result = walk([Step("a"), Step("b"), Step("c")], {}, cancel_before="b", timeouts=("a",))
    assert statuses == {"a": TIMED_OUT, "b": CANCELLED, "c": SKIPPED}
    assert result.status == TIMED_OUT
    _, _, result = walk([Step("a"), Step("b")], {}, cancel_before="b")
    assert (result.status, result.status_details) == (CANCELLED, "")


def test_exit_codes_of_processes():
    step = Step("s")
    assert steps.process_step_result(step, -9, timed_out=False, cancelled=False, stdout="", stdout_size=0,
                                     stderr="", stderr_size=0, started_at=0.0).exit_code == 137
    timed = steps.process_step_result(step, -15, timed_out=True, cancelled=False, stdout="", stdout_size=0,
                                      stderr="", stderr_size=0, started_at=0.0)
    assert timed.status == "TimedOut" and timed.detail == "ExecutionTimedOut"
    assert steps.capped_text(b"abcdef", 6, 4) == "abcd\n[output truncated by the agent: 6 bytes in all, 4 kept]\n"


def test_194_stops_the_flow_for_a_reboot_finally_steps_included():
    """amazon-ssm-agent: no step runs after the one that asked for a reboot, until the reboot."""
    inv = Invocation("inv", "cmd", "i-1", "doc", "1", "sha",
                     [Step("a"), Step("b"), Step("c"), Step("z", finally_step=True)], 0.0, 0.0)
    flow = steps.StepFlow(inv, "Linux", started_at=1.0)
    ran = []
    while (next_step := flow.next_step(False)) is not None:
        index, step = next_step
        ran.append(step.name)
        flow.report(steps.process_step_result(step, 194 if step.name == "b" else 0, timed_out=False,
                                              cancelled=False, stdout="", stdout_size=0, stderr="",
                                              stderr_size=0, started_at=1.0))
    assert ran == ["a", "b"]
    assert flow.reboot is not None and flow.reboot.index == 1
    assert [s.name for s in flow.reboot.steps] == ["a"]


def test_resume_runs_the_step_that_asked_again_and_never_the_ones_before():
    inv = Invocation("inv", "cmd", "i-1", "doc", "1", "sha", [Step("a"), Step("b"), Step("c")], 0.0, 0.0)
    before = steps.process_step_result(Step("a"), 0, timed_out=False, cancelled=False, stdout="a\n",
                                       stdout_size=2, stderr="", stderr_size=0, started_at=1.0)
    flow = steps.StepFlow(inv, "Linux", resume=steps.Resume(1, [before], 1.0))
    ran = []
    while (next_step := flow.next_step(False)) is not None:
        index, step = next_step
        ran.append(step.name)
        flow.report(steps.process_step_result(step, 0, timed_out=False, cancelled=False, stdout=f"{step.name}\n",
                                              stdout_size=2, stderr="", stderr_size=0, started_at=1.0))
    result = flow.result(ended_at=2.0)
    assert ran == ["b", "c"] and flow.reboot is None
    assert result.status == SUCCESS and result.stdout == "a\nb\nc\n"


def test_3010_is_an_ordinary_failure_on_linux():
    ran, statuses, result = walk([Step("a"), Step("b")], {"a": 3010})
    assert ran == ["a", "b"] and statuses["a"] == FAILED


def test_platform_type_matches_in_any_case_as_ssm_does():
    """amazon-ssm-agent compares ``strings.ToLower`` of the document's platform with its own
    lower-case ``linux``: a step written for ``linux`` runs on SSM, and here it was Skipped."""
    for operands in (["platformType", "linux"], ["LINUX", "platformType"], ["platformType", "Linux"]):
        ran, statuses, _ = walk([Step("l", precondition=Precondition("StringEquals", operands))], {})
        assert ran == ["l"], (operands, statuses)
    ran, statuses, _ = walk([Step("w", precondition=Precondition("StringEquals", ["platformType", "windows"]))], {})
    assert ran == [] and statuses["w"] == SKIPPED
    # a parameter's precondition compares exactly, as in SSM
    ran, _, _ = walk([Step("p", precondition=Precondition("StringEquals", ["Install", "install"]))], {})
    assert ran == []


def test_a_relative_working_directory_is_inside_the_invocations_directory(tmp_path):
    """amazon-ssm-agent takes a relative workingDirectory inside the invocation's downloads
    directory, where aws:downloadContent puts a relative destinationPath, and falls back to the
    default directory when it is not there (runscript.go at 1c217c89b42d). Here it was relative to
    the agent's own directory: 'download to fetched/, then run in fetched' failed with "working
    directory fetched does not exist"."""
    run_dir = tmp_path / "run"
    (run_dir / "fetched").mkdir(parents=True)
    assert steps.working_directory("", str(run_dir)) == str(run_dir)
    assert steps.working_directory("fetched", str(run_dir)) == str(run_dir / "fetched")
    assert steps.working_directory("missing", str(run_dir)) == str(run_dir)  # SSM's fallback
    assert steps.working_directory(str(tmp_path), str(run_dir)) == str(tmp_path)
    assert steps.working_directory("/no/such/dir", str(run_dir)) == "/no/such/dir"  # refused by cannot_run


# -- composite documents: a nested document's flow is its own (SSM's plugins/rundocument) ---------


def nested(scope: Scope | list[Scope], *step_list: Step) -> list[Step]:
    """``step_list`` as the steps of the runDocument step(s) ``scope`` (outermost first)."""
    chain = scope if isinstance(scope, list) else [scope]
    for step in step_list:
        step.name = f"{chain[-1].name}/{step.name}"
        step.scope = [*chain, *step.scope]
    return list(step_list)


def test_a_nested_exit_ends_the_nested_document_only():
    """169 in the nested document skips its later steps; the parent goes on (the runDocument
    step is Failed, and says nothing about stopping); the invocation is Failed."""
    ran, statuses, result = walk([*nested(Scope("call"), Step("x"), Step("y")), Step("after")], {"call/x": 169})
    assert ran == ["call/x", "after"]
    assert statuses == {"call/x": FAILED, "call/y": SKIPPED, "after": SUCCESS}
    assert result.status == FAILED and result.status_details == "step call/x failed"
    ran, _, result = walk([*nested(Scope("call"), Step("x", on_failure="exit"), Step("y")), Step("after")],
                          {"call/x": 1})
    assert ran == ["call/x", "after"]
    ran, _, result = walk([*nested(Scope("call"), Step("x"), Step("y")), Step("after")], {"call/x": 168})
    assert ran == ["call/x", "after"] and result.status == SUCCESS


def test_the_run_document_steps_flow_applies_to_the_nested_documents_outcome():
    def steps_of(scope: Scope) -> list[Step]:
        return [Step("before"), *nested(scope, Step("x"), Step("y")), Step("after")]

    ran, _, _ = walk(steps_of(Scope("call", on_failure="exit")), {"call/x": 3})
    assert ran == ["before", "call/x", "call/y"]
    ran, statuses, result = walk(steps_of(Scope("call", on_failure="successAndExit")), {"call/x": 3})
    assert ran == ["before", "call/x", "call/y"] and statuses["after"] == SKIPPED
    assert statuses["call/x"] == SUCCESS and result.status == SUCCESS
    assert "successAndExit of call" in result.steps[1].detail
    ran, _, _ = walk(steps_of(Scope("call", on_success="exit")), {})
    assert ran == ["before", "call/x", "call/y"]
    ran, _, _ = walk(steps_of(Scope("call", on_success="exit")), {"call/y": 3})  # Failed: goes on
    assert ran == ["before", "call/x", "call/y", "after"]


def test_a_nested_finally_step_runs_only_when_its_run_document_step_runs():
    child = [Step("work"), Step("cleanup", finally_step=True)]
    ran, statuses, _ = walk([Step("a", on_failure="exit"), *nested(Scope("call"), *child)], {"a": 3})
    assert ran == ["a"] and statuses == {"a": FAILED, "call/work": SKIPPED, "call/cleanup": SKIPPED}
    child = [Step("work", on_failure="exit"), Step("more"), Step("cleanup", finally_step=True)]
    ran, _, _ = walk([*nested(Scope("call"), *child), Step("after")], {"call/work": 3})
    assert ran == ["call/work", "call/cleanup", "after"]
    # a runDocument step that is the parent's finallyStep runs whole, with its own flow
    child = [Step("work"), Step("more")]
    ran, _, _ = walk([Step("a", on_failure="exit"), *nested(Scope("call", finally_step=True), *child)], {"a": 3})
    assert ran == ["a", "call/work", "call/more"]
    # a cancel: no finally step runs, nested or not (each is reported Cancelled)
    step_list = [*nested(Scope("call"), Step("x"), Step("y"), Step("fin", finally_step=True)), Step("after"),
                 Step("z", finally_step=True)]
    ran, statuses, result = walk(step_list, {}, cancel_before="call/y")
    assert ran == ["call/x"]
    assert statuses == {"call/x": SUCCESS, "call/y": CANCELLED, "call/fin": CANCELLED, "after": SKIPPED,
                        "z": CANCELLED}
    assert result.status == CANCELLED


def test_two_levels_of_nesting():
    outer, inner = Scope("o", on_failure="exit"), Scope("o/i")
    step_list = [*nested([outer, inner], Step("x", on_failure="exit"), Step("y")),
                 *nested(outer, Step("z")), Step("after")]
    ran, statuses, result = walk(step_list, {"o/i/x": 3})
    assert ran == ["o/i/x", "o/z"]  # i ends at x; o goes on, then its Failed outcome stops the parent
    assert statuses == {"o/i/x": FAILED, "o/i/y": SKIPPED, "o/z": SUCCESS, "after": SKIPPED}


def test_a_run_document_steps_status_merges_as_ssms():
    """contracts.MergeResultStatus makes a runDocument step with a Failed and a TimedOut step
    TimedOut; the invocation takes DocumentResultAggregator's precedence over the command
    document's steps (here that one): TimedOut."""
    step_list = nested(Scope("call"), Step("x"), Step("y"))
    _, statuses, result = walk(step_list, {"call/x": 3}, timeouts=("call/y",))
    assert statuses == {"call/x": FAILED, "call/y": TIMED_OUT}
    assert result.status == TIMED_OUT and result.status_details == "ExecutionTimedOut"
    _, _, result = walk([Step("a"), *nested(Scope("call"), Step("x"), Step("y"))], {"a": 3}, timeouts=("call/y",))
    assert result.status == FAILED and result.status_details == "step a failed"


def test_resume_inside_a_nested_document_keeps_its_flow():
    """After a reboot asked for by a nested step, the nested document's outcome still covers the
    steps it ran before the reboot: here its Failed step, with the runDocument step's onFailure."""
    step_list = [*nested(Scope("call", on_failure="exit"), Step("x"), Step("y"), Step("z")), Step("after")]
    inv = Invocation("inv", "cmd", "i-1", "doc", "1", "sha", step_list, 0.0, 0.0)
    before = steps.process_step_result(step_list[0], 3, timed_out=False, cancelled=False, stdout="", stdout_size=0,
                                       stderr="", stderr_size=0, started_at=1.0)
    flow = steps.StepFlow(inv, "Linux", resume=steps.Resume(1, [before], 1.0))
    ran = []
    while (next_step := flow.next_step(False)) is not None:
        ran.append(next_step[1].name)
        flow.report(steps.process_step_result(next_step[1], 0, timed_out=False, cancelled=False, stdout="",
                                              stdout_size=0, stderr="", stderr_size=0, started_at=1.0))
    assert ran == ["call/y", "call/z"]
    assert [s.status for s in flow.result().steps] == [FAILED, SUCCESS, SUCCESS, SKIPPED]


def test_a_timed_out_or_cancelled_step_exits_137_whatever_ended_it():
    """amazon-ssm-agent: CommandStoppedPreemptivelyExitCode (137), set by executers.ExecuteCommand
    in its timeout branch and in its cancel branch alike."""
    for code in (-15, -9, 0, 5, 143):
        timed = steps.process_step_result(Step("s"), code, timed_out=True, cancelled=False, stdout="", stdout_size=0,
                                          stderr="", stderr_size=0, started_at=0.0)
        assert (timed.status, timed.exit_code) == (TIMED_OUT, 137), code
        cancelled = steps.process_step_result(Step("s"), code, timed_out=False, cancelled=True, stdout="",
                                              stdout_size=0, stderr="", stderr_size=0, started_at=0.0)
        assert (cancelled.status, cancelled.exit_code) == (CANCELLED, 137), code
