"""The document pages for tenant users (Django session login, TenantMembership roles).

Every corpus is looked up among the tenants the user is a member of, so another tenant's
corpus is a 404 exactly like one that does not exist. Viewers read and search; editors
also create corpora, upload and delete.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from apps.core.usage import Payer, UsageRefused
from apps.rag import presenters, selectors, services
from apps.rag.apis import read_upload
from apps.rag.engine import EngineError
from apps.rag.models import Corpus
from apps.rag.retrieval import search_now
from apps.tenants.models import TenantMembership


def memberships(request: HttpRequest) -> dict[int, TenantMembership]:
    rows = TenantMembership.objects.filter(user=request.user, tenant__active=True).select_related(
        "tenant"
    )
    return {m.tenant_id: m for m in rows}


def corpus_for(
    request: HttpRequest, corpus_id: str, *, edit: bool = False
) -> tuple[Corpus, TenantMembership]:
    member_of = memberships(request)
    corpus = Corpus.objects.filter(public_id=corpus_id, tenant_id__in=list(member_of)).first()
    if corpus is None:
        raise Http404("No such corpus.")
    membership = member_of[corpus.tenant_id]
    if edit and not membership.can_edit:
        raise PermissionDenied("Only editors may change this corpus.")
    return corpus, membership


@login_required
@require_GET
def corpora_page(request: HttpRequest) -> HttpResponse:
    return _corpora(request)


def _corpora(request: HttpRequest, *, error: str = "", status: int = 200) -> HttpResponse:
    groups = [
        {
            "membership": m,
            "corpora": [
                {"corpus": c, "counts": presenters.document_counts(c)}
                for c in selectors.corpora_of(tenant_id=m.tenant_id)
            ],
            "models": services.tenant_models(tenant=m.tenant) if m.can_edit else [],
        }
        for m in memberships(request).values()
    ]
    return render(request, "rag/corpora.html", {"groups": groups, "error": error}, status=status)


@login_required
@require_POST
def corpus_create(request: HttpRequest) -> HttpResponse:
    tenant_id = request.POST.get("tenant", "")
    membership = memberships(request).get(int(tenant_id) if tenant_id.isdigit() else -1)
    if membership is None:
        raise Http404("No such tenant.")
    if not membership.can_edit:
        raise PermissionDenied("Only editors may create corpora.")
    try:
        corpus = services.corpus_create(
            tenant=membership.tenant,
            name=request.POST.get("name", "").strip(),
            embedding_model=request.POST.get("embedding_model") or None,
            expires_after_days=expiry_days_of(request.POST.get("expires_after_days", "")),
        )
    except services.RagError as exc:
        return _corpora(request, error=form_error(exc), status=400)
    return redirect("rag_pages:corpus", corpus_id=corpus.public_id)


EXPIRY_ERROR = (
    f"Expires after: a whole number of days from 1 to {services.EXPIRY_MAX_DAYS}, "
    "or empty to never expire."
)


def expiry_days_of(raw: str) -> int | None:
    """The form's "expires after (days)" field: empty is no expiry; the range is the
    service's to check (as for the APIs)."""
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise services.RagError(EXPIRY_ERROR, param="expires_after.days")
    return int(raw)


def form_error(exc: services.RagError) -> str:
    """A service's refusal as the form says it (its field, not the API's name for it)."""
    return EXPIRY_ERROR if exc.param == "expires_after.days" else exc.message


@login_required
@require_GET
def corpus_page(request: HttpRequest, corpus_id: str) -> HttpResponse:
    corpus, membership = corpus_for(request, corpus_id)
    return _corpus(request, corpus, membership)


def _corpus(
    request: HttpRequest,
    corpus: Corpus,
    membership: TenantMembership,
    *,
    expiry_error: str = "",
    status: int = 200,
) -> HttpResponse:
    query = request.GET.get("q", "").strip()
    hits, search_error = [], ""
    if query and corpus.is_expired():
        search_error = services.expired_error(corpus).message
    elif query:
        try:
            tenant = corpus.tenant
            payer = Payer(
                tenant_id=tenant.pk, tenant_slug=tenant.slug, weight=tenant.scheduling_weight
            )
            hits = search_now(corpora=[corpus], query=query, top_k=None, payer=payer)
        except (EngineError, UsageRefused) as exc:
            search_error = str(exc)
        services.corpora_touch(corpora=[corpus])
    documents = [presenters.document_json(d) for d in selectors.documents_of(corpus=corpus)]
    context = {
        "corpus": corpus,
        "membership": membership,
        "documents": documents,
        "query": query,
        "hits": hits,
        "search_error": search_error,
        "expired": corpus.is_expired(),
        "expiry_error": expiry_error,
        "expiry_max_days": services.EXPIRY_MAX_DAYS,
    }
    return render(request, "rag/corpus.html", context, status=status)


@login_required
@require_POST
def corpus_expiry(request: HttpRequest, corpus_id: str) -> HttpResponse:
    """Set or remove (empty field) the corpus's expiry, as `expires_after` does on the APIs."""
    corpus, membership = corpus_for(request, corpus_id, edit=True)
    try:
        services.corpus_update(
            corpus=corpus,
            expires_after_days=expiry_days_of(request.POST.get("expires_after_days", "")),
        )
    except services.RagError as exc:
        corpus.refresh_from_db()
        return _corpus(request, corpus, membership, expiry_error=form_error(exc), status=400)
    return redirect("rag_pages:corpus", corpus_id=corpus.public_id)


@login_required
@require_GET
def documents_json(request: HttpRequest, corpus_id: str) -> JsonResponse:
    corpus, _ = corpus_for(request, corpus_id)
    documents = [presenters.document_json(d) for d in selectors.documents_of(corpus=corpus)]
    return JsonResponse({"data": documents})


@login_required
@require_POST
def document_upload(request: HttpRequest, corpus_id: str) -> JsonResponse:
    """One file per request (the page sends each with its own progress bar)."""
    corpus, _ = corpus_for(request, corpus_id, edit=True)
    upload = request.FILES.get("file")
    if upload is None:
        return JsonResponse({"error": "Choose a file to upload."}, status=400)
    try:
        document, created = services.document_upload(
            corpus=corpus, filename=upload.name, data=read_upload(upload)
        )
    except services.RagError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    return JsonResponse(
        {"document": presenters.document_json(document), "created": created},
        status=201 if created else 200,
    )


@login_required
@require_POST
def document_delete(request: HttpRequest, corpus_id: str, file_id: str) -> HttpResponse:
    corpus, _ = corpus_for(request, corpus_id, edit=True)
    try:
        document = selectors.document_get(corpus=corpus, file_id=file_id)
    except selectors.NotFound:
        raise Http404("No such document.") from None
    services.document_delete(document=document)
    if request.headers.get("Accept", "").startswith("application/json"):
        return JsonResponse({"deleted": True})
    return redirect("rag_pages:corpus", corpus_id=corpus.public_id)
