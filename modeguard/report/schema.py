"""The JSON report's schema (``modeguard run --report-json``, ``Report.to_json()``).

``REPORT_SCHEMA`` is a JSON Schema (draft 2020-12) for schema version 1. A change that
removes or renames a field, or changes a field's type, bumps ``SCHEMA_VERSION``; adding a
field does not. ``validate()`` checks a report against it with no dependency, supporting
only the keywords this schema uses; a test cross-checks it with ``jsonschema`` when that
is installed.
"""

from __future__ import annotations

from typing import Any, List

from .render import SCHEMA_VERSION

_LOCATION = {
    "type": "object",
    "description": "A place in the user's code.",
    "required": ["file", "line", "function"],
    "additionalProperties": False,
    "properties": {
        "file": {"type": "string"},
        "line": {"type": "integer", "minimum": 0},
        "function": {"type": "string"},
    },
}

_MODE_SITE = {
    "type": "object",
    "description": "Where the offending mode was last set, and how.",
    "required": ["training", "how", "by", "location"],
    "additionalProperties": False,
    "properties": {
        "training": {"type": "boolean", "description": "the mode that was set (true = train)"},
        "how": {"type": "string", "description": "'Net.eval()', 'Net.train()', 'assignment' or 'override'"},
        "by": {"type": ["string", "null"], "description": "the class whose train() override set it"},
        "framework": {"type": ["string", "null"],
                      "description": "the framework function that called train()/eval(), when not the user's code"},
        "location": {"oneOf": [_LOCATION, {"type": "null"}]},
    },
}

_VIOLATION = {
    "type": "object",
    "description": "One distinct problem: one rule at one place in the user's code.",
    "required": ["code", "name", "severity", "message", "model", "modules", "location", "mode_set_at", "count", "first_step"],
    "additionalProperties": False,
    "properties": {
        "code": {"type": "string", "pattern": "^MG[0-9]{3}$"},
        "name": {"type": "string"},
        "severity": {"enum": ["error", "warning", "info"]},
        "message": {"type": "string", "description": "the full text: what, where, why and the fix"},
        "model": {"type": "string", "description": "the watched model (class name, or the path of a submodule)"},
        "modules": {"type": "array", "items": {"type": "string"}, "description": "offending submodules, by name"},
        "location": {"oneOf": [_LOCATION, {"type": "null"}]},
        "mode_set_at": {"oneOf": [_MODE_SITE, {"type": "null"}]},
        "count": {"type": "integer", "minimum": 1, "description": "how often it happened at this place"},
        "first_step": {"type": "integer", "minimum": 0, "description": "optimizer steps seen before it first happened"},
    },
}

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://modeguard.dev/schema/report-1.json",
    "title": "modeguard report",
    "type": "object",
    "required": ["modeguard", "schema", "violations", "counts"],
    "additionalProperties": False,
    "properties": {
        "modeguard": {"type": "string", "description": "the modeguard version that wrote it"},
        "schema": {"const": SCHEMA_VERSION},
        "script": {"type": "string", "description": "modeguard run: the script path, or '-m package.module'"},
        "exit_status": {"type": "integer", "description": "modeguard run: the program's own exit status"},
        "rank": {"type": "integer", "minimum": 0,
                 "description": "modeguard run: the rank that wrote it (RANK; 0 for a single process)"},
        "world_size": {"type": "integer", "minimum": 1,
                       "description": "modeguard run: how many ranks the program ran as (WORLD_SIZE; 1 for a single process)"},
        "violations": {"type": "array", "items": _VIOLATION},
        "counts": {
            "type": "object",
            "required": ["error", "warning", "info"],
            "additionalProperties": False,
            "properties": {k: {"type": "integer", "minimum": 0} for k in ("error", "warning", "info")},
        },
    },
}

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _check(value: Any, schema: dict, path: str, errors: List[str]) -> None:
    import re

    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {type(value).__name__}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: {value} is less than {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if "oneOf" in schema:
        passing = sum(1 for sub in schema["oneOf"] if not _errors(value, sub, path))
        if passing != 1:
            errors.append(f"{path}: matches {passing} of the allowed forms, expected exactly 1")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _check(item, props[key], f"{path}.{key}", errors)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected field {key!r}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{path}[{i}]", errors)


def _errors(value: Any, schema: dict, path: str) -> List[str]:
    out: List[str] = []
    _check(value, schema, path, out)
    return out


def validate(report: dict, schema: dict = REPORT_SCHEMA) -> List[str]:
    """The ways ``report`` (a decoded JSON report) breaks the schema; empty if it is valid."""
    return _errors(report, schema, "$")
