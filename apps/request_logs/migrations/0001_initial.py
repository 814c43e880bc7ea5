# The RequestLog model moved here from apps.proxy; its table (proxy_requestlog) stays.

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = [
        ("proxy", "0003_engine_cache_index"),
        ("tenants", "0005_tenant_restrict_models"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="RequestLog",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("created_at", models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                        ("endpoint", models.CharField(max_length=64)),
                        ("model", models.CharField(blank=True, max_length=200)),
                        ("engine", models.CharField(blank=True, max_length=64)),
                        ("stream", models.BooleanField(default=False)),
                        ("status_code", models.PositiveSmallIntegerField()),
                        ("error_code", models.CharField(blank=True, max_length=64)),
                        ("prompt_tokens", models.PositiveIntegerField(default=0)),
                        ("completion_tokens", models.PositiveIntegerField(default=0)),
                        ("cached_tokens", models.PositiveIntegerField(default=0, help_text="Prompt tokens the engine took from its cache (llama.cpp cache_n).")),
                        ("usage_estimated", models.BooleanField(default=False, help_text="The engine sent no usage (e.g. the client disconnected).")),
                        ("client_disconnected", models.BooleanField(default=False)),
                        ("ttft_ms", models.FloatField(blank=True, help_text="Time to first token (ms).", null=True)),
                        ("latency_ms", models.FloatField(help_text="Total time in the gateway (ms).")),
                        ("api_key", models.ForeignKey(null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="request_logs", to="tenants.apikey")),
                        ("tenant", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="request_logs", to="tenants.tenant")),
                    ],
                    options={
                        "db_table": "proxy_requestlog",
                        "ordering": ["-created_at"],
                        "indexes": [
                            models.Index(fields=["tenant", "-created_at"], name="proxy_reque_tenant__c2611f_idx"),
                            models.Index(fields=["engine", "created_at"], include=("endpoint", "usage_estimated", "prompt_tokens", "cached_tokens"), name="requestlog_engine_cache"),
                        ],
                    },
                ),
            ],
            database_operations=[],
        ),
    ]
