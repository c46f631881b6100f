"""A render worker answers every job, whatever goes wrong inside it."""

from __future__ import annotations

import io

import pytest

from zerorun import protocol
from zmq_broker import render_worker
from zmq_broker.rendering import RenderJob, ValidateJob

DOC = ("schemaVersion: '2.2'\ndescription: d\nmainSteps:\n- action: aws:runShellScript\n  name: s\n"
       "  inputs: {runCommand: [echo]}\n")


def _broken(*args, **kwargs):
    raise TypeError("first argument must be string or compiled pattern")


@pytest.mark.parametrize("job", [ValidateJob(7, "ops-doc", DOC),
                                 RenderJob(7, protocol.SendCommand(document_content=DOC), "Linux", 1 << 20, 1 << 23)])
def test_an_unexpected_error_is_a_clear_refusal_not_a_dead_worker(monkeypatch, capsys, job):
    """An exception no one expected (a TypeError from a document the loader failed to check)
    escaped ``run_job``: the worker died with a traceback, and the broker told the operator that
    the document needed more memory than a render worker may use."""
    import zerorun.documents as engine

    monkeypatch.setattr(engine, "load_document", _broken)
    done = render_worker.Worker(io.BytesIO(), io.BytesIO()).run_job(job)
    assert done.job == 7 and not done.ok and done.code == "RenderFailed"
    assert "TypeError" in done.message and "memory" not in done.message
    assert "Traceback" in capsys.readouterr().err  # the broker's log gets the details
