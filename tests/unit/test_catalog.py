"""The tool catalog: the shipped file is sane, override files are validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from core.errors import ConfigurationError
from core.json_types import JsonValue
from planner.catalog import (
    DECISIONS,
    SETTING,
    Catalog,
    default_catalog_path,
    load_catalog,
    parse_catalog,
)


def _entry(**overrides: JsonValue) -> dict[str, JsonValue]:
    entry: dict[str, JsonValue] = {
        "name": "create_thing",
        "module": "todo",
        "description": "Create a thing.",
        "parameters": {
            "type": "object",
            "properties": {"title": {"type": "string"}},
            "required": ["title"],
        },
        "defaultPolicy": "propose",
    }
    entry.update(overrides)
    return entry


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "tools.json"
    path.write_bytes(orjson.dumps(data))
    return path


def test_shipped_catalog_is_realistic() -> None:
    catalog = load_catalog()
    assert 15 <= len(catalog) <= 25
    names = [t.name for t in catalog]
    assert len(set(names)) == len(names)
    assert set(catalog.modules) >= {"todo", "notes", "calendar", "journal", "goals", "kontext"}
    assert "profile" in catalog.modules
    policies = [t.default_policy for t in catalog]
    assert set(policies) == set(DECISIONS)
    assert policies.count("propose") > len(policies) / 2
    for expected in (
        "create_task",
        "complete_task",
        "reschedule_task",
        "create_note",
        "append_to_note",
        "create_event",
        "move_event",
        "add_journal_entry",
        "update_goal_progress",
        "create_goal",
    ):
        assert expected in catalog
    for tool in catalog:
        if tool.name.startswith(("delete_", "remove_", "cancel_")):
            assert tool.default_policy == "deny", tool.name
        assert tool.parameters["type"] == "object"
        assert set(tool.required) <= set(tool.properties)


def test_shipped_catalog_path_is_package_data() -> None:
    path = default_catalog_path()
    assert path.name == "tools.json" and path.is_file()
    assert load_catalog(path).tools == load_catalog().tools


def test_function_schema_shape() -> None:
    tool = load_catalog().get("create_task")
    assert tool is not None
    schema = tool.function_schema()
    assert schema == {
        "type": "function",
        "function": {
            "name": "create_task",
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def test_override_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"version": 1, "tools": [_entry(), _entry(name="b", module="notes")]})
    catalog = load_catalog(path)
    assert isinstance(catalog, Catalog)
    assert [t.name for t in catalog] == ["create_thing", "b"]
    assert catalog.source == str(path)
    assert catalog.get("b") is not None and catalog.get("b").module == "notes"  # type: ignore[union-attr]
    assert catalog.get("missing") is None
    assert load_catalog(_write(tmp_path, {"tools": []})).tools == ()


def test_missing_file_names_setting_and_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigurationError) as info:
        load_catalog(path)
    assert info.value.setting == SETTING
    assert str(path) in str(info.value)


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    path.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid JSON") as info:
        load_catalog(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([], "expected an object"),
        ({"version": 2, "tools": []}, "unsupported catalog version"),
        ({"tools": [], "extra": 1}, "unknown top-level key(s): extra"),
        ({"tools": {}}, '"tools" must be a list'),
        ({"tools": [1]}, "tools[0]: expected an object, got a number"),
        ({"tools": [_entry(name="bad name")]}, "tools[0] ('bad name'): 'name'"),
        ({"tools": [_entry(name=None)]}, "tools[0]: 'name'"),
        ({"tools": [_entry(), _entry()]}, "tools[1] ('create_thing'): duplicate tool name"),
        ({"tools": [_entry(default_policy="propose")]}, "unknown key(s) default_policy"),
        ({"tools": [_entry(module="Todo List")]}, "'module'"),
        ({"tools": [_entry(description="  ")]}, "'description'"),
        ({"tools": [_entry(defaultPolicy="maybe")]}, "'defaultPolicy' must be one of"),
        ({"tools": [_entry(defaultPolicy="Propose")]}, "got 'Propose'"),
        ({"tools": [_entry(parameters=[])]}, "'parameters' must be a JSON-schema object"),
        ({"tools": [_entry(parameters={"type": "string"})]}, "'parameters.type'"),
        (
            {"tools": [_entry(parameters={"type": "object", "properties": []})]},
            "'parameters.properties'",
        ),
        (
            {"tools": [_entry(parameters={"type": "object", "properties": {"a": 1}})]},
            "parameter 'a' must have a schema object",
        ),
        (
            {"tools": [_entry(parameters={"type": "object", "required": ["x"]})]},
            "required parameter(s) not in properties: x",
        ),
        (
            {"tools": [_entry(parameters={"type": "object", "required": "x"})]},
            "'parameters.required' must be a list",
        ),
    ],
)
def test_bad_override_entries(tmp_path: Path, data: object, fragment: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigurationError) as info:
        load_catalog(path)
    assert info.value.setting == SETTING
    assert str(path) in info.value.message
    assert fragment in info.value.message


def test_parse_catalog_is_pure_and_names_source() -> None:
    with pytest.raises(ConfigurationError, match=r"memory\.json"):
        parse_catalog({"tools": [{}]}, source="memory.json")
    catalog = parse_catalog({"tools": [_entry()]}, source="x")
    assert "create_thing" in catalog and len(catalog) == 1
