"""Open sessions and record turns as server-side functions, many per round trip.

Through the ORM, a session turn cost about ten queries and ~5 ms of the gateway's CPU
(measured: 183 req/s with sessions against ~4,700 without). These functions do the same
work in one call for a whole batch of requests (apps/sessions/store.py), one transaction
each. Every batch takes its session rows in (tenant_id, external_id) order, opens and
records alike, so two batches can never deadlock on each other.
"""

from django.db import migrations

OPEN_BATCH = """
CREATE OR REPLACE FUNCTION gateway_session_open_batch(p_batch jsonb)
RETURNS TABLE (n bigint, session_id bigint, created boolean, session_prompt text,
               tenant_prompt text, history jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT e.ordinality AS i, (e.value->>'tenant')::bigint AS tenant,
               e.value->>'external_id' AS external_id
        FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
        ORDER BY 2, 3, 1
    LOOP
        RETURN QUERY
        WITH s AS (
            INSERT INTO chat_sessions_chatsession AS c
                (tenant_id, external_id, system_prompt, created_at, last_active_at)
            VALUES (item.tenant, item.external_id, '', now(), now())
            ON CONFLICT (tenant_id, external_id) DO UPDATE SET last_active_at = now()
            RETURNING c.id, c.system_prompt, (c.xmax = 0) AS created
        )
        SELECT item.i, s.id, s.created, s.system_prompt, t.system_prompt,
               CASE WHEN s.created THEN '[]'::jsonb ELSE coalesce(
                   (SELECT jsonb_agg(jsonb_build_array(m.payload, m.tokens) ORDER BY m.position)
                    FROM chat_sessions_message m WHERE m.session_id = s.id),
                   '[]'::jsonb) END
        FROM s JOIN tenants_tenant t ON t.id = item.tenant;
    END LOOP;
END
$$;
"""

RECORD_BATCH = """
CREATE OR REPLACE FUNCTION gateway_session_record_batch(p_batch jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    item record;
    base integer;
    recorded bigint := 0;
BEGIN
    PERFORM 1 FROM chat_sessions_chatsession c
    WHERE c.id IN (SELECT (e->>'session')::bigint FROM jsonb_array_elements(p_batch) AS e)
    ORDER BY c.tenant_id, c.external_id
    FOR UPDATE;
    FOR item IN
        SELECT (e.value->>'session')::bigint AS session, e.value->'messages' AS messages
        FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
        ORDER BY e.ordinality
    LOOP
        UPDATE chat_sessions_chatsession SET last_active_at = now() WHERE id = item.session;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile: it takes no turn
        SELECT coalesce(max(position) + 1, 0) INTO base
        FROM chat_sessions_message WHERE session_id = item.session;
        INSERT INTO chat_sessions_message (
            session_id, position, role, payload, tokens, model, created_at,
            prompt_tokens, cached_tokens, pp_tokens, pp_started_at, pp_finished_at,
            tg_tokens, tg_started_at, tg_finished_at)
        SELECT item.session, base + m.o - 1, left(m.r->>'role', 16), m.r->'payload',
               (m.r->>'tokens')::integer, m.r->>'model', now(),
               (m.r->>'prompt_tokens')::integer, (m.r->>'cached_tokens')::integer,
               (m.r->>'pp_tokens')::integer, (m.r->>'pp_started_at')::timestamptz,
               (m.r->>'pp_finished_at')::timestamptz, (m.r->>'tg_tokens')::integer,
               (m.r->>'tg_started_at')::timestamptz, (m.r->>'tg_finished_at')::timestamptz
        FROM jsonb_array_elements(item.messages) WITH ORDINALITY AS m(r, o);
        recorded := recorded + 1;
    END LOOP;
    RETURN recorded;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0001_initial")]

    operations = [
        migrations.RunSQL(OPEN_BATCH, "DROP FUNCTION IF EXISTS gateway_session_open_batch(jsonb)"),
        migrations.RunSQL(
            RECORD_BATCH, "DROP FUNCTION IF EXISTS gateway_session_record_batch(jsonb)"
        ),
    ]
