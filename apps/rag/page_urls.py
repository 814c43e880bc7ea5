from django.contrib.auth import views as auth_views
from django.urls import path

from apps.rag import views

app_name = "rag_pages"

urlpatterns = [
    path("", views.corpora_page, name="corpora"),
    path("login/", auth_views.LoginView.as_view(template_name="rag/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="rag_pages:login"), name="logout"),
    path("corpora/new", views.corpus_create, name="corpus_create"),
    path("<str:corpus_id>/", views.corpus_page, name="corpus"),
    path("<str:corpus_id>/expiry", views.corpus_expiry, name="corpus_expiry"),
    path("<str:corpus_id>/documents.json", views.documents_json, name="documents_json"),
    path("<str:corpus_id>/upload", views.document_upload, name="upload"),
    path(
        "<str:corpus_id>/documents/<str:file_id>/delete",
        views.document_delete,
        name="document_delete",
    ),
]
