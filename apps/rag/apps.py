from django.apps import AppConfig


class RagConfig(AppConfig):
    name = "apps.rag"
    verbose_name = "RAG (corpora and documents)"

    def ready(self) -> None:
        from apps.rag.selectors import auto_rag_for_key, session_rag_in_use
        from apps.tenants.auth import attach_to_principal

        # The auto-RAG defaults of a key (its own, else its tenant's) are cached with the
        # key, like quotas: a change takes effect within AUTH_CACHE_SECONDS.
        attach_to_principal("rag", auto_rag_for_key)
        attach_to_principal("rag_sessions", session_rag_in_use)
