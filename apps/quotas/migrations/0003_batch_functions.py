"""Reserve and settle many requests in one round trip (apps/quotas/batching.py).

Each batch is one transaction that first creates and locks every window it touches in the
global (quota_id, window_start) order, then runs the single-request function for each
item in arrival order. Locking everything up front keeps the one lock order across
batches, single calls and the sweep: no two of them can deadlock.
"""

from django.db import migrations

BATCH_WINDOWS = """
CREATE OR REPLACE FUNCTION gateway_quota_batch_windows(p_batch jsonb)
RETURNS TABLE (q bigint, s timestamptz)
LANGUAGE sql IMMUTABLE AS $$
    SELECT DISTINCT qs.value::bigint, st.value::timestamptz
    FROM jsonb_array_elements(p_batch) AS e(item),
         jsonb_array_elements_text(e.item->'quotas') WITH ORDINALITY AS qs(value, o)
         JOIN jsonb_array_elements_text(e.item->'starts') WITH ORDINALITY AS st(value, o)
           USING (o)
$$;
"""

RESERVE_BATCH = """
CREATE OR REPLACE FUNCTION gateway_quota_reserve_batch(p_batch jsonb)
RETURNS TABLE (n bigint, window_id bigint, quota_id bigint, used_tokens bigint,
               reserved_tokens bigint, granted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item jsonb;
    i bigint;
BEGIN
    INSERT INTO quotas_quotawindow AS w (quota_id, window_start, used_tokens, reserved_tokens)
    SELECT b.q, b.s, 0, 0 FROM gateway_quota_batch_windows(p_batch) b ORDER BY b.q, b.s
    ON CONFLICT (quota_id, window_start) DO NOTHING;
    PERFORM 1 FROM quotas_quotawindow w
    JOIN gateway_quota_batch_windows(p_batch) b ON w.quota_id = b.q AND w.window_start = b.s
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;
    FOR item, i IN
        SELECT e.value, e.ordinality FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
        ORDER BY e.ordinality
    LOOP
        RETURN QUERY
        SELECT i, r.window_id, r.quota_id, r.used_tokens, r.reserved_tokens, r.granted
        FROM gateway_quota_reserve(
            (item->>'id')::uuid, (item->>'tenant')::bigint, (item->>'key')::bigint,
            (item->>'tokens')::bigint,
            ARRAY(SELECT a.value::bigint
                  FROM jsonb_array_elements_text(item->'quotas') WITH ORDINALITY AS a(value, o)
                  ORDER BY a.o),
            ARRAY(SELECT b.value::timestamptz
                  FROM jsonb_array_elements_text(item->'starts') WITH ORDINALITY AS b(value, o)
                  ORDER BY b.o)
        ) AS r;
    END LOOP;
END
$$;
"""

SETTLE_BATCH = """
CREATE OR REPLACE FUNCTION gateway_quota_settle_batch(p_ids uuid[], p_actual bigint[])
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    k int;
BEGIN
    PERFORM 1 FROM quotas_quotawindow w
    WHERE w.id IN (SELECT unnest(r.window_ids) FROM quotas_reservation r
                   WHERE r.id = ANY (p_ids))
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;
    FOR k IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        PERFORM gateway_quota_settle(p_ids[k], p_actual[k]);
    END LOOP;
    RETURN coalesce(array_length(p_ids, 1), 0);
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("quotas", "0002_reserve_settle_functions")]

    operations = [
        migrations.RunSQL(
            BATCH_WINDOWS, "DROP FUNCTION IF EXISTS gateway_quota_batch_windows(jsonb)"
        ),
        migrations.RunSQL(
            RESERVE_BATCH, "DROP FUNCTION IF EXISTS gateway_quota_reserve_batch(jsonb)"
        ),
        migrations.RunSQL(
            SETTLE_BATCH, "DROP FUNCTION IF EXISTS gateway_quota_settle_batch(uuid[], bigint[])"
        ),
    ]
