"""Session functions that handle a batch in a few statements instead of a few per item.

0004's functions ran two or three statements for every item of a batch (a lookup, maybe an
insert, the history query; an update, a max(position) and an insert), and each statement
executed alone costs PostgreSQL its executor start-up. Measured with 50 concurrent
requests through the batchers (PostgreSQL CPU per request): opening a known session
37 -> 12 us, a new one 29 -> 17 us, recording a turn 48 -> 30 us.

- The open inserts the batch's new sessions in one statement, in (tenant, external_id)
  order (two batches inserting the same ids wait for each other instead of deadlocking;
  one that another batch inserted first is skipped, and read by the next statement once
  that batch has committed), then reads every item's session, tenant prompt and history in
  one query. It still locks nothing.
- The record marks its sessions active one by one in session-id order (the same global
  order in every batch, so two batches cannot deadlock; a session deleted meanwhile is
  skipped and takes no turn), then inserts all the batch's messages in one statement,
  each session's after its last stored position, in arrival order.
- Timestamps arrive as epoch seconds (the gateway no longer formats six of them per turn).

The sessions table loses its (tenant, last_active_at) index. A plan made while the table
was tiny used it to find a session by external id, which reads every session of the
tenant once the table has grown; and as last_active_at changes on every turn, it made
every turn's update write three index entries instead of none (a HOT update, for which the
table now leaves room on its pages). Listing a tenant's sessions by activity already
counted every session's messages, so it did not use the index.

With only the primary key and the unique indexes left, every lookup here is a probe of
the one index that fits it (LATERAL ... OFFSET 0 keeps the planner from turning it into a
join that could scan a table), so the functions use generic plans
(plan_cache_mode = force_generic_plan): made once per connection, right for any table
size (tests/test_db_function_scans.py makes them on empty tables). Left to choose between
generic and custom plans, PostgreSQL made the record cost 290 us of CPU per single-turn
call; with generic plans it costs 120 (measured on a 2-core machine, ~2M messages).
"""

import importlib

from django.db import migrations

# Reversing restores 0004's functions.
previous = importlib.import_module("apps.sessions.migrations.0004_plans_for_growing_tables")

OPEN_BATCH = """
CREATE OR REPLACE FUNCTION gateway_session_open_batch(p_batch jsonb)
RETURNS TABLE (n bigint, session_id bigint, created boolean, session_prompt text,
               tenant_prompt text, history jsonb)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    new_ids bigint[];
BEGIN
    WITH inserted AS (
        INSERT INTO chat_sessions_chatsession
            (tenant_id, external_id, system_prompt, created_at, last_active_at)
        SELECT DISTINCT (e->>'tenant')::bigint, e->>'external_id', '', now(), now()
        FROM jsonb_array_elements(p_batch) AS e
        WHERE (SELECT c.id FROM chat_sessions_chatsession c
               WHERE c.tenant_id = (e->>'tenant')::bigint AND c.external_id = e->>'external_id'
               LIMIT 1) IS NULL
        ORDER BY 1, 2
        ON CONFLICT (tenant_id, external_id) DO NOTHING
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO new_ids FROM inserted;
    RETURN QUERY
    SELECT e.ordinality, s.id, s.id = ANY(new_ids), s.system_prompt, t.system_prompt,
           coalesce(h.history, '[]'::jsonb)
    FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
    CROSS JOIN LATERAL (
        SELECT c.id, c.system_prompt FROM chat_sessions_chatsession c
        WHERE c.tenant_id = (e.value->>'tenant')::bigint AND c.external_id = e.value->>'external_id'
        OFFSET 0) s
    CROSS JOIN LATERAL (
        SELECT tt.system_prompt FROM tenants_tenant tt
        WHERE tt.id = (e.value->>'tenant')::bigint OFFSET 0) t
    LEFT JOIN LATERAL (
        SELECT jsonb_agg(jsonb_build_array(m.payload, m.tokens) ORDER BY m.position) AS history
        FROM chat_sessions_message m WHERE m.session_id = s.id) h ON true;
END
$$;
"""

RECORD_BATCH = """
CREATE OR REPLACE FUNCTION gateway_session_record_batch(p_batch jsonb)
RETURNS bigint
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    sid bigint;
    live bigint[] := '{}';
BEGIN
    FOR sid IN
        SELECT DISTINCT (e->>'session')::bigint FROM jsonb_array_elements(p_batch) AS e ORDER BY 1
    LOOP
        UPDATE chat_sessions_chatsession SET last_active_at = now() WHERE id = sid;
        IF FOUND THEN
            live := live || sid;
        END IF;
    END LOOP;
    INSERT INTO chat_sessions_message (
        session_id, position, role, payload, tokens, model, created_at,
        prompt_tokens, cached_tokens, pp_tokens, pp_started_at, pp_finished_at,
        tg_tokens, tg_started_at, tg_finished_at)
    SELECT t.session,
           b.base + row_number() OVER (PARTITION BY t.session ORDER BY t.i, m.o) - 1,
           left(m.r->>'role', 16), m.r->'payload', (m.r->>'tokens')::integer, m.r->>'model',
           now(), (m.r->>'prompt_tokens')::integer, (m.r->>'cached_tokens')::integer,
           (m.r->>'pp_tokens')::integer, to_timestamp((m.r->>'pp_started_at')::float8),
           to_timestamp((m.r->>'pp_finished_at')::float8), (m.r->>'tg_tokens')::integer,
           to_timestamp((m.r->>'tg_started_at')::float8),
           to_timestamp((m.r->>'tg_finished_at')::float8)
    FROM (SELECT (e.value->>'session')::bigint AS session, e.value->'messages' AS messages,
                 e.ordinality AS i
          FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e) t
    CROSS JOIN LATERAL jsonb_array_elements(t.messages) WITH ORDINALITY AS m(r, o)
    CROSS JOIN LATERAL (
        SELECT coalesce(max(x.position) + 1, 0) AS base
        FROM chat_sessions_message x WHERE x.session_id = t.session) b
    WHERE t.session = ANY(live);
    RETURN cardinality(live);
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0004_plans_for_growing_tables")]

    operations = [
        migrations.RemoveIndex(model_name="chatsession", name="chat_sessio_tenant__5bbabd_idx"),
        # Room on each page for the new versions of rows marked active (HOT updates).
        migrations.RunSQL(
            "ALTER TABLE chat_sessions_chatsession SET (fillfactor = 70)",
            "ALTER TABLE chat_sessions_chatsession RESET (fillfactor)",
        ),
        migrations.RunSQL(OPEN_BATCH, previous.OPEN_BATCH),
        migrations.RunSQL(RECORD_BATCH, previous.RECORD_BATCH),
    ]
