"""Reserve and settle as server-side functions: one round trip each.

Every request reserves and settles on the same few window rows. Done as several statements
from Python, the row locks stayed held across client round trips, each of which also waits
for the GIL in a busy gateway process (measured: ~100 req/s). Inside one function the locks
are held only while PostgreSQL itself works.
"""

from django.db import migrations

RESERVE = """
CREATE OR REPLACE FUNCTION gateway_quota_reserve(
    p_reservation uuid, p_tenant bigint, p_key bigint, p_tokens bigint,
    p_quota_ids bigint[], p_starts timestamptz[]
) RETURNS TABLE (window_id bigint, quota_id bigint, used_tokens bigint,
                 reserved_tokens bigint, granted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    all_fit boolean;
BEGIN
    -- Make sure the current windows exist (quota id order: the global lock order).
    INSERT INTO quotas_quotawindow AS w (quota_id, window_start, used_tokens, reserved_tokens)
    SELECT t.q, t.s, 0, 0
    FROM unnest(p_quota_ids, p_starts) WITH ORDINALITY AS t(q, s, n)
    ORDER BY t.n
    ON CONFLICT (quota_id, window_start) DO NOTHING;
    -- Lock them all in the global order, then decide for all of them at once.
    PERFORM 1 FROM quotas_quotawindow w
    JOIN unnest(p_quota_ids, p_starts) AS t(q, s) ON w.quota_id = t.q AND w.window_start = t.s
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;
    SELECT coalesce(bool_and(w.used_tokens + w.reserved_tokens + p_tokens <= q.limit_tokens), true)
    INTO all_fit
    FROM quotas_quotawindow w
    JOIN unnest(p_quota_ids, p_starts) AS t(q, s) ON w.quota_id = t.q AND w.window_start = t.s
    JOIN quotas_quota q ON q.id = w.quota_id;
    IF all_fit THEN
        UPDATE quotas_quotawindow w SET reserved_tokens = w.reserved_tokens + p_tokens
        FROM unnest(p_quota_ids, p_starts) AS t(q, s)
        WHERE w.quota_id = t.q AND w.window_start = t.s;
        INSERT INTO quotas_reservation (id, tenant_id, api_key_id, tokens, window_ids, created_at)
        SELECT p_reservation, p_tenant, p_key, p_tokens, array_agg(w.id ORDER BY w.quota_id), now()
        FROM quotas_quotawindow w
        JOIN unnest(p_quota_ids, p_starts) AS t(q, s) ON w.quota_id = t.q AND w.window_start = t.s;
    END IF;
    RETURN QUERY
    SELECT w.id, w.quota_id, w.used_tokens, w.reserved_tokens, all_fit
    FROM quotas_quotawindow w
    JOIN unnest(p_quota_ids, p_starts) AS t(q, s) ON w.quota_id = t.q AND w.window_start = t.s
    ORDER BY w.quota_id;
END
$$;
"""

SETTLE = """
CREATE OR REPLACE FUNCTION gateway_quota_settle(p_reservation uuid, p_actual bigint)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    -- DELETE ... RETURNING: a reservation is applied at most once.
    DELETE FROM quotas_reservation WHERE id = p_reservation
    RETURNING tokens, window_ids, released_at INTO r;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM quotas_quotawindow w WHERE w.id = ANY (r.window_ids)
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE;
    -- A reservation the sweep already released holds nothing any more: charge only.
    RETURN QUERY
    UPDATE quotas_quotawindow w
    SET reserved_tokens = w.reserved_tokens
            - CASE WHEN r.released_at IS NULL THEN r.tokens ELSE 0 END,
        used_tokens = w.used_tokens + p_actual
    WHERE w.id = ANY (r.window_ids)
    RETURNING w.id;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("quotas", "0001_initial")]

    operations = [
        migrations.RunSQL(RESERVE, "DROP FUNCTION IF EXISTS gateway_quota_reserve"),
        migrations.RunSQL(SETTLE, "DROP FUNCTION IF EXISTS gateway_quota_settle"),
    ]
