"""The tool catalog: which tools the planner may propose, as data.

A tool is a name, the platform module it belongs to (`todo`, `notes`, `calendar`, ...), a
description for the model, a JSON-schema `parameters` object (the function-calling contract of
domain.md §5) and a `defaultPolicy` (`auto | propose | deny`, domain.md §4).

The catalog ships as `planner/tools.json`; `PLANNER_TOOL_CATALOG` may point to an override file
of the same shape: `{"version": 1, "tools": [{name, module, description, parameters,
defaultPolicy}, ...]}`. `parse_catalog` is pure and validates everything the planner relies on;
`load_catalog` is the only function here that touches the file system. A bad file raises
`ConfigurationError("PLANNER_TOOL_CATALOG", ...)` naming the file and the entry.

Invariants of a `Catalog`: tool names are unique and valid OpenAI function names; every
`parameters` is an object schema whose `required` names exist in its `properties`. Nobody may
mutate `ToolSpec.parameters` after parsing (it is shared with every request built from it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, TypeAlias

import orjson

from core.errors import ConfigurationError
from core.json_types import JsonValue

Decision: TypeAlias = Literal["auto", "propose", "deny"]
"""A tool policy decision (domain.md §4)."""

DECISIONS: tuple[Decision, ...] = ("auto", "propose", "deny")

SETTING = "PLANNER_TOOL_CATALOG"
"""The setting that names an override catalog file; every catalog error names it."""

CATALOG_VERSION = 1

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-compatible APIs accept
_MODULE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_ENTRY_KEYS = frozenset(("name", "module", "description", "parameters", "defaultPolicy"))

_Fail: TypeAlias = Callable[[str], ConfigurationError]
"""The error factory `parse_catalog` hands to the entry checks (it knows the file name)."""


def as_decision(value: object) -> Decision | None:
    """`value` as a decision, or None when it is not exactly one of `DECISIONS`."""
    match value:
        case "auto":
            return "auto"
        case "propose":
            return "propose"
        case "deny":
            return "deny"
        case _:
            return None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One catalog entry."""

    name: str
    module: str
    description: str
    parameters: dict[str, JsonValue]
    default_policy: Decision

    @property
    def properties(self) -> dict[str, JsonValue]:
        props = self.parameters.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def required(self) -> tuple[str, ...]:
        req = self.parameters.get("required")
        if not isinstance(req, list):
            return ()
        return tuple(r for r in req if isinstance(r, str))

    def function_schema(self) -> dict[str, JsonValue]:
        """The entry as an OpenAI `tools[]` element."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True, slots=True)
class Catalog:
    """The validated tool catalog, in file order (order matters for stable tie-breaks)."""

    tools: tuple[ToolSpec, ...]
    source: str = "<builtin>"
    _by_name: Mapping[str, ToolSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tools})

    def get(self, name: str) -> ToolSpec | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(self.tools)

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.module for t in self.tools))


def default_catalog_path() -> Path:
    """Where the shipped catalog lives (package data)."""
    return Path(str(resources.files("planner").joinpath("tools.json")))


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate a catalog: the shipped one when `path` is None, else an override."""
    file = default_catalog_path() if path is None else path
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            SETTING, f"cannot read the tool catalog {file}: {exc.strerror or exc}"
        ) from None
    try:
        data: JsonValue = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(SETTING, f"{file} is not valid JSON: {exc}") from None
    return parse_catalog(data, source=str(file))


def parse_catalog(data: JsonValue, *, source: str = "<catalog>") -> Catalog:
    """Validate decoded catalog JSON. Errors name `source` and the offending entry."""

    def fail(message: str) -> ConfigurationError:
        return ConfigurationError(SETTING, f"{source}: {message}")

    if not isinstance(data, dict):
        raise fail('expected an object {"version": 1, "tools": [...]}')
    version = data.get("version", CATALOG_VERSION)
    if version != CATALOG_VERSION:
        raise fail(f"unsupported catalog version {version!r}; this build reads version 1")
    unknown = sorted(set(data) - {"version", "tools"})
    if unknown:
        raise fail(f"unknown top-level key(s): {', '.join(unknown)}")
    entries = data.get("tools")
    if not isinstance(entries, list):
        raise fail('"tools" must be a list of tool entries')
    tools: list[ToolSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        spec = _parse_entry(entry, index=index, fail=fail)
        if spec.name in seen:
            raise fail(f"tools[{index}] ({spec.name!r}): duplicate tool name")
        seen.add(spec.name)
        tools.append(spec)
    return Catalog(tuple(tools), source=source)


def _parse_entry(entry: JsonValue, *, index: int, fail: _Fail) -> ToolSpec:
    where = f"tools[{index}]"
    if not isinstance(entry, dict):
        raise fail(f"{where}: expected an object, got {_kind(entry)}")
    name = entry.get("name")
    if isinstance(name, str):
        where = f"{where} ({name!r})"
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail(f"{where}: 'name' must be 1-64 letters, digits, '_' or '-'")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise fail(
            f"{where}: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_ENTRY_KEYS))}"
        )
    module = entry.get("module")
    if not isinstance(module, str) or not _MODULE.match(module):
        raise fail(f"{where}: 'module' must be a lower-case module name such as 'todo'")
    description = entry.get("description")
    if not isinstance(description, str) or not description.strip():
        raise fail(f"{where}: 'description' must be a non-empty string")
    policy = as_decision(entry.get("defaultPolicy"))
    if policy is None:
        raise fail(
            f"{where}: 'defaultPolicy' must be one of {', '.join(DECISIONS)}, "
            f"got {entry.get('defaultPolicy')!r}"
        )
    parameters = entry.get("parameters")
    _check_parameters(parameters, where=where, fail=fail)
    assert isinstance(parameters, dict)
    return ToolSpec(
        name=name,
        module=module,
        description=description.strip(),
        parameters=parameters,
        default_policy=policy,
    )


def _check_parameters(parameters: JsonValue, *, where: str, fail: _Fail) -> None:
    if not isinstance(parameters, dict):
        raise fail(f"{where}: 'parameters' must be a JSON-schema object")
    if parameters.get("type") != "object":
        raise fail(f"{where}: 'parameters.type' must be \"object\"")
    props = parameters.get("properties", {})
    if not isinstance(props, dict):
        raise fail(f"{where}: 'parameters.properties' must be an object")
    for prop, schema in props.items():
        if not isinstance(schema, dict):
            raise fail(f"{where}: parameter {prop!r} must have a schema object")
        kind = schema.get("type")
        if kind is not None and not isinstance(kind, str | list):
            raise fail(f"{where}: parameter {prop!r} has an invalid 'type'")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise fail(f"{where}: 'parameters.required' must be a list of parameter names")
    missing = [r for r in required if isinstance(r, str) and r not in props]
    if missing:
        raise fail(f"{where}: required parameter(s) not in properties: {', '.join(missing)}")
    if len(set(map(str, required))) != len(required):
        raise fail(f"{where}: 'parameters.required' lists a name twice")


def _kind(value: JsonValue) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list():
            return "a list"
        case _:
            return "an object"
