"""Render a validated document with parameter values into ``protocol.Step`` objects.

The result is final text: the agent does no templating. Rendering happens once per command, so
every invocation of a command runs exactly the same steps.

``interpolationType: ENV_VAR``: in a runShellScript step, ``{{ name }}`` renders as the
double-quoted reference ``"${ZERORUN_PARAM_name}"`` instead of the value, so the value never
becomes shell syntax (write ``echo {{ name }}``, not ``echo '{{ name }}'``: inside single quotes
the reference stays literal). In a runScript step it renders as the variable's name
(``os.environ["{{ name }}"]``). For other parameters, untrusted values must go through the
``quote`` filter (``{{ name | quote }}``) or be constrained by ``allowedPattern``/``allowedValues``:
plain ``{{ name }}`` is text substitution, exactly as in SSM, and therefore injectable.
"""

from __future__ import annotations

import shlex
from typing import Any

from zerorun import protocol
from zerorun.documents.model import SHELL_ACTIONS, Document, DocumentError, StepDef
from zerorun.documents.params import ENV_PREFIX, coerce_parameters, parameter_env
from zerorun.documents.templating import EnvRef, render_value, to_text

DEFAULT_TIMEOUT = 3600
MAX_TIMEOUT = 172800


def _render(step: StepDef, path: str, raw: Any, context: dict[str, Any]) -> Any:
    """Render one raw input value; template failures become a DocumentError naming the step."""
    if not isinstance(raw, str):
        return raw
    try:
        return render_value(raw, context)
    except Exception as exc:  # jinja2 UndefinedError, SecurityError, TypeError from filters, ...
        message = getattr(exc, "message", None) or str(exc)
        raise DocumentError(f"step {step.name!r} {path}: cannot render: {message}") from None


def _lines(step: StepDef, key: str, raw: Any, context: dict[str, Any]) -> list[str]:
    """runCommand/script as lines; an item that renders to a list is flattened one level."""
    items = raw if isinstance(raw, list) else [raw]
    lines: list[str] = []
    for i, item in enumerate(items):
        path = f"{key}[{i}]" if isinstance(raw, list) else key
        value = _render(step, path, item, context)
        if isinstance(value, list):
            lines.extend(to_text(v) for v in value)
        else:
            lines.append(to_text(value))
    return lines


def _timeout(value: Any) -> int:
    """SSM's rule: a number or numeric string in 1..172800, anything else means 3600."""
    if isinstance(value, bool):
        return DEFAULT_TIMEOUT
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 1 <= value <= MAX_TIMEOUT:
        return value
    return DEFAULT_TIMEOUT


def _precondition(step: StepDef, values: dict[str, Any]) -> protocol.Precondition | None:
    if step.precondition is None:
        return None
    op, operands = step.precondition
    rendered = [to_text(_render(step, f"precondition[{i}]", v, values)) for i, v in enumerate(operands)]
    return protocol.Precondition(op=op, operands=rendered)


def precondition_holds(precondition: protocol.Precondition | None, platform: str) -> bool:
    """The agent's evaluation, done here only to know if an unsupported step is skipped."""
    if precondition is None:
        return True
    a, b = (platform if v == "platformType" else v for v in precondition.operands)
    return a == b


def _context(doc: Document, values: dict[str, Any], action: str) -> dict[str, Any]:
    context = dict(values)
    for name, spec in doc.parameters.items():
        if spec.interpolation_type == "ENV_VAR":
            var = ENV_PREFIX + name
            context[name] = EnvRef(f'"${{{var}}}"') if action == "runShellScript" else var
    return context


def _render_step(doc: Document, step: StepDef, values: dict[str, Any], env: dict[str, str],
                 platform: str) -> protocol.Step:
    precondition = _precondition(step, values)
    flow = dict(on_failure=step.on_failure, on_success=step.on_success,
                finally_step=step.finally_step)
    if not step.supported:
        if precondition_holds(precondition, platform):
            raise DocumentError(
                f"step {step.name!r}: action {step.action!r} is not supported on {platform} "
                f"(supported: aws:runShellScript, runShellScript, runScript)")
        return protocol.Step(name=step.name, action=step.action, precondition=precondition, **flow)
    action = SHELL_ACTIONS[step.action]
    context = _context(doc, values, action)  # for the script text only: the other inputs are no
    # shell text (a directory, a number, an argv), so ENV_VAR parameters render as their values there
    inputs = step.inputs
    body_key = "script" if action == "runScript" else "runCommand"
    script = "\n".join(_lines(step, body_key, inputs[body_key], context))
    interpreter: list[str] = []
    if action == "runScript":
        raw = inputs["interpreter"]
        if isinstance(raw, list):
            interpreter = [to_text(_render(step, f"interpreter[{i}]", v, values)) for i, v in enumerate(raw)]
        else:
            interpreter = shlex.split(to_text(_render(step, "interpreter", raw, values)))
    return protocol.Step(
        name=step.name, action=action, script=script, interpreter=interpreter,
        working_directory=to_text(_render(step, "workingDirectory", inputs.get("workingDirectory", ""), values)),
        timeout_seconds=_timeout(_render(step, "timeoutSeconds", inputs.get("timeoutSeconds"), values)),
        env=dict(env), precondition=precondition, **flow)


def render_document(doc: Document, parameters: dict[str, Any], *, platform: str = "Linux",
                    execution_timeout: int = 0) -> list[protocol.Step]:
    """Validate ``parameters`` (ParameterError) and render every step (DocumentError).

    A step with an unsupported action is tolerated only when its precondition is false on
    ``platform``: it is emitted with an empty script, for the agent to report Skipped.
    """
    values = coerce_parameters(doc, parameters)
    env = parameter_env(doc, values)
    steps = [_render_step(doc, step, values, env, platform) for step in doc.steps]
    if execution_timeout > 0:
        for step in steps:
            step.timeout_seconds = execution_timeout
    return steps
