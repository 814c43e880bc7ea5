# RequestLog now belongs to apps.request_logs (same table); the proxy app forgets it.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("proxy", "0003_engine_cache_index"),
        ("request_logs", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="RequestLog")],
            database_operations=[],
        ),
    ]
