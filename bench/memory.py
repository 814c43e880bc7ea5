"""Memory under load: the gateway's RSS over a long run of the full pipeline.

Run from the repo root:  python bench/memory.py [--minutes 10]

Sets up the gateway as bench/run.py does, with the full pipeline (a token quota, a rate
limit, and X-Session-Id over 500 sessions whose histories grow during the run), drives
scenario (a) with wrk for `--minutes`, and prints the resident memory of the gateway's
processes (the serve process and its workers; PostgreSQL apart) at the start, after
1 minute and at the end, with the requests served by then. Caches with a bound fill up in
the first minute; growth after that is what this looks for. Without a context size the
histories, and so each request's prompt, grow all run long; `--ctx-size` caps them.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    FULL_SESSIONS_PER_THREAD,
    SCENARIOS,
    BenchError,
    WrkResult,
    fake_engine,
    note,
    run_main,
    run_wrk,
    running_gateway,
)

CONNECTIONS = 50
# Its own data dir: ten minutes leave ~400k session messages behind, which bench/run.py's
# PostgreSQL should not carry into its runs.
MEMORY_DIR = REPO / "var" / "bench-memory"


def rss_mib(pid: int) -> float:
    """Resident memory of the process and its children (uvicorn workers), in MiB."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / 2**20


def drive(url: str, key: str, seconds: int, results: list[WrkResult]) -> None:
    scenario = next(s for s in SCENARIOS if s.key == "a")
    body = scenario.body()
    results.append(run_wrk(url, body, key, seconds, CONNECTIONS, FULL_SESSIONS_PER_THREAD))


def sample(pid: int, marks: list[float], started: float) -> list[tuple[float, float]]:
    """RSS at each mark (seconds after `started`)."""
    samples = []
    for mark in marks:
        time.sleep(max(0.0, started + mark - time.monotonic()))
        samples.append((mark, rss_mib(pid)))
        note(f"{mark / 60:5.1f} min: gateway RSS {samples[-1][1]:.1f} MiB")
    return samples


def run(args: argparse.Namespace) -> int:
    seconds = int(args.minutes * 60)
    engine_args = ("--ctx-size", str(args.ctx_size)) if args.ctx_size else ()
    data_dir = MEMORY_DIR.with_name(
        MEMORY_DIR.name + (f"-ctx{args.ctx_size}" if args.ctx_size else "")
    )
    with (
        fake_engine(*engine_args) as engine,
        running_gateway(
            engine.url, limits=True, ctx_size=args.ctx_size, data_dir=data_dir
        ) as served,
    ):
        assert served.gateway.proc is not None
        pid = served.gateway.proc.pid
        results: list[WrkResult] = []
        url = served.gateway.url + "/v1/chat/completions"
        load = threading.Thread(target=drive, args=(url, served.api_key, seconds, results))
        started = time.monotonic()
        load.start()
        marks = [1.0, 60.0, *range(120, seconds, 120), seconds - 2.0]
        samples = sample(pid, sorted(set(marks)), started)
        load.join()
    if not results:
        raise BenchError("wrk gave no result")
    done = results[0]
    print(f"\n{'minute':>7} {'RSS MiB':>9}")
    for mark, rss in samples:
        print(f"{mark / 60:7.1f} {rss:9.1f}")
    print(f"\n{done.requests} requests ({done.rps:.0f}/s), {done.error_count} errors")
    return 0 if not done.error_count else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--ctx-size",
        type=int,
        default=0,
        help="give the model a context: histories are trimmed to it, so what each request "
        "handles stops growing and any growth left is the gateway's own",
    )
    return run_main(run, parser.parse_args(argv), needs_wrk=True)


if __name__ == "__main__":
    sys.exit(main())
