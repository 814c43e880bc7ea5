from django.urls import path

from apps.rag import apis

app_name = "rag"

urlpatterns = [
    path("corpora", apis.CorporaApi.as_view(), name="corpora"),
    path("corpora/<str:corpus_id>", apis.CorpusApi.as_view(), name="corpus"),
    path("corpora/<str:corpus_id>/documents", apis.DocumentsApi.as_view(), name="documents"),
    path(
        "corpora/<str:corpus_id>/documents/<str:file_id>",
        apis.DocumentApi.as_view(),
        name="document",
    ),
    path("corpora/<str:corpus_id>/search", apis.CorpusSearchApi.as_view(), name="search"),
    path("sessions/<str:session_id>/rag", apis.SessionRagApi.as_view(), name="session-rag"),
]
