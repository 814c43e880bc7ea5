"""The session open returns only the messages the gateway does not hold yet.

0007's open read and serialized a session's whole kept history on every request (~300 us
of PostgreSQL CPU per request under load with long sessions, and a transfer that grows
with the history), although the gateway process that served the session's previous turn
already holds nearly all of it (apps/sessions/history_cache.py). An item may now carry
`known` = {"session": pk, "version": v, "upto": position}: what the gateway holds is this
session's history up to that position, as of `history_version` v. If the session is that
one and its version is still v, only the messages after `upto` are read and returned
(`delta`), their units numbered from the first of them; `continues` says the first of
them is not a user message, so it belongs to the gateway's last unit. Otherwise, or if
the new messages alone exceed the cap (then nothing older can fit either), the kept
history comes back whole, as in 0007. Every answer carries the session's version and its
last position (-1: no messages), and per unit its stored count (NULL as 0: the cap's
rule, which the gateway applies to what it holds) and whether it has media.

`history_version` changes whenever stored messages change other than by the hot path's
INSERTs: an UPDATE or DELETE of messages (admin, tenant API, session deletes, any purge)
bumps the version of every session it touched, in the same transaction; a TRUNCATE of
the messages bumps every session. Versions come from a sequence that no column owns, so
TRUNCATE ... RESTART IDENTITY (Django's flush) restarts the sessions' ids but never the
versions: a session whose id comes back never matches what a gateway held for the old
one. Existing sessions keep 0 (adding the column rewrites nothing).

Locks (none), the cap's rule and generic plans as in 0007.
"""

import importlib

from django.db import migrations

previous = importlib.import_module("apps.sessions.migrations.0007_history_as_text")

VERSION = """
CREATE SEQUENCE chat_sessions_history_version_seq;
ALTER TABLE chat_sessions_chatsession
    ADD COLUMN history_version bigint NOT NULL DEFAULT 0;
ALTER TABLE chat_sessions_chatsession
    ALTER COLUMN history_version SET DEFAULT nextval('chat_sessions_history_version_seq');

CREATE FUNCTION gateway_history_bump(p_sessions bigint[]) RETURNS void
LANGUAGE sql AS $$
    -- Session rows locked in id order, as the record function locks them: no deadlock.
    UPDATE chat_sessions_chatsession c
    SET history_version = nextval('chat_sessions_history_version_seq')
    FROM (SELECT x.id FROM chat_sessions_chatsession x WHERE x.id = ANY(p_sessions)
          ORDER BY x.id FOR UPDATE) l
    WHERE c.id = l.id
$$;

CREATE FUNCTION gateway_messages_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        PERFORM gateway_history_bump(ARRAY(SELECT o.session_id FROM changed o
                                           UNION SELECT n.session_id FROM changed_new n));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM gateway_history_bump(ARRAY(SELECT DISTINCT o.session_id FROM changed o));
    ELSE
        UPDATE chat_sessions_chatsession
        SET history_version = nextval('chat_sessions_history_version_seq');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER chat_sessions_message_updated AFTER UPDATE ON chat_sessions_message
    REFERENCING OLD TABLE AS changed NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_messages_changed();
CREATE TRIGGER chat_sessions_message_deleted AFTER DELETE ON chat_sessions_message
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_messages_changed();
CREATE TRIGGER chat_sessions_message_truncated AFTER TRUNCATE ON chat_sessions_message
    FOR EACH STATEMENT EXECUTE FUNCTION gateway_messages_changed();
"""

VERSION_REVERSE = """
DROP TRIGGER chat_sessions_message_truncated ON chat_sessions_message;
DROP TRIGGER chat_sessions_message_deleted ON chat_sessions_message;
DROP TRIGGER chat_sessions_message_updated ON chat_sessions_message;
DROP FUNCTION gateway_messages_changed();
DROP FUNCTION gateway_history_bump(bigint[]);
ALTER TABLE chat_sessions_chatsession DROP COLUMN history_version;
DROP SEQUENCE chat_sessions_history_version_seq;
"""

OPEN_BATCH = """
DROP FUNCTION IF EXISTS gateway_session_open_batch(jsonb);
CREATE FUNCTION gateway_session_open_batch(p_batch jsonb)
RETURNS TABLE (n bigint, session_id bigint, created boolean, session_prompt text,
               tenant_prompt text, history text, unit_offsets bigint[], unit_tokens bigint[],
               unit_messages bigint[], unit_counted bigint[], unit_media boolean[],
               delta boolean, continues boolean, history_version bigint,
               last_position bigint)
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
           coalesce(h.messages, '{}'), coalesce(h.counted, '{}'), coalesce(h.media, '{}'),
           k.after >= 0 AND c.start = k.after + 1,
           k.after >= 0 AND c.start = k.after + 1 AND coalesce(h.lead, false),
           s.history_version, coalesce(c.last, h.last, k.after)
    FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
    CROSS JOIN LATERAL (
        SELECT c.id, c.system_prompt, c.history_version FROM chat_sessions_chatsession c
        WHERE c.tenant_id = (e.value->>'tenant')::bigint AND c.external_id = e.value->>'external_id'
        OFFSET 0) s
    CROSS JOIN LATERAL (
        SELECT tt.system_prompt FROM tenants_tenant tt
        WHERE tt.id = (e.value->>'tenant')::bigint OFFSET 0) t
    CROSS JOIN LATERAL (
        -- The last position the gateway holds, if it holds this very session's history
        -- unchanged since (its version); else -1: it needs all of it.
        SELECT CASE WHEN (e.value->'known'->>'session')::bigint = s.id
                         AND (e.value->'known'->>'version')::bigint = s.history_version
                         AND (e.value->'known'->>'upto')::bigint >= 0
                    THEN (e.value->'known'->>'upto')::bigint ELSE -1 END AS after) k
    CROSS JOIN LATERAL (
        -- Where the answer starts. A delta: right after what the gateway holds, unless the
        -- new messages' stored counts alone exceed the cap, when nothing held fits either
        -- and the answer is the cap's cut of them. Else the oldest turn start whose
        -- suffix of stored counts fits the cap (0006), or 0 without a cap.
        SELECT CASE WHEN e.value->>'cap' IS NULL
                         OR (k.after >= 0 AND coalesce(max(w.suffix), 0)
                                              <= (e.value->>'cap')::bigint)
                    THEN k.after + 1
                    ELSE coalesce(min(w.position) FILTER (
                             WHERE (w.role = 'user' OR (w.rn = 1 AND k.after < 0))
                                   AND w.suffix <= (e.value->>'cap')::bigint),
                         2147483647) END AS start,
               -- The window reads every message after what the gateway holds (with a
               -- cap); without one, the history below does: the last position is theirs.
               max(w.position)::bigint AS last
        FROM (
            SELECT m.position, m.role,
                   row_number() OVER (ORDER BY m.position) AS rn,
                   sum(coalesce(m.tokens, 0)) OVER (ORDER BY m.position DESC) AS suffix
            FROM chat_sessions_message m
            WHERE m.session_id = s.id AND m.position > k.after AND e.value->>'cap' IS NOT NULL
        ) w) c
    LEFT JOIN LATERAL (
        SELECT string_agg(u.body, ',' ORDER BY u.unit) AS history,
               array_agg(u.start ORDER BY u.unit) AS offsets,
               array_agg(u.tokens ORDER BY u.unit) AS tokens,
               array_agg(u.messages ORDER BY u.unit) AS messages,
               array_agg(u.counted ORDER BY u.unit) AS counted,
               array_agg(u.media ORDER BY u.unit) AS media,
               bool_or(u.unit = 0) AS lead, max(u.last) AS last
        FROM (
            -- A unit starts where the text before it (its units and their commas) ends, in
            -- UTF-8 bytes: the gateway slices the bytes it got, never decoding them.
            SELECT g.unit, g.body, g.tokens, g.counted, g.messages, g.media, g.last,
                   coalesce(sum(octet_length(g.body) + 1) OVER (ORDER BY g.unit ROWS BETWEEN
                            UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS start
            FROM (
                SELECT k2.unit, string_agg(k2.payload::text, ',' ORDER BY k2.position) AS body,
                       sum(k2.tokens)::bigint AS tokens,
                       sum(coalesce(k2.stored, 0))::bigint AS counted,
                       count(*) AS messages, bool_or(k2.media) AS media,
                       max(k2.position)::bigint AS last
                FROM (
                    SELECT m.position, m.payload, m.tokens AS stored,
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
                ) k2
                GROUP BY k2.unit
            ) g
        ) u) h ON true;
END
$$;
"""

REVERSE = previous.OPEN_BATCH  # it drops this function first


class Migration(migrations.Migration):
    dependencies = [("chat_sessions", "0007_history_as_text")]

    operations = [
        migrations.RunSQL(VERSION, VERSION_REVERSE),
        migrations.RunSQL(OPEN_BATCH, REVERSE),
    ]
