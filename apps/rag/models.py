"""Corpora of a tenant, their documents and the documents' embedded chunks.

Embedding dimensions differ per model, so `Chunk.embedding` is a pgvector `vector` column
without a fixed dimension plus a `dims` column; each dimension in use gets its own partial
HNSW expression index `((embedding::vector(N)) vector_cosine_ops) WHERE dims = N`, created
when the first corpus of that dimension is embedded (apps/rag/indexes.py). One table keeps
deletes, joins and full-text search in one place; a query for a corpus of N dimensions
casts to vector(N) and filters on dims = N, which is exactly that index's predicate.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.db import models
from django.utils import timezone
from pgvector.django import VectorField


def _public_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def corpus_public_id() -> str:
    return _public_id("vs_")


def file_public_id() -> str:
    return _public_id("file-")


class Corpus(models.Model):
    """A tenant's collection of documents (an OpenAI vector store)."""

    public_id = models.CharField(
        max_length=40, unique=True, default=corpus_public_id, editable=False
    )
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="corpora")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    embedding_model = models.CharField(
        max_length=200, help_text="A model served by an engine that answers /v1/embeddings."
    )
    embedding_dims = models.PositiveIntegerField(
        null=True,
        blank=True,
        editable=False,
        help_text="Known once the first document is embedded.",
    )
    chunk_tokens = models.PositiveIntegerField(default=400)
    chunk_overlap = models.PositiveIntegerField(default=50)
    top_k = models.PositiveIntegerField(default=5)
    rerank_model = models.CharField(max_length=200, blank=True, help_text="Empty: no reranking.")
    hybrid_weight = models.FloatField(
        default=0.5,
        help_text="Share of the vector ranking in the fused score (0 = full text only, 1 = vectors only).",
    )
    score_threshold = models.FloatField(
        default=0.0, help_text="Results scoring below this are dropped (0: none are)."
    )
    metadata = models.JSONField(default=dict, blank=True)
    # OpenAI's `expires_after` (its only anchor is last_active_at, so the days are enough).
    expires_after_days = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text="Expires this many days after its last activity (search, files added); empty: never.",
    )
    last_active_at = models.DateTimeField(default=timezone.now, editable=False)
    expired_at = models.DateTimeField(
        null=True,
        blank=True,
        editable=False,
        help_text="When the periodic task found it expired and freed its chunks.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name_plural = "corpora"
        ordering = ["tenant__slug", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_id})"

    @property
    def expires_at(self) -> datetime | None:
        if self.expires_after_days is None:
            return None
        return self.last_active_at + timedelta(days=self.expires_after_days)

    def is_expired(self, now: datetime | None = None) -> bool:
        """Expired for good once past expires_at, whether or not the periodic task has
        freed its chunks yet (a use in between must not revive it)."""
        if self.expired_at is not None:
            return True
        expires_at = self.expires_at
        return expires_at is not None and expires_at <= (now or timezone.now())


class StoredFile(models.Model):
    """An uploaded file's bytes (OpenAI's /v1/files); documents are made from it."""

    public_id = models.CharField(max_length=40, unique=True, default=file_public_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="rag_files")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, default="assistants")
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    data = models.BinaryField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.filename} ({self.public_id})"


class Document(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        EXTRACTING = "extracting"
        EMBEDDING = "embedding"
        READY = "ready"
        FAILED = "failed"

    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="documents")
    file = models.ForeignKey(StoredFile, on_delete=models.RESTRICT, related_name="documents")
    name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True)
    chunk_count = models.PositiveIntegerField(default=0)
    chunks_embedded = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["corpus", "-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["corpus", "sha256"], name="unique_document_content_per_corpus"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def progress(self) -> int:
        """Percent done: extraction is the first 10 %, embedding the rest."""
        if self.status == self.Status.READY:
            return 100
        if self.status == self.Status.EMBEDDING and self.chunk_count:
            return 10 + int(90 * self.chunks_embedded / self.chunk_count)
        return 0


class Chunk(models.Model):
    """A piece of a ready document. All of a document's chunks are written in one
    transaction when it turns ready, so retrieval never sees half a document."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    # Denormalized from the document: retrieval filters on it without a join.
    corpus = models.ForeignKey(Corpus, on_delete=models.CASCADE, related_name="+", db_index=False)
    position = models.PositiveIntegerField()
    text = models.TextField()
    token_count = models.PositiveIntegerField()
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    page = models.PositiveIntegerField(null=True, blank=True)
    dims = models.PositiveIntegerField()
    embedding = VectorField()
    search_vector = models.GeneratedField(
        expression=SearchVector("text", config="english"),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        ordering = ["document", "position"]
        indexes = [
            models.Index(fields=["corpus", "dims"], name="rag_chunk_corpus_dims"),
            # fastupdate off: new entries go straight into the index, never into a pending
            # list that every search must scan until the next vacuum (2 MB of it doubled
            # the full-text search's time at 100k chunks, bench/README.md).
            GinIndex(fields=["search_vector"], name="rag_chunk_search_vector", fastupdate=False),
        ]
        constraints = [
            models.UniqueConstraint(fields=["document", "position"], name="unique_chunk_position"),
        ]

    def __str__(self) -> str:
        return f"{self.document_id}#{self.position}"


class AutoRag(models.Model):
    """Retrieval added to every chat completion of a tenant (api_key empty) or of one key
    (which wins over the tenant's). A request's own `"rag"` field wins over both."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="auto_rag")
    api_key = models.ForeignKey(
        "tenants.ApiKey", on_delete=models.CASCADE, null=True, blank=True, related_name="auto_rag"
    )
    enabled = models.BooleanField(default=True)
    corpora = models.ManyToManyField(Corpus, related_name="auto_rag")
    top_k = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: each corpus's own top_k."
    )

    class Meta:
        verbose_name = "automatic RAG"
        verbose_name_plural = "automatic RAG"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "api_key"], name="unique_auto_rag_scope", nulls_distinct=False
            ),
        ]

    def __str__(self) -> str:
        scope = f"key {self.api_key.name}" if self.api_key_id else "tenant"
        return f"{self.tenant.slug} ({scope})"


class SessionRag(models.Model):
    """RAG for one chat session of a tenant (the id the client sends as X-Session-Id), set
    through the tenant API (`PUT /api/sessions/{id}/rag`). It wins over the key's and the
    tenant's AutoRag; a request's own `"rag"` field wins over it. `enabled=False` turns
    RAG off for the session. Keyed by the session's id, not its row: the setting may be
    made before the session's first request, and the rag app does not reach into
    sessions'."""

    tenant = models.ForeignKey(
        "tenants.Tenant", on_delete=models.CASCADE, related_name="session_rag"
    )
    session_id = models.CharField(max_length=128)
    enabled = models.BooleanField(default=True)
    corpora = models.ManyToManyField(Corpus, related_name="session_rag", blank=True)
    top_k = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: each corpus's own top_k."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "session RAG"
        verbose_name_plural = "session RAG"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "session_id"], name="unique_session_rag"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug} / session {self.session_id}"


class CorpusDay(models.Model):
    """A corpus's activity on one UTC day, for the operators' charts (admin → Corpora):
    documents ingested (turned ready) and their chunks, ingestions that failed, searches
    (the search endpoints, the page, chat RAG). Counted per document and per search, never
    per chunk; the chat path's searches are summed in memory and written in batches
    (apps/rag/usage.py)."""

    # No database constraint: its check would take a share lock on the corpus row, and a
    # count would wait for whatever holds that row (ingestion storing a document's chunks,
    # an update). The upsert skips deleted corpora; deleting one deletes its days (ORM).
    corpus = models.ForeignKey(
        Corpus, on_delete=models.CASCADE, related_name="days", db_constraint=False
    )
    day = models.DateField()
    documents_ingested = models.PositiveIntegerField(default=0)
    chunks_ingested = models.PositiveBigIntegerField(default=0)
    failures = models.PositiveIntegerField(default=0)
    searches = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = "corpus day"
        constraints = [
            models.UniqueConstraint(fields=["corpus", "day"], name="unique_corpus_day"),
        ]
        indexes = [models.Index(fields=["day"], name="rag_corpusday_day")]

    def __str__(self) -> str:
        return f"{self.corpus_id} {self.day}"
