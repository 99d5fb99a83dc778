"""The `sync_changes` table exactly as the sync service defines it (domain.md §1).

For development, demos and tests only: in production the sync service owns this table and
mission-runner never creates or alters it. `mission-runner dev-schema` runs this.
"""

from __future__ import annotations

from psycopg import AsyncConnection

DDL = """
CREATE TABLE IF NOT EXISTS public.sync_changes (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id          text        NOT NULL,
    table_name      text        NOT NULL,
    record_id       text        NOT NULL,
    user_id         text        NOT NULL,
    op              text        NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    data            jsonb,
    field_meta      jsonb       DEFAULT '{}',
    client_id       text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    schema_version  int         NOT NULL DEFAULT 1,
    actor           jsonb,
    origin          text,
    space_id        text
);

CREATE INDEX IF NOT EXISTS sync_changes_user_app_created_idx
    ON public.sync_changes (user_id, app_id, created_at);
CREATE INDEX IF NOT EXISTS sync_changes_table_record_created_idx
    ON public.sync_changes (table_name, record_id, created_at);
CREATE INDEX IF NOT EXISTS sync_changes_user_app_table_created_idx
    ON public.sync_changes (user_id, app_id, table_name, created_at);
CREATE INDEX IF NOT EXISTS sync_changes_user_space_app_created_idx
    ON public.sync_changes (user_id, space_id, app_id, created_at)
    WHERE space_id IS NOT NULL;

ALTER TABLE public.sync_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.sync_changes FORCE ROW LEVEL SECURITY;

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_policies
        WHERE schemaname = 'public' AND tablename = 'sync_changes'
          AND policyname = 'sync_changes_user_isolation'
    ) THEN
        CREATE POLICY sync_changes_user_isolation ON public.sync_changes
            FOR ALL
            USING (user_id = current_setting('app.current_user_id', true))
            WITH CHECK (user_id = current_setting('app.current_user_id', true));
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_policies
        WHERE schemaname = 'public' AND tablename = 'sync_changes'
          AND policyname = 'sync_changes_space_member_read'
    ) THEN
        CREATE POLICY sync_changes_space_member_read ON public.sync_changes
            FOR SELECT
            USING (space_id = ANY (string_to_array(
                coalesce(current_setting('app.current_user_space_ids', true), ''), ',')));
    END IF;
END
$$;
"""


async def create_dev_schema(conn: AsyncConnection[tuple[object, ...]]) -> None:
    async with conn.transaction():
        await conn.execute(DDL.encode())
