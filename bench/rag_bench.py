"""RAG benchmark: retrieval latency at 10k and 100k chunks (pgvector HNSW vs numpy),
ingestion throughput (and the engine's share of it), and the latency the automatic-RAG
stage adds to a chat completion.

Run from the repo root:  python bench/rag_bench.py [--sizes 10000,100000] [--queries 200]

Everything runs in its own data directory (var/bench-rag, its own embedded PostgreSQL;
DATABASE_URL is ignored), against the fake engine (tests/fake_engine.py), whose
embeddings are a hashed bag of words and which answers instantly, so what is measured is
the gateway's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.pop("DATABASE_URL", None)
os.environ["DATA_DIR"] = str(REPO / "var" / "bench-rag")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["REGISTRY_CACHE_SECONDS"] = "0"

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from tests.fake_engine import FakeEngineProcess  # noqa: E402

DIMS = 384
WORDS = [f"w{i}" for i in range(5000)] + [
    "otter",
    "beaver",
    "heron",
    "bee",
    "salmon",
    "river",
    "forest",
]
RNG = np.random.default_rng(7)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def fake_text(words: int = 60) -> str:
    return " ".join(RNG.choice(WORDS, size=words))


# Real embeddings cluster by topic; uniform random vectors (no neighbours to speak of) are
# the worst case for HNSW and say nothing about recall. So: topics, and chunks near them.
TOPICS = RNG.standard_normal((500, DIMS)).astype(np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def clustered_vectors(n: int) -> np.ndarray:
    topics = TOPICS[RNG.integers(0, len(TOPICS), n)]
    return _unit(topics + 0.6 * RNG.standard_normal((n, DIMS)).astype(np.float32))


def query_vectors(n: int) -> np.ndarray:
    """Questions about some topic: near its chunks, none of them exactly."""
    return clustered_vectors(n)


def tenant_setup(slug: str):
    from apps.tenants.models import Tenant
    from apps.tenants.services import api_key_create, tenant_create

    Tenant.objects.filter(slug=slug).delete()
    tenant = tenant_create(slug=slug)
    return tenant, api_key_create(tenant=tenant, name="bench").raw_key


def synthetic_corpus(tenant, *, chunks: int, start: int = 0, corpus=None):
    """`chunks` more chunks with random unit vectors, COPYed in binary, 1000 per document."""
    from pgvector.psycopg import register_vector

    from apps.rag.indexes import _known, hnsw_index_ensure, index_name
    from apps.rag.models import Corpus, Document, StoredFile

    corpus = corpus or Corpus.objects.create(
        tenant=tenant, name="bench", embedding_model="bench-embed", embedding_dims=DIMS
    )
    connection.ensure_connection()
    register_vector(connection.connection)
    # Bulk loads are faster without the index, which is then built once (as pgvector
    # recommends); _known makes hnsw_index_ensure create it again.
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX IF EXISTS {index_name(DIMS)}")
        cursor.execute("SET maintenance_work_mem = '512MB'")
    _known.discard(DIMS)
    for first in range(start, start + chunks, 1000):
        stored = StoredFile.objects.create(
            tenant=tenant,
            filename=f"doc{first}.txt",
            content_type="text/plain",
            size=1,
            sha256=f"{first:064d}",
            data=b"x",
        )
        doc = Document.objects.create(
            corpus=corpus,
            file=stored,
            name=stored.filename,
            content_type="text/plain",
            size=1,
            sha256=stored.sha256,
            status="ready",
            chunk_count=1000,
        )
        vectors = clustered_vectors(1000)
        with (
            connection.cursor() as cursor,
            cursor.connection.cursor().copy(
                "COPY rag_chunk (document_id, corpus_id, position, text, token_count, char_start, char_end, dims, embedding) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(
                ["int8", "int8", "int4", "text", "int4", "int4", "int4", "int4", "vector"]
            )
            for i in range(1000):
                copy.write_row([doc.pk, corpus.pk, i, fake_text(), 80, 0, 300, DIMS, vectors[i]])
    started = time.perf_counter()
    hnsw_index_ensure(dims=DIMS)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE rag_chunk")
    return corpus, time.perf_counter() - started


def retrieval(corpus, *, queries: int) -> dict[str, tuple[float, float]]:
    from apps.rag.retrieval import CorpusRef, candidates
    from apps.rag.stores import vector_store

    size = corpus.chunk_count_for_bench
    ref = CorpusRef.of(corpus, chunks=size)
    out = {}
    qs = query_vectors(queries)
    for name in ("pgvector", "numpy"):
        store = vector_store(name)
        started = time.perf_counter()
        store.nearest(
            corpus_ids=[corpus.pk], dims=DIMS, query=list(qs[0]), limit=10
        )  # warm (numpy: load)
        out[f"{name} first query (load)"] = ((time.perf_counter() - started) * 1000, 0.0)
        samples = []
        for q in qs:
            t = time.perf_counter()
            store.nearest(corpus_ids=[corpus.pk], dims=DIMS, query=list(q), limit=10)
            samples.append((time.perf_counter() - t) * 1000)
        out[f"{name} nearest"] = percentiles(samples)
        if name == "pgvector":
            samples = []
            for q in qs[: queries // 4]:
                t = time.perf_counter()
                store.nearest(
                    corpus_ids=[corpus.pk], dims=DIMS, query=list(q), limit=10, exact=True
                )
                samples.append((time.perf_counter() - t) * 1000)
            out["pgvector exact scan (no index; small corpora)"] = percentiles(samples)
        samples = []
        for q in qs[: queries // 2]:
            t = time.perf_counter()
            candidates(
                corpora=[ref],
                query=fake_text(8),
                vectors={"bench-embed": list(q)},
                limit=5,
                store=name,
            )
            samples.append((time.perf_counter() - t) * 1000)
        out[f"{name} hybrid (vector + full text + fusion + rows)"] = percentiles(samples)
    return out


# The full-text query before the rarest-words selection (any word's matches, the first
# RAG_TEXT_MATCH_CAP of them ranked by ts_rank_cd), kept to compare with in the same run.
OLD_TEXT_SQL = (
    "WITH q AS (SELECT to_tsquery('english', %s) AS q) "
    "SELECT m.id, m.corpus_id FROM q, LATERAL ("
    "  SELECT c.id, c.corpus_id, c.search_vector FROM rag_chunk c "
    "  WHERE c.corpus_id = ANY(%s) AND c.search_vector @@ q.q LIMIT %s) m "
    "ORDER BY ts_rank_cd(m.search_vector, q.q) DESC, m.id LIMIT %s"
)


def old_text_matches(corpus_ids: list[int], query: str, limit: int) -> list[tuple[int, int]]:
    from django.conf import settings

    from apps.rag.retrieval import WORD

    tsquery = " | ".join(f"'{w}'" for w in WORD.findall(query.lower())[:64])
    with connection.cursor() as cursor:
        cursor.execute(OLD_TEXT_SQL, [tsquery, corpus_ids, settings.RAG_TEXT_MATCH_CAP, limit])
        return cursor.fetchall()


def text_side(corpus, *, queries: int, k: int = 10) -> dict[str, tuple[float, float]]:
    """The full-text candidates alone, old and new query: time, and recall@k against the
    uncapped ranking (ts_rank_cd over every matching chunk). Many chunks tie (a chunk
    with one query word once), so a result counts when its reference score is at least
    the k-th best one."""
    from apps.rag.retrieval import _text_matches

    size = corpus.chunk_count_for_bench
    out = {}
    texts = [fake_text(8) for _ in range(queries)]
    variants = {
        "old (any word, first cap, ts_rank_cd)": lambda q: old_text_matches([corpus.pk], q, 40),
        "new (rarest words, ts_rank)": lambda q: _text_matches([corpus.pk], q, 40, chunks=size),
    }
    for label, search in variants.items():
        samples, recalls = [], []
        for q in texts:
            t = time.perf_counter()
            found = search(q)
            samples.append((time.perf_counter() - t) * 1000)
        for q in texts[: max(1, queries // 8)]:
            with connection.cursor() as cursor:
                cursor.execute(
                    "WITH q AS (SELECT to_tsquery('english', %s) AS q) "
                    "SELECT c.id, ts_rank_cd(c.search_vector, q.q) FROM rag_chunk c, q "
                    "WHERE c.corpus_id = %s AND c.search_vector @@ q.q",
                    [" | ".join(f"'{w}'" for w in q.split()), corpus.pk],
                )
                reference = dict(cursor.fetchall())
            best = sorted(reference.values(), reverse=True)
            if len(best) < k:
                continue
            found = [i for i, _ in search(q)[:k]]
            recalls.append(sum(reference.get(i, 0) >= best[k - 1] for i in found) / k)
        out[f"full text {label}"] = percentiles(samples)
        out[f"  {label.split()[0]}: recall@{k} vs uncapped ts_rank_cd (mean, min)"] = (
            statistics.mean(recalls),
            min(recalls),
        )
    return out


def recall_at_10(corpus, *, queries: int = 50) -> float:
    """HNSW's recall against the exact (numpy) answer."""
    from apps.rag.stores import vector_store

    hits = 0
    for q in query_vectors(queries):
        exact = {
            i
            for i, _, _ in vector_store("numpy").nearest(
                corpus_ids=[corpus.pk], dims=DIMS, query=list(q), limit=10
            )
        }
        approx = {
            i
            for i, _, _ in vector_store("pgvector").nearest(
                corpus_ids=[corpus.pk], dims=DIMS, query=list(q), limit=10
            )
        }
        hits += len(exact & approx)
    return hits / (queries * 10)


def ingestion(tenant, engine_url: str, *, chunks: int) -> dict[str, float]:
    from apps.engines.client import close_engine_session
    from apps.engines.services import engine_register_external
    from apps.rag import engine as rag_engine
    from apps.rag import ingestion as ingestion_module
    from apps.rag.ingestion import ingest
    from apps.rag.models import Document
    from apps.rag.services import corpus_create, document_upload

    engine_register_external(
        name="bench-fake", base_url=engine_url, models=["bench-chat", "bench-embed"], slots=4
    )
    corpus = corpus_create(
        tenant=tenant,
        name="ingest",
        embedding_model="bench-embed",
        chunk_tokens=100,
        chunk_overlap=10,
    )
    text = "\n\n".join(fake_text(70) + "." for _ in range(chunks))
    document, _ = document_upload(corpus=corpus, filename="big.txt", data=text.encode())
    engine_seconds = 0.0
    original = rag_engine.embed

    async def timed_embed(**kwargs):
        nonlocal engine_seconds
        t = time.perf_counter()
        try:
            return await original(**kwargs)
        finally:
            engine_seconds += time.perf_counter() - t

    rag_engine.embed = timed_embed
    store_seconds = 0.0
    original_store = ingestion_module._store

    def timed_store(*args):
        nonlocal store_seconds
        t = time.perf_counter()
        try:
            return original_store(*args)
        finally:
            store_seconds += time.perf_counter() - t

    ingestion_module._store = timed_store

    async def run() -> None:
        try:
            await ingest(document_id=document.pk)
        finally:
            await close_engine_session()

    started = time.perf_counter()
    asyncio.run(run())
    total = time.perf_counter() - started
    rag_engine.embed, ingestion_module._store = original, original_store
    document = Document.objects.get(pk=document.pk)
    assert document.status == "ready", document.error
    return {
        "chunks": document.chunk_count,
        "seconds": total,
        "engine_seconds": engine_seconds,
        "store_seconds": store_seconds,
    }


def stage_latency(raw_key: str, corpus_id: str, *, requests: int) -> dict[str, tuple[float, float]]:
    from tests.conftest import start_gateway

    log = Path(os.environ["DATA_DIR"]) / "gateway.log"
    gateway = start_gateway(
        connection.settings_dict,
        log,
        env={"RAG_SERVE_WORKERS": "0", "AUTH_CACHE_SECONDS": "5", "REGISTRY_CACHE_SECONDS": "5"},
    )
    try:
        body = {
            "model": "bench-chat",
            "messages": [{"role": "user", "content": "why do otters hold hands"}],
            "max_tokens": 8,
        }
        out = {}
        with httpx.Client(
            base_url=gateway.base_url, headers={"Authorization": f"Bearer {raw_key}"}, timeout=30
        ) as client:
            for label, extra in (
                ("without RAG", {}),
                ("with RAG (top_k 5)", {"rag": {"corpora": [corpus_id], "top_k": 5}}),
            ):
                for _ in range(20):
                    client.post("/chat/completions", json={**body, **extra}).raise_for_status()
                samples = []
                for _ in range(requests):
                    t = time.perf_counter()
                    client.post("/chat/completions", json={**body, **extra}).raise_for_status()
                    samples.append((time.perf_counter() - t) * 1000)
                out[label] = percentiles(samples)
        return out
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ingest-chunks", type=int, default=2000)
    parser.add_argument("--chat-requests", type=int, default=200)
    args = parser.parse_args()
    call_command("migrate", interactive=False, verbosity=0)
    tenant, raw_key = tenant_setup("bench-rag")
    print(f"Retrieval, {DIMS}-dimension vectors, top 10, {args.queries} queries (ms p50 / p99)")
    corpus, done = None, 0
    for size in [int(s) for s in args.sizes.split(",")]:
        corpus, index_seconds = synthetic_corpus(
            tenant, chunks=size - done, start=done, corpus=corpus
        )
        done = size
        corpus.chunk_count_for_bench = size
        print(
            f"  {size:>7} chunks (HNSW index built in {index_seconds:.1f} s, recall@10 {recall_at_10(corpus):.2f})"
        )
        rows = {**retrieval(corpus, queries=args.queries), **text_side(corpus, queries=80)}
        for label, (p50, p99) in rows.items():
            print(f"    {label:<52} {p50:8.2f} / {p99:8.2f}")
    with FakeEngineProcess().start(
        "--model",
        "bench-chat",
        "--model",
        "bench-embed",
        "--embedding-dims",
        str(DIMS),
        "--no-record",
    ) as engine:
        result = ingestion(tenant, engine.url, chunks=args.ingest_chunks)
        share = result["engine_seconds"] / result["seconds"]
        print(
            f"\nIngestion: {result['chunks']} chunks in {result['seconds']:.2f} s = "
            f"{result['chunks'] / result['seconds']:.0f} chunks/s; engine calls {share:.0%} of it, "
            f"ours {1 - share:.0%} (of which writing the chunks and their index entries "
            f"{result['store_seconds'] / result['seconds']:.0%})"
        )
        from apps.rag.models import Corpus

        small = Corpus.objects.get(tenant=tenant, name="ingest")
        print(
            f"\nChat completion latency through serve, {args.chat_requests} sequential requests (ms p50 / p99), corpus of {result['chunks']} chunks"
        )
        rows = stage_latency(raw_key, small.public_id, requests=args.chat_requests)
        for label, (p50, p99) in rows.items():
            print(f"    {label:<52} {p50:8.2f} / {p99:8.2f}")
        (b50, b99), (r50, r99) = rows.values()
        print(f"    {'added by the RAG stage':<52} {r50 - b50:8.2f} / {r99 - b99:8.2f}")
    tenant.delete()  # its corpora, documents, chunks and files


if __name__ == "__main__":
    main()
