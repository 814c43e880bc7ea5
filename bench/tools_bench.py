"""Start-to-result time of a sandboxed `print(1)`, per backend.

    python bench/tools_bench.py                 # 50 runs, alone and 4 at a time
    python bench/tools_bench.py --runs 100 --concurrency 4 --json results.json

Each run is what the tool loop does for one call: a fresh work directory, the sandbox
started (bubblewrap namespaces + rlimits, or rlimits only), `python3 -I -c "print(1)"`
run to its exit, output captured, the directory listed and removed. Printed: p50, p99 and
mean in ms per backend, sequential and with `--concurrency` runs in flight (on this 2-core
machine). Target: p50 <= 150 ms for bubblewrap + python.

The docker backend is not measured here: no Docker engine runs on this machine, and its
time against the fake Docker API (tests/tools/fake_docker.py) would measure the fake, not
container start-up. Where Docker exists, `--docker unix:///var/run/docker.sock` adds it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from apps.tools.sandbox.base import RunLimits
from apps.tools.sandbox.bwrap import BwrapSandbox, RlimitsOnlySandbox

PRINT_1 = ["/usr/bin/python3", "-I", "-c", "print(1)"]
ECHO_1 = ["/usr/bin/bash", "--noprofile", "--norc", "-c", "echo 1"]
LIMITS = RunLimits()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def timed_run(sandbox, argv: list[str]) -> float:
    started = time.perf_counter()
    result = await sandbox.run(argv, limits=LIMITS)
    elapsed = (time.perf_counter() - started) * 1000
    if result.stdout != "1\n" or result.exit_code != 0:
        raise SystemExit(f"{sandbox.name}: unexpected result {result}")
    return elapsed


async def measure(sandbox, argv: list[str], *, runs: int, concurrency: int) -> list[float]:
    await timed_run(sandbox, argv)  # warm the page cache
    gate = asyncio.Semaphore(concurrency)

    async def one() -> float:
        async with gate:
            return await timed_run(sandbox, argv)

    return list(await asyncio.gather(*(one() for _ in range(runs))))


def docker_sandbox(url: str):
    from apps.tools.sandbox.docker_backend import DockerSandbox

    return DockerSandbox(image="python:3.11-slim", base_url=url)


async def main(args: argparse.Namespace) -> dict:
    targets = [
        ("bwrap + python", BwrapSandbox(), PRINT_1),
        ("bwrap + bash", BwrapSandbox(), ECHO_1),
        ("rlimits-only + python", RlimitsOnlySandbox(), PRINT_1),
    ]
    if args.docker:
        targets.append(("docker + python", docker_sandbox(args.docker), PRINT_1))
    results = {}
    print(f"{'backend':<24}{'in flight':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label, sandbox, argv in targets:
        for concurrency in (1, args.concurrency):
            times = await measure(sandbox, argv, runs=args.runs, concurrency=concurrency)
            row = {
                "p50_ms": round(percentile(times, 0.5), 1),
                "p99_ms": round(percentile(times, 0.99), 1),
                "mean_ms": round(statistics.fmean(times), 1),
            }
            results[f"{label} x{concurrency}"] = row
            print(
                f"{label:<24}{concurrency:>10}{row['p50_ms']:>10}{row['p99_ms']:>10}"
                f"{row['mean_ms']:>10}"
            )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--docker", help="a real Docker engine's URL (not the fake API)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    figures = uvloop.run(main(arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))
