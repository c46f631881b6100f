"""Task results from command views (plugin_utils/results.py): pure logic on plain dicts."""

from ansible_collections.zerorun.fleet.plugins.plugin_utils import results


def view(stdout="", stderr="", stdout_size=0, stderr_size=0):
    return {"command_id": "c1", "status": "Success", "status_details": "Success", "target_count": 1,
            "invocations": [{"command_id": "c1", "invocation_id": "i1", "instance_id": "web-1", "status": "Success",
                             "exit_code": 0, "stdout": stdout, "stderr": stderr, "stdout_size": stdout_size,
                             "stderr_size": stderr_size}]}


def test_a_view_without_output_is_not_reported_truncated():
    """command_info with include_output=false reported every invocation's output truncated
    ("stdout truncated after 0 of 6 bytes"), in output_note and in the task's msg."""
    result = results.command_result(view(stdout_size=6, stderr_size=4), with_output=False)
    inv = result["invocations"][0]
    assert (inv["stdout_truncated"], inv["stderr_truncated"], inv["output_note"]) == (False, False, "")
    assert (inv["stdout_size"], inv["stderr_size"]) == (6, 4)
    assert result["msg"] == "command c1 Success on 1 instance(s)"


def test_whole_output_is_not_truncated_and_cut_output_is():
    whole = results.command_result(view(stdout="hello\n", stdout_size=6))["invocations"][0]
    assert (whole["stdout_truncated"], whole["output_note"]) == (False, "")
    cut = results.command_result(view(stdout="hel", stdout_size=6))
    assert cut["invocations"][0]["stdout_truncated"] is True
    assert cut["invocations"][0]["output_note"].startswith("stdout truncated after 3 of 6 bytes")
    assert "output truncated on 1" in cut["msg"]


def test_truncated_agrees_with_the_note_when_the_cut_marker_is_longer_than_what_was_cut():
    """stdout_truncated counted the broker's cut marker as output: 1000 bytes kept of 1010, plus a
    marker, made it false while output_note said the output was cut."""
    text = "x" * 1000 + "\n[output truncated by the broker: 10 more bytes]\n"
    inv = results.command_result(view(stdout=text, stdout_size=1010))["invocations"][0]
    assert inv["stdout_truncated"] is True
    assert inv["output_note"].startswith("stdout truncated after 1000 of 1010 bytes")


def test_a_host_result_has_the_keys_return_promises_even_without_its_invocation():
    """Per-host results hold the whole invocation under a key Ansible keeps (it deletes
    ``invocation`` from every registered result); one whose instance is not in the command has
    the per-host keys too (instance_id, start, end, delta, output_note were missing)."""
    found = results.host_result(view(stdout="hi", stdout_size=2), "web-1")
    assert "invocation" not in found and found["zerorun_invocation"]["invocation_id"] == "i1"
    missing = results.host_result(view(), "web-9")
    assert missing["failed"] is True and "invocation" not in missing
    assert set(found) - {"msg"} <= set(missing)
    assert (missing["instance_id"], missing["zerorun_invocation"], missing["output_note"]) == ("web-9", None, "")
