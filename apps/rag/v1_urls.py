"""/v1 paths served by Django (config/asgi.py sends V1_PREFIXES here, not to Channels)."""

from django.urls import path

from apps.rag import openai_apis as v1

app_name = "rag_v1"
V1_PREFIXES = ("/v1/files", "/v1/vector_stores")

urlpatterns = [
    path("files", v1.FilesApi.as_view(), name="files"),
    path("files/<str:file_id>", v1.FileApi.as_view(), name="file"),
    path("vector_stores", v1.VectorStoresApi.as_view(), name="vector_stores"),
    path("vector_stores/<str:store_id>", v1.VectorStoreApi.as_view(), name="vector_store"),
    path(
        "vector_stores/<str:store_id>/files",
        v1.VectorStoreFilesApi.as_view(),
        name="files_of_store",
    ),
    path(
        "vector_stores/<str:store_id>/files/<str:file_id>",
        v1.VectorStoreFileApi.as_view(),
        name="file_of_store",
    ),
    path("vector_stores/<str:store_id>/search", v1.VectorStoreSearchApi.as_view(), name="search"),
]
