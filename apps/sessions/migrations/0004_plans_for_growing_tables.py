"""Session functions whose plans stay right while the tables grow past what they were
planned for, and an open that locks nothing.

PostgreSQL plans a function's statements once per connection, for the tables' size at the
time, until ANALYZE updates the statistics. A fresh database's tables grow faster than
autovacuum looks, and two of 0003's plans went bad on the way (bench: 0.5 ms per session
opened, reading ~3,000 rows each):
- the open found a session by (tenant, external_id), and a plan made for a few rows used
  the index on tenant_id alone, so it read every session of the tenant. That index goes:
  the unique (tenant, external_id) index and the (tenant, last_active_at) one both start
  with tenant_id, so it only cost a write per new session and per turn;
- the record locked its sessions with `id = ANY(...)`, which a plan made for a small
  table does by a sequential scan. It now takes no separate lock: it updates each
  session by primary key in the order of session ids (items of one session in arrival
  order), the same global order in every batch, so two batches cannot deadlock.

The open no longer locks a session another batch inserted first (0003 used a no-op
update for that): it waits for that insert to commit and reads the row. With no lock in the
open, it cannot wait for a record, whatever order either takes.
"""

import importlib

import django.db.models.deletion
from django.db import migrations, models

from config.sql_migrations import replaced

# Reversing restores 0003's functions.
previous = importlib.import_module("apps.sessions.migrations.0003_session_functions_scale")

OPEN_BATCH = replaced(
    previous.OPEN_BATCH,
    """        IF is_new THEN
            -- Another batch may insert it first: then this one waits for it and takes it
            -- (the no-op update is what makes RETURNING see the other row).
            INSERT INTO chat_sessions_chatsession AS c
                (tenant_id, external_id, system_prompt, created_at, last_active_at)
            VALUES (item.tenant, item.external_id, '', now(), now())
            ON CONFLICT (tenant_id, external_id) DO UPDATE SET last_active_at = c.last_active_at
            RETURNING c.id, c.system_prompt, (c.xmax = 0) INTO found_id, found_prompt, is_new;
        END IF;""",
    """        IF is_new THEN
            INSERT INTO chat_sessions_chatsession
                (tenant_id, external_id, system_prompt, created_at, last_active_at)
            VALUES (item.tenant, item.external_id, '', now(), now())
            ON CONFLICT (tenant_id, external_id) DO NOTHING
            RETURNING id, system_prompt INTO found_id, found_prompt;
            IF NOT FOUND THEN
                -- Another batch inserted it first; this one waited for that to commit.
                SELECT c.id, c.system_prompt INTO STRICT found_id, found_prompt
                FROM chat_sessions_chatsession c
                WHERE c.tenant_id = item.tenant AND c.external_id = item.external_id;
                is_new := false;
            END IF;
        END IF;""",
)

RECORD_BATCH = replaced(
    replaced(
        previous.RECORD_BATCH,
        """    PERFORM 1 FROM chat_sessions_chatsession c
    WHERE c.id = ANY(ARRAY(SELECT (e->>'session')::bigint FROM jsonb_array_elements(p_batch) AS e))
    ORDER BY c.tenant_id, c.external_id
    FOR UPDATE;
""",
        "",
    ),
    "        ORDER BY e.ordinality\n",
    "        ORDER BY 1, e.ordinality  -- the UPDATE below locks: in session id order\n",
)


class Migration(migrations.Migration):
    dependencies = [
        ("chat_sessions", "0003_session_functions_scale"),
        ("tenants", "0005_tenant_restrict_models"),
    ]

    operations = [
        migrations.AlterField(
            model_name="chatsession",
            name="tenant",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="chat_sessions",
                to="tenants.tenant",
            ),
        ),
        migrations.RunSQL(OPEN_BATCH, previous.OPEN_BATCH),
        migrations.RunSQL(RECORD_BATCH, previous.RECORD_BATCH),
    ]
