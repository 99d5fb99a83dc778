"""The compiled fold (projections._speedups) against the Python path it stands in for.

The same generated rows go through a projector with the compiled fold and one without; after
every row both must report the same outcome and hold the same states, dirty sets, live
counts and bookkeeping. The generator makes mostly rows the fold takes (updates of records
that exist) and every kind it must decline.
"""

from __future__ import annotations

import importlib.util
import shutil
import sysconfig
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core import instants
from core.lsn import Lsn
from core.sync_changes import COLUMNS
from projections import decode, fastpath, merge
from projections import projector as projector_module
from projections.decode import Value
from projections.projector import Outcome, Projector
from projections.stores import SnapshotStore, StateTable
from stream.pgoutput import UNCHANGED, TupleData
from stream.transactions import CommittedTransaction, RowInsert
from tests.fix_projection import (  # sync_changes as pgoutput has it, and the readers
    ITEMS,
    NAMES,
    SYNC,
    outcome_of,
    projector,
    store_of,
)

IN_ORDER = tuple(range(len(COLUMNS)))

needs_fast_path = pytest.mark.skipif(
    fastpath.compiled_fold() is None, reason="projections._speedups is not built (no C compiler)"
)


def test_the_fast_path_is_built_where_a_compiler_is() -> None:
    # Without this, a broken build would quietly leave only the Python path (and skip the
    # equivalence tests below).
    compiler = str(sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert fastpath.compiled_fold() is not None
    assert projector(True).compiled and not projector(False).compiled


@pytest.mark.parametrize("module", ["projections._speedups", "stream._tuples"])
def test_a_compiled_module_in_the_tree_is_not_older_than_its_source(module: str) -> None:
    # The extensions are optional: when a change to a C source fails to compile, the install
    # goes on and an editable tree keeps the module built from the previous source, which
    # the tests would then check instead. Rebuild (`pip install -e .`) to see the error.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"{module} is not built")
    source = Path(spec.origin).parent / (module.rsplit(".", 1)[1] + ".c")
    if not source.exists():
        pytest.skip(f"{module} is installed without its source")
    built = Path(spec.origin).stat().st_mtime
    assert built >= source.stat().st_mtime, f"{spec.origin} is older than {source}"


STAMPS: list[object] = [
    "2026-04-15T01:00:00.000Z",
    "2026-04-15T01:00:00Z",  # the same instant, other text
    "2026-04-15T01:00:00.001Z",
    "2026-04-15T03:00:00+02:00",
    "2026-04-15T00:59:59.999999Z",
    "2026-04-15t01:00:00z",  # invalid: lower case
    "2026-04-15T01:00:00",  # invalid: naive
    "x" * 60,  # longer than any stamp
    "",
    17,
    None,
]
META_ENTRY = st.one_of(
    st.sampled_from(STAMPS),
    st.builds(lambda s: {"at": s, "actor": {"kind": "user"}}, st.sampled_from(STAMPS)),
    st.just({"actor": {"kind": "user"}}),  # an object without `at`
)
FIELDS = ["title", "objective", "cadence", "deletedAt", "id", "__fieldMeta", "n"]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.text(max_size=3),
    st.just({"kind": "daily"}),
    st.just([1, 2]),
)
CREATED = [
    b"2026-04-15 00:00:00+00",
    b"2026-04-15 00:00:00.5+00",
    b"2026-04-15 02:00:00+02",
    b"2026-04-15 01:00:00.000001+00",
    b"2026-04-15 00:00:01+00",  # as long as the first, a second later
]


# --- field_meta as text -------------------------------------------------------------------
# The fast path reads field_meta in place (`scan_field_meta`) and leaves to orjson what it is
# not sure of. Texts here come in every shape JSON allows and some it does not: whitespace,
# escapes, non-ASCII, duplicate names, numbers of every form, nesting, and damaged copies.

JSON_WS = st.sampled_from(["", "", "", " ", "\n", "\t ", "\r\n"])
NAMES_IN_META = st.sampled_from([*FIELDS, "at", "tit\u00e9", "", 'a"b', "a\\b"])
TEXTS_IN_META = st.sampled_from(
    [s for s in STAMPS if isinstance(s, str)] + ["\u00e9t\u00e9", "tab\there", "\x7f"]
)
NUMBERS = st.sampled_from(
    ["0", "-0", "17", "-3", "2.5", "-0.125", "1e3", "1E-2", "2.5e+10", "1e999",
     "123456789012345678901234567890", "9" * 70, "9" * 400, "0." + "1" * 70, "01", "1.", ".5", "-",
     "+1", "NaN", "Infinity"]
)  # fmt: skip


def _text_json(draw: st.DrawFn, value: object) -> str:
    """`value` as JSON text, laid out and escaped at random (sometimes not as JSON allows)."""
    if isinstance(value, dict):
        items = list(value.items())
        if items and draw(st.integers(0, 3)) == 0:
            # The first name again, with another value: the last one counts.
            items.append((items[0][0], draw(META_TEXT_ENTRY)))
        parts = [
            f"{draw(JSON_WS)}{_text_json(draw, k)}{draw(JSON_WS)}:{draw(JSON_WS)}"
            f"{_text_json(draw, v)}{draw(JSON_WS)}"
            for k, v in items
        ]
        return "{" + ",".join(parts) + draw(JSON_WS) + "}"
    if isinstance(value, list):
        return "[" + ",".join(draw(JSON_WS) + _text_json(draw, v) for v in value) + "]"
    if isinstance(value, str):
        if draw(st.integers(0, 6)) == 0:
            return orjson.dumps(value).decode()  # escapes a quote, backslash, control char
        if draw(st.integers(0, 6)) == 0 and value:
            return f'"\\u{ord(value[0]):04x}{value[1:]}"'  # an escaped first character
        return '"' + value + '"'
    if isinstance(value, bool) or value is None:
        return orjson.dumps(value).decode()
    return draw(NUMBERS)


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), TEXTS_IN_META)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(NAMES_IN_META, inner, max_size=3)
    ),
    max_leaves=8,
)
META_TEXT_ENTRY = st.one_of(
    TEXTS_IN_META,
    st.dictionaries(st.sampled_from(["at", "actor", "origin", "by"]), JSON_VALUE, max_size=3),
    st.fixed_dictionaries({"at": TEXTS_IN_META}, optional={"actor": JSON_VALUE}),
    JSON_VALUE,
)


@st.composite
def meta_texts(draw: st.DrawFn) -> bytes:
    meta = draw(st.dictionaries(NAMES_IN_META, META_TEXT_ENTRY, max_size=6))
    text = (draw(JSON_WS) + _text_json(draw, meta) + draw(JSON_WS)).encode()
    damage = draw(st.integers(0, 5))
    if damage == 0 and text:  # cut short
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == 1:  # one byte added anywhere
        at = draw(st.integers(0, len(text)))
        extra = draw(
            st.sampled_from([b"{", b"}", b",", b":", b'"', b"\\", b"\x00", b"\x0c", b"\xc3"])
        )
        text = text[:at] + extra + text[at:]
    return text


def _stamp_text(entry: object) -> str | None:
    """The stamp text the merge reads from one parsed field_meta entry (None: no text)."""
    if isinstance(entry, dict):
        entry = entry.get("at")
    return entry if isinstance(entry, str) else None


def counting_fold() -> tuple[fastpath.Fold, list[bytes]]:
    """A compiled fold whose `loads` records each text it parses: the ones the fold did not
    read in place."""
    from projections._speedups import Fold

    parsed: list[bytes] = []

    def loads(text: bytes) -> object:
        parsed.append(text)
        return orjson.loads(text)

    fold: fastpath.Fold = Fold(
        loads=loads,
        created_at_us=decode._created_at_us,
        parse_stamp=instants.parse_stamp_text,
        unstamped=merge.UNSTAMPED,
        max_stamp_len=instants.MAX_STAMP_LEN,
        record_state=merge.RecordState,
    )
    return fold, parsed


def fold_insert(fold: fastpath.Fold, meta: bytes) -> tuple[int, StateTable]:
    """One insert of a new mission with `meta` as its field_meta, folded into new tables:
    how far the fold got (1: taken) and the missions' table."""
    missions, agents = StateTable(), StateTable()
    row = (b"e1", b"ai", b"aiMissions", b"m1", b"u1", b"insert", b'{"title": "x", "n": 1}',
           meta, CREATED[0])  # fmt: skip
    rows: list[tuple[None, tuple[Value, ...]]] = [(None, row)]
    done = fold(rows, 0, 1, lambda _: IN_ORDER, missions, agents, [], [], Lsn(1), 1)
    return done[0], missions


META_FIELDS = {name: i for i, name in enumerate([*FIELDS, "at", "tit\u00e9", "", 'a"b', "a\\b"])}


@needs_fast_path
@settings(max_examples=2000, deadline=None)
@given(meta_texts(), st.sampled_from([b"update", b"insert"]))
def test_field_meta_read_in_place_merges_as_orjson_reads_it(text: bytes, op: bytes) -> None:
    # Every name field_meta may hold is a field of the row, so the stamp text the fold
    # reads for each (in place, or from orjson when the scanner is not sure) shows in the
    # merge keys; the Python path reads every text with orjson.
    fast, slow = projector(True), projector(False)
    _merge_alike(fast, slow, op, text)


@needs_fast_path
def test_field_meta_as_the_server_sends_it_is_read_in_place() -> None:
    # jsonb's text output and orjson's: the fold must not quietly hand these to orjson.
    jsonb_text = (
        b'{"title": {"at": "2026-11-22T23:12:30.831Z", "actor": {"kind": "user"},'
        b' "origin": "user"}, "cadence": "2026-11-22T23:12:30.831Z", "n": [1, -2.5, null]}'
    )
    in_place = [jsonb_text, orjson.dumps(orjson.loads(jsonb_text)), b"{}"]
    # Escapes, non-ASCII, exponents and deep nesting are orjson's.
    deep = b'{"n": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # orjson: too deep
    for_orjson = [b'{"t\\u0069tle": "x"}', '{"é": "x"}'.encode(), b'{"n": 1e3}', deep]
    for text in in_place + for_orjson:
        fold, parsed = counting_fold()
        taken, missions = fold_insert(fold, text)
        assert (text in parsed) == (text in for_orjson), text
        assert taken == (text is not deep)  # orjson rejects that one: the Python path's
    taken, missions = fold_insert(counting_fold()[0], jsonb_text)
    state = missions.states[("u1", "m1")]
    stamp = instants.parse_stamp_text("2026-11-22T23:12:30.831Z")
    assert state.keys["title"] == merge.make_key(stamp, merge.key_created(state.keys["n"]), "e1")
    assert (missions.live, list(missions.dirty.values())) == (1, [state])


@needs_fast_path
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from([*FIELDS[:3], "at", ""]), VALUES, max_size=4),
            meta_texts(),
            st.sampled_from([b"update", b"insert"]),
        ),
        min_size=1,
        max_size=12,
    )
)
@example([({"title": "b"}, '{"title": "\u00e9t\u00e9"}'.encode(), b"update")])
@example([({"title": "b"}, b'{"title": {"at": "x", "at": 1}}', b"update")])
@example([({"title": "b"}, b'{"title": "2026-04-15T01:00:00Z", "title": "x"}', b"update")])
def test_stamps_read_in_place_merge_as_parsed_ones(
    updates: list[tuple[dict[str, object], bytes, bytes]],
) -> None:
    # Updates of one record that exists, so the fast path takes every row it can read.
    fast, slow = projector(True), projector(False)
    create = (b"e0", b"ai", b"aiMissions", b"m1", b"u1", b"insert",
              b'{"title": "a", "objective": "o"}', b"{}", CREATED[0])  # fmt: skip
    rows_ = [create]
    for i, (data, meta, op) in enumerate(updates, 1):
        event = f"e{i}".encode()
        created = CREATED[i % len(CREATED)]
        rows_.append((event, b"ai", b"aiMissions", b"m1", b"u1", op, orjson.dumps(data), meta,
                      created))  # fmt: skip
    for i, columns in enumerate(rows_):
        results = []
        for p in (fast, slow):
            outcome = Outcome()
            p.apply_loaded([columns], IN_ORDER, Lsn(10 + i), 20 + i, outcome)
            results.append(outcome_of(outcome))
        assert results[0] == results[1], columns
    assert store_of(fast.missions) == store_of(slow.missions)


# Per column, what one corrupted column of an otherwise good row may hold.
BAD: list[list[Value]] = [
    [b"", b"\xff", None, UNCHANGED],
    [b"other", None, UNCHANGED],
    [b"notes", None, UNCHANGED],
    [b"", b"\xff", None, UNCHANGED],
    [b"", b"\xc3", None, UNCHANGED],
    [b"upsert", b"", None, UNCHANGED],
    [b"{bad", b"[1]", b"null", b"\xff", None, UNCHANGED],
    [b"{bad", b"[]", b'"x"', b"\xff", None, UNCHANGED],
    [b"yesterday", b"", None, UNCHANGED],
]


@st.composite
def rows(draw: st.DrawFn) -> tuple[Value, ...]:
    """Mostly good rows of a few records (so most find their record), a fifth with one
    column corrupted."""
    table = draw(st.sampled_from([b"aiMissions", b"aiMissions", b"agents"]))
    fields = FIELDS if draw(st.integers(0, 4)) == 0 else [f for f in FIELDS if f != "deletedAt"]
    data = draw(st.dictionaries(st.sampled_from(fields), VALUES, max_size=5))
    meta_kind = draw(st.sampled_from(["all", "all", "all", "some", "none", "not-object"]))
    if meta_kind == "all":
        meta: object = {k: draw(META_ENTRY) for k in data}
    elif meta_kind == "some":
        meta = {k: draw(META_ENTRY) for k in data if draw(st.booleans())}
    elif meta_kind == "none":
        meta = {}
    else:
        meta = draw(st.sampled_from([[], "x", None]))
    columns: list[Value] = [
        draw(st.sampled_from([b"e1", b"e2", b"e3", "\u00e9v".encode()])),
        b"ai",
        table,
        draw(st.sampled_from([b"m1", b"m2"])),
        draw(st.sampled_from([b"u1", b"u1", b"u2"])),
        draw(st.sampled_from([b"update"] * 14 + [b"insert"] * 5 + [b"delete"])),
        orjson.dumps(data),
        orjson.dumps(meta) if draw(st.integers(0, 3)) else draw(meta_texts()),
        draw(st.sampled_from(CREATED)),
    ]
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(BAD) - 1))
        columns[i] = draw(st.sampled_from(BAD[i]))
    return tuple(columns)


@needs_fast_path
@settings(max_examples=300, deadline=None)
@given(st.lists(rows(), min_size=1, max_size=30), st.integers(0, 3))
def test_the_fast_path_does_what_the_python_path_does(
    batch: list[tuple[Value, ...]], dirty_every: int
) -> None:
    fast, slow = projector(True), projector(False)
    assert fast.compiled and not slow.compiled
    for i, columns in enumerate(batch):
        lsn = Lsn(1000 + i)
        commit_us = 1_776_000_000_000_000 + i
        results = []
        for p in (fast, slow):
            outcome = Outcome()
            p.apply_loaded([columns], IN_ORDER, lsn, commit_us, outcome)
            results.append(outcome_of(outcome))
        assert results[0] == results[1], columns
        for store in (fast.missions, fast.agents):
            assert_table_contract(store)
        if dirty_every and i % dirty_every == 0:
            # The persister takes dirty states now and then; both must agree after it.
            assert store_of(fast.missions) == store_of(slow.missions)
            assert store_of(fast.agents) == store_of(slow.agents)
    assert store_of(fast.missions) == store_of(slow.missions)
    assert store_of(fast.agents) == store_of(slow.agents)


def assert_table_contract(store: SnapshotStore) -> None:
    """What StateTable promises, which the fold must keep as the store's methods do."""
    table = store.table
    assert all(key == (s.user_id, s.record_id) for key, s in table.states.items())
    assert all(table.states.get(key) is s for key, s in table.dirty.items())
    assert table.live == sum(store.is_live(s) for s in table.states.values())


@pytest.fixture
def python_rows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Value, ...]]:
    """The rows the projector hands to the Python path (the ones the fold declines)."""
    seen: list[tuple[Value, ...]] = []

    def spy(columns: tuple[Value, ...]) -> object:
        seen.append(columns)
        return decode.decode_columns(columns)

    monkeypatch.setattr(projector_module, "decode_columns", spy)
    return seen


@needs_fast_path
def test_the_common_row_takes_the_fast_path(python_rows: list[tuple[Value, ...]]) -> None:
    p = projector(True)
    insert = (b"e1", b"ai", b"aiMissions", b"m1", b"u1", b"insert",
              b'{"title": "a"}', b"{}", CREATED[0])  # fmt: skip
    update = (b"e2", b"ai", b"aiMissions", b"m1", b"u1", b"update",
              b'{"title": "b"}', b'{"title": {"at": "2026-04-15T01:00:00Z"}}',
              CREATED[0])  # fmt: skip
    stale = (b"e0", b"ai", b"aiMissions", b"m1", b"u1", b"update",
             b'{"title": "c"}', b'{"title": {"at": "2026-04-15T00:30:00Z"}}',
             CREATED[0])  # fmt: skip
    outcome = Outcome()
    p.apply_loaded([insert, update, stale], IN_ORDER, Lsn(5), 7, outcome)
    # The insert creates the record, the updates change it: all in the fold.
    assert python_rows == []
    state = p.missions.get("u1", "m1")
    assert state is not None and state.values == {"title": "b"}
    assert state.last_lsn == Lsn(5) and state.last_applied_us == 7
    assert outcome.mission_rows == 3 and outcome.changed_missions == [("u1", "m1")] * 2
    assert outcome.new_records == 1 and p.missions.live_count() == 1


@needs_fast_path
def test_an_agent_row_that_sets_deleted_at_is_declined(
    python_rows: list[tuple[Value, ...]],
) -> None:
    p = projector(True)
    create = (b"e1", b"ai", b"agents", b"a1", b"u1", b"insert",
              b'{"name": "x"}', b"{}", CREATED[0])  # fmt: skip
    retire = (b"e2", b"ai", b"agents", b"a1", b"u1", b"update",
              b'{"deletedAt": "2026-04-15T02:00:00Z"}',
              b'{"deletedAt": {"at": "2026-04-15T02:00:00Z"}}', CREATED[0])  # fmt: skip
    p.apply_loaded([create], IN_ORDER, Lsn(1), 1, Outcome())
    assert p.agents.live_count() == 1 and python_rows == []
    p.apply_loaded([retire], IN_ORDER, Lsn(2), 2, Outcome())
    assert python_rows == [retire]
    assert p.agents.live_count() == 0


def _as_sync_tuple(columns: tuple[Value, ...]) -> TupleData:
    by_name = dict(zip(COLUMNS, columns, strict=True))
    return tuple(by_name.get(n, b"x") for n in NAMES)  # type: ignore[misc]


INSERTS = st.lists(
    st.one_of(
        rows().map(lambda c: (SYNC, _as_sync_tuple(c))),
        st.just((ITEMS, (b"1",))),
    ),
    max_size=40,
)


@needs_fast_path
@settings(max_examples=300, deadline=None)
@given(st.lists(INSERTS, min_size=1, max_size=4))
def test_the_compiled_transaction_loop_does_what_the_python_path_does(
    transactions: list[list[RowInsert]],
) -> None:
    fast, slow = projector(True), projector(False)
    for n, inserts in enumerate(transactions):
        commit = Lsn(100 * (n + 1))
        tx = CommittedTransaction(
            xid=n + 1,
            commit_lsn=commit,
            end_lsn=Lsn(commit + 10),
            commit_time_us=1_776_000_000_000_000 + n,
            inserts=inserts,
            other_changes=[],
            messages=[],
            origin=None,
            streamed=False,
        )
        results = []
        for p in (fast, slow):
            outcome = p.apply_transaction(tx)
            assert outcome is not None
            results.append(outcome_of(outcome))
        assert results[0] == results[1]
        assert store_of(fast.missions) == store_of(slow.missions)
        assert store_of(fast.agents) == store_of(slow.agents)


class _Stamp:
    """An object stamp as a typed decoder makes it: its `at` alone."""

    def __init__(self, at: object) -> None:
        self.at = at


def _typed_meta(text: bytes) -> dict[str, object]:
    """A field_meta decoder of the shape `meta_loads` takes: string stamps as they are,
    object stamps as `_Stamp`; anything else raises (the fold's `loads` then parses it)."""
    parsed = orjson.loads(text)
    if not isinstance(parsed, dict) or not all(isinstance(v, str | dict) for v in parsed.values()):
        raise TypeError("not a field_meta of stamps")
    return {k: v if isinstance(v, str) else _Stamp(v.get("at")) for k, v in parsed.items()}


@needs_fast_path
@settings(max_examples=500, deadline=None)
@given(meta_texts(), st.sampled_from([b"update", b"insert"]))
def test_a_fold_with_meta_loads_merges_as_the_python_path(text: bytes, op: bytes) -> None:
    # `meta_loads` (what bench/stages.py --field-meta measures) stands in for the scanner.
    fast, slow = projector(True), projector(False)
    fast._fold = fastpath.compiled_fold(meta_loads=_typed_meta)
    _merge_alike(fast, slow, op, text)


def _merge_alike(fast: Projector, slow: Projector, op: bytes, text: bytes) -> None:
    """A record created, then changed with `field_meta` `text`: both projectors agree."""
    create = (b"e0", b"ai", b"aiMissions", b"m1", b"u1", b"insert", b'{"title": "a"}', b"{}",
              CREATED[0])  # fmt: skip
    change = (b"e1", b"ai", b"aiMissions", b"m1", b"u1", op, orjson.dumps(META_FIELDS), text,
              CREATED[1])  # fmt: skip
    results = []
    for p in (fast, slow):
        outcome = Outcome()
        p.apply_loaded([create, change], IN_ORDER, Lsn(10), 20, outcome)
        results.append(outcome_of(outcome))
    assert results[0] == results[1]
    assert store_of(fast.missions) == store_of(slow.missions)
