from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest

from apps.core.admin import ReadOnlyAdminMixin
from apps.core.charts import Chart, Frame, Series, bar_chart
from apps.rag.models import AutoRag, Corpus, Document, SessionRag, StoredFile
from apps.rag.selectors import CorpusStats, corpus_stats
from apps.rag.services import EXPIRY_MAX_DAYS, document_enqueue


class DocumentInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Document
    fields = ["name", "status", "progress_percent", "chunk_count", "error", "created_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True

    @admin.display(description="progress")
    def progress_percent(self, obj: Document) -> str:
        return f"{obj.progress} %"


class CorpusAdminForm(forms.ModelForm):
    """The API's and the pages' bounds on expiry, here too (the column takes any
    positive number)."""

    class Meta:
        model = Corpus
        fields = ["expires_after_days"]  # the admin adds its own fields to these

    def clean_expires_after_days(self) -> int | None:
        days = self.cleaned_data.get("expires_after_days")
        if days is not None and not 1 <= days <= EXPIRY_MAX_DAYS:
            raise forms.ValidationError(
                f"A whole number of days from 1 to {EXPIRY_MAX_DAYS}, or empty: never expires."
            )
        return days


@admin.register(Corpus)
class CorpusAdmin(admin.ModelAdmin):
    form = CorpusAdminForm
    list_display = [
        "name",
        "tenant",
        "public_id",
        "embedding_model",
        "embedding_dims",
        "document_count",
        "chunks_stored",
        "rerank_model",
        "created_at",
    ]
    list_filter = ["tenant", "embedding_model"]
    search_fields = ["name", "public_id", "tenant__slug"]
    readonly_fields = ["public_id", "embedding_dims", "created_at"]
    inlines = [DocumentInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Corpus]:
        ready = Q(documents__status=Document.Status.READY)
        return (
            super()
            .get_queryset(request)
            .select_related("tenant")
            .annotate(
                num_documents=Count("documents"),
                num_chunks=Sum("documents__chunk_count", filter=ready),
            )
        )

    @admin.display(description="documents", ordering="num_documents")
    def document_count(self, obj: Corpus) -> int:
        return obj.num_documents

    @admin.display(description="chunks", ordering="num_chunks")
    def chunks_stored(self, obj: Corpus) -> int:
        return 0 if obj.expired_at else obj.num_chunks or 0  # expiry freed them

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> Any:
        response = super().changelist_view(request, extra_context)
        changelist = getattr(response, "context_data", {}).get("cl")
        if changelist is not None:
            # The charts follow the filters and the search of the list below them.
            stats = corpus_stats(corpora=changelist.queryset)
            response.context_data["rag_stats"] = stats_context(stats, scope="these corpora")
        return response

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        context = dict(extra_context or {})
        corpus = self.get_object(request, object_id)
        if corpus is not None and self.has_view_permission(request, corpus):
            stats = corpus_stats(corpora=Corpus.objects.filter(pk=corpus.pk))
            context["rag_stats"] = stats_context(stats, scope="this corpus")
        return super().change_view(request, object_id, form_url, extra_context=context)


STATS_FRAME = Frame(width=440, height=200, left=48, right=8, top=10, bottom=24, label_gap=4)


def day_label(day: Any) -> str:
    return f"{day:%b} {day.day}"  # "Nov 3"


def stats_context(stats: CorpusStats, *, scope: str) -> dict[str, Any]:
    """The figures and charts of the corpus pages: documents by status now, and per day
    ingestion (documents, failures, chunks) and searches."""
    statuses = list(stats.statuses)
    failed = Document.Status.FAILED
    labels = [day_label(day) for day in stats.days]
    titles = [day.isoformat() for day in stats.days]
    period = f"last {len(stats.days)} days (UTC)"

    def per_day(name: str, title: str, unit: str, values: list[int]) -> Chart:
        return bar_chart(
            id=f"rag-chart-{name}", css="rag-chart", title=f"{title}, {period}",
            frame=STATS_FRAME, labels=labels, series=[Series(unit, "bar", values)],
            titles=[f"{t}: {v:,} {unit}" for t, v in zip(titles, values, strict=True)],
            empty_text=f"No {unit} in these days.",
        )  # fmt: skip

    charts = [
        bar_chart(
            id="rag-chart-statuses", css="rag-chart", title="Documents by status, now",
            frame=STATS_FRAME, labels=statuses, legend=False,
            series=[Series("documents", "bar", [0 if s == failed else stats.statuses[s]
                                                for s in statuses]),
                    Series("failed", "bar error", [stats.statuses[s] if s == failed else 0
                                                   for s in statuses])],
            titles=[f"{s}: {stats.statuses[s]:,} documents" for s in statuses],
            empty_text="No documents.",
        ),
        bar_chart(
            id="rag-chart-ingested", css="rag-chart", frame=STATS_FRAME, legend=True,
            title=f"Documents ingested and ingestions failed per day, {period}",
            labels=labels,
            series=[Series("ingested", "bar", stats.documents_ingested),
                    Series("failed", "bar error", stats.failures)],
            titles=[f"{t}: {i:,} ingested + {f:,} failed"
                    for t, i, f in zip(titles, stats.documents_ingested, stats.failures,
                                       strict=True)],
            empty_text="No documents ingested in these days.",
        ),
        per_day("chunks", "Chunks ingested per day", "chunks", stats.chunks_ingested),
        per_day("searches", "Searches per day", "searches", stats.searches),
    ]  # fmt: skip
    return {
        "scope": scope,
        "period": period,
        "documents": stats.documents,
        "statuses": stats.statuses,
        "chunks": stats.chunks,
        "ingested": sum(stats.documents_ingested),
        "failures": sum(stats.failures),
        "searches": sum(stats.searches),
        "charts": charts,
    }


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
