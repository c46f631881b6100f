"""Parse and validate document text (YAML or JSON; SSM schema 1.2, 2.0, 2.2).

Everything that can be checked without parameter values is checked here, so that
``documents create``/``validate`` refuse a broken document before it is stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import re
from typing import Any, Iterator

from zerorun.documents.model import (DOWNLOAD_CONTENT, FLOW_VALUES, MISSING, PARAMETER_TYPES, RUN_DOCUMENT,
                                     SCHEMA_VERSIONS, Document, DocumentError, ParameterError,
                                     ParameterSpec, StepDef)
from zerorun.documents.gojson import go_json, has_lone_surrogate
from zerorun.documents.params import coerce_value, convert_value
from zerorun.documents.patterns import PatternError, compile_pattern
from zerorun.documents.templating import check_template, has_param_store_ref, language_of

_PARAM_STORE = "Parameter Store references are not supported ({{ssm:...}}, {{ssm-secure:...}}, {{resolve:...}})"


MAX_NODES = 100_000
MAX_DEPTH = 64


def _check_size(data: Any, what: str = "document") -> None:
    """Refuse absurd nesting and YAML alias bombs before anything walks the data recursively
    (``&a [x, x]`` then ``&b [*a, *a]``... is small text but expands exponentially), and NaN or
    Infinity (YAML's ``.nan``, ``.inf``; JSON's parser takes ``NaN`` too): no JSON holds them, so
    no SSM document does, and rendering one as text raised ValueError. Also lone surrogates
    (JSON's ``\\ud800``), which no UTF-8 holds: storing a command that held one stopped the broker."""
    stack, nodes = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise DocumentError(f"{what} is too large: more than {MAX_NODES} values once YAML "
                                f"aliases are expanded")
        if depth > MAX_DEPTH:
            raise DocumentError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth + 1) for k in value if isinstance(k, str))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise DocumentError(f"{what} holds NaN or Infinity ({value!r}), which JSON cannot write")
        elif isinstance(value, str) and has_lone_surrogate(value):
            raise DocumentError(f"{what} holds a lone surrogate ({ascii(value)[:80]}): JSON's \\ud800-\\udfff "
                                f"escapes are text only in pairs")


def parse_data(content: str, what: str = "document") -> Any:
    """JSON or YAML text as data, refused (DocumentError naming ``what``) when it is neither,
    nests too deep or expands too far."""
    try:
        data = _parse_any(content, what)
    except RecursionError:
        raise DocumentError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    _check_size(data, what)
    return data


def _parse_any(content: str, what: str) -> Any:
    if content.lstrip("\ufeff \t\r\n").startswith("{"):
        try:
            return json.loads(content.lstrip("\ufeff"))
        except ValueError:
            pass  # YAML flow mappings also start with "{"
    import yaml

    from zerorun.documents import goyaml

    try:  # PyYAML's safe loader (libyaml's parser when there), scalars read as amazon-ssm-agent's yaml.v2 reads them
        return goyaml.load(content)
    except yaml.YAMLError as exc:
        if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own limit
            raise DocumentError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DocumentError(f"{what} is neither valid JSON nor valid YAML{where}: "
                            f"{getattr(exc, 'problem', None) or exc}") from None
    except ValueError as exc:  # from a constructor: int() refuses a number of more than 4,300 digits
        raise DocumentError(f"{what} is neither valid JSON nor valid YAML: {exc}") from None


def _scalar_text(value: Any) -> Any:
    """YAML scalars that are not strings (numbers, booleans, dates) as text, for String values:
    a boolean or number as the JSON text amazon-ssm-agent substitutes for it (``convertToString``
    in ``docparser/parameters``: ``true``, ``5`` for 5.0), not Python's ``True`` and ``5.0``."""
    if isinstance(value, (bool, int, float)):
        try:
            return go_json(value)
        except ValueError:  # NaN or infinity: refused with the document (_check_size)
            return str(value)
    if isinstance(value, datetime.date):
        return str(value)
    return value


def _opt_int(where: str, raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses, and int() refuses 4,300 digits
    if not (text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 18):
        raise DocumentError(f"{where}: {key} must be a non-negative integer (at most 18 digits), got {value!r}")
    return int(text)


def _integer_value(value: Any) -> Any:
    """An Integer parameter's allowed value as an int when it is one (``5``, ``"+5"``), else as
    written (it then matches no value)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,19}\s*", value):
        return int(value)
    return value


PARAMETER_KEYS = ("type", "description", "default", "allowedValues", "allowedPattern", "displayType", "minItems",
                  "maxItems", "minChars", "maxChars", "interpolationType", "secret")
"""What a parameter declaration may say: SSM's keys (AWS's own schema for them, in
aws/amazon-ssm-document-language-service ``parameterDefinition.ts``, allows no other), and
Zerorun's ``secret``."""
DISPLAY_TYPES = ("textfield", "textarea")


def _check_declaration_keys(where: str, raw: dict[Any, Any]) -> None:
    """An unknown key was ignored: ``allowedpattern`` or ``allowedValue`` left the parameter
    unchecked while its author believed it guarded."""
    for key in raw:
        if key not in PARAMETER_KEYS:
            known = {k.lower(): k for k in PARAMETER_KEYS}
            guess = known.get(str(key).lower()) or known.get(str(key).lower() + "s") or known.get(str(key).lower()[:-1])
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise DocumentError(f"{where}: unknown key {str(key)[:80]!r}{hint}; a parameter declares "
                                f"{', '.join(PARAMETER_KEYS)}")
    display = raw.get("displayType")
    if display is not None and display not in DISPLAY_TYPES:
        raise DocumentError(f"{where}: displayType must be textfield or textarea, got {repr(display)[:80]}")


def _parse_parameter(name: str, raw: Any, checked: bool = False) -> ParameterSpec:
    where = f"parameter {name!r}"
    if not name.isidentifier() or not name.isascii():
        raise DocumentError(f"{where}: names must be letters, digits and '_' (not starting with a digit)")
    if not isinstance(raw, dict):
        raise DocumentError(f"{where}: the declaration must be a mapping")
    if not checked:  # a stored version keeps loading as it did when it was stored
        _check_declaration_keys(where, raw)
    ptype = raw.get("type", "String")
    secret = bool(raw.get("secret", False))
    if ptype == "SecureString":
        ptype, secret = "String", True
    if ptype not in PARAMETER_TYPES:
        raise DocumentError(f"{where}: unsupported type {ptype!r} (supported: {', '.join(PARAMETER_TYPES)})")
    interpolation = raw.get("interpolationType") or ""
    if interpolation not in ("", "ENV_VAR"):
        raise DocumentError(f"{where}: interpolationType must be ENV_VAR, got {interpolation!r}")
    allowed_raw = raw.get("allowedValues") or []
    if not isinstance(allowed_raw, list):
        raise DocumentError(f"{where}: allowedValues must be a list")
    bool_allowed = ptype in ("String", "StringList") and any(isinstance(v, bool) for v in allowed_raw)
    if ptype == "Integer":
        allowed = tuple(_integer_value(v) for v in allowed_raw)
    elif ptype in ("String", "StringList"):
        allowed = tuple(_scalar_text(v) for v in allowed_raw)
    elif ptype in ("StringMap", "MapList"):  # a map's JSON is what is compared (params.coerce_value)
        allowed = tuple(go_json(v) if isinstance(v, dict) else v for v in allowed_raw)
    else:
        allowed = tuple(allowed_raw)
    pattern = raw.get("allowedPattern") or ""
    if not isinstance(pattern, str):
        raise DocumentError(f"{where}: allowedPattern must be a string (a regular expression), got {repr(pattern)[:80]}")
    if pattern:  # RE2 syntax, read as SSM's agent reads it (patterns.py)
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise DocumentError(f"{where}: invalid allowedPattern {pattern!r}: {exc}") from None
    description = raw.get("description") or ""
    spec = ParameterSpec(
        name=name, type=ptype, description=str(description), default=MISSING,
        allowed_values=allowed, allowed_pattern=str(pattern),
        min_items=_opt_int(where, raw, "minItems"), max_items=_opt_int(where, raw, "maxItems"),
        min_chars=_opt_int(where, raw, "minChars"), max_chars=_opt_int(where, raw, "maxChars"),
        secret=secret, interpolation_type=interpolation, bool_allowed_values=bool_allowed)
    default = raw.get("default")
    if default is None:  # absent or null: no default, the parameter is required (as in SSM)
        return spec
    for text in _strings(default):
        if has_param_store_ref(text):
            raise DocumentError(f"{where} default: {_PARAM_STORE}")
    if ptype == "String":
        default = _scalar_text(default)
    elif ptype == "StringList" and isinstance(default, list):
        default = [_scalar_text(v) for v in default]
    try:  # a checked document's default met its constraints then (the author's pattern may be slow)
        default = convert_value(spec, default) if checked else coerce_value(spec, default)
    except ParameterError as exc:
        raise DocumentError(f"invalid default: {exc}") from None
    return dataclasses.replace(spec, default=default)


def _strings(value: Any) -> Iterator[str]:
    for _, text in _strings_at(value, ""):
        yield text


def _strings_at(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside a nested value, with a readable path (``runCommand[3]``)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings_at(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings_at(item, f"{path}.{key}" if path else str(key))


def _flow(where: str, key: str, value: Any) -> str:
    """SSM's values: ``onFailure`` is ``exit`` or ``successAndExit``, ``onSuccess`` only ``exit``
    (amazon-ssm-agent's ``runpluginutil.getShouldPluginSkipBasedOnControlFlow`` stops after a
    success only for ``exit``: ``onSuccess: successAndExit`` would run the later steps there)."""
    if value in (None, ""):
        return ""
    if key == "onSuccess" and value == "successAndExit":
        raise DocumentError(f"{where}: onSuccess must be exit, got 'successAndExit' (an onFailure value: SSM "
                            f"ignores it on onSuccess and runs the later steps; onSuccess: exit stops with success)")
    allowed = FLOW_VALUES if key == "onFailure" else ("exit",)
    if value not in allowed:
        raise DocumentError(f"{where}: {key} must be {' or '.join(allowed)}, got {value!r}")
    return str(value)


def _step_flow(where: str, raw: dict[str, Any], inputs: dict[str, Any], key: str) -> Any:
    """Step-flow keys sit on the step (2.2) or, in older documents, inside ``inputs``."""
    outer, inner = raw.get(key), inputs.get(key)
    if outer is not None and inner is not None and outer != inner:
        raise DocumentError(f"{where}: {key} is given twice with different values")
    return outer if outer is not None else inner


def _parse_precondition(where: str, raw: Any) -> tuple[str, tuple[Any, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or list(raw) != ["StringEquals"]:
        raise DocumentError(f"{where}: precondition must be {{StringEquals: [a, b]}}")
    operands = raw["StringEquals"]
    if not isinstance(operands, list) or len(operands) != 2:
        raise DocumentError(f"{where}: precondition StringEquals needs exactly two operands")
    return "StringEquals", tuple(_scalar_text(v) for v in operands)


def _finally(where: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DocumentError(f"{where}: finallyStep must be true or false, got {value!r}")


def _check_shell_inputs(where: str, action: str, inputs: dict[str, Any]) -> None:
    body_key = "script" if action == "runScript" else "runCommand"
    body = inputs.get(body_key)
    if body is None:
        raise DocumentError(f"{where} ({action}): inputs.{body_key} is required")
    if not isinstance(body, (str, list)):
        raise DocumentError(f"{where} ({action}): inputs.{body_key} must be a string or a list")
    if action == "runScript":
        interpreter = inputs.get("interpreter")
        if not interpreter or not isinstance(interpreter, (str, list)):
            raise DocumentError(f"{where} (runScript): inputs.interpreter is required "
                                f"(a string like 'python3' or an argv list)")


def _check_run_document_inputs(where: str, inputs: dict[str, Any]) -> None:
    """What can be checked before rendering; the values are checked again once substituted."""
    for key in ("documentType", "documentPath"):
        value = inputs.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DocumentError(f"{where} ({RUN_DOCUMENT}): inputs.{key} is required (a string)")
    parameters = inputs.get("documentParameters")
    if parameters is not None and not isinstance(parameters, (str, dict)):
        raise DocumentError(f"{where} ({RUN_DOCUMENT}): inputs.documentParameters must be a mapping "
                            f"or a JSON/YAML string")


def _check_download_inputs(where: str, inputs: dict[str, Any]) -> None:
    """What can be checked before rendering; the source is checked once substituted."""
    if not isinstance(inputs.get("sourceType"), str) or not inputs["sourceType"].strip():
        raise DocumentError(f"{where} ({DOWNLOAD_CONTENT}): inputs.sourceType is required (a string)")
    if not isinstance(inputs.get("sourceInfo"), (str, dict)):
        raise DocumentError(f"{where} ({DOWNLOAD_CONTENT}): inputs.sourceInfo is required (a mapping or a "
                            f"JSON string)")
    if not isinstance(inputs.get("destinationPath", ""), str):
        raise DocumentError(f"{where} ({DOWNLOAD_CONTENT}): inputs.destinationPath must be a string")


def _parse_step(raw: Any, index: int, version: str = "2.2") -> StepDef:
    if not isinstance(raw, dict):
        raise DocumentError(f"mainSteps[{index}]: a step must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DocumentError(f"mainSteps[{index}]: every step needs a non-empty name")
    where = f"step {name!r}"
    action = raw.get("action")
    if not isinstance(action, str) or not action:
        raise DocumentError(f"{where}: action is required")
    inputs = raw.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise DocumentError(f"{where}: inputs must be a mapping")
    if raw.get("precondition") is not None and version != "2.2":
        raise DocumentError(f"{where}: precondition needs schemaVersion 2.2 (amazon-ssm-agent fails such a step "
                            f"in a {version} document: \"Precondition is not supported for document schema "
                            f"version prior to 2.2\")")
    run_as = raw.get("runAs")
    if run_as is not None and (not isinstance(run_as, str) or not run_as.strip()):
        raise DocumentError(f"{where}: runAs must be a user name (a non-empty string)")
    step = StepDef(
        name=name, action=action, inputs=inputs,
        precondition=_parse_precondition(where, raw.get("precondition")),
        on_failure=_flow(where, "onFailure", _step_flow(where, raw, inputs, "onFailure")),
        on_success=_flow(where, "onSuccess", _step_flow(where, raw, inputs, "onSuccess")),
        finally_step=_finally(where, _step_flow(where, raw, inputs, "finallyStep")),
        run_as=(run_as or "").strip())
    if action == RUN_DOCUMENT:
        _check_run_document_inputs(where, inputs)
    elif action == DOWNLOAD_CONTENT:
        _check_download_inputs(where, inputs)
    elif step.supported:
        _check_shell_inputs(where, action, inputs)
    return step


def _steps_v12(runtime: Any) -> list[StepDef]:
    """Schema 1.2: one step per ``runtimeConfig.<plugin>.properties[]`` entry."""
    if not isinstance(runtime, dict) or not runtime:
        raise DocumentError("runtimeConfig must be a non-empty mapping of plugins")
    steps = []
    for plugin, config in runtime.items():
        properties = config.get("properties") if isinstance(config, dict) else None
        if isinstance(properties, dict):
            properties = [properties]
        if not isinstance(properties, list) or not properties:
            raise DocumentError(f"runtimeConfig {plugin!r}: properties must be a non-empty list")
        for i, props in enumerate(properties):
            if not isinstance(props, dict):
                raise DocumentError(f"runtimeConfig {plugin!r}: properties[{i}] must be a mapping")
            name = str(props.get("id") or f"{i}.{plugin}")
            step = StepDef(name=name, action=plugin, inputs=props)
            if plugin == RUN_DOCUMENT:
                _check_run_document_inputs(f"step {name!r}", props)
            elif step.supported:
                _check_shell_inputs(f"step {name!r}", plugin, props)
            steps.append(step)
    return steps


def _check_templates(steps: list[StepDef], declared: set[str], language: str) -> None:
    for step in steps:
        values: dict[str, Any] = {"inputs": step.inputs}
        if step.run_as:
            values["runAs"] = step.run_as
        if step.precondition:
            values["precondition"] = list(step.precondition[1])
        for path, text in _strings_at(values, ""):
            if has_param_store_ref(text):
                raise DocumentError(f"step {step.name!r} {path}: {_PARAM_STORE}")
            problem = check_template(language, text, declared)
            if problem:
                raise DocumentError(f"step {step.name!r} {path}: {problem}")


def _uses_parameter(text: str, declared: set[str], language: str) -> bool:
    """Whether a precondition operand substitutes a declared parameter."""
    if language != "ssm":
        return "{{" in text or "{%" in text
    from zerorun.documents.ssm_substitution import SsmSubstitution

    return bool(declared) and SsmSubstitution(dict.fromkeys(declared)).replace_in_string(text) != text


def _check_preconditions(steps: list[StepDef], declared: set[str], language: str) -> None:
    """amazon-ssm-agent's rules for a StringEquals precondition (``runpluginutil.evaluatePreconditions``):
    the operands differ as written; one is ``platformType`` and the other a platform written out,
    or at least one substitutes a document parameter. It fails a step that breaks one at run time
    ("Unrecognized precondition(s)"); here the document is invalid, naming the step."""
    for step in steps:
        if step.precondition is None:
            continue
        where = f"step {step.name!r}: precondition StringEquals {list(step.precondition[1])!r}"
        a, b = (str(operand) for operand in step.precondition[1])
        if a == b:
            raise DocumentError(f"{where}: the two operands are the same (amazon-ssm-agent fails such a step: "
                                f"\"operator's arguments can't be identical\")")
        if "platformType" in (a, b):
            other = b if a == "platformType" else a
            if _uses_parameter(other, declared, language):
                raise DocumentError(f"{where}: the platform compared with platformType cannot come from a "
                                    f"parameter (amazon-ssm-agent fails such a step); write it out: Linux, "
                                    f"Windows or MacOS")
        elif not (_uses_parameter(a, declared, language) or _uses_parameter(b, declared, language)):
            raise DocumentError(f"{where}: compare platformType, or a declared parameter ({{{{ name }}}}), with a "
                                f"value (amazon-ssm-agent fails a step comparing two constants: \"at least one of "
                                f"operator's arguments must contain a valid document parameter\")")


def load_document(content: str, name: str = "", *, checked: bool = False) -> Document:
    """Parse and validate ``content``. Raises DocumentError with a one-line message.

    ``checked``: this exact text passed ``load_document`` before (a stored version): the checks
    that may be slow - templates, and defaults against their author's ``allowedPattern`` - are
    not made again; they only refuse, so what they would have passed is the same."""
    if not isinstance(content, str):
        raise DocumentError("document content must be text")
    data = parse_data(content)
    if not isinstance(data, dict):
        raise DocumentError("a document must be a mapping with schemaVersion")
    version = data.get("schemaVersion")
    version = str(version) if isinstance(version, (str, float)) else version
    if version not in SCHEMA_VERSIONS:
        raise DocumentError(f"schemaVersion must be one of {', '.join(SCHEMA_VERSIONS)}, got {version!r}")
    raw_params = data.get("parameters") or {}
    if not isinstance(raw_params, dict):
        raise DocumentError("parameters must be a mapping of name to declaration")
    parameters = {str(k): _parse_parameter(str(k), v, checked) for k, v in raw_params.items()}
    if version == "1.2":
        if "mainSteps" in data:
            raise DocumentError("schemaVersion 1.2 uses runtimeConfig, not mainSteps")
        steps = _steps_v12(data.get("runtimeConfig"))
    else:
        raw_steps = data.get("mainSteps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise DocumentError(f"schemaVersion {version} needs a non-empty mainSteps list")
        steps = [_parse_step(raw, i, version) for i, raw in enumerate(raw_steps)]
        for step in steps[:-1]:
            if step.finally_step:
                raise DocumentError(f"step {step.name!r}: finallyStep is for the last step only (amazon-ssm-agent "
                                    f"ignores it on any other step, which then runs as an ordinary step): make "
                                    f"{step.name!r} the last step or remove finallyStep")
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise DocumentError(f"step name {step.name!r} is used twice: step names must be unique")
        seen.add(step.name)
    try:
        language = language_of(data.get("templating"), (step.action for step in steps))
    except ValueError as exc:
        raise DocumentError(str(exc)) from None
    if language == "jinja":
        from zerorun.documents.jinja_language import RESERVED_NAMES

        for reserved in sorted(RESERVED_NAMES.intersection(parameters)):
            raise DocumentError(f"parameter {reserved!r}: Jinja gives {reserved} a meaning of its own, so "
                                f"{{{{ {reserved} }}}} would not be this parameter in a Jinja document: rename it")
    for step in steps:
        if step.run_as and language != "jinja":
            raise DocumentError(f"step {step.name!r}: runAs is a Zerorun extension, only in Zerorun-native documents "
                                "(add templating: jinja at the top level); SSM documents run as the agent's user")
    if not checked:
        _check_templates(steps, set(parameters), language)
        _check_preconditions(steps, set(parameters), language)
    return Document(
        name=name, content=content, sha256=hashlib.sha256(content.encode("utf-8")).hexdigest(),
        schema_version=version, description=str(data.get("description") or ""),
        parameters=parameters, steps=tuple(steps), templating=language)
