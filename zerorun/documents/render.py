"""Render a validated document with parameter values into ``protocol.Step`` objects.

The result is final text: the agent does no templating. Rendering happens once per command, so
every invocation of a command runs exactly the same steps. Each document renders in its own
language (``templating.py``): SSM substitution, or Jinja for documents that ask for it.

``interpolationType: ENV_VAR``: in a runShellScript step, ``{{ name }}`` renders as the
double-quoted reference ``"${ZERORUN_PARAM_name}"`` instead of the value, so the value never
becomes shell syntax (write ``echo {{ name }}``, not ``echo '{{ name }}'``: inside single quotes
the reference stays literal). In a runScript step it renders as the variable's name
(``os.environ["{{ name }}"]``). For other parameters, untrusted values must be constrained by
``allowedPattern``/``allowedValues`` or, in Jinja documents, go through the ``quote`` filter
(``{{ name | quote }}``): plain ``{{ name }}`` is text substitution, exactly as in SSM, and
therefore injectable.

Composite documents: an ``aws:runDocument`` step with ``documentType: SSMDocument`` is replaced
by the steps of the document it names, looked up with the caller's ``resolver`` (once per
rendering, however many steps name it) and rendered with the step's ``documentParameters`` in
that document's own language, up to SSM's depth of 3 (``composite.py``). A nested step is named
``<runDocument step>/<its name>`` and keeps its own flow; each nested step carries, in
``scope``, the runDocument steps it is nested in with their ``onFailure``/``onSuccess``/
``finallyStep``, so that the agent runs the nested document as SSM does, as one step of the
document that runs it (``agent/steps.py``): an exit inside it (``onFailure: exit``, exit code
168/169) ends that document only, its ``finallyStep`` runs only when the runDocument step runs,
and the runDocument step's flow applies to the nested document's outcome. The runDocument
step's ``precondition`` decides (on the rendering platform) whether its steps are there at all
and is copied to those without one when it tests ``platformType``.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zerorun import protocol
from zerorun.identifiers import user_name_problem
from zerorun.documents.composite import (LOCAL_PATH, NOOP_DOCUMENT, check_depth, check_inputs,
                                         parse_document_parameters, parse_document_path)
from zerorun.documents.gojson import has_lone_surrogate, to_text
from zerorun.documents.model import (DOWNLOAD_CONTENT, DOWNLOAD_SOURCES, RUN_DOCUMENT, SHELL_ACTIONS, SSM_DOCUMENT,
                                     Document, DocumentError, ParameterError, StepDef)
from zerorun.documents.params import ENV_PREFIX, coerce_parameters, parameter_env, redact
from zerorun.documents.redaction import redact_step, secret_env_names, secret_pattern, secret_values
from zerorun.documents.templating import EnvRef, Templates

DEFAULT_TIMEOUT = 3600
MAX_TIMEOUT = 172800

Resolver = Callable[[str, str], Document]
"""(name, version) -> the stored document (``version`` "" for the default one). Raises
DocumentError (one line, e.g. "document X not found") when there is none."""


@dataclass(frozen=True)
class NestedDocument:
    """A document that an ``aws:runDocument`` step expanded into the command."""

    step: str  # the full name of the runDocument step ("deploy", or "deploy/configure" deeper)
    name: str
    version: str
    sha256: str
    depth: int  # 1: run by the command's own document
    templating: str


@dataclass
class Rendering:
    """Everything a command needs from its document."""

    steps: list[protocol.Step]  # what the agents run
    display_steps: list[protocol.Step]  # the same with every level's secret values as ***
    parameters: dict[str, Any]  # the command document's values, validated and defaulted
    shown_parameters: dict[str, Any]  # the same with secret values as ***
    templating: str  # the command document's language
    nested: list[NestedDocument] = field(default_factory=list)  # depth first, in step order

    @property
    def nested_names(self) -> list[str]:
        """Every nested document's name, once each (for policy checks)."""
        return list(dict.fromkeys(n.name for n in self.nested))


def _render(step: str, path: str, raw: Any, templates: Templates) -> Any:
    """Render one raw input value; template failures become a DocumentError naming the step."""
    try:
        return templates.render(raw)
    except (MemoryError, RecursionError):
        raise  # a resource limit, not a template error: whoever set the limit reports it
    except Exception as exc:  # jinja2 UndefinedError, SecurityError, TypeError from filters, ...
        message = getattr(exc, "message", None) or str(exc)
        raise DocumentError(f"step {step!r} {path}: cannot render: {message}") from None


def _lines(step: str, key: str, raw: Any, templates: Templates) -> list[str]:
    """runCommand/script as lines; an item that renders to a list is flattened one level."""
    items = raw if isinstance(raw, list) else [raw]
    lines: list[str] = []
    for i, item in enumerate(items):
        path = f"{key}[{i}]" if isinstance(raw, list) else key
        value = _render(step, path, item, templates)
        if isinstance(value, list):
            lines.extend(to_text(v) for v in value)
        else:
            lines.append(to_text(value))
    return lines


_GO_ATOI = re.compile(r"[+-]?[0-9]+")
_GO_DECIMAL_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _timeout(value: Any) -> int:
    """amazon-ssm-agent's ``pluginutil.ValidateExecutionTimeout``: an integer, a number (truncated:
    90.7 is 90), or a string that Go's ``strconv.Atoi`` reads (``"+60"``), else one its
    ``ParseFloat`` reads, truncated (``"90.7"``, ``"1e3"``); anything else (spaces around digits
    included), or a result outside 1..172800, means 3600. Only ASCII text is read: ``int`` takes
    ``"٣"`` and ``float`` takes ``"1_0"``, which Go refuses; and ``int`` refuses 4,300 digits."""
    number: Any = None
    if isinstance(value, bool):
        return DEFAULT_TIMEOUT
    if isinstance(value, str) and len(value) <= 400:
        if _GO_ATOI.fullmatch(value) and len(value.lstrip("+-").lstrip("0")) <= 19:
            number = int(value)
        elif _GO_DECIMAL_FLOAT.fullmatch(value):
            number = float(value)
    elif isinstance(value, (int, float)):
        number = value
    if isinstance(number, float):
        number = int(number) if math.isfinite(number) else None
    if isinstance(number, int) and 1 <= number <= MAX_TIMEOUT:
        return number
    return DEFAULT_TIMEOUT


def _precondition(step: StepDef, name: str, templates: Templates) -> protocol.Precondition | None:
    if step.precondition is None:
        return None
    op, operands = step.precondition
    rendered = [to_text(_render(name, f"precondition[{i}]", v, templates)) for i, v in enumerate(operands)]
    return protocol.Precondition(op=op, operands=rendered)


def precondition_holds(precondition: protocol.Precondition | None, platform: str) -> bool:
    """The agent's evaluation, done here to know if an unsupported or composite step is skipped.
    The platform matches in any case, as in SSM (it lower-cases both); other operands exactly."""
    if precondition is None:
        return True
    a, b = precondition.operands
    if "platformType" in (a, b):
        return (b if a == "platformType" else a).lower() == platform.lower()
    return a == b


def _script_context(doc: Document, values: dict[str, Any], action: str) -> dict[str, Any]:
    context = dict(values)
    for name, spec in doc.parameters.items():
        if spec.interpolation_type == "ENV_VAR":
            var = ENV_PREFIX + name
            context[name] = EnvRef(f'"${{{var}}}"') if action == "runShellScript" else var
    return context


def _run_as(step: StepDef, name: str, templates: Templates) -> str:
    """The step's rendered runAs user ("" when it names none), checked as a user name."""
    if not step.run_as:
        return ""
    user = to_text(_render(name, "runAs", step.run_as, templates)).strip()
    problem = user_name_problem(user)
    if problem:
        raise DocumentError(f"step {name!r} runAs: {problem}")
    return user


def _flow(step: StepDef) -> dict[str, Any]:
    return dict(on_failure=step.on_failure, on_success=step.on_success, finally_step=step.finally_step)


class _Expansion:
    """One rendering: the steps of a document and, depth first, of the documents it runs."""

    def __init__(self, platform: str, resolver: Resolver | None):
        self.platform = platform
        self.resolver = resolver
        self._resolved: dict[tuple[str, str], Document] = {}
        self.secrets: list[Any] = []
        self.nested: list[NestedDocument] = []

    def _resolve(self, name: str, version: str) -> Document:
        """The resolver's document, asked for once per rendering: several steps running the same
        document had it looked up (and, in a render worker, parsed) once each."""
        key = (name, version)
        doc = self._resolved.get(key)
        if doc is None:
            assert self.resolver is not None
            doc = self._resolved[key] = self.resolver(name, version)
        return doc

    def document(self, doc: Document, values: dict[str, Any], prefix: str,
                 depth: int) -> list[tuple[protocol.Step, frozenset[str]]]:
        """``doc``'s steps (named ``prefix + name``), each with its secret variable names."""
        self.secrets.extend(secret_values(doc, values))
        secret_vars = frozenset(secret_env_names(doc))
        env = parameter_env(doc, values)
        templates = Templates(doc.templating, values)  # for everything but the script text
        out: list[tuple[protocol.Step, frozenset[str]]] = []
        for step in doc.steps:
            name = prefix + step.name
            if step.action == RUN_DOCUMENT:
                out.extend(self._run_document(step, name, templates, depth, secret_vars))
            elif step.action == DOWNLOAD_CONTENT:
                out.append((self._download(step, name, templates, env), secret_vars))
            else:
                out.append((self._step(doc, step, name, values, templates, env), secret_vars))
        return out

    def _step(self, doc: Document, step: StepDef, name: str, values: dict[str, Any],
              templates: Templates, env: dict[str, str]) -> protocol.Step:
        precondition = _precondition(step, name, templates)
        if not step.supported:
            if precondition_holds(precondition, self.platform):
                raise DocumentError(
                    f"step {name!r}: action {step.action!r} is not supported on {self.platform} "
                    f"(supported: aws:runShellScript, runShellScript, runScript, aws:runDocument, "
                    f"aws:downloadContent)")
            return protocol.Step(name=name, action=step.action, precondition=precondition, **_flow(step))
        action = SHELL_ACTIONS[step.action]
        # ENV_VAR parameters are variable references in the script text only: the other inputs
        # are no shell text (a directory, a number, an argv), so they get the values there
        script_templates = Templates(doc.templating, _script_context(doc, values, action))
        inputs = step.inputs
        body_key = "script" if action == "runScript" else "runCommand"
        script = "\n".join(_lines(name, body_key, inputs[body_key], script_templates))
        interpreter: list[str] = []
        if action == "runScript":
            raw = inputs["interpreter"]
            if isinstance(raw, list):
                interpreter = [to_text(_render(name, f"interpreter[{i}]", v, templates)) for i, v in enumerate(raw)]
            else:
                text = to_text(_render(name, "interpreter", raw, templates))
                try:
                    interpreter = shlex.split(text)
                except ValueError as exc:  # an unclosed quote
                    raise DocumentError(f"step {name!r} interpreter: {exc} in {text[:200]!r}") from None
        return protocol.Step(
            name=name, action=action, script=script, interpreter=interpreter,
            working_directory=to_text(_render(name, "workingDirectory", inputs.get("workingDirectory", ""),
                                              templates)),
            timeout_seconds=_timeout(_render(name, "timeoutSeconds", inputs.get("timeoutSeconds"), templates)),
            env=dict(env), precondition=precondition, run_as=_run_as(step, name, templates), **_flow(step))

    def _download(self, step: StepDef, name: str, templates: Templates, env: dict[str, str]) -> protocol.Step:
        """``aws:downloadContent``: a ``downloadContent`` step whose script is the download's JSON
        spec, run by the agent (``agent/download.py``). An HTTP source may give ``sha256`` (a
        Zerorun addition; SSM has none); an SSMDocument source's content is looked up now, from
        the broker's store. Other sources (S3, GitHub, ...) refuse the document, naming the step
        (as an unsupported action does), unless the step's precondition rules it out here."""
        precondition = _precondition(step, name, templates)
        where = f"step {name!r} ({DOWNLOAD_CONTENT})"
        inputs = step.inputs
        source_type = to_text(_render(name, "sourceType", inputs.get("sourceType"), templates)).strip()
        if source_type not in DOWNLOAD_SOURCES:
            if precondition_holds(precondition, self.platform):
                raise DocumentError(f"step {name!r}: action {step.action!r} with sourceType {source_type!r} is not "
                                    f"supported on {self.platform} (supported sources: "
                                    f"{', '.join(DOWNLOAD_SOURCES)}; S3 and GitHub are not)")
            return protocol.Step(name=name, action=step.action, precondition=precondition, **_flow(step))
        raw_info = inputs.get("sourceInfo")
        if isinstance(raw_info, dict):
            info = {key: _render(name, f"sourceInfo.{key}", value, templates) for key, value in raw_info.items()}
        else:
            text = to_text(_render(name, "sourceInfo", raw_info, templates))
            try:
                info = msgspec.json.decode(text.encode()) if text.strip() else {}
            except msgspec.DecodeError:
                raise DocumentError(f"{where}: sourceInfo is not JSON: {text[:200]!r}") from None
            if not isinstance(info, dict):
                raise DocumentError(f"{where}: sourceInfo must be a JSON object")
        spec: dict[str, Any] = {"sourceType": source_type,
                                "destinationPath": to_text(_render(name, "destinationPath",
                                                                   inputs.get("destinationPath", ""), templates))}
        if source_type == "HTTP":
            url = to_text(info.get("url", ""))
            if not url.startswith(("http://", "https://")):
                raise DocumentError(f"{where}: sourceInfo.url must be an http(s) URL, got {url[:200]!r}")
            spec.update(url=url, sha256=to_text(info.get("sha256", "")).strip().lower())
        elif source_type == SSM_DOCUMENT:
            path = to_text(info.get("name", ""))
            doc_name, version = parse_document_path(path)
            if info.get("version"):
                version = to_text(info["version"])
            if self.resolver is None:
                raise DocumentError(f"{where}: document {path!r} cannot be looked up here: only a broker renders "
                                    f"documents that download stored documents")
            child = self._resolve(doc_name, version)
            if child is None:
                raise DocumentError(f"{where}: document {path!r} not found")
            spec.update(name=child.name, content=child.content)
        return protocol.Step(
            name=name, action="downloadContent", script=msgspec.json.encode(spec).decode(),
            working_directory=to_text(_render(name, "workingDirectory", inputs.get("workingDirectory", ""),
                                              templates)),
            timeout_seconds=_timeout(_render(name, "timeoutSeconds", inputs.get("timeoutSeconds"), templates)),
            env=dict(env), precondition=precondition, run_as=_run_as(step, name, templates), **_flow(step))

    def _run_document(self, step: StepDef, name: str, templates: Templates, depth: int,
                      secret_vars: frozenset[str]) -> list[tuple[protocol.Step, frozenset[str]]]:
        where = f"step {name!r} ({RUN_DOCUMENT})"
        precondition = _precondition(step, name, templates)
        if not precondition_holds(precondition, self.platform):  # one step, for the agent to skip
            return [(protocol.Step(name=name, action=step.action, precondition=precondition,
                                   **_flow(step)), secret_vars)]
        inputs = {key: _render(name, f"inputs.{key}", step.inputs.get(key), templates)
                  for key in ("documentType", "documentPath", "documentParameters")}
        path = inputs["documentPath"]
        try:
            check_inputs(inputs["documentType"], path)
            check_depth(depth + 1)
            if path == NOOP_DOCUMENT:
                noop = protocol.Step(name=name, script=f"# {RUN_DOCUMENT} {NOOP_DOCUMENT}: nothing to run",
                                     precondition=precondition, **_flow(step))
                return [(noop, secret_vars)]
            if inputs["documentType"] == LOCAL_PATH:
                raise DocumentError("documentType LocalPath (a document that aws:downloadContent put on "
                                    "the instance) is not supported on Linux yet: run a stored document "
                                    "with documentType SSMDocument")
            doc_name, version = parse_document_path(path)
            if self.resolver is None:
                raise DocumentError(f"document {path!r} cannot be looked up here: only a broker (send, "
                                    f"send --dry-run) renders documents that run stored documents")
            child = self._resolve(doc_name, version)
            if child is None:
                raise DocumentError(f"document {path!r} not found")
            given = parse_document_parameters(inputs["documentParameters"])
        except DocumentError as exc:
            raise DocumentError(f"{where}: {exc}") from None
        try:
            child_values = coerce_parameters(child, given, from_document=True)
        except ParameterError as exc:
            raise ParameterError(f"{where}: documentParameters for {child.name}: {exc}") from None
        self.nested.append(NestedDocument(step=name, name=child.name, version=child.version,
                                          sha256=child.sha256, depth=depth + 1, templating=child.templating))
        inner = self.document(child, child_values, name + "/", depth + 1)
        _apply_parent_flow(step, name, precondition, [s for s, _ in inner])
        run_as = _run_as(step, name, templates)
        for nested, _ in inner:  # the runDocument step's user, for nested steps that name none
            nested.run_as = nested.run_as or run_as
        return inner


def _check_text(step: protocol.Step) -> None:
    """Every rendered text is UTF-8 text: Jinja writes a lone surrogate from ``"\\ud800"`` or
    ``"%c" % 55296``, which msgpack cannot carry (the worker rendering it died sending it back)."""
    texts = [("script", step.script), ("workingDirectory", step.working_directory), ("runAs", step.run_as)]
    texts += [(f"interpreter[{i}]", arg) for i, arg in enumerate(step.interpreter)]
    if step.precondition is not None:
        texts += [(f"precondition[{i}]", operand) for i, operand in enumerate(step.precondition.operands)]
    for where, text in texts:
        if has_lone_surrogate(text):
            raise DocumentError(f"step {step.name!r} {where}: renders a lone surrogate ({ascii(text)[:80]}), "
                                f"which is not text")


def _apply_parent_flow(step: StepDef, name: str, precondition: protocol.Precondition | None,
                       inner: list[protocol.Step]) -> None:
    """The runDocument step on the flat list of the steps it expanded into: it becomes their
    outermost scope (with its flow), and its platform precondition theirs when they have none."""
    platform_bound = precondition is not None and "platformType" in precondition.operands
    for nested in inner:
        scope = protocol.Scope(name=name, **_flow(step))
        nested.scope = [scope, *nested.scope]
        if platform_bound and nested.precondition is None:
            nested.precondition = msgspec.structs.replace(precondition, operands=list(precondition.operands))


def render(doc: Document, parameters: dict[str, Any], *, platform: str = "Linux",
           execution_timeout: int = 0, resolver: Resolver | None = None) -> Rendering:
    """Validate ``parameters`` (ParameterError) and render every step (DocumentError), expanding
    ``aws:runDocument`` steps with documents from ``resolver``.

    A step with an unsupported action is tolerated only when its precondition is false on
    ``platform``: it is emitted with an empty script, for the agent to report Skipped.
    """
    values = coerce_parameters(doc, parameters)
    expansion = _Expansion(platform, resolver)
    entries = expansion.document(doc, values, "", 0)
    seen: set[str] = set()
    for step, _ in entries:
        _check_text(step)
        if step.name in seen:
            raise DocumentError(f"step name {step.name!r} occurs twice once aws:runDocument steps are "
                                f"expanded: rename the step whose name contains '/'")
        seen.add(step.name)
    if execution_timeout > 0:
        for step, _ in entries:
            step.timeout_seconds = execution_timeout
    pattern = secret_pattern(expansion.secrets)
    return Rendering(
        steps=[step for step, _ in entries],
        display_steps=[redact_step(step, pattern, secret_vars) for step, secret_vars in entries],
        parameters=values, shown_parameters=redact(doc, values), templating=doc.templating,
        nested=expansion.nested)


def render_document(doc: Document, parameters: dict[str, Any], *, platform: str = "Linux",
                    execution_timeout: int = 0, resolver: Resolver | None = None) -> list[protocol.Step]:
    """The steps of ``render(...)``."""
    return render(doc, parameters, platform=platform, execution_timeout=execution_timeout,
                  resolver=resolver).steps
