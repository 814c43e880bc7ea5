"""The session open sends only the history that could still fit the model's context.

A session's history grows without end, but a request sends at most what fits the model's
largest context. 0005's open returned every stored message, and the gateway parsed all of
them on every request to drop most again (a 200-turn session on an 8k model: ~400
messages loaded, ~170 sent; loading and parsing the rest was ~25% of the gateway's CPU on
that request). An item may now carry `cap`, the model's largest context in tokens: the
history starts at the oldest turn (a user message, where trimming may cut) from which the
stored token counts, summed to the newest message, stay within `cap`. A message stored
without a count counts 0 here, so the cut never drops what the exact trimming in
apps/sessions/prompts.py would keep; that trimming still decides what is sent. Without
`cap` (the tenant API, models with no context size) the whole history comes back, as
before.

The cut is found from the (session, position) unique index's rows, reading the token and
role columns only; the history itself is then read from the cut on. Generic plans, as in
0005.
"""

import importlib

from django.db import migrations

previous = importlib.import_module("apps.sessions.migrations.0005_set_based_session_functions")

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
    CROSS JOIN LATERAL (
        -- The oldest turn start whose suffix of stored counts fits the cap (no cap: 0).
        SELECT CASE WHEN e.value->>'cap' IS NULL THEN 0
                    ELSE coalesce(min(w.position), 2147483647) END AS start
        FROM (
            SELECT m.position, m.role,
                   row_number() OVER (ORDER BY m.position) AS rn,
                   sum(coalesce(m.tokens, 0)) OVER (ORDER BY m.position DESC) AS suffix
            FROM chat_sessions_message m
            WHERE m.session_id = s.id AND e.value->>'cap' IS NOT NULL
        ) w
        WHERE (w.role = 'user' OR w.rn = 1) AND w.suffix <= (e.value->>'cap')::bigint) c
    LEFT JOIN LATERAL (
        SELECT jsonb_agg(jsonb_build_array(m.payload, m.tokens) ORDER BY m.position) AS history
        FROM chat_sessions_message m
        WHERE m.session_id = s.id AND m.position >= c.start) h ON true;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0005_set_based_session_functions")]

    operations = [migrations.RunSQL(OPEN_BATCH, previous.OPEN_BATCH)]
