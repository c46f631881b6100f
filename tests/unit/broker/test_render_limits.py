"""What a rendering weighs against the caps: every text a parameter can render into."""

from __future__ import annotations

import pytest

from zerorun import protocol
from zmq_broker.documents import RenderLimits, check_size
from zmq_broker.errors import BrokerError


def test_a_working_directory_and_an_interpreter_count_toward_the_command():
    limits = RenderLimits(max_step_bytes=1000, max_command_bytes=1000)
    small = protocol.Step("run", script="true")
    assert check_size([small], limits) == 4
    for step in (protocol.Step("run", script="true", working_directory="/d" * 600),
                 protocol.Step("run", action="runScript", script="true", interpreter=["python3", "-c" + "x" * 1200])):
        with pytest.raises(BrokerError) as over:
            check_size([step], limits)
        assert over.value.code == "RenderTooLarge" and "per command" in over.value.message
    weighed = protocol.Step("run", script="true", working_directory="/srv", interpreter=["sh", "-e"], env={"A": "b"})
    assert check_size([weighed], limits) == 4 + 4 + 4 + 2


def test_a_large_default_substituted_many_times_renders_in_a_worker_not_the_loop():
    """The loop renders a stored SSM document only when its output is bounded within the caps; the
    bound counted the values a command gave and not the defaults, so 120 KB of default substituted
    25,000 times was rendered in the loop: a 3 GB string, 20 s and 5.7 GB of memory before the
    step cap refused it (every client and agent waited; the kernel could have killed the broker)."""
    from zerorun.documents import load_document
    from zmq_broker.documents import may_render_inline

    def document(default: str, uses: int):
        return load_document("schemaVersion: '2.2'\ndescription: d\nparameters:\n"
                             f"  p: {{type: String, default: '{default}'}}\nmainSteps:\n"
                             f"- action: aws:runShellScript\n  name: s\n  inputs: {{runCommand: ['{'{{p}}' * uses}']}}\n",
                             "ops-defaults")

    limits = RenderLimits()
    given = protocol.SendCommand(document="ops-defaults", parameters={})
    assert not may_render_inline(document("x" * 120_000, 25_000), given, limits)
    null = protocol.SendCommand(document="ops-defaults", parameters={"p": None})  # null: the default applies
    assert not may_render_inline(document("x" * 120_000, 25_000), null, limits)
    assert may_render_inline(document("x" * 10, 3), given, limits)  # the everyday case stays in the loop
    assert may_render_inline(document("x" * 120_000, 3),
                             protocol.SendCommand(document="ops-defaults", parameters={"p": "small"}), limits)


def test_the_environment_names_of_every_step_count_in_the_bound():
    """Every step carries every parameter as ZERORUN_PARAM_<name>: the bound counted the values
    but not the names, so 200 parameters and 2,800 steps passed as within the caps, and the loop
    spent about a second rendering 10.6 MB before the command cap refused it."""
    from zerorun.documents import load_document
    from zmq_broker.documents import check_size, may_render_inline, render

    params = "".join(f"  p{i:04d}: {{default: ''}}\n" for i in range(200))
    steps = "".join(f"- {{action: aws:runShellScript, name: s{i:04d}, inputs: {{runCommand: [x]}}}}\n"
                    for i in range(2800))
    doc = load_document(f"schemaVersion: '2.2'\ndescription: d\nparameters:\n{params}mainSteps:\n{steps}", "ops-env")
    msg = protocol.SendCommand(document="ops-env", parameters={})
    limits = RenderLimits()
    with pytest.raises(BrokerError, match="per command"):
        check_size(render(doc, "1", msg, "Linux", None, RenderLimits(max_command_bytes=1 << 30)).steps, limits)
    assert not may_render_inline(doc, msg, limits)
