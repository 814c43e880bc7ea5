"""Run by the concurrency tests in separate OS processes, through `manage.py shell -c`:

    python manage.py shell -c "from tests.quotas.reserve_worker import main; main()"

Reads QUOTA_WORKER_TENANT_ID, QUOTA_WORKER_KEY_IDS (comma-separated; thread i uses key
i mod n), QUOTA_WORKER_TOKENS, QUOTA_WORKER_THREADS and QUOTA_WORKER_SETTLE (1: settle
each reservation with exactly the reserved tokens). Prints `READY`, waits for a line on
stdin so every process starts at once, then prints one JSON line {"ok": n, "exceeded": n}.
"""

from __future__ import annotations

import json
import os
import sys
import threading


def main() -> None:
    from django.db import connection

    from apps.quotas.services import QuotaExceeded, quota_reserve, quota_settle

    tenant_id = int(os.environ["QUOTA_WORKER_TENANT_ID"])
    key_ids = [int(k) for k in os.environ["QUOTA_WORKER_KEY_IDS"].split(",")]
    tokens = int(os.environ["QUOTA_WORKER_TOKENS"])
    threads = int(os.environ["QUOTA_WORKER_THREADS"])
    settle = os.environ.get("QUOTA_WORKER_SETTLE") == "1"
    results: list[str] = []
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            barrier.wait()
            try:
                ticket = quota_reserve(
                    tenant_id=tenant_id, api_key_id=key_ids[i % len(key_ids)], tokens=tokens
                )
            except QuotaExceeded:
                results.append("exceeded")
                return
            if settle:
                quota_settle(ticket=ticket, actual_tokens=tokens)
            results.append("ok")
        except Exception as exc:  # reported to the test, which fails on anything else
            results.append(f"error: {exc!r}")
        finally:
            connection.close()

    print("READY", flush=True)
    sys.stdin.readline()
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    errors = [r for r in results if r.startswith("error")]
    print(
        json.dumps(
            {"ok": results.count("ok"), "exceeded": results.count("exceeded"), "errors": errors}
        ),
        flush=True,
    )
