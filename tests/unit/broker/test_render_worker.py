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


def test_a_result_that_cannot_be_sent_back_is_answered_as_a_failure(monkeypatch):
    """A result msgpack cannot encode (text that is not UTF-8) raised in ``serve`` after the job:
    the worker died and the broker blamed the document's memory."""
    from zmq_broker.rendering import JobDone, from_worker, frame

    monkeypatch.setattr(render_worker.Worker, "run_job", lambda self, job: JobDone(job.job, False, "X", "bad \ud800"))
    out = io.BytesIO()
    render_worker.Worker(io.BytesIO(frame(ValidateJob(9, "ops-doc", DOC))), out).serve()
    data, messages = out.getvalue(), []
    while data:
        size = int.from_bytes(data[:4], "big")
        messages.append(from_worker.decode(data[4:4 + size]))
        data = data[4 + size:]
    done = messages[-1]
    assert isinstance(done, JobDone) and done.job == 9 and not done.ok and done.code == "RenderFailed"
    assert "could not be sent back" in done.message


def test_a_stored_version_is_parsed_for_show_as_the_loop_parsed_it():
    """Show had the loop parse a stored version (``DocumentStore.get``); a worker does now, with
    the same leniency (its checks were made when it was stored) and the same refusal."""
    from zmq_broker.docstore import parameter_view
    from zerorun.documents import load_document

    done = render_worker.Worker(io.BytesIO(), io.BytesIO()).run_job(ValidateJob(3, "ops-doc", DOC, version=2))
    assert done.ok and done.parsed == 1 and done.checked.parameters == parameter_view(load_document(DOC)) == {}
    old = ("schemaVersion: '2.2'\nparameters:\n  p: {type: String, default: '5', allowedPattern: 5}\n"
           "mainSteps:\n- {action: aws:runShellScript, name: s, inputs: {runCommand: [echo]}}\n")
    done = render_worker.Worker(io.BytesIO(), io.BytesIO()).run_job(ValidateJob(4, "ops-old", old, version=1))
    assert not done.ok and done.code == "InvalidDocument"
    assert done.message.startswith("document ops-old version 1 cannot be used: ") and "allowedPattern" in done.message
