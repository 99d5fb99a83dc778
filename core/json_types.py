"""The types of decoded JSON values.

`JsonValue` is the type of every decoded JSON value in the domain: the projections store
field values as they arrived and never look inside them, except for the few fields the
views read.
"""

from __future__ import annotations

from typing import TypeAlias

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
"""Any value `json.loads`/`orjson.loads` can return."""

JsonObject: TypeAlias = "dict[str, JsonValue]"
"""A decoded JSON object (a record, a row's `data` or `field_meta`)."""
