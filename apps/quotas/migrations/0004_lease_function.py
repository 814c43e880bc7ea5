"""Renew per-process quota leases in one round trip (apps/quotas/leases.py).

A lease is an ordinary reservation of one window, held by a gateway process instead of one
request. Renewing it settles the old reservation (charging what the process's requests
used meanwhile) and reserves a new one: what the lease still covers (`keep`, always
granted: it was reserved already; requests in flight hold part of it) plus up to `want`
more, never more than the window has left. Windows are created and locked in the global (quota_id,
window_start) order first, like every other quota writer, so renewals cannot deadlock with
reservations, settlements or the sweep.
"""

from django.db import migrations

LEASE_BATCH = """
CREATE OR REPLACE FUNCTION gateway_quota_lease_batch(p_batch jsonb)
RETURNS TABLE (n bigint, granted bigint, limit_tokens bigint, used_tokens bigint,
               reserved_tokens bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    item record;
    win record;
    g bigint;
BEGIN
    -- Only windows of quotas that still exist: a deleted quota's lease just ends.
    INSERT INTO quotas_quotawindow AS w (quota_id, window_start, used_tokens, reserved_tokens)
    SELECT DISTINCT q.id, (e->>'start')::timestamptz, 0, 0
    FROM jsonb_array_elements(p_batch) AS e JOIN quotas_quota q ON q.id = (e->>'quota')::bigint
    ORDER BY 1, 2
    ON CONFLICT (quota_id, window_start) DO NOTHING;
    PERFORM 1 FROM quotas_quotawindow w
    JOIN (SELECT (e->>'quota')::bigint AS q, (e->>'start')::timestamptz AS s
          FROM jsonb_array_elements(p_batch) AS e) b ON w.quota_id = b.q AND w.window_start = b.s
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;
    FOR item IN
        SELECT e.ordinality AS i, (e.value->>'old')::uuid AS old, (e.value->>'new')::uuid AS new_id,
               (e.value->>'charge')::bigint AS charge, (e.value->>'keep')::bigint AS keep,
               (e.value->>'want')::bigint AS want, (e.value->>'quota')::bigint AS quota,
               (e.value->>'start')::timestamptz AS start, (e.value->>'tenant')::bigint AS tenant
        FROM jsonb_array_elements(p_batch) WITH ORDINALITY AS e
        ORDER BY e.ordinality
    LOOP
        IF item.old IS NOT NULL THEN
            PERFORM gateway_quota_settle(item.old, item.charge);
        ELSIF item.charge > 0 THEN
            UPDATE quotas_quotawindow w SET used_tokens = w.used_tokens + item.charge
            WHERE w.quota_id = item.quota AND w.window_start = item.start;
        END IF;
        SELECT w.id, w.used_tokens, w.reserved_tokens, q.limit_tokens INTO win
        FROM quotas_quotawindow w JOIN quotas_quota q ON q.id = w.quota_id
        WHERE w.quota_id = item.quota AND w.window_start = item.start;
        IF NOT FOUND THEN
            RETURN QUERY SELECT item.i, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint;
            CONTINUE;
        END IF;
        g := greatest(item.keep, least(item.keep + item.want,
                                       win.limit_tokens - win.used_tokens - win.reserved_tokens));
        IF g > 0 THEN
            UPDATE quotas_quotawindow SET reserved_tokens = reserved_tokens + g WHERE id = win.id;
            INSERT INTO quotas_reservation (id, tenant_id, api_key_id, tokens, window_ids, created_at)
            VALUES (item.new_id, item.tenant, NULL, g, ARRAY[win.id], now());
        END IF;
        RETURN QUERY SELECT item.i, g, win.limit_tokens, win.used_tokens, win.reserved_tokens + g;
    END LOOP;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("quotas", "0003_batch_functions")]

    operations = [
        migrations.RunSQL(LEASE_BATCH, "DROP FUNCTION IF EXISTS gateway_quota_lease_batch(jsonb)"),
    ]
