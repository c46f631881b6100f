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
