import django.contrib.postgres.indexes
from django.db import migrations

INDEX = "rag_chunk_search_vector"


class Migration(migrations.Migration):
    """Full-text search (apps/rag/retrieval.py, _text_matches): the index without a
    pending list (see Chunk.Meta), set in place (no rebuild) and the entries already
    pending merged into it; and ten times the default statistics on the column, so the
    planner's most common lexemes (up to 10,000, which retrieval reads to find the query's
    rarest words) cover a corpus's vocabulary beyond its top 1,000 words. And the vectors
    kept in the row (storage main) rather than out of line in the TOAST table: an exact
    scan of a small corpus read ~6 buffers per chunk for its vector, 8x slower (pgvector
    stores vectors `external` by default, and a 384-dimension vector already pushes a row
    past the TOAST threshold). Only rows written from now on are stored so; vectors too
    large for a page are still moved out of line."""

    dependencies = [
        ("rag", "0004_corpus_day"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    f"ALTER INDEX {INDEX} SET (fastupdate = off); "
                    f"SELECT gin_clean_pending_list('{INDEX}'::regclass);",
                    reverse_sql=f"ALTER INDEX {INDEX} RESET (fastupdate);",
                ),
                migrations.RunSQL(
                    "ALTER TABLE rag_chunk ALTER COLUMN search_vector SET STATISTICS 1000; "
                    "ANALYZE rag_chunk (search_vector);",
                    reverse_sql="ALTER TABLE rag_chunk ALTER COLUMN search_vector SET STATISTICS -1;",
                ),
                migrations.RunSQL(
                    "ALTER TABLE rag_chunk ALTER COLUMN embedding SET STORAGE MAIN;",
                    reverse_sql="ALTER TABLE rag_chunk ALTER COLUMN embedding SET STORAGE EXTERNAL;",
                ),
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="chunk", name=INDEX),
                migrations.AddIndex(
                    model_name="chunk",
                    index=django.contrib.postgres.indexes.GinIndex(
                        fastupdate=False, fields=["search_vector"], name=INDEX
                    ),
                ),
            ],
        ),
    ]
