"""Long histories: what a session costs when its history no longer fits the context.

Run from the repo root:  python bench/long_history.py [--sessions 10] [--turns 200]

Sets up the gateway as bench/run.py does (its own data dir and PostgreSQL, the fake
engine), registers the model with an 8k context, and fills `--sessions` sessions with
`--turns` turns each (about 100 tokens a turn: 200 turns is ~20k tokens, so every request
trims the history to fit). Then `--clients` clients send back to back, in alternating
rounds, requests without a session and requests on those long sessions, and the script
prints both latencies and what the session adds (p50/p99), and the prompt tokens the
engine saw (showing the trimming). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import (  # noqa: E402
    MODEL,
    BenchError,
    CpuProbe,
    fake_engine,
    gateway_probe,
    note,
    process_probe,
    run_main,
    running_gateway,
)

CTX_SIZE = 8192
# Its own data dir: bench/run.py registers the same model without a context size, and a
# model with a variant of unknown context is never trimmed (sessions would overflow).
LONG_HISTORY_DIR = REPO / "var" / "bench-long-history"
WORDS_PER_MESSAGE = 40  # user message and reply: ~50 heuristic tokens each, ~100 a turn


def request_body(turn: int) -> dict[str, Any]:
    words = " ".join(f"word{(turn * 7 + i) % 997}" for i in range(WORDS_PER_MESSAGE))
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"question {turn}: {words}"}],
        "max_tokens": 256,
        # One chunk a word: the fake engine counts words as tokens, so the completion
        # tokens it reports are what the reply costs when it comes back as history.
        "fake": {"chunks": WORDS_PER_MESSAGE + 2, "reply": f"answer {turn}: {words}"},
    }


async def post(
    http: aiohttp.ClientSession, url: str, key: str, turn: int, session_id: str | None
) -> tuple[float, int]:
    """(latency in ms, prompt tokens the engine reported)."""
    headers = {"Authorization": f"Bearer {key}"}
    if session_id is not None:
        headers["X-Session-Id"] = session_id
    started = time.perf_counter()
    async with http.post(url, json=request_body(turn), headers=headers) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise BenchError(f"HTTP {resp.status}: {data}")
    return (time.perf_counter() - started) * 1000, data["usage"]["prompt_tokens"]


async def seed(http: aiohttp.ClientSession, url: str, key: str, args: argparse.Namespace) -> None:
    async def one(session_id: str) -> None:
        for turn in range(args.turns):
            await post(http, url, key, turn, session_id)

    await asyncio.gather(*(one(f"long-{i}") for i in range(args.sessions)))


async def measure(
    http: aiohttp.ClientSession, url: str, key: str, seconds: float, sessions: int | None
) -> tuple[list[float], list[int]]:
    """Latencies and prompt tokens of `seconds` of back-to-back requests by each client
    (client i on session long-i when `sessions` is given)."""
    latencies: list[float] = []
    prompts: list[int] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        turn = 10_000 + i
        session_id = f"long-{i % sessions}" if sessions else None
        while time.perf_counter() < deadline:
            latency, prompt = await post(http, url, key, turn, session_id)
            latencies.append(latency)
            prompts.append(prompt)
            turn += 1

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return latencies, prompts


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def cpu_now(probes: dict[str, CpuProbe]) -> dict[str, float]:
    return {f"{who} {part}": v for who, probe in probes.items() for part, v in probe().items()}


async def bench(
    gateway_url: str, key: str, args: argparse.Namespace, probes: dict[str, CpuProbe]
) -> dict[str, Any]:
    url = gateway_url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        note(f"seeding {args.sessions} sessions x {args.turns} turns")
        started = time.perf_counter()
        await seed(http, url, key, args)
        note(f"seeded in {time.perf_counter() - started:.1f} s")
        results: dict[str, list[float]] = {"none": [], "long": []}
        prompts: dict[str, list[int]] = {"none": [], "long": []}
        cpu: dict[str, dict[str, float]] = {"none": {}, "long": {}}
        await measure(http, url, key, 2, None)  # warm-up
        for round_ in range(1, args.rounds + 1):
            note(f"round {round_}/{args.rounds}")
            for name, sessions in (("none", None), ("long", args.sessions)):
                before = cpu_now(probes)
                lat, pr = await measure(http, url, key, args.duration, sessions)
                after = cpu_now(probes)
                for part, value in after.items():
                    cpu[name][part] = cpu[name].get(part, 0.0) + value - before[part]
                results[name] += lat
                prompts[name] += pr
    for name, parts in cpu.items():  # CPU seconds -> microseconds per request
        cpu[name] = {part: v / len(results[name]) * 1e6 for part, v in parts.items()}
    return {"latency": results, "prompts": prompts, "cpu": cpu}


def report(figures: dict[str, Any]) -> None:
    lat, prompts = figures["latency"], figures["prompts"]
    parts = sorted(figures["cpu"]["none"])
    cpu_header = " ".join(f"{p + ' us':>16}" for p in parts)
    print(
        f"\n{'requests':<26} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'prompt tokens':>14}"
        f"  CPU per request: {cpu_header}"
    )
    for name, title in (("none", "without a session"), ("long", "on a 200-turn session")):
        values = lat[name]
        cpu = " ".join(f"{figures['cpu'][name][p]:16.0f}" for p in parts)
        print(
            f"{title:<26} {len(values):>6} {percentile(values, 50):8.2f} "
            f"{percentile(values, 99):8.2f} {statistics.mean(prompts[name]):14.0f}"
            f"                   {cpu}"
        )
    added50 = percentile(lat["long"], 50) - percentile(lat["none"], 50)
    added99 = percentile(lat["long"], 99) - percentile(lat["none"], 99)
    print(f"\nthe long session adds {added50:.2f} ms at p50 and {added99:.2f} ms at p99")
    print(f"(context {CTX_SIZE}: every session request trimmed its history to fit)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    return parser.parse_args(argv)


CLIENTS = 10


def run(args: argparse.Namespace) -> int:
    with (
        fake_engine("--ctx-size", str(CTX_SIZE)) as engine,
        running_gateway(
            engine.url, limits=False, ctx_size=CTX_SIZE, data_dir=LONG_HISTORY_DIR
        ) as served,
    ):
        assert engine.proc is not None
        assert served.gateway.proc is not None
        probes = {
            "engine": process_probe(engine.proc.pid),
            "gateway": gateway_probe(served.gateway.proc.pid, served.gateway.data_dir),
        }
        report(asyncio.run(bench(served.gateway.url, served.api_key, args, probes)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(run, parse_args(argv), needs_wrk=False)


if __name__ == "__main__":
    sys.exit(main())
