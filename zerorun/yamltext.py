"""A YAML file's mistake in one line: where and what.

PyYAML's own text of an error spans lines, with ``"<unicode string>"`` and a caret under the
place; an operator's terminal, a log line and a task's ``msg`` need one line."""

from __future__ import annotations

from typing import Any


def yaml_problem(exc: Any) -> str:
    """``line L, column C: problem`` of a ``yaml.YAMLError`` (its text, joined, without a mark)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + " ".join(str(problem or exc).split())
