"""Tool policy resolution (domain.md §4) and which tools a planner call offers (§5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.json_types import JsonValue
from planner.catalog import Catalog, Decision, ToolSpec, load_catalog, parse_catalog
from planner.policy import (
    EMPTY_POLICY,
    AgentPolicy,
    offered_tools,
    parse_policy,
)

CATALOG = load_catalog()


def _tool(name: str, module: str, default: Decision) -> ToolSpec:
    return ToolSpec(name, module, "d", {"type": "object", "properties": {}}, default)


SMALL = Catalog(
    (
        _tool("create_task", "todo", "propose"),
        _tool("complete_task", "todo", "propose"),
        _tool("create_note", "notes", "propose"),
        _tool("list_tasks", "todo", "auto"),
        _tool("delete_task", "todo", "deny"),
    )
)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, "propose"),
        ({"defaultForAi": "auto"}, "auto"),
        ({"defaultForAi": "auto", "defaultsByModule": {"todo": "deny"}}, "deny"),
        (
            {
                "defaultForAi": "deny",
                "defaultsByModule": {"todo": "deny"},
                "tools": {"create_task": "auto"},
            },
            "auto",
        ),
        ({"defaultsByModule": {"notes": "deny"}}, "propose"),
        ({"tools": {"complete_task": "deny"}}, "propose"),
    ],
)
def test_resolution_order(policy: JsonValue, expected: Decision) -> None:
    tool = SMALL.get("create_task")
    assert tool is not None
    assert parse_policy(policy).resolve(tool) == expected


def test_nothing_set_falls_back_to_catalog_default() -> None:
    assert [EMPTY_POLICY.resolve(t) for t in SMALL] == [
        "propose",
        "propose",
        "propose",
        "auto",
        "deny",
    ]


@pytest.mark.parametrize("raw", [None, 3, "deny", [], True])
def test_policy_that_is_not_an_object(raw: JsonValue) -> None:
    parsed = parse_policy(raw)
    assert parsed.tools == {} and parsed.defaults_by_module == {} and parsed.default_for_ai is None
    assert parsed.ignored == (0 if raw is None else 1)
    assert [t.name for t in offered_tools(SMALL, raw)] == [
        "create_task",
        "complete_task",
        "create_note",
    ]


def test_malformed_entries_are_ignored_one_by_one() -> None:
    parsed = parse_policy(
        {
            "tools": {"create_task": "DENY", "complete_task": "deny", "create_note": 1},
            "defaultsByModule": ["todo"],
            "defaultForAi": "never",
        }
    )
    assert parsed.tools == {"complete_task": "deny"}
    assert parsed.defaults_by_module == {}
    assert parsed.default_for_ai is None
    assert parsed.ignored == 4
    assert [t.name for t in offered_tools(SMALL, parsed)] == ["create_task", "create_note"]


def test_null_sections_are_not_errors() -> None:
    parsed = parse_policy({"tools": None, "defaultsByModule": None, "defaultForAi": None})
    assert parsed == AgentPolicy()


def test_offered_only_propose_minus_denied_with_labels() -> None:
    offered = offered_tools(
        SMALL,
        {
            "defaultsByModule": {"todo": "auto"},
            "tools": {"complete_task": "deny", "delete_task": "propose", "list_tasks": "propose"},
        },
    )
    # auto/deny catalog tools are never offered server-side, whatever the agent says.
    assert [(t.name, t.module, t.policy) for t in offered] == [
        ("create_task", "todo", "auto"),
        ("create_note", "notes", "propose"),
    ]
    assert offered[0].spec is SMALL.get("create_task")


def test_deny_everything() -> None:
    assert offered_tools(CATALOG, {"defaultForAi": "deny"}) == ()
    policy = parse_policy({"defaultForAi": "deny"})
    assert {t.name for t in CATALOG if policy.resolve(t) == "deny"} == {t.name for t in CATALOG}


def test_shipped_catalog_offers_only_propose_tools() -> None:
    offered = offered_tools(CATALOG, None)
    assert [t.name for t in offered] == [t.name for t in CATALOG if t.default_policy == "propose"]
    assert all(t.policy == "propose" for t in offered)
    assert "delete_task" not in {t.name for t in offered}


_decision = st.sampled_from(["auto", "propose", "deny", "Deny", "", "yes"]) | st.integers()
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
_names = st.sampled_from([t.name for t in CATALOG] + ["unknown"])
_modules = st.sampled_from([*CATALOG.modules, "other"])
_policies = (
    st.fixed_dictionaries(
        {},
        optional={
            "tools": st.dictionaries(_names, _decision) | _json,
            "defaultsByModule": st.dictionaries(_modules, _decision) | _json,
            "defaultForAi": _decision | _json,
        },
    )
    | _json
)


@given(_policies)
def test_any_policy_json_is_safe_and_deterministic(raw: JsonValue) -> None:
    offered = offered_tools(CATALOG, raw)
    assert offered == offered_tools(CATALOG, raw)
    parsed = parse_policy(raw)
    for tool in offered:
        assert tool.spec.default_policy == "propose"
        assert tool.policy in ("auto", "propose")
        assert tool.policy == parsed.resolve(tool.spec)
    offered_names = {t.name for t in offered}
    for spec in CATALOG:
        if spec.default_policy == "propose" and parsed.resolve(spec) != "deny":
            assert spec.name in offered_names


def test_parse_catalog_tools_work_with_policy() -> None:
    catalog = parse_catalog(
        {
            "tools": [
                {
                    "name": "x",
                    "module": "notes",
                    "description": "d",
                    "parameters": {"type": "object"},
                    "defaultPolicy": "propose",
                }
            ]
        }
    )
    assert [t.name for t in offered_tools(catalog, {"defaultsByModule": {"todo": "deny"}})] == ["x"]
