"""withUser: every read or write on behalf of a user runs in a transaction that first sets
`app.current_user_id` (domain.md §1), so row-level security applies to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection

from writer.errors import WriterError


@asynccontextmanager
async def with_user(
    conn: AsyncConnection[tuple[object, ...]], user_id: str
) -> AsyncIterator[AsyncConnection[tuple[object, ...]]]:
    """A transaction scoped to `user_id`. An empty user id is an error, never "everyone"."""
    if not user_id:
        raise WriterError("withUser needs a user id; refusing an empty one")
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_user_id', %s, true)", (user_id,))
        yield conn
