"""The session open returns the kept history as JSON text, with what trimming needs.

Profiled under load, half of the event loop went into a session's history: psycopg
parsing the jsonb the open returned, a Python object per message, a walk over them to
estimate tokens, then orjson writing all of it again for the engine. The gateway never
needs to look into a stored message to send it, so the open now returns:

- `history`: the kept payloads' JSON (jsonb's text form), joined with commas in position
  order, without brackets: spliced as is into the engine's body (apps/core/context.py);
- per unit (a user message and what follows it up to the next one, or whatever comes
  before the first user message: the turns trimming drops whole, as in
  apps/sessions/prompts.py), `unit_offsets`, its first byte in `history` (UTF-8),
  `unit_tokens`, its token cost (the stored count, else the gateway's heuristic,
  gateway_message_tokens below: ~4 characters a token + 4 for the role markers), and
  `unit_messages`, its number of messages;
- `history_media`: some kept message has a content part that is not text (an image,
  audio): its bytes do not bound its tokens (apps/engines/sizing.py prompt_token_bound).

Locks, the cap (0006: stored counts only, NULL counting 0) and generic plans as in 0006.
The return type changes, so the function is dropped and created again.
"""

import importlib

from django.db import migrations

previous = importlib.import_module("apps.sessions.migrations.0006_history_capped_in_sql")

MESSAGE_TOKENS = """
CREATE FUNCTION gateway_message_tokens(p jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- apps/engines/tokens.py heuristic_message_tokens: the message's text (its content, or
    -- its text parts joined by spaces, then "name arguments" of each tool call, the
    -- non-empty pieces joined by spaces), a token per 4 characters rounded up, plus 4.
    SELECT (coalesce(sum(length(t)), 0) + greatest(count(*) - 1, 0) + 3) / 4 + 4
    FROM unnest(
        ARRAY[CASE jsonb_typeof(p->'content')
              WHEN 'string' THEN p->>'content'
              WHEN 'array' THEN (SELECT string_agg(coalesce(x->>'text', ''), ' ')
                                 FROM jsonb_array_elements(p->'content') x
                                 WHERE jsonb_typeof(x) = 'object')
              END]
        || ARRAY(SELECT coalesce(c->'function'->>'name', '') || ' '
                        || coalesce(c->'function'->>'arguments', '')
                 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p->'tool_calls') = 'array'
                                                THEN p->'tool_calls' ELSE '[]' END) c
                 WHERE jsonb_typeof(c) = 'object')) t
    WHERE t <> ''
$$;
"""

OPEN_BATCH = """
DROP FUNCTION IF EXISTS gateway_session_open_batch(jsonb);
CREATE FUNCTION gateway_session_open_batch(p_batch jsonb)
RETURNS TABLE (n bigint, session_id bigint, created boolean, session_prompt text,
               tenant_prompt text, history text, unit_offsets bigint[], unit_tokens bigint[],
               unit_messages bigint[], history_media boolean)
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
           coalesce(h.history, ''), coalesce(h.offsets, '{}'), coalesce(h.tokens, '{}'),
           coalesce(h.messages, '{}'), coalesce(h.media, false)
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
        SELECT string_agg(u.body, ',' ORDER BY u.unit) AS history,
               array_agg(u.start ORDER BY u.unit) AS offsets,
               array_agg(u.tokens ORDER BY u.unit) AS tokens,
               array_agg(u.messages ORDER BY u.unit) AS messages,
               bool_or(u.media) AS media
        FROM (
            -- A unit starts where the text before it (its units and their commas) ends, in
            -- UTF-8 bytes: the gateway slices the bytes it got, never decoding them.
            SELECT g.unit, g.body, g.tokens, g.messages, g.media,
                   coalesce(sum(octet_length(g.body) + 1) OVER (ORDER BY g.unit ROWS BETWEEN
                            UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS start
            FROM (
                SELECT k.unit, string_agg(k.payload::text, ',' ORDER BY k.position) AS body,
                       sum(k.tokens)::bigint AS tokens, count(*) AS messages,
                       bool_or(k.media) AS media
                FROM (
                    SELECT m.position, m.payload,
                           -- Unit number: the user messages so far (0 before the first).
                           count(*) FILTER (WHERE m.role = 'user')
                               OVER (ORDER BY m.position) AS unit,
                           -- Most messages have text content and no tool calls: the
                           -- heuristic's cheap case, spelled out.
                           coalesce(m.tokens,
                                    CASE WHEN jsonb_typeof(m.payload->'content') = 'string'
                                              AND m.payload->'tool_calls' IS NULL
                                         THEN (length(m.payload->>'content') + 3) / 4 + 4
                                         ELSE gateway_message_tokens(m.payload) END) AS tokens,
                           CASE WHEN jsonb_typeof(m.payload->'content') = 'array'
                                THEN EXISTS (SELECT 1
                                             FROM jsonb_array_elements(m.payload->'content') x
                                             WHERE x->>'type' IS DISTINCT FROM 'text')
                                ELSE false END AS media
                    FROM chat_sessions_message m
                    WHERE m.session_id = s.id AND m.position >= c.start
                ) k
                GROUP BY k.unit
            ) g
        ) u) h ON true;
END
$$;
"""

REVERSE = (
    "DROP FUNCTION IF EXISTS gateway_session_open_batch(jsonb);"
    + previous.OPEN_BATCH
    + "DROP FUNCTION IF EXISTS gateway_message_tokens(jsonb);"
)


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0006_history_capped_in_sql")]

    operations = [migrations.RunSQL(MESSAGE_TOKENS + OPEN_BATCH, REVERSE)]
