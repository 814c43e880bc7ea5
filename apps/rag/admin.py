from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from apps.core.admin import ReadOnlyAdminMixin
from apps.rag.models import AutoRag, Corpus, Document, SessionRag, StoredFile
from apps.rag.services import document_enqueue


class DocumentInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Document
    fields = ["name", "status", "progress_percent", "chunk_count", "error", "created_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True

    @admin.display(description="progress")
    def progress_percent(self, obj: Document) -> str:
        return f"{obj.progress} %"


@admin.register(Corpus)
class CorpusAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "tenant",
        "public_id",
        "embedding_model",
        "embedding_dims",
        "document_count",
        "rerank_model",
        "created_at",
    ]
    list_filter = ["tenant", "embedding_model"]
    search_fields = ["name", "public_id", "tenant__slug"]
    readonly_fields = ["public_id", "embedding_dims", "created_at"]
    inlines = [DocumentInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Corpus]:
        return (
            super()
            .get_queryset(request)
            .select_related("tenant")
            .annotate(num_documents=Count("documents"))
        )

    @admin.display(description="documents", ordering="num_documents")
    def document_count(self, obj: Corpus) -> int:
        return obj.num_documents


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "corpus",
        "tenant",
        "status",
        "progress_percent",
        "chunk_count",
        "size",
        "error_excerpt",
        "updated_at",
    ]
    list_filter = ["status", "content_type", "corpus__tenant"]
    search_fields = ["name", "sha256", "corpus__name", "file__public_id"]
    readonly_fields = [f.name for f in Document._meta.fields]
    actions = ["ingest_again"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Document]:
        return super().get_queryset(request).select_related("corpus__tenant")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # documents are uploaded by tenants (page, API)

    @admin.display(description="tenant", ordering="corpus__tenant__slug")
    def tenant(self, obj: Document) -> str:
        return obj.corpus.tenant.slug

    @admin.display(description="progress")
    def progress_percent(self, obj: Document) -> str:
        return f"{obj.progress} %"

    @admin.display(description="error")
    def error_excerpt(self, obj: Document) -> str:
        return obj.error[:120]

    @admin.action(description="Ingest the selected documents again")
    def ingest_again(self, request: HttpRequest, queryset: QuerySet[Document]) -> None:
        count = 0
        for document in queryset.exclude(
            status__in=[Document.Status.EXTRACTING, Document.Status.EMBEDDING]
        ):
            Document.objects.filter(pk=document.pk).update(status=Document.Status.QUEUED, error="")
            document_enqueue(document=document)
            count += 1
        self.message_user(request, f"{count} document(s) queued for ingestion.", messages.SUCCESS)


@admin.register(StoredFile)
class StoredFileAdmin(admin.ModelAdmin):
    list_display = [
        "filename",
        "tenant",
        "public_id",
        "content_type",
        "size",
        "purpose",
        "created_at",
    ]
    list_filter = ["content_type", "purpose", "tenant"]
    search_fields = ["filename", "public_id", "sha256"]
    exclude = ["data"]
    readonly_fields = [
        "public_id",
        "tenant",
        "filename",
        "purpose",
        "content_type",
        "size",
        "sha256",
        "created_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class AutoRagForm(forms.ModelForm):
    class Meta:
        model = AutoRag
        fields = ["tenant", "api_key", "enabled", "corpora", "top_k"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        tenant = data.get("tenant")
        if tenant is None:
            return data
        key = data.get("api_key")
        if key is not None and key.tenant_id != tenant.pk:
            self.add_error("api_key", "This key belongs to another tenant.")
        foreign = [c.name for c in data.get("corpora") or [] if c.tenant_id != tenant.pk]
        if foreign:
            self.add_error("corpora", f"Not corpora of this tenant: {', '.join(foreign)}.")
        return data


@admin.register(AutoRag)
class AutoRagAdmin(admin.ModelAdmin):
    """Retrieval added to every chat completion of a tenant, or of one of its keys."""

    form = AutoRagForm
    list_display = ["tenant", "api_key", "enabled", "top_k"]
    list_filter = ["enabled", "tenant"]
    filter_horizontal = ["corpora"]


@admin.register(SessionRag)
class SessionRagAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Per-session RAG, set by tenants through `PUT /api/sessions/{id}/rag` (shown here,
    removable by superusers)."""

    superusers_may_delete = True
    list_display = ["tenant", "session_id", "enabled", "top_k", "updated_at"]
    list_filter = ["enabled", "tenant"]
    search_fields = ["session_id", "tenant__slug"]
    fields = ["tenant", "session_id", "enabled", "corpora", "top_k", "updated_at"]
