"""Session functions that cost the same however many sessions there are, and an open
that no longer writes a known session.

- 0002's record took its row locks with `id IN (SELECT ... FROM jsonb_array_elements(..))`:
  the planner guesses 100 rows for that function and hash-joined it against a sequential
  scan of every session. Measured: 1.9 ms per single-turn batch at 5,000 sessions, and
  linear in the table. It now locks `id = ANY(array)`, an index scan.
- 0002's open was an upsert that set last_active_at on every request, and recording the
  turn set it again. Since (tenant, last_active_at) is indexed, each of those writes is a
  new row version plus three index entries: the open's was pure overhead for a request
  that then stored a turn, and for one that did not (the engine failed) it marked a session
  active that had not moved. Now last_active_at is the time of the last stored turn (or of
  the session's creation), and the open only inserts sessions that do not exist yet.
"""

import importlib

from django.db import migrations

from config.sql_migrations import replaced

# Reversing restores 0002's functions.
previous = importlib.import_module("apps.sessions.migrations.0002_session_functions")

OPEN_BATCH = """
CREATE OR REPLACE FUNCTION gateway_session_open_batch(p_batch jsonb)
RETURNS TABLE (n bigint, session_id bigint, created boolean, session_prompt text,
               tenant_prompt text, history jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item record;
    found_id bigint;
    found_prompt text;
    is_new boolean;
BEGIN
    FOR item IN
        SELECT e.ordinality AS i, (e.value->>'tenant')::bigint AS tenant,
               e.value->>'external_id' AS external_id
        FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
        ORDER BY 2, 3, 1
    LOOP
        SELECT c.id, c.system_prompt INTO found_id, found_prompt
        FROM chat_sessions_chatsession c
        WHERE c.tenant_id = item.tenant AND c.external_id = item.external_id;
        is_new := NOT FOUND;
        IF is_new THEN
            -- Another batch may insert it first: then this one waits for it and takes it
            -- (the no-op update is what makes RETURNING see the other row).
            INSERT INTO chat_sessions_chatsession AS c
                (tenant_id, external_id, system_prompt, created_at, last_active_at)
            VALUES (item.tenant, item.external_id, '', now(), now())
            ON CONFLICT (tenant_id, external_id) DO UPDATE SET last_active_at = c.last_active_at
            RETURNING c.id, c.system_prompt, (c.xmax = 0) INTO found_id, found_prompt, is_new;
        END IF;
        RETURN QUERY
        SELECT item.i, found_id, is_new, found_prompt, t.system_prompt,
               CASE WHEN is_new THEN '[]'::jsonb ELSE coalesce(
                   (SELECT jsonb_agg(jsonb_build_array(m.payload, m.tokens) ORDER BY m.position)
                    FROM chat_sessions_message m WHERE m.session_id = found_id),
                   '[]'::jsonb) END
        FROM tenants_tenant t WHERE t.id = item.tenant;
    END LOOP;
END
$$;
"""

# The record is 0002's with its locking statement replaced.
RECORD_BATCH = replaced(
    previous.RECORD_BATCH,
    "WHERE c.id IN (SELECT (e->>'session')::bigint FROM jsonb_array_elements(p_batch) AS e)",
    "WHERE c.id = ANY(ARRAY(SELECT (e->>'session')::bigint FROM jsonb_array_elements(p_batch) AS e))",
)


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0002_session_functions")]

    operations = [
        migrations.RunSQL(OPEN_BATCH, previous.OPEN_BATCH),
        migrations.RunSQL(RECORD_BATCH, previous.RECORD_BATCH),
    ]
