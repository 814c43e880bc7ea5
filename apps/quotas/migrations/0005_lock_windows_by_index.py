"""The batch functions lock their windows through the (quota, start) index.

0003 and 0004 locked a batch's windows with one join against the batch's jsonb. The
planner guesses 100 rows for jsonb_array_elements, so it hash-joined them against a
sequential scan of every window there ever was (an hourly quota adds 8,760 a year), on
every batch; settling did the same through `id IN (SELECT unnest(...))`. Now each window
is locked by its own index lookup, in the same global (quota, start) order, and settling
locks `id = ANY(array)`. tests/test_db_function_scans.py counts the scans.

Only the locking statement of each function changes; the rest is 0003's and 0004's text.
"""

import importlib

from django.db import migrations

from config.sql_migrations import replaced

batch = importlib.import_module("apps.quotas.migrations.0003_batch_functions")
lease = importlib.import_module("apps.quotas.migrations.0004_lease_function")


# One index lookup per window, in the global lock order (q, s).
LOCK_EACH = """
    FOR win IN SELECT DISTINCT b.q, b.s FROM ({windows}) b ORDER BY b.q, b.s LOOP
        PERFORM 1 FROM quotas_quotawindow w
        WHERE w.quota_id = win.q AND w.window_start = win.s
        FOR UPDATE;
    END LOOP;"""

RESERVE_BATCH = replaced(
    replaced(
        batch.RESERVE_BATCH,
        """
    PERFORM 1 FROM quotas_quotawindow w
    JOIN gateway_quota_batch_windows(p_batch) b ON w.quota_id = b.q AND w.window_start = b.s
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;""",
        LOCK_EACH.format(windows="SELECT * FROM gateway_quota_batch_windows(p_batch)"),
    ),
    "    i bigint;\n",
    "    i bigint;\n    win record;\n",
)

SETTLE_BATCH = replaced(
    batch.SETTLE_BATCH,
    """WHERE w.id IN (SELECT unnest(r.window_ids) FROM quotas_reservation r
                   WHERE r.id = ANY (p_ids))""",
    """WHERE w.id = ANY (ARRAY(SELECT unnest(r.window_ids) FROM quotas_reservation r
                             WHERE r.id = ANY (p_ids)))""",
)

LEASE_BATCH = replaced(
    lease.LEASE_BATCH,
    """
    PERFORM 1 FROM quotas_quotawindow w
    JOIN (SELECT (e->>'quota')::bigint AS q, (e->>'start')::timestamptz AS s
          FROM jsonb_array_elements(p_batch) AS e) b ON w.quota_id = b.q AND w.window_start = b.s
    ORDER BY w.quota_id, w.window_start
    FOR UPDATE OF w;""",
    LOCK_EACH.format(
        windows="SELECT (e->>'quota')::bigint AS q, (e->>'start')::timestamptz AS s"
        " FROM jsonb_array_elements(p_batch) AS e"
    ),
)


class Migration(migrations.Migration):
    dependencies = [("quotas", "0004_lease_function")]

    operations = [
        migrations.RunSQL(RESERVE_BATCH, batch.RESERVE_BATCH),
        migrations.RunSQL(SETTLE_BATCH, batch.SETTLE_BATCH),
        migrations.RunSQL(LEASE_BATCH, lease.LEASE_BATCH),
    ]
