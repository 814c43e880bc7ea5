"""Engine overheads: slot scheduling, variant selection and engine swaps.

Run from the repo root:  python bench/engines.py [--duration 10] [--skip-real]

1. scheduling: Scheduler.acquire + release in-process, uncontended and contended, against
   an asyncio.Semaphore doing the same in the same event loop;
2. variant selection: wrk through the gateway (as bench/run.py runs it) to a model with one
   variant and to one with two context-sized variants, against the fake engine direct;
3. swaps: EngineManager in-process on var/bench's database, cold starts and alternating
   swaps between two variants, against the engine's own start (spawned without the
   manager), with the fake engine and, when installed, the real llama-server.

Every figure is a ratio or a difference against a baseline measured in the same run.
Results go to var/bench/engines.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402  (needs the repo on sys.path)
    DATA_DIR,
    WARMUP_SECONDS,
    BenchError,
    Gateway,
    WrkResult,
    fmt_pair,
    free_port,
    note,
    post,
    result_dict,
    run_main,
    run_wrk,
)
from tests.fake_engine import FakeEngineProcess  # noqa: E402

RESULTS_FILE = DATA_DIR / "engines.json"
GATEWAY_LOG = DATA_DIR / "engines-gateway.log"
OWN_START_LOG = DATA_DIR / "engines-own-start.log"
BENCH_MODELS_DIR = DATA_DIR / "models"
INSTALLED_MODELS_DIR = REPO / "var" / "models"

# Part 1: the scheduler
SCHED_KEY = "bench"
SCHED_SLOTS = 4
UNCONTENDED_PAIRS = 50_000
CONTENDED_TASKS = 200
CONTENDED_TENANTS = 3
GRANTS_PER_TASK = 50
SCHED_ROUNDS = 5

# Part 2: the gateway
ONE_VARIANT_MODEL = "fake-model"  # bench/run.py's engine `fake`: one variant, no ctx size
SIZED_ENGINE = "fake-sized"
SIZED_MODEL = "fake-sized"
SIZED_CTX = (4096, 8192)  # the prompt fits both: the gateway must pick 4096
FAKE_ENGINE_CTX = max(SIZED_CTX)
GATEWAY_SLOTS = "64"  # as run.py: the fair queue never holds anything back

# Part 3: swaps
OWN_HEALTH_POLL = 0.01  # seconds between /health probes when we start the engine ourselves
STOP_GRACE = 10.0

T = TypeVar("T")


def mean_min_max(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop (what the gateway serves on) if installed; SIGTERM cancels it
    like Ctrl-C, so its finally blocks stop what it started."""

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        import uvloop
    except ImportError:
        runner: Callable[[Coroutine[Any, Any, T]], T] = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# --- 1. scheduling overhead ------------------------------------------------------------


def new_scheduler() -> Any:
    from apps.engines.scheduler import Scheduler  # pure asyncio: no Django needed

    return Scheduler()


def slot_request(tenant: str, *, max_queue: int) -> Any:
    from apps.engines.scheduler import SlotRequest

    return SlotRequest(
        SCHED_KEY, replicas=1, slots=SCHED_SLOTS, tenant=tenant, max_queue=max_queue, max_wait=60.0
    )


async def scheduler_pairs(n: int) -> float:
    """µs per uncontended acquire + release on a fresh Scheduler."""
    scheduler = new_scheduler()
    acquire, release = scheduler.acquire, scheduler.release
    start = time.perf_counter()
    for _ in range(n):
        placement = await acquire(slot_request("t0", max_queue=n))  # one per request, as /v1
        release(placement)
    return (time.perf_counter() - start) / n * 1e6


async def semaphore_pairs(n: int) -> float:
    """µs per uncontended acquire + release of an asyncio.Semaphore (the baseline)."""
    semaphore = asyncio.Semaphore(SCHED_SLOTS)
    acquire, release = semaphore.acquire, semaphore.release
    start = time.perf_counter()
    for _ in range(n):
        await acquire()
        release()
    return (time.perf_counter() - start) / n * 1e6


async def contended(hold: Callable[[str], Awaitable[None]]) -> float:
    """µs per grant: CONTENDED_TASKS tasks of CONTENDED_TENANTS tenants, each taking a slot
    GRANTS_PER_TASK times and holding it for one event-loop turn."""

    async def worker(i: int) -> None:
        tenant = f"t{i % CONTENDED_TENANTS}"
        for _ in range(GRANTS_PER_TASK):
            await hold(tenant)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONTENDED_TASKS)))
    return (time.perf_counter() - start) / (CONTENDED_TASKS * GRANTS_PER_TASK) * 1e6


async def scheduler_contended() -> float:
    scheduler = new_scheduler()

    async def hold(tenant: str) -> None:
        placement = await scheduler.acquire(slot_request(tenant, max_queue=CONTENDED_TASKS))
        try:
            await asyncio.sleep(0)
        finally:
            scheduler.release(placement)

    return await contended(hold)


async def semaphore_contended() -> float:
    semaphore = asyncio.Semaphore(SCHED_SLOTS)

    async def hold(tenant: str) -> None:
        async with semaphore:
            await asyncio.sleep(0)

    return await contended(hold)


async def scheduling_rounds() -> dict[str, list[float]]:
    """Interleaved rounds, so drift in the machine's load hits both sides alike."""
    samples: dict[str, list[float]] = {k: [] for k in ("sched", "sem", "sched_c", "sem_c")}
    for _ in range(SCHED_ROUNDS):
        samples["sched"].append(await scheduler_pairs(UNCONTENDED_PAIRS))
        samples["sem"].append(await semaphore_pairs(UNCONTENDED_PAIRS))
        samples["sched_c"].append(await scheduler_contended())
        samples["sem_c"].append(await semaphore_contended())
    return samples


def comparison(measured: list[float], baseline: list[float]) -> dict[str, Any]:
    """Medians of the rounds, their ratio and difference."""
    ours, base = statistics.median(measured), statistics.median(baseline)
    return {
        "scheduler_us": ours,
        "semaphore_us": base,
        "ratio": ours / base if base else 0.0,
        "added_us": ours - base,
        "rounds_scheduler_us": measured,
        "rounds_semaphore_us": baseline,
    }


def bench_scheduling() -> dict[str, Any]:
    note(f"1) scheduling: {SCHED_ROUNDS} interleaved rounds on {loop_name()} ...")
    samples = run_async(scheduling_rounds())
    return {
        "loop": loop_name(),
        "uncontended": {
            "pairs_per_round": UNCONTENDED_PAIRS,
            **comparison(samples["sched"], samples["sem"]),
        },
        "contended": {
            "tasks": CONTENDED_TASKS,
            "tenants": CONTENDED_TENANTS,
            "slots": SCHED_SLOTS,
            "grants_per_round": CONTENDED_TASKS * GRANTS_PER_TASK,
            **comparison(samples["sched_c"], samples["sem_c"]),
        },
    }


def print_scheduling(data: dict[str, Any]) -> None:
    print(f"\n1) scheduling overhead, in-process ({data['loop']}, median of {SCHED_ROUNDS} rounds)")
    header = f"{'':<52} {'Scheduler':>10} {'Semaphore':>10} {'ratio':>7} {'added':>8}"
    print(header)
    print("-" * len(header))
    rows = (
        ("uncontended acquire+release pair, µs", data["uncontended"]),
        (
            f"contended ({CONTENDED_TASKS} tasks, {CONTENDED_TENANTS} tenants, "
            f"{SCHED_SLOTS} slots), µs/grant",
            data["contended"],
        ),
    )
    for title, row in rows:
        print(
            f"{title:<52} {row['scheduler_us']:10.2f} {row['semaphore_us']:10.2f} "
            f"{row['ratio']:7.2f} {row['added_us']:+8.2f}"
        )


# --- 2. variant selection through the gateway -----------------------------------------


def chat_body(model: str, **extra: Any) -> str:
    """The body of bench/run.py's scenario a) (non-streaming, instant), for `model`."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "fake": {"chunks": 5},
        **extra,
    }
    return json.dumps(body, separators=(",", ":"))


def smoke(url: str, body: str, api_key: str) -> None:
    status, content = post(url + "/v1/chat/completions", body, api_key)
    if status != 200 or b'"choices"' not in content:
        raise BenchError(f"smoke request to {url} failed: HTTP {status}\n{content[:500]!r}")


def check_sizing_active(url: str, api_key: str) -> None:
    """With two variants the gateway itself must refuse what fits neither (else it is not
    choosing, and the two-variant figure would measure nothing)."""
    body = chat_body(SIZED_MODEL, max_tokens=FAKE_ENGINE_CTX * 4)
    status, content = post(url + "/v1/chat/completions", body, api_key)
    if status != 400 or b"context_length_exceeded" not in content:
        raise BenchError(
            f"the gateway did not size the two-variant request: HTTP {status}\n{content[:500]!r}"
        )


def setup_gateway(engine_url: str) -> tuple[Gateway, str]:
    """bench/run.py's setup (tenant, key, engine `fake` with one variant of fake-model),
    plus engine `fake-sized` serving fake-sized with one variant per SIZED_CTX."""
    gateway = Gateway(engine_url)
    gateway.log_path = GATEWAY_LOG
    note(f"setting up the gateway in {DATA_DIR.relative_to(REPO)} (migrate, tenant, key)")
    api_key = gateway.setup(limits=False)
    for ctx in SIZED_CTX:
        gateway.manage(
            "add_engine",
            SIZED_ENGINE,
            "--base-url",
            engine_url,
            "--model",
            SIZED_MODEL,
            "--ctx-size",
            str(ctx),
            "--slots",
            GATEWAY_SLOTS,
        )
    return gateway, api_key


def wrk_measure(url: str, body: str, api_key: str, args: argparse.Namespace) -> WrkResult:
    smoke(url, body, api_key)
    target = url + "/v1/chat/completions"
    run_wrk(target, body, api_key, WARMUP_SECONDS, args.connections)
    return run_wrk(target, body, api_key, args.duration, args.connections)


def sizing_warnings() -> int:
    """Lines where sizing fell back to the heuristic (the engine was not asked)."""
    with contextlib.suppress(OSError):
        return GATEWAY_LOG.read_text(errors="replace").count("sizing on")
    return 0


def selection_summary(results: dict[str, WrkResult]) -> dict[str, Any]:
    direct, one, two = results["direct"], results["one_variant"], results["two_variants"]
    return {
        "targets": {name: result_dict(r) for name, r in results.items()},
        "ratio_to_direct": {
            name: r.rps / direct.rps if direct.rps else 0.0 for name, r in results.items()
        },
        "two_over_one_rps_ratio": two.rps / one.rps if one.rps else 0.0,
        "two_over_one_added_p50_ms": two.p50_ms - one.p50_ms,
        "two_over_one_added_p99_ms": two.p99_ms - one.p99_ms,
        "sizing_fallbacks_logged": sizing_warnings(),
        "valid": all(r.error_count == 0 for r in results.values()),
    }


def bench_selection(args: argparse.Namespace) -> dict[str, Any]:
    engine = FakeEngineProcess()
    gateway: Gateway | None = None
    try:
        engine.start(
            "--no-record", "--model", ONE_VARIANT_MODEL, "--ctx-size", str(FAKE_ENGINE_CTX)
        )
        note(f"2) variant selection: fake engine at {engine.url}")
        gateway, api_key = setup_gateway(engine.url)
        gateway.start()
        note(f"gateway at {gateway.url} (log: {GATEWAY_LOG.relative_to(REPO)})")
        check_sizing_active(gateway.url, api_key)
        plan = (
            ("direct", engine.url, ONE_VARIANT_MODEL, ""),
            ("one_variant", gateway.url, ONE_VARIANT_MODEL, api_key),
            ("two_variants", gateway.url, SIZED_MODEL, api_key),
        )
        results: dict[str, WrkResult] = {}
        for name, url, model, key in plan:
            note(f"2) {name} ...")
            results[name] = wrk_measure(url, chat_body(model), key, args)
    finally:
        if gateway is not None:
            gateway.stop()
        engine.stop()
    return {
        "duration_s": args.duration,
        "connections": args.connections,
        **selection_summary(results),
    }


def print_selection(data: dict[str, Any]) -> None:
    print(
        f"\n2) variant selection through the gateway (non-streaming, "
        f"{data['connections']} connections, {data['duration_s']} s each)"
    )
    header = f"{'target':<40} {'r/s':>8} {'ratio':>7}  {'p50/p99 ms':>16}  {'errors':>6}"
    print(header)
    print("-" * len(header))
    titles = {
        "direct": "direct (fake engine)",
        "one_variant": "gateway, 1 variant (no sizing)",
        "two_variants": f"gateway, 2 variants {SIZED_CTX} (sized)",
    }
    for name, title in titles.items():
        r = data["targets"][name]
        print(
            f"{title:<40} {r['rps']:8.0f} {data['ratio_to_direct'][name]:7.3f}  "
            f"{fmt_pair(r['p50_ms'], r['p99_ms']):>16}  {r['error_count']:>6}"
        )
    print(
        f"2 variants vs 1: r/s ratio {data['two_over_one_rps_ratio']:.3f}, added p50/p99 "
        f"{data['two_over_one_added_p50_ms']:+.2f} / {data['two_over_one_added_p99_ms']:+.2f} ms"
    )
    if data["sizing_fallbacks_logged"]:
        print(f"  note: {data['sizing_fallbacks_logged']} sizing fallbacks to the heuristic logged")
    if not data["valid"]:
        print("  INVALID: errors during the load (numbers above are not comparable)")


# --- 3. swaps: Django and the managed engines ------------------------------------------


def setup_django() -> None:
    """Django on var/bench's own embedded PostgreSQL (never the developer's database)."""
    os.environ["DATA_DIR"] = str(DATA_DIR)
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("MODELS_DIR", str(INSTALLED_MODELS_DIR))  # what test_real_llama reads
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", "--no-input", verbosity=0)


@dataclass(frozen=True)
class SwapEngine:
    """A managed engine to swap between two variants, and how to start it ourselves."""

    label: str
    engine_name: str
    model: str
    template: str
    models_dir: Path
    model_path: str
    ctx_sizes: tuple[int, int]
    startup_timeout: float


@dataclass(frozen=True)
class Prepared:
    engine_id: int
    slots: int
    variant_ids: tuple[int, int]  # in ctx_sizes order


def fake_swap_engine() -> SwapEngine:
    from tests.engines.manager_helpers import FAKE_TEMPLATE

    return SwapEngine(
        label="fake engine",
        engine_name="bench-swap-fake",
        model="bench-swap-fake",  # not fake-model: part 2's one-variant model stays at one
        template=FAKE_TEMPLATE,
        models_dir=BENCH_MODELS_DIR,
        model_path="",
        ctx_sizes=(1024, 2048),
        startup_timeout=30.0,
    )


def real_swap_engine() -> tuple[SwapEngine | None, str]:
    """The real llama-server engine, or None and why it cannot run here."""
    try:
        from tests.engines.test_real_llama import MODEL_FILE, TEMPLATE, unusable_reason
    except ImportError as exc:
        return None, f"tests/engines/test_real_llama.py cannot be imported: {exc}"
    reason = unusable_reason()
    if reason:
        return None, reason
    engine = SwapEngine(
        label="llama-server",
        engine_name="bench-swap-llama",
        model="bench-swap-gemma",
        template=TEMPLATE,
        models_dir=INSTALLED_MODELS_DIR,
        model_path=MODEL_FILE,
        ctx_sizes=(1024, 2048),
        startup_timeout=60.0,
    )
    return engine, ""


def use_models_dir(path: Path) -> None:
    from django.conf import settings

    path.mkdir(parents=True, exist_ok=True)
    settings.MODELS_DIR = path.resolve()


def prepare(spec: SwapEngine) -> Prepared:
    """Register the engine with one variant per context size (idempotent)."""
    from django.db import connections

    from apps.engines.models import Engine
    from apps.engines.services import engine_register_managed

    use_models_dir(spec.models_dir)
    for ctx in spec.ctx_sizes:
        engine_register_managed(
            name=spec.engine_name,
            command_template=spec.template,
            models=[spec.model],
            ctx_size=ctx,
            model_path=spec.model_path,
            startup_timeout_seconds=spec.startup_timeout,
        )
    engine = Engine.objects.get(name=spec.engine_name)
    by_ctx = {v.ctx_size: v.pk for v in engine.variants.filter(model__name=spec.model)}
    connections.close_all()  # the manager's own threads open theirs
    return Prepared(engine.pk, engine.slots, (by_ctx[spec.ctx_sizes[0]], by_ctx[spec.ctx_sizes[1]]))


def engine_argv(spec: SwapEngine, slots: int, ctx: int, port: int) -> list[str]:
    """The argv the manager would run for this variant on `port`."""
    from apps.engines.launch import LaunchSpec, render_command

    launch = LaunchSpec(
        command_template=spec.template,
        port=port,
        slots=slots,
        ctx_size=ctx,
        model_path=spec.model_path,
        extra_args="",
    )
    return render_command(launch)


async def healthy(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


async def wait_healthy(proc: asyncio.subprocess.Process, url: str, within: float) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as http:
        while not await healthy(http, url):
            if proc.returncode is not None:
                raise BenchError(f"engine exited with {proc.returncode} (see {OWN_START_LOG})")
            if time.monotonic() > deadline:
                raise BenchError(f"engine not healthy at {url} after {within:g} s")
            await asyncio.sleep(OWN_HEALTH_POLL)


async def stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the engine's process group, SIGKILL after the grace (as the manager)."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), wait)


async def own_start(spec: SwapEngine, slots: int, ctx: int) -> tuple[float, float]:
    """(seconds from spawn to /health 200, seconds from SIGTERM to exit), no manager."""
    port = free_port()
    argv = engine_argv(spec, slots, ctx, port)
    with OWN_START_LOG.open("ab") as log:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        await wait_healthy(proc, f"http://127.0.0.1:{port}/health", spec.startup_timeout)
        start_s = time.perf_counter() - started
    finally:
        stopping = time.perf_counter()
        await stop_group(proc)
    return start_s, time.perf_counter() - stopping


async def served_ctx(base_url: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(base_url + "/props", timeout=aiohttp.ClientTimeout(total=10)) as resp,
    ):
        props = await resp.json(content_type=None)
    return props["default_generation_settings"]["n_ctx"]


async def timed_acquire(manager: Any, engine_id: int, variant_id: int, ctx: int) -> float:
    """Seconds until the manager admits a request for the variant; checks it runs it."""
    started = time.perf_counter()
    async with manager.acquire(engine_id=engine_id, variant_id=variant_id) as lease:
        elapsed = time.perf_counter() - started
        served = await served_ctx(lease.base_url)
    if served != ctx:
        raise BenchError(f"the manager served n_ctx {served}, expected {ctx}")
    return elapsed


async def cold_start(prepared: Prepared, which: int, ctx: int) -> float:
    """A fresh manager (connection open, nothing owned): the first acquire's wait."""
    from apps.engines.manager import EngineManager

    manager = EngineManager()
    await manager.start()
    try:
        await manager.control.ping()
        return await timed_acquire(manager, prepared.engine_id, prepared.variant_ids[which], ctx)
    finally:
        await manager.shutdown()


async def swap_series(prepared: Prepared, spec: SwapEngine, swaps: int) -> list[float]:
    """Start variant A, then `swaps` alternating swaps B, A, B, ... with nothing in flight."""
    from apps.engines.manager import EngineManager

    manager = EngineManager()
    await manager.start()
    times: list[float] = []
    try:
        await timed_acquire(manager, prepared.engine_id, prepared.variant_ids[0], spec.ctx_sizes[0])
        for i in range(1, swaps + 1):
            which = i % 2
            ctx = spec.ctx_sizes[which]
            times.append(
                await timed_acquire(manager, prepared.engine_id, prepared.variant_ids[which], ctx)
            )
        if manager.launches != swaps + 1:
            raise BenchError(f"{manager.launches} launches for {swaps} swaps: not all swapped")
    finally:
        await manager.shutdown()
    return times


async def measure_swaps(
    spec: SwapEngine, prepared: Prepared, starts: int, swaps: int
) -> dict[str, list[float]]:
    await own_start(spec, prepared.slots, spec.ctx_sizes[0])  # warm-up: caches, imports
    own: list[tuple[float, float]] = []
    cold: list[float] = []
    for i in range(starts):  # alternating variants, own start next to the manager's
        which = i % 2
        ctx = spec.ctx_sizes[which]
        own.append(await own_start(spec, prepared.slots, ctx))
        cold.append(await cold_start(prepared, which, ctx))
    return {
        "own_start_s": [s for s, _ in own],
        "own_stop_s": [s for _, s in own],
        "cold_start_s": cold,
        "swap_s": await swap_series(prepared, spec, swaps),
    }


def poll_delay(ready_s: float) -> float:
    """How long after the engine is ready (`ready_s` after spawn) the manager's health
    polling (engine_process.EngineProcess.wait_healthy) first probes it, ignoring probe time."""
    from apps.engines.engine_process import _HEALTH_POLL_MAX, _HEALTH_POLL_START

    probe, interval = 0.0, _HEALTH_POLL_START
    while probe < ready_s:
        probe += interval
        interval = min(interval * 1.5, _HEALTH_POLL_MAX)
    return probe - ready_s


def swap_summary(spec: SwapEngine, samples: dict[str, list[float]]) -> dict[str, Any]:
    ms = {name: mean_min_max([v * 1000 for v in values]) for name, values in samples.items()}
    own, stop = ms["own_start_s"]["mean"], ms["own_stop_s"]["mean"]
    cold, swap = ms["cold_start_s"]["mean"], ms["swap_s"]["mean"]
    return {
        "engine": asdict(spec) | {"models_dir": str(spec.models_dir)},
        "ms": {name.removesuffix("_s") + "_ms": value for name, value in ms.items()},
        "samples_s": samples,
        "manager_cold_start_cost_ms": cold - own,
        "health_poll_granularity_ms": statistics.fmean(
            poll_delay(v) * 1000 for v in samples["own_start_s"]
        ),
        "swap_beyond_start_ms": swap - cold,
        "swap_beyond_own_stop_and_start_ms": swap - stop - own,
    }


def bench_swaps(spec: SwapEngine, args: argparse.Namespace) -> dict[str, Any]:
    note(
        f"3) swaps, {spec.label}: {args.starts} own starts, {args.starts} cold starts, "
        f"{args.swaps} swaps ..."
    )
    prepared = prepare(spec)
    samples = run_async(measure_swaps(spec, prepared, args.starts, args.swaps))
    return swap_summary(spec, samples)


def print_swaps(data: dict[str, Any]) -> None:
    engine = data["engine"]
    a, b = engine["ctx_sizes"]
    print(f"\n3) swaps, {engine['label']} (variants ctx {a} and {b}, nothing in flight)")
    header = f"{'':<52} {'mean':>9} {'min':>9} {'max':>9} {'n':>4}"
    print(header)
    print("-" * len(header))
    rows = (
        ("engine's own start (spawn -> /health 200), ms", "own_start"),
        ("engine's own stop (SIGTERM -> exit), ms", "own_stop"),
        ("manager cold start (first acquire), ms", "cold_start"),
        (f"manager swap {a}<->{b} (acquire other variant), ms", "swap"),
    )
    for title, key in rows:
        s = data["ms"][key + "_ms"]
        n = len(data["samples_s"][key + "_s"])
        print(f"{title:<52} {s['mean']:9.1f} {s['min']:9.1f} {s['max']:9.1f} {n:>4}")
    print(
        f"manager's cost of a cold start: {data['manager_cold_start_cost_ms']:+.1f} ms "
        "(mean cold start - mean own start)"
    )
    print(
        f"  of which health-poll granularity, estimated: {data['health_poll_granularity_ms']:+.1f} ms"
    )
    print(
        f"swap adds {data['swap_beyond_start_ms']:+.1f} ms beyond the start "
        "(mean swap - mean cold start)"
    )
    print(
        f"swap beyond the engine's own stop + start: "
        f"{data['swap_beyond_own_stop_and_start_ms']:+.1f} ms"
    )


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (part 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (part 2)")
    parser.add_argument("--starts", type=int, default=4, help="cold starts per engine (part 3)")
    parser.add_argument("--swaps", type=int, default=6, help="swaps per engine (part 3)")
    parser.add_argument("--skip-real", action="store_true", help="no real llama-server run")
    parser.add_argument("--parts", default="123", help="which parts to run, e.g. '13'")
    args = parser.parse_args(argv)
    if args.starts < 1 or args.swaps < 1:
        parser.error("--starts and --swaps must be at least 1")
    return args


def run_swaps(args: argparse.Namespace, results: dict[str, Any]) -> None:
    setup_django()
    # Before the fake run points MODELS_DIR elsewhere: test_real_llama reads it at import.
    spec, reason = (None, "--skip-real") if args.skip_real else real_swap_engine()
    results["swaps"] = {"fake": bench_swaps(fake_swap_engine(), args)}
    print_swaps(results["swaps"]["fake"])
    if spec is None:
        results["swaps"]["real_skipped"] = reason
        print(f"\n3) swaps, llama-server: skipped ({reason})")
        return
    results["swaps"]["real"] = bench_swaps(spec, args)
    print_swaps(results["swaps"]["real"])


def write_results(results: dict[str, Any], args: argparse.Namespace) -> None:
    document = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "args": vars(args),
        **results,
    }
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")
    note(f"results written to {RESULTS_FILE.relative_to(REPO)}")


def run(args: argparse.Namespace) -> int:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if "1" in args.parts:
        results["scheduling"] = bench_scheduling()
        print_scheduling(results["scheduling"])
    if "2" in args.parts:
        results["selection"] = bench_selection(args)
        print_selection(results["selection"])
    if "3" in args.parts:
        run_swaps(args, results)
    print()
    write_results(results, args)
    return 0 if results.get("selection", {}).get("valid", True) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(run, args, needs_wrk="2" in args.parts)


if __name__ == "__main__":
    sys.exit(main())
