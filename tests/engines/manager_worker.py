"""A stand-in gateway process for the ownership tests: its own EngineManager acquires a
managed engine, reports what it got as one JSON line, then idles until told to stop.

    python -m tests.engines.manager_worker --engine ID --variant ID --log-dir DIR \
        [--go FILE] [--stop FILE]

DATABASE_URL must point at the test database. It prints `{"ready": ...}` once set up,
waits for --go to exist (so several workers race on the acquire itself), acquires,
checks the engine answers, prints `{"acquired": ...}`, and shuts its manager down (which
stops any engine it owns) once --stop exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", type=int, required=True)
    parser.add_argument("--variant", type=int, required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--go")
    parser.add_argument("--stop")
    return parser.parse_args()


def say(**payload: object) -> None:
    print(json.dumps(payload), flush=True)


async def wait_for_file(path: str | None) -> None:
    # The test process creates the file: no asyncio.Event reaches across processes, and a
    # stat() every 20 ms does not hold the loop up measurably.
    while path and not Path(path).exists():  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.02)


async def run(args: argparse.Namespace) -> None:
    import aiohttp

    from apps.engines.manager import EngineManager

    manager = EngineManager()
    await manager.start()
    say(ready=os.getpid())
    try:
        await wait_for_file(args.go)
        async with manager.acquire(engine_id=args.engine, variant_id=args.variant) as lease:
            async with aiohttp.ClientSession() as http, http.get(lease.base_url + "/props") as r:
                props = await r.json()
            say(
                acquired=os.getpid(),
                base_url=lease.base_url,
                status=r.status,
                n_ctx=props["default_generation_settings"]["n_ctx"],
                launched=manager.launches,
            )
        await wait_for_file(args.stop)
    finally:
        await manager.shutdown()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings

    settings.ENGINE_LOG_DIR = Path(args.log_dir)
    settings.ENGINE_OWNER_POLL_SECONDS = 0.1
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
