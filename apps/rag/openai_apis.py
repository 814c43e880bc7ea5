"""OpenAI-compatible files and vector stores (a vector store is a corpus), enough for the
official SDK's `files.create`, `vector_stores.create/list/retrieve/update/delete` (with
`expires_after`), `vector_stores.files.create/upload_and_poll/list/retrieve/delete` and
`vector_stores.search`. Served by Django (config/asgi.py routes these paths here)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from rest_framework.parsers import JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.core.errors import invalid_request
from apps.rag import presenters, selectors, services
from apps.rag.apis import RagApiView, corpus_fields, expiry_fields, read_upload, top_k_of
from apps.rag.models import Document

FILE_PURPOSES = ("assistants", "user_data")
# How soon the SDK's upload_and_poll asks again (its header `openai-poll-after-ms`).
POLL_AFTER_MS = "250"
EXTRA_STORE_FIELDS = (
    "embedding_model",
    "rerank_model",
    "top_k",
    "hybrid_weight",
    "score_threshold",
    "description",
)


def limit_of(request: Request) -> int:
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise invalid_request("`limit` must be an integer between 1 and 100.", param="limit")
    return int(raw)


def page(request: Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Cursor pagination as OpenAI does it: `limit`, `after` (an id), `order`."""
    if request.query_params.get("order") == "asc":
        items = items[::-1]
    after = request.query_params.get("after")
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = limit_of(request)
    return presenters.list_json(items[:limit], has_more=len(items) > limit)


class FilesApi(RagApiView):
    parser_classes = [MultiPartParser]

    def get(self, request: Request) -> Response:
        files = selectors.files_of(tenant_id=self.principal.tenant.pk)
        return Response(page(request, [presenters.file_json(f) for f in files]))

    def post(self, request: Request) -> Response:
        upload = request.FILES.get("file")
        if upload is None:
            raise invalid_request("Send the file as the multipart field `file`.", param="file")
        purpose = request.data.get("purpose")
        if purpose not in FILE_PURPOSES:
            raise invalid_request(
                f"`purpose` must be one of {', '.join(FILE_PURPOSES)}.", param="purpose"
            )
        stored = services.file_create(
            tenant=self.principal.tenant,
            filename=upload.name,
            data=read_upload(upload),
            purpose=purpose,
        )
        return Response(presenters.file_json(stored))


class FileApi(RagApiView):
    def get(self, request: Request, file_id: str) -> Response:
        return Response(
            presenters.file_json(
                selectors.file_get(tenant_id=self.principal.tenant.pk, public_id=file_id)
            )
        )

    def delete(self, request: Request, file_id: str) -> Response:
        stored = selectors.file_get(tenant_id=self.principal.tenant.pk, public_id=file_id)
        services.file_delete(stored=stored)
        return Response({"id": file_id, "object": "file", "deleted": True})


def store_fields(data: Any) -> dict[str, Any]:
    """OpenAI's create/update fields (+ our corpus settings, e.g. via extra_body); the
    expiry policy as `expires_after_days` only when the body names it."""
    if not isinstance(data, dict):
        raise invalid_request("The body must be a JSON object.")
    data = dict(data)
    expiry = expiry_fields(data)
    strategy = data.pop("chunking_strategy", None)
    file_ids = data.pop("file_ids", None) or []
    if not isinstance(file_ids, list) or not all(isinstance(i, str) for i in file_ids):
        raise invalid_request("`file_ids` must be an array of file ids.", param="file_ids")
    fields = corpus_fields(data, allowed=("name", "metadata", *EXTRA_STORE_FIELDS))
    if isinstance(strategy, dict) and strategy.get("type") == "static":
        static = strategy.get("static") or {}
        fields["chunk_tokens"] = static.get("max_chunk_size_tokens", 800)
        fields["chunk_overlap"] = static.get("chunk_overlap_tokens", 400)
    return {**fields, **expiry, "file_ids": file_ids}


class VectorStoresApi(RagApiView):
    def get(self, request: Request) -> Response:
        corpora = selectors.corpora_of(tenant_id=self.principal.tenant.pk).order_by(
            "-created_at", "-pk"
        )
        return Response(page(request, [presenters.vector_store_json(c) for c in corpora]))

    def post(self, request: Request) -> Response:
        fields = store_fields(request.data)
        file_ids = fields.pop("file_ids")
        tenant = self.principal.tenant
        files = [selectors.file_get(tenant_id=tenant.pk, public_id=i) for i in file_ids]
        with transaction.atomic():  # a file refused: no store either
            corpus = services.corpus_create(
                tenant=tenant, name=fields.pop("name", "") or "Untitled", **fields
            )
            for stored in files:
                services.document_add(corpus=corpus, stored=stored)
        return Response(presenters.vector_store_json(corpus))


class VectorStoreApi(RagApiView):
    def get(self, request: Request, store_id: str) -> Response:
        return Response(presenters.vector_store_json(self.corpus(store_id)))

    def post(self, request: Request, store_id: str) -> Response:
        fields = store_fields(request.data)
        fields.pop("file_ids")
        corpus = services.corpus_update(corpus=self.corpus(store_id), **fields)
        return Response(presenters.vector_store_json(corpus))

    def delete(self, request: Request, store_id: str) -> Response:
        services.corpus_delete(corpus=self.corpus(store_id))
        return Response({"id": store_id, "object": "vector_store.deleted", "deleted": True})


class VectorStoreFilesApi(RagApiView):
    def get(self, request: Request, store_id: str) -> Response:
        documents = selectors.documents_of(corpus=self.corpus(store_id))
        wanted = request.query_params.get("filter")
        items = [presenters.vector_store_file_json(d) for d in documents]
        if wanted:
            items = [i for i in items if i["status"] == wanted]
        return Response(page(request, items))

    def post(self, request: Request, store_id: str) -> Response:
        corpus = self.corpus(store_id)
        file_id = request.data.get("file_id") if isinstance(request.data, dict) else None
        if not isinstance(file_id, str):
            raise invalid_request("`file_id` is required.", param="file_id")
        stored = selectors.file_get(tenant_id=self.principal.tenant.pk, public_id=file_id)
        document, _ = services.document_add(corpus=corpus, stored=stored)
        return self.answer(document)

    @staticmethod
    def answer(document: Document) -> Response:
        return Response(
            presenters.vector_store_file_json(document),
            headers={"openai-poll-after-ms": POLL_AFTER_MS},
        )


class VectorStoreFileApi(RagApiView):
    def get(self, request: Request, store_id: str, file_id: str) -> Response:
        document = selectors.document_get(corpus=self.corpus(store_id), file_id=file_id)
        return VectorStoreFilesApi.answer(document)

    def delete(self, request: Request, store_id: str, file_id: str) -> Response:
        document = selectors.document_get(corpus=self.corpus(store_id), file_id=file_id)
        services.document_delete(document=document, keep_file=True)
        return Response({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})


class VectorStoreSearchApi(RagApiView):
    parser_classes = [JSONParser]

    def post(self, request: Request, store_id: str) -> Response:
        corpus = self.corpus(store_id)
        data = request.data if isinstance(request.data, dict) else {}
        query = data.get("query")
        if isinstance(query, list) and query and all(isinstance(q, str) for q in query):
            query = " ".join(query)
        top_k = top_k_of(data.get("max_num_results", 10), param="max_num_results")
        hits = self.search(corpus, query, top_k)
        threshold = (data.get("ranking_options") or {}).get("score_threshold")
        if isinstance(threshold, int | float):
            hits = [h for h in hits if h.score >= threshold]
        return Response(
            {
                "object": "vector_store.search_results.page",
                "search_query": [query],
                "data": [search_result(h) for h in hits],
                "has_more": False,
                "next_page": None,
            }
        )


def search_result(hit) -> dict[str, Any]:
    attributes = {"page": hit.page} if hit.page is not None else {}
    return {
        "file_id": hit.document_id,
        "filename": hit.document,
        "score": hit.score,
        "attributes": attributes,
        "content": [{"type": "text", "text": hit.text}],
    }
