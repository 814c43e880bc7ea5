"""Writes of the rag app: corpora, files, documents (keyword-only, tenant-scoped)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

import httpx
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, F, Func, Q
from django.utils import timezone

from apps.engines.models import ServedModel
from apps.engines.registry import load_snapshot
from apps.rag import extraction
from apps.rag.models import Chunk, Corpus, Document, SessionRag, StoredFile
from apps.tenants.models import Tenant

PROBE_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
CORPUS_FIELDS = (
    "name",
    "description",
    "embedding_model",
    "chunk_tokens",
    "chunk_overlap",
    "top_k",
    "rerank_model",
    "hybrid_weight",
    "score_threshold",
    "metadata",
)
EXPIRY_MAX_DAYS = 365
# last_active_at is written at most this often per store: searches on a busy store cost
# no write each (see corpora_touch).
ACTIVITY_RESOLUTION = timedelta(minutes=1)
UNSET = object()  # corpus_update: expires_after_days not given (None removes the policy)


class RagError(Exception):
    """A refused write: the message is for the user; `param` names the offending field."""

    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def expired_error(corpus: Corpus, *, param: str | None = None) -> RagError:
    return RagError(
        f"Vector store {corpus.public_id} has expired; create a new vector store.",
        param=param,
        code="vector_store_expired",
    )


def tenant_models(*, tenant: Tenant) -> list[str]:
    """The names of the models this tenant may use, by name."""
    models = ServedModel.objects.order_by("name")
    if tenant.restrict_models:
        models = models.filter(pk__in=tenant.allowed_models.values("pk"))
    return list(models.values_list("name", flat=True))


def embedding_model_default(*, tenant: Tenant) -> str:
    """RAG_EMBEDDING_MODEL, else the first model of the tenant's whose engine answers
    /v1/embeddings (external engines are asked; a managed one is not started to ask)."""
    allowed = tenant_models(tenant=tenant)
    if settings.RAG_EMBEDDING_MODEL:
        if settings.RAG_EMBEDDING_MODEL not in allowed:
            raise RagError(
                f"The embedding model `{settings.RAG_EMBEDDING_MODEL}` (RAG_EMBEDDING_MODEL) is not available to this tenant.",
                param="embedding_model",
            )
        return settings.RAG_EMBEDDING_MODEL
    snapshot = load_snapshot()
    for name in allowed:
        route = snapshot.models.get(name)
        if route and any(_answers_embeddings(v.engine, name) for v in route.variants):
            return name
    raise RagError(
        "No embedding model is available: set RAG_EMBEDDING_MODEL or give this tenant a model whose engine answers /v1/embeddings.",
        param="embedding_model",
    )


def _answers_embeddings(engine, model: str) -> bool:
    if engine.managed:
        return False
    headers = (
        {"Authorization": f"Bearer {engine.upstream_api_key}"} if engine.upstream_api_key else {}
    )
    try:
        resp = httpx.post(
            f"{engine.base_url}/v1/embeddings",
            json={"model": model, "input": "probe"},
            headers=headers,
            timeout=PROBE_TIMEOUT,
        )
        return resp.status_code == 200 and bool(resp.json().get("data"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def _check_corpus(*, tenant: Tenant, corpus: Corpus) -> None:
    allowed = tenant_models(tenant=tenant)
    if corpus.embedding_model not in allowed:
        raise RagError(
            f"The model `{corpus.embedding_model}` does not exist or you do not have access to it.",
            param="embedding_model",
            status=404,
        )
    if corpus.rerank_model and corpus.rerank_model not in allowed:
        raise RagError(
            f"The model `{corpus.rerank_model}` does not exist or you do not have access to it.",
            param="rerank_model",
            status=404,
        )
    if not corpus.name.strip():
        raise RagError("`name` must be a non-empty string.", param="name")
    if not 16 <= corpus.chunk_tokens <= 8192:
        raise RagError("`chunk_tokens` must be between 16 and 8192.", param="chunk_tokens")
    if corpus.chunk_overlap >= corpus.chunk_tokens:
        raise RagError(
            "`chunk_overlap` must be smaller than `chunk_tokens`.", param="chunk_overlap"
        )
    if not 1 <= corpus.top_k <= 100:
        raise RagError("`top_k` must be between 1 and 100.", param="top_k")
    if not 0.0 <= corpus.hybrid_weight <= 1.0:
        raise RagError("`hybrid_weight` must be between 0 and 1.", param="hybrid_weight")
    days = corpus.expires_after_days
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= EXPIRY_MAX_DAYS
    ):
        raise RagError(
            f"`expires_after.days` must be an integer between 1 and {EXPIRY_MAX_DAYS}.",
            param="expires_after.days",
        )


def corpus_create(
    *, tenant: Tenant, name: str, expires_after_days: int | None = None, **fields
) -> Corpus:
    unknown = set(fields) - set(CORPUS_FIELDS)
    if unknown:
        raise RagError(f"Unknown field `{sorted(unknown)[0]}`.", param=sorted(unknown)[0])
    corpus = Corpus(tenant=tenant, name=name, **{k: v for k, v in fields.items() if v is not None})
    corpus.expires_after_days = expires_after_days
    if not corpus.embedding_model:
        corpus.embedding_model = embedding_model_default(tenant=tenant)
    _check_corpus(tenant=tenant, corpus=corpus)
    corpus.save()
    return corpus


def corpus_update(*, corpus: Corpus, expires_after_days: object = UNSET, **fields) -> Corpus:
    """Change the given fields (None: keep), and the expiry policy when given (None: never
    expire); all checked before anything is written."""
    for key in fields:
        if key not in CORPUS_FIELDS:
            raise RagError(f"Unknown field `{key}`.", param=key)
    with transaction.atomic():
        # Locked: the periodic expiry (corpora_expire) sees the policy before or after.
        corpus = Corpus.objects.select_for_update().select_related("tenant").get(pk=corpus.pk)
        if (
            "embedding_model" in fields
            and fields["embedding_model"] != corpus.embedding_model
            and corpus.documents.exists()
        ):
            raise RagError(
                "The embedding model of a corpus with documents cannot change.",
                param="embedding_model",
            )
        for key, value in fields.items():
            if value is not None:
                setattr(corpus, key, value)
        if expires_after_days is not UNSET:
            if corpus.is_expired():  # its chunks are (or are about to be) gone: no revival
                raise expired_error(corpus, param="expires_after")
            corpus.expires_after_days = expires_after_days
        _check_corpus(tenant=corpus.tenant, corpus=corpus)
        corpus.save()
    return corpus


class _Days(Func):
    template = "make_interval(days => %(expressions)s)"
    output_field = DurationField()


def _expires_at_db() -> ExpressionWrapper:
    """Corpus.expires_at in SQL (NULL without a policy)."""
    return ExpressionWrapper(
        F("last_active_at") + _Days(F("expires_after_days")), output_field=DateTimeField()
    )


def is_idle(last_active_at: datetime | None, now: datetime) -> bool:
    """Whether a use now should be recorded (see ACTIVITY_RESOLUTION)."""
    return last_active_at is None or last_active_at < now - ACTIVITY_RESOLUTION


class Used(Protocol):
    """A corpus as loaded (a Corpus or a retrieval CorpusRef)."""

    pk: int
    last_active_at: datetime | None


def corpora_touch(*, corpora: Sequence[Used]) -> int:
    """Record a use of these corpora (a search, files added), which pushes their expiry
    back: one UPDATE, and none at all when each was used within ACTIVITY_RESOLUTION (as
    loaded: most uses of a busy store cost no query)."""
    now = timezone.now()
    idle = [c.pk for c in corpora if is_idle(c.last_active_at, now)]
    if not idle:
        return 0
    return (
        Corpus.objects.filter(
            pk__in=idle, expired_at__isnull=True, last_active_at__lt=now - ACTIVITY_RESOLUTION
        )
        .alias(expires_at_db=_expires_at_db())
        # Never an expired one: a use that raced its expiry does not revive it.
        .filter(Q(expires_after_days__isnull=True) | Q(expires_at_db__gt=now))
        .update(last_active_at=now)
    )


def corpora_expire(*, now: datetime | None = None) -> int:
    """Mark the stores past their expires_at expired and free their chunks (embeddings
    and text; the store and its file list stay, as OpenAI keeps an expired store)."""
    now = now or timezone.now()
    expired = 0
    with transaction.atomic():
        due = list(
            Corpus.objects.select_for_update(skip_locked=True)
            .filter(expired_at__isnull=True, expires_after_days__isnull=False)
            .alias(expires_at_db=_expires_at_db())
            .filter(expires_at_db__lte=now)
            .values_list("pk", flat=True)
        )
        if due:
            expired = Corpus.objects.filter(pk__in=due).update(expired_at=now)
            Chunk.objects.filter(corpus_id__in=due).delete()
    return expired


def corpus_delete(*, corpus: Corpus) -> None:
    """The corpus, its documents and chunks (files stay: they may be in other corpora)."""
    with transaction.atomic():
        corpus.delete()


def file_create(
    *, tenant: Tenant, filename: str, data: bytes, purpose: str = "assistants"
) -> StoredFile:
    """Store an upload after checking its size and type (refused before anything is written)."""
    if len(data) > settings.RAG_MAX_FILE_BYTES:
        raise RagError(
            f"The file is too large ({len(data)} bytes; the limit is {settings.RAG_MAX_FILE_BYTES}).",
            param="file",
            status=413,
        )
    try:
        content_type = extraction.detect_type(data, filename)
    except extraction.ExtractionError as exc:
        raise RagError(str(exc), param="file") from None
    return StoredFile.objects.create(
        tenant=tenant,
        filename=filename[:255] or "upload",
        purpose=purpose,
        content_type=content_type,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
    )


def file_delete(*, stored: StoredFile) -> None:
    """The file and every document made from it (their chunks too)."""
    with transaction.atomic():
        Document.objects.filter(file=stored).delete()
        stored.delete()


def document_add(*, corpus: Corpus, stored: StoredFile) -> tuple[Document, bool]:
    """(the corpus's document of this content, created?) — the same bytes twice are one
    document. A new one is queued for ingestion in the same transaction."""
    if stored.tenant_id != corpus.tenant_id:
        raise RagError(f"No such File object: {stored.public_id}", param="file_id", status=404)
    if corpus.is_expired():
        raise expired_error(corpus)
    existing = corpus.documents.filter(sha256=stored.sha256).first()
    if existing is not None:
        return existing, False
    if corpus.documents.count() >= settings.RAG_MAX_DOCUMENTS_PER_CORPUS:
        raise RagError(
            f"This corpus already has {settings.RAG_MAX_DOCUMENTS_PER_CORPUS} documents, the most it may have.",
            param="file",
        )
    try:
        with transaction.atomic():
            document = Document.objects.create(
                corpus=corpus,
                file=stored,
                name=stored.filename,
                content_type=stored.content_type,
                size=stored.size,
                sha256=stored.sha256,
            )
            document_enqueue(document=document)
    except IntegrityError:  # the same content added concurrently
        return corpus.documents.get(sha256=stored.sha256), False
    corpora_touch(corpora=[corpus])
    return document, True


def document_enqueue(*, document: Document) -> None:
    from apps.rag.tasks import ingest_document

    # The lock: jobs of one document never run at once (a re-run waits for the first).
    ingest_document.configure(lock=f"rag-document-{document.pk}").defer(document_id=document.pk)


def document_upload(*, corpus: Corpus, filename: str, data: bytes) -> tuple[Document, bool]:
    """Store a file and add it to the corpus, all or nothing."""
    with transaction.atomic():
        stored = file_create(tenant=corpus.tenant, filename=filename, data=data)
        document, created = document_add(corpus=corpus, stored=stored)
        if not created:
            transaction.set_rollback(True)  # the content is already there: keep no copy
    return document, created


def document_delete(*, document: Document, keep_file: bool = False) -> None:
    """The document and its chunks; its file too unless kept (an OpenAI file outlives its
    vector stores) or another corpus uses it."""
    with transaction.atomic():
        stored = document.file
        document.delete()
        if not keep_file and not stored.documents.exists():
            stored.delete()


def document_progress(*, document_id: int, **fields) -> bool:
    """Record ingestion progress; False if the document was deleted meanwhile."""
    return bool(Document.objects.filter(pk=document_id).update(updated_at=timezone.now(), **fields))


@transaction.atomic
def session_rag_set(
    *, tenant: Tenant, session_id: str, corpora: list[Corpus], top_k: int | None, enabled: bool
) -> SessionRag:
    """Set (or replace) the RAG of one session: these corpora, or off (`enabled=False`)."""
    if enabled and not corpora:
        raise RagError("`corpora` must name at least one corpus.", param="corpora")
    if any(corpus.tenant_id != tenant.pk for corpus in corpora):
        raise RagError("Unknown corpus.", param="corpora", status=404)
    setting, _ = SessionRag.objects.update_or_create(
        tenant=tenant, session_id=session_id, defaults={"enabled": enabled, "top_k": top_k}
    )
    setting.corpora.set(corpora if enabled else [])
    return setting


def session_rag_clear(*, tenant: Tenant, session_id: str) -> bool:
    """Remove a session's RAG setting (the key's or tenant's default applies again)."""
    deleted, _ = SessionRag.objects.filter(tenant=tenant, session_id=session_id).delete()
    return bool(deleted)
