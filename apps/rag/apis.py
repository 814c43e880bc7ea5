"""Tenant API for corpora (`/api/corpora`, API-key auth, OpenAI-shaped errors). Thin
views: services write, selectors read, presenters shape."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.errors import ApiError, invalid_request
from apps.core.session_ids import InvalidSessionId, session_id_validate
from apps.core.usage import Payer, UsageRefused
from apps.rag import presenters, selectors, services
from apps.rag.engine import EngineError
from apps.rag.models import Corpus
from apps.rag.retrieval import search_now
from apps.tenants.api_auth import TenantApiView

INT_FIELDS = ("chunk_tokens", "chunk_overlap", "top_k")
FLOAT_FIELDS = ("hybrid_weight", "score_threshold")
STR_FIELDS = ("name", "description", "embedding_model", "rerank_model")


def corpus_fields(
    data: Any, *, allowed: tuple[str, ...] = services.CORPUS_FIELDS
) -> dict[str, Any]:
    """The corpus fields of a JSON body, type-checked (400 naming the field otherwise)."""
    if not isinstance(data, dict):
        raise invalid_request("The body must be a JSON object.")
    fields = {}
    for key, value in data.items():
        if key not in allowed:
            raise invalid_request(f"Unknown field `{key}`.", param=key)
        if value is None:
            continue
        ok = (
            (key in INT_FIELDS and isinstance(value, int) and not isinstance(value, bool))
            or (
                key in FLOAT_FIELDS
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            )
            or (key in STR_FIELDS and isinstance(value, str))
            or (key == "metadata" and isinstance(value, dict))
        )
        if not ok:
            raise invalid_request(f"`{key}` has the wrong type.", param=key)
        fields[key] = value
    return fields


def expires_after_days(value: Any) -> Any:
    """OpenAI's `expires_after` ({"anchor": "last_active_at", "days": 1..365}, or null: no
    expiry) as its days."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_request("`expires_after` must be an object or null.", param="expires_after")
    unknown = sorted(set(value) - {"anchor", "days"})
    if unknown:
        raise invalid_request(
            f"Unknown field `expires_after.{unknown[0]}`.", param=f"expires_after.{unknown[0]}"
        )
    if value.get("anchor") != "last_active_at":
        raise invalid_request(
            "`expires_after.anchor` must be 'last_active_at'.", param="expires_after.anchor"
        )
    if value.get("days") is None:
        raise invalid_request("`expires_after.days` is required.", param="expires_after.days")
    return value["days"]  # its type and range are the service's to check (any writer's)


def expiry_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Pops `expires_after` from a body (changed in place) and gives it as the services'
    `expires_after_days`, only when the body names it: absent keeps the policy, null
    removes it. The same shape on /api/corpora and /v1/vector_stores."""
    if "expires_after" not in data:
        return {}
    return {"expires_after_days": expires_after_days(data.pop("expires_after"))}


def native_corpus_fields(data: Any) -> dict[str, Any]:
    """The body of POST/PATCH /api/corpora: the corpus fields and the expiry policy."""
    if not isinstance(data, dict):
        raise invalid_request("The body must be a JSON object.")
    data = dict(data)
    expiry = expiry_fields(data)
    return {**corpus_fields(data), **expiry}


def top_k_of(value: Any, *, param: str = "top_k") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise invalid_request(f"`{param}` must be an integer between 1 and 100.", param=param)
    return value


class RagApiView(TenantApiView):
    """Errors of the rag services and selectors as OpenAI-shaped API errors."""

    def handle_exception(self, exc: Exception) -> Response:
        if isinstance(exc, services.RagError):
            exc = ApiError(exc.status, exc.message, param=exc.param, code=exc.code)
        elif isinstance(exc, selectors.NotFound):
            exc = ApiError(404, str(exc), code="not_found")
        elif isinstance(exc, EngineError):
            exc = ApiError(502, str(exc), type="api_error", code="engine_error")
        elif isinstance(exc, UsageRefused):  # the tenant's token quota has no room
            exc = exc.error
        return super().handle_exception(exc)

    def corpus(self, corpus_id: str) -> Corpus:
        return selectors.corpus_get(tenant_id=self.principal.tenant.pk, public_id=corpus_id)

    def search(self, corpus: Corpus, query: Any, top_k: int | None) -> list:
        if not isinstance(query, str) or not query.strip():
            raise invalid_request("`query` must be a non-empty string.", param="query")
        if corpus.is_expired():
            raise services.expired_error(corpus)
        tenant, key = self.principal.tenant, self.principal.api_key
        payer = Payer(
            tenant_id=tenant.pk,
            tenant_slug=tenant.slug,
            api_key_id=key.pk,
            weight=tenant.scheduling_weight,
        )
        hits = search_now(corpora=[corpus], query=query, top_k=top_k, payer=payer)
        services.corpora_touch(corpora=[corpus])
        return hits


class CorporaApi(RagApiView):
    def get(self, request: Request) -> Response:
        corpora = selectors.corpora_of(tenant_id=self.principal.tenant.pk)
        return Response(presenters.list_json([presenters.corpus_json(c) for c in corpora]))

    def post(self, request: Request) -> Response:
        fields = native_corpus_fields(request.data)
        name = fields.pop("name", None)
        if name is None:
            raise invalid_request("`name` is required.", param="name")
        corpus = services.corpus_create(tenant=self.principal.tenant, name=name, **fields)
        return Response(presenters.corpus_json(corpus), status=201)


class CorpusApi(RagApiView):
    def get(self, request: Request, corpus_id: str) -> Response:
        return Response(presenters.corpus_json(self.corpus(corpus_id)))

    def patch(self, request: Request, corpus_id: str) -> Response:
        corpus = services.corpus_update(
            corpus=self.corpus(corpus_id), **native_corpus_fields(request.data)
        )
        return Response(presenters.corpus_json(corpus))

    def delete(self, request: Request, corpus_id: str) -> Response:
        corpus = self.corpus(corpus_id)
        services.corpus_delete(corpus=corpus)
        return Response({"id": corpus_id, "object": "corpus.deleted", "deleted": True})


class DocumentsApi(RagApiView):
    parser_classes = [MultiPartParser, JSONParser]

    def get(self, request: Request, corpus_id: str) -> Response:
        documents = selectors.documents_of(corpus=self.corpus(corpus_id))
        return Response(presenters.list_json([presenters.document_json(d) for d in documents]))

    def post(self, request: Request, corpus_id: str) -> Response:
        """Multipart `file` (repeat it for several): all are added, or none."""
        corpus = self.corpus(corpus_id)
        uploads = request.FILES.getlist("file")
        if not uploads:
            raise invalid_request("Send the document as the multipart field `file`.", param="file")
        results = []
        with transaction.atomic():
            for upload in uploads:
                results.append(
                    services.document_upload(
                        corpus=corpus, filename=upload.name, data=read_upload(upload)
                    )
                )
        created = any(c for _, c in results)
        data = [presenters.document_json(d) for d, _ in results]
        body = data[0] if len(data) == 1 else presenters.list_json(data)
        return Response(body, status=201 if created else 200)


def read_upload(upload) -> bytes:
    """The upload's bytes, refused unread beyond the size limit."""
    from django.conf import settings

    if upload.size > settings.RAG_MAX_FILE_BYTES:
        raise services.RagError(
            f"The file is too large ({upload.size} bytes; the limit is {settings.RAG_MAX_FILE_BYTES}).",
            param="file",
            status=413,
        )
    return upload.read()


class DocumentApi(RagApiView):
    def get(self, request: Request, corpus_id: str, file_id: str) -> Response:
        document = selectors.document_get(corpus=self.corpus(corpus_id), file_id=file_id)
        return Response(presenters.document_json(document))

    def delete(self, request: Request, corpus_id: str, file_id: str) -> Response:
        document = selectors.document_get(corpus=self.corpus(corpus_id), file_id=file_id)
        services.document_delete(document=document)
        return Response({"id": file_id, "object": "document.deleted", "deleted": True})


class CorpusSearchApi(RagApiView):
    def post(self, request: Request, corpus_id: str) -> Response:
        corpus = self.corpus(corpus_id)
        data = request.data if isinstance(request.data, dict) else {}
        hits = self.search(corpus, data.get("query"), top_k_of(data.get("top_k")))
        return Response(presenters.list_json([h.as_source(n) for n, h in enumerate(hits, 1)]))


def session_rag_fields(data: Any) -> dict[str, Any]:
    """`{"corpora": ["vs_..."], "top_k": n}` sets a session's RAG; `{"enabled": false}`
    turns it off for the session (whatever the key's or tenant's default)."""
    if not isinstance(data, dict):
        raise invalid_request("The body must be a JSON object.")
    unknown = sorted(set(data) - {"corpora", "top_k", "enabled"})
    if unknown:
        raise invalid_request(f"Unknown field `{unknown[0]}`.", param=unknown[0])
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise invalid_request("`enabled` must be true or false.", param="enabled")
    corpora = data.get("corpora", [])
    if not isinstance(corpora, list) or not all(isinstance(c, str) for c in corpora):
        raise invalid_request("`corpora` must be an array of corpus ids.", param="corpora")
    return {"corpus_ids": list(dict.fromkeys(corpora)), "top_k": top_k_of(data.get("top_k")),
            "enabled": enabled}  # fmt: skip


class SessionRagApi(RagApiView):
    """RAG for one session: `PUT /api/sessions/{id}/rag`, GET, DELETE."""

    def get(self, request: Request, session_id: str) -> Response:
        setting = selectors.session_rag_get(
            tenant_id=self.principal.tenant.pk, session_id=session_id
        )
        return Response(presenters.session_rag_json(setting))

    def put(self, request: Request, session_id: str) -> Response:
        try:
            session_id_validate(session_id, param="session_id")
        except InvalidSessionId as exc:
            raise invalid_request(str(exc), param="session_id") from None
        fields = session_rag_fields(request.data)
        corpora = [self.corpus(corpus_id) for corpus_id in fields.pop("corpus_ids")]
        setting = services.session_rag_set(
            tenant=self.principal.tenant, session_id=session_id, corpora=corpora, **fields
        )
        return Response(presenters.session_rag_json(setting))

    def delete(self, request: Request, session_id: str) -> Response:
        if not services.session_rag_clear(tenant=self.principal.tenant, session_id=session_id):
            raise ApiError(404, f"No RAG setting for session '{session_id}'.", code="not_found")
        return Response({"session_id": session_id, "object": "session.rag.deleted",
                         "deleted": True})  # fmt: skip
