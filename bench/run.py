"""Overhead benchmark: the same load through the gateway and straight to the engine.

Run from the repo root:  python bench/run.py [--duration 10] [--connections 50]

It starts the fake engine (tests/fake_engine.py) and a gateway on its own data dir
(var/bench, with its own embedded PostgreSQL), drives both with wrk and compares them
per scenario against the budgets below. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import safety as bench_safety  # noqa: E402
from tests.fake_engine import FakeEngineProcess  # noqa: E402  (needs the repo on sys.path)

BENCH_DIR = REPO / "bench"
DATA_DIR = REPO / "var" / "bench"
LUA_SCRIPT = BENCH_DIR / "post.lua"
RESULTS_FILE = DATA_DIR / "results.json"
MODEL = "fake-model"
THREADS = 2
WARMUP_SECONDS = 2
HEALTH_TIMEOUT_SECONDS = 60.0
MANAGE_TIMEOUT_SECONDS = 300.0
FULL_SESSIONS_PER_THREAD = 250  # --full: 500 sessions in all, as the performance issue ran


class BenchError(Exception):
    """The benchmark cannot run; the message says why."""


# --- scenarios and budgets -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
    text: str
    check: Callable[[Comparison], bool]


PLAIN, FULL = "plain", "full"  # the gateway alone; + quota, rate limit and sessions


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    stream: bool
    fake: dict[str, Any]
    budgets: dict[str, Budget]  # by pipeline mode (PLAIN, FULL)

    def body(self) -> str:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "fake": self.fake,
        }
        if self.stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    # CPU time per request of the target's own processes over the run, in microseconds
    # ("server", and "postgres" for the gateway): steadier than req/s on a noisy host.
    cpu_us: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclasses.dataclass(frozen=True)
class Round:
    """One run of each target, back to back."""

    direct: WrkResult
    gateway: WrkResult
    bare: WrkResult | None = None  # bench/bare_proxy.py: a proxy that only forwards

    @property
    def ratio(self) -> float:
        return self.gateway.rps / self.direct.rps if self.direct.rps else 0.0

    @property
    def bare_ratio(self) -> float | None:
        """Gateway req/s / bare proxy req/s: what the pipeline costs beyond forwarding."""
        if self.bare is None or not self.bare.rps:
            return None
        return self.gateway.rps / self.bare.rps

    @property
    def floor(self) -> WrkResult:
        """What the gateway's latency is compared with: the bare proxy when it ran (the
        same stack doing nothing but forwarding), else the engine itself."""
        return self.bare if self.bare is not None else self.direct

    @property
    def added_p50_ms(self) -> float:
        return self.gateway.p50_ms - self.floor.p50_ms

    @property
    def added_p99_ms(self) -> float:
        return self.gateway.p99_ms - self.floor.p99_ms


def median_result(results: list[WrkResult]) -> WrkResult:
    """Each figure's median over the rounds; requests and errors summed."""
    errors = {k: sum(r.socket_errors.get(k, 0) for r in results) for k in results[0].socket_errors}
    cpu = {
        name: statistics.median(r.cpu_us[name] for r in results if name in r.cpu_us)
        for name in {name for r in results for name in r.cpu_us}
    }
    return WrkResult(
        requests=sum(r.requests for r in results),
        duration_s=sum(r.duration_s for r in results),
        non_2xx=sum(r.non_2xx for r in results),
        socket_errors=errors,
        cpu_us=cpu,
        **{
            name: statistics.median(getattr(r, name) for r in results)
            for name in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")
        },
    )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A scenario's rounds. The host drifts (other tenants of the machine), so each round
    compares targets measured seconds apart, and every figure is the median over rounds
    of that round's ratio or difference, not a ratio of figures taken minutes apart."""

    rounds: list[Round]

    def _median(self, figure: Callable[[Round], float | None]) -> float | None:
        values = [v for v in map(figure, self.rounds) if v is not None]
        return statistics.median(values) if values else None

    @property
    def direct(self) -> WrkResult:
        return median_result([r.direct for r in self.rounds])

    @property
    def gateway(self) -> WrkResult:
        return median_result([r.gateway for r in self.rounds])

    @property
    def bare(self) -> WrkResult | None:
        bares = [r.bare for r in self.rounds if r.bare is not None]
        return median_result(bares) if bares else None

    @property
    def ratio(self) -> float:
        return self._median(lambda r: r.ratio) or 0.0

    @property
    def bare_ratio(self) -> float | None:
        return self._median(lambda r: r.bare_ratio)

    @property
    def added_p50_ms(self) -> float:
        return self._median(lambda r: r.added_p50_ms) or 0.0

    @property
    def added_p99_ms(self) -> float:
        return self._median(lambda r: r.added_p99_ms) or 0.0


def bare_ratio_at_least(floor: float) -> Budget:
    def check(c: Comparison) -> bool:
        return c.bare_ratio is not None and c.bare_ratio >= floor

    return Budget(f"gateway req/s >= {floor:.2f} x bare proxy", check)


ADDED_LATENCY = Budget(
    "added p50 <= 2 ms and added p99 <= 20 ms over the bare proxy",
    lambda c: c.bare is not None and c.added_p50_ms <= 2.0 and c.added_p99_ms <= 20.0,
)

# Every budget is relative to bench/bare_proxy.py measured in the same run: the engine's
# own speed differs several-fold between machines, so a ratio to it measures the engine.
SCENARIOS = [
    Scenario(
        "a",
        "non-streaming, instant",
        stream=False,
        fake={"chunks": 5},
        budgets={PLAIN: bare_ratio_at_least(0.90), FULL: bare_ratio_at_least(0.60)},
    ),
    Scenario(
        "b",
        "stream 20 chunks, instant",
        stream=True,
        fake={"chunks": 20},
        budgets={PLAIN: bare_ratio_at_least(0.85), FULL: bare_ratio_at_least(0.55)},
    ),
    Scenario(
        "c",
        "stream 20 chunks, 10 ms apart",
        stream=True,
        fake={"chunks": 20, "chunk_delay": 0.01},
        budgets={PLAIN: ADDED_LATENCY, FULL: ADDED_LATENCY},
    ),
]


def pipeline_mode(args: argparse.Namespace) -> str:
    """FULL when any of the per-request stages that write to PostgreSQL are on."""
    return FULL if args.limits or args.sessions else PLAIN


# --- wrk -------------------------------------------------------------------------------


def run_wrk(
    url: str, body: str, api_key: str, duration: int, connections: int, sessions: int = 0
) -> WrkResult:
    """One wrk run; numbers come from the Lua done() hook, not from scraping wrk's text."""
    cmd = [
        "wrk",
        f"-t{THREADS}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        # wrk's default 2 s would count slow responses as errors, hiding real latency.
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    env = {**os.environ, "BENCH_BODY": body, "BENCH_KEY": api_key}
    env |= {"BENCH_SESSIONS": str(sessions), "BENCH_RUN": secrets.token_hex(4)}
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return parse_wrk_json(json.loads(line[len("BENCH_JSON ") :]))
    raise BenchError(f"wrk gave no summary (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")


def parse_wrk_json(data: dict[str, Any]) -> WrkResult:
    duration_s = data["duration_us"] / 1e6
    latency = data["latency_us"]
    errors = data["errors"]
    return WrkResult(
        requests=data["requests"],
        duration_s=duration_s,
        rps=data["requests"] / duration_s if duration_s else 0.0,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        non_2xx=errors["status"],
        socket_errors={k: errors[k] for k in ("connect", "read", "write", "timeout")},
    )


# --- CPU per request ----------------------------------------------------------------------

CpuProbe = Callable[[], dict[str, float]]  # cumulative CPU seconds, per process group


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU of the processes that are still there (others count 0)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def process_probe(pid: int) -> CpuProbe:
    process = psutil.Process(pid)
    return lambda: {"server": cpu_seconds([process])}


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The embedded PostgreSQL serving `data_dir` and its backends right now."""
    marker = str(data_dir / "postgres")
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "-D" in cmdline and marker in cmdline:
            with contextlib.suppress(psutil.Error):
                return [process, *process.children(recursive=True)]
    return []


def gateway_probe(pid: int, data_dir: Path) -> CpuProbe:
    server = psutil.Process(pid)
    return lambda: {
        "server": cpu_seconds([server]),
        "postgres": cpu_seconds(postgres_processes(data_dir)),
    }


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    api_key: str = ""  # only the gateway has one, and only the gateway keeps sessions
    cpu: CpuProbe | None = None

    @property
    def url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    def run(self, scenario: Scenario, seconds: int, args: argparse.Namespace) -> WrkResult:
        sessions = args.sessions if self.api_key else 0
        before = self.cpu() if self.cpu else {}
        result = run_wrk(
            self.url, scenario.body(), self.api_key, seconds, args.connections, sessions
        )
        if not self.cpu or not result.requests:
            return result
        after = self.cpu()
        per_request = {name: (after[name] - before[name]) / result.requests * 1e6 for name in after}
        return dataclasses.replace(result, cpu_us=per_request)


def measure_scenario(
    scenario: Scenario, targets: list[Target], args: argparse.Namespace
) -> dict[str, list[WrkResult]]:
    """Per target name, one result per round. Every target gets a smoke request and a
    warm-up (pools and caches filled, so the rounds see steady state) before the first."""
    for target in targets:
        smoke_test(target.url, scenario, target.api_key)
        target.run(scenario, WARMUP_SECONDS, args)
    results: dict[str, list[WrkResult]] = {target.name: [] for target in targets}
    for round_ in range(1, args.rounds + 1):
        note(f"{scenario.key}) {scenario.title}: round {round_}/{args.rounds}")
        for target in targets:
            results[target.name].append(target.run(scenario, args.duration, args))
    return results


# --- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: str, api_key: str = "") -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def smoke_test(url: str, scenario: Scenario, api_key: str) -> None:
    """One request before the load, so a misconfiguration fails with its real answer."""
    status, content = post(url, scenario.body(), api_key)
    complete = b"data: [DONE]" in content if scenario.stream else b'"choices"' in content
    if status != 200 or not complete:
        raise BenchError(f"smoke request to {url} failed: HTTP {status}\n{content[:500]!r}")


class Gateway:
    """The gateway on its own DATA_DIR, set up through its management commands."""

    def __init__(self, engine_url: str, *, data_dir: Path = DATA_DIR) -> None:
        self.engine_url = engine_url
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "gateway.log"
        self.env = {**os.environ, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING"}
        # Unset so settings start the embedded PostgreSQL under DATA_DIR and never reach
        # the developer's database or cache.
        self.env.pop("DATABASE_URL", None)
        self.env.pop("REDIS_URL", None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=MANAGE_TIMEOUT_SECONDS,
            check=False,
        )
        if check and proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            hint = (
                " (is that management command written yet?)" if "Unknown command" in output else ""
            )
            raise BenchError(f"manage.py {args[0]} failed{hint}:\n{output}")
        return proc

    def setup(self, *, limits: bool, ctx_size: int | None = None) -> str:
        """Migrate, create tenant, key and engine; return the raw API key.

        With `limits`, the tenant gets a token quota and a rate limit too (both far above
        what the run uses), so every request also reserves and settles in PostgreSQL.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.manage("migrate", "--no-input")
        tenant = self.manage("create_tenant", "bench", check=False)
        output = (tenant.stdout + tenant.stderr).strip()
        if tenant.returncode != 0 and "already exists" not in output:
            # Not fatal: create_api_key below fails clearly if the tenant is really missing.
            note(f"create_tenant bench: {output[-300:]}")
        key_out = self.manage("create_api_key", "bench", "--name", f"bench-{secrets.token_hex(4)}")
        lines = key_out.stdout.strip().splitlines()
        api_key = lines[-1].strip() if lines else ""
        if not api_key.startswith("sk-"):
            raise BenchError(f"create_api_key printed no sk-... key:\n{key_out.stdout}")
        # As many slots as connections: the fair queue never holds anything back, so the
        # run measures the pipeline's overhead, not queueing (direct calls have none).
        engine = ["add_engine", "fake", "--base-url", self.engine_url, "--model", MODEL]
        engine += ["--slots", "64"] + (["--ctx-size", str(ctx_size)] if ctx_size else [])
        self.manage(*engine)
        tokens, rpm = ("1000000000000", "10000000") if limits else ("0", "0")
        self.manage("set_quota", "bench", "--tokens", tokens, "--period", "day")
        self.manage("set_rate_limit", "bench", "--rpm", rpm)
        return api_key

    def start(self) -> None:
        cmd = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        with self.log_path.open("wb") as log:
            # Own session: Ctrl-C reaches only us, and stop() can end the server's
            # whole process group (it may fork workers) in order.
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.25)
        raise BenchError(
            f"gateway not healthy after {HEALTH_TIMEOUT_SECONDS:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGINT, not SIGTERM: uvicorn re-raises the signal it caught after shutting down,
        # and only SIGINT (as KeyboardInterrupt) lets atexit run, which releases the
        # embedded PostgreSQL; after SIGTERM the database server is left running.
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            self._signal_group(proc, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                return

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The group id is the pid we started (start_new_session), so this reaches only it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


@dataclasses.dataclass(frozen=True)
class Served:
    gateway: Gateway
    api_key: str  # the `bench` tenant's
    prepared: Any = None  # what `prepare` returned


def fake_engine(*args: str) -> FakeEngineProcess:
    """The fake engine serving MODEL, started (`args`: more of its options); `with` it so
    that it stops when the benchmark ends, Ctrl-C included."""
    engine = FakeEngineProcess().start("--no-record", "--model", MODEL, *args)
    note(f"fake engine at {engine.url}")
    return engine


@contextlib.contextmanager
def running_gateway(
    engine_url: str,
    *,
    limits: bool,
    ctx_size: int | None = None,
    prepare: Callable[[Gateway], Any] | None = None,
    env: dict[str, str] | None = None,
    data_dir: Path = DATA_DIR,
) -> Iterator[Served]:
    """Every bench script's gateway: set up on DATA_DIR (its embedded PostgreSQL migrated,
    tenant `bench`, a key, engine `fake` at `engine_url`; see Gateway.setup), then
    `prepare`d (more tenants, rules: before serving, so the server starts with them),
    served and healthy for the block, and stopped after it, Ctrl-C included. `env` adds to
    the gateway's environment; `data_dir` is a script's own, when what it sets up (a
    context size) must not meet another script's engine and sessions."""
    gateway = Gateway(engine_url, data_dir=data_dir)
    gateway.env |= env or {}
    try:
        note(f"setting up the gateway in {data_dir.relative_to(REPO)} (migrate, tenant, key)")
        api_key = gateway.setup(limits=limits, ctx_size=ctx_size)
        prepared = prepare(gateway) if prepare is not None else None
        gateway.start()
        note(f"gateway at {gateway.url} (log: {gateway.log_path.relative_to(REPO)})")
        yield Served(gateway, api_key, prepared)
    finally:
        gateway.stop()


class BareProxy:
    """bench/bare_proxy.py under uvicorn (uvloop, httptools), one worker like the gateway."""

    def __init__(self, engine_url: str) -> None:
        self.port = free_port()
        self.env = {**os.environ, "BARE_ENGINE_URL": engine_url}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", "bench.bare_proxy:application", "--port"]
        cmd += [str(self.port), "--loop", "uvloop", "--http", "httptools", "--lifespan", "off"]
        cmd += ["--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, start_new_session=True)
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.1)
        raise BenchError("the bare proxy did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()


# --- report --------------------------------------------------------------------------


def note(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def fmt_pair(a: float, b: float) -> str:
    return f"{a:6.2f} /{b:7.2f}"


def label(scenario: Scenario) -> str:
    return f"{scenario.key + ') ' + scenario.title:<33}"


def print_block(header: str, lines: Iterable[str]) -> None:
    """A table: its header, a rule as wide, its lines, a blank line."""
    print(header)
    print("-" * len(header))
    for line in lines:
        print(line)
    print()


def print_table(rows: list[tuple[Scenario, Comparison]]) -> None:
    header = (
        f"{'scenario':<33} {'direct r/s':>10} {'bare r/s':>8} {'gateway r/s':>11} "
        f"{'ratio':>6} {'gw/bare':>7}  "
        f"{'direct p50/p99 ms':>17}  {'gateway p50/p99 ms':>18}  {'+bare p50/p99 ms':>16}  "
        f"{'errors d/g':>10}"
    )
    print()
    print_block(header, (comparison_line(scenario, c) for scenario, c in rows))
    print_cpu_table(rows)


def comparison_line(scenario: Scenario, c: Comparison) -> str:
    errors = f"{c.direct.error_count}/{c.gateway.error_count}"
    bare = f"{c.bare.rps:8.0f}" if c.bare else f"{'-':>8}"
    bare_ratio = f"{c.bare_ratio:7.3f}" if c.bare_ratio is not None else f"{'-':>7}"
    return (
        f"{label(scenario)} {c.direct.rps:10.0f} {bare} "
        f"{c.gateway.rps:11.0f} {c.ratio:6.3f} {bare_ratio}  "
        f"{fmt_pair(c.direct.p50_ms, c.direct.p99_ms):>17}  "
        f"{fmt_pair(c.gateway.p50_ms, c.gateway.p99_ms):>18}  "
        f"{fmt_pair(c.added_p50_ms, c.added_p99_ms):>16}  {errors:>10}"
    )


def print_cpu_table(rows: list[tuple[Scenario, Comparison]]) -> None:
    """CPU per request of each target's own processes: the engine (direct), the bare proxy,
    the gateway and its PostgreSQL."""

    def cell(result: WrkResult | None, name: str, width: int) -> str:
        value = result.cpu_us.get(name) if result else None
        return f"{value:{width}.0f}" if value is not None else f"{'-':>{width}}"

    header = (
        f"{'CPU us per request':<33} {'engine':>7} {'bare':>7} {'gateway':>8} {'its postgres':>12}"
    )
    print_block(
        header,
        (
            f"{label(scenario)} {cell(c.direct, 'server', 7)} {cell(c.bare, 'server', 7)} "
            f"{cell(c.gateway, 'server', 8)} {cell(c.gateway, 'postgres', 12)}"
            for scenario, c in rows
        ),
    )


def print_direct_table(rows: list[tuple[Scenario, WrkResult]]) -> None:
    header = f"{'scenario':<33} {'direct r/s':>10}  {'p50/p99 ms':>16}  {'errors':>6}"
    print()
    print_block(
        header,
        (
            f"{label(scenario)} {r.rps:10.0f}  {fmt_pair(r.p50_ms, r.p99_ms):>16}  "
            f"{r.error_count:>6}"
            for scenario, r in rows
        ),
    )


def error_lines(scenario: Scenario, target: str, result: WrkResult) -> Iterator[str]:
    if result.non_2xx:
        yield f"{scenario.key}) {target}: {result.non_2xx} non-2xx responses"
    for kind, count in result.socket_errors.items():
        if count:
            yield f"{scenario.key}) {target}: {count} socket {kind} errors"


def verdicts(rows: list[tuple[Scenario, Comparison]], mode: str) -> tuple[bool, bool]:
    """Print PASS/MISS per scenario and any errors; return (valid, all_passed)."""
    problems = [
        line
        for scenario, c in rows
        for target, result in (("direct", c.direct), ("gateway", c.gateway))
        for line in error_lines(scenario, target, result)
    ]
    all_passed = True
    for scenario, c in rows:
        budget = scenario.budgets[mode]
        passed = budget.check(c)
        all_passed &= passed
        verdict = "PASS" if passed else "MISS" if c.bare is not None else "MISS (no bare proxy)"
        print(f"{verdict}  {scenario.key}) {scenario.title} [{mode}]: {budget.text}")
    if problems:
        bar = "!" * 78
        print(f"\n{bar}\nINVALID RUN: errors during the load (numbers above are not comparable)")
        for line in problems:
            print(f"  {line}")
        print(bar)
    return not problems, all_passed


def result_dict(result: WrkResult) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    data["error_count"] = result.error_count
    return data


def write_results(rows: list[tuple[Scenario, Comparison]], args: argparse.Namespace) -> None:
    mode = pipeline_mode(args)
    scenarios = []
    for scenario, c in rows:
        scenarios.append(
            {
                "key": scenario.key,
                "title": scenario.title,
                "body": json.loads(scenario.body()),
                "direct": result_dict(c.direct),
                "gateway": result_dict(c.gateway),
                "ratio": c.ratio,
                "bare": result_dict(c.bare) if c.bare else None,
                "gateway_vs_bare": c.bare_ratio,
                "added_p50_ms": c.added_p50_ms,
                "added_p99_ms": c.added_p99_ms,
                "rounds": [
                    {
                        "direct": result_dict(r.direct),
                        "bare": result_dict(r.bare) if r.bare else None,
                        "gateway": result_dict(r.gateway),
                    }
                    for r in c.rounds
                ],
                "budget": scenario.budgets[mode].text,
                "passed": scenario.budgets[mode].check(c),
                "valid": c.direct.error_count == 0 and c.gateway.error_count == 0,
            }
        )
    valid = all(s["valid"] for s in scenarios)
    document = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "connections": args.connections,
        "mode": mode,
        "limits": args.limits,
        "sessions_per_thread": args.sessions,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "valid": valid,
        "passed": valid and all(s["passed"] for s in scenarios),
        "scenarios": scenarios,
    }
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(document, indent=2) + "\n")
    note(f"results written to {RESULTS_FILE.relative_to(REPO)}")


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per target per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of back-to-back runs (medians are shown)"
    )
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--scenarios", default="abc", help="which scenarios to run, e.g. 'ac' (default: abc)"
    )
    parser.add_argument(
        "--direct-only",
        action="store_true",
        help="only drive the engine directly (checks the harness without a gateway)",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="give the bench tenant a token quota and a rate limit (exercises both stages)",
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare-proxy floor (bench/bare_proxy.py)"
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=0,
        metavar="N",
        help="gateway requests carry X-Session-Id, N sessions per wrk thread (history kept)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the full pipeline: --limits and --sessions {FULL_SESSIONS_PER_THREAD} "
        f"({FULL_SESSIONS_PER_THREAD * THREADS} sessions whose histories grow over each run)",
    )
    parser.add_argument(
        "--safety-rules",
        type=int,
        default=0,
        metavar="N",
        help="also run the gateway with N regex rules on prompt and N on response "
        "(another tenant, same process) and compare (bench/safety.py)",
    )
    parser.add_argument(
        "--stalls",
        type=float,
        default=0,
        metavar="MS",
        help="log the gateway's event-loop stalls over MS milliseconds (LOOP_STALL_MS, "
        "apps/observability/loop_watch.py) and sum them up per scenario",
    )
    args = parser.parse_args(argv)
    if args.full:
        args.limits = True
        args.sessions = args.sessions or FULL_SESSIONS_PER_THREAD
    if args.connections < THREADS:
        parser.error(f"--connections must be at least {THREADS}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def raise_interrupt(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C, so the finally blocks stop the servers.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
    with contextlib.ExitStack() as servers:  # all stopped at the end, whatever happens
        engine = servers.enter_context(fake_engine())
        gateway: Gateway | None = None
        bare: BareProxy | None = None
        api_key = safety_key = ""
        if not args.direct_only:
            # The safety tenant and its rules exist before the server starts.
            rules = partial(bench_safety.setup, rules=args.safety_rules)
            prepare = rules if args.safety_rules else None
            served = servers.enter_context(
                running_gateway(
                    engine.url, limits=args.limits, prepare=prepare, env=stall_env(args)
                )
            )
            gateway, api_key, safety_key = served.gateway, served.api_key, served.prepared or ""
            if not args.no_bare:
                bare = BareProxy(engine.url)
                servers.callback(bare.stop)
                bare.start()
        direct_rows: list[tuple[Scenario, WrkResult]] = []
        rows: list[tuple[Scenario, Comparison]] = []
        assert engine.proc is not None
        targets = [Target("direct", engine.url, cpu=process_probe(engine.proc.pid))]
        if bare is not None:
            assert bare.proc is not None
            targets.append(Target("bare", bare.url, cpu=process_probe(bare.proc.pid)))
        if gateway is not None:
            assert gateway.proc is not None
            probe = gateway_probe(gateway.proc.pid, gateway.data_dir)
            targets.append(Target("gateway", gateway.url, api_key, cpu=probe))
            if args.safety_rules:
                targets.append(Target("safety", gateway.url, safety_key, cpu=probe))
        safety_rows = []
        for scenario in scenarios:
            log_offset = gateway.log_path.stat().st_size if gateway is not None else 0
            runs = measure_scenario(scenario, targets, args)
            if gateway is not None and args.stalls:
                print_stalls(scenario, gateway.log_path, log_offset)
            direct_rows.append((scenario, median_result(runs["direct"])))
            if gateway is not None:
                bares = runs.get("bare") or [None] * args.rounds
                rounds = [
                    Round(d, g, b)
                    for d, g, b in zip(runs["direct"], runs["gateway"], bares, strict=True)
                ]
                rows.append((scenario, Comparison(rounds)))
            if "safety" in runs:
                safety_rows.append((scenario, runs["gateway"], runs["safety"]))
        if gateway is None:
            print_direct_table(direct_rows)
            note("--direct-only: no gateway, no budgets checked, no results file written")
            return 0
        print_table(rows)
        if safety_rows:
            print_safety(safety_rows, gateway, api_key, safety_key, args.safety_rules)
        valid, passed = verdicts(rows, pipeline_mode(args))
        write_results(rows, args)
        return 0 if valid and passed else 1


STALL_LINE = re.compile(r"event loop stalled ([\d.]+) ms \(collections: ([^)]*)\)")


def stall_env(args: argparse.Namespace) -> dict[str, str]:
    return {"LOOP_STALL_MS": str(args.stalls)} if args.stalls else {}


def print_stalls(scenario: Scenario, log_path: Path, offset: int) -> None:
    """The loop watch's lines of this scenario: how many, how long, and where the loop was
    (the innermost frame of each stack; "gc" when a full collection took most of it)."""
    with log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode("utf-8", "replace")
    stalls: list[tuple[float, str]] = []
    for block in text.split("event loop stalled ")[1:]:
        match = STALL_LINE.match("event loop stalled " + block)
        if match is None:
            continue
        length, collections = float(match[1]), match[2]
        gen2 = sum(float(ms) for ms in re.findall(r"gen2 ([\d.]+) ms", collections))
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', block)
        where = "gc (gen2)" if gen2 >= length / 2 else _innermost(frames)
        stalls.append((length, where))
    if not stalls:
        note(f"{scenario.key}) no event-loop stall over the threshold")
        return
    total = sum(length for length, _ in stalls)
    note(
        f"{scenario.key}) {len(stalls)} event-loop stalls, {total:.0f} ms in all, "
        f"longest {max(length for length, _ in stalls):.0f} ms; where the loop was:"
    )
    by_place: dict[str, list[float]] = {}
    for length, where in stalls:
        by_place.setdefault(where, []).append(length)
    ranked = sorted(by_place.items(), key=lambda item: -sum(item[1]))
    for where, lengths in ranked[:8]:
        print(f"    {len(lengths):4d} x, {sum(lengths):7.0f} ms  {where}")


def _innermost(frames: list[tuple[str, str, str]]) -> str:
    """The innermost frame of the project's code (else the innermost of all)."""
    ours = [f for f in frames if str(REPO) in f[0] and "/.venv/" not in f[0]]
    if not frames:
        return "(over before the watchdog looked)"
    path, line, name = (ours or frames)[-1]
    return f"{Path(path).name}:{line} {name}"


def print_safety(rows: list, gateway: Gateway, api_key: str, safety_key: str, rules: int) -> None:
    bench_safety.print_table(rows, rules)
    body = next(s for s in SCENARIOS if s.key == "c").body()
    url = gateway.url + "/v1/chat/completions"
    plain, held = (bench_safety.ttft_ms(url, key, body) for key in (api_key, safety_key))
    print(f"time to first token, scenario c body: {plain:.1f} ms without rules, {held:.1f} ms with")
    print()


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args(argv), needs_wrk=True)


def run_main(
    run_benchmark: Callable[[argparse.Namespace], int], args: argparse.Namespace, *, needs_wrk: bool
) -> int:
    """Run a benchmark script's `run`: exit 2 without wrk, 1 on BenchError, 130 on Ctrl-C
    or SIGTERM (its finally blocks stop whatever it started)."""
    if needs_wrk and shutil.which("wrk") is None:
        print("wrk is not installed. Install it with:\n    apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return run_benchmark(args)
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
