from django.db import migrations
from pgvector.django import VectorExtension


class Migration(migrations.Migration):
    """Enable pgvector for the whole database (RAG chunks store embeddings)."""

    dependencies = [("tenants", "0001_initial")]

    operations = [VectorExtension()]
