from collections.abc import Callable

def configure(
    loads: Callable[[bytes], object],
    created_at_us: Callable[[bytes], int | None],
    parse_stamp: Callable[[str], int | None],
    unstamped: int,
    max_stamp_len: int,
    record_state: type,
    row_insert: type,
    /,
) -> None: ...
def apply(
    columns: tuple[object, ...],
    mission_states: dict[tuple[str, str], object],
    mission_dirty: dict[tuple[str, str], object],
    changed_missions: list[tuple[str, str]],
    agent_states: dict[tuple[str, str], object],
    agent_dirty: dict[tuple[str, str], object],
    changed_agents: list[tuple[str, str]],
    lsn: object,
    applied_us: int,
    /,
) -> int | None: ...
def apply_inserts(
    inserts: list[object],
    start: int,
    indexes_of: Callable[[object], tuple[int, ...] | None],
    mission_states: dict[tuple[str, str], object],
    mission_dirty: dict[tuple[str, str], object],
    changed_missions: list[tuple[str, str]],
    agent_states: dict[tuple[str, str], object],
    agent_dirty: dict[tuple[str, str], object],
    changed_agents: list[tuple[str, str]],
    lsn: object,
    applied_us: int,
    /,
) -> tuple[int, int, int, int, int, int, int]: ...
def scan_field_meta(field_meta: bytes, /) -> dict[str, str | None] | None: ...
def slot_offsets() -> tuple[int, ...]: ...
