"""`bench/run.py --safety-rules N`: the cost of safety rules, in the same run.

A second tenant, `bench-safety`, gets N regex rules on the prompt and N on the response
(scoped to it, so the plain `bench` tenant on the same gateway process has none); each
round runs the gateway with both keys back to back, and the table compares them: req/s,
added p50/p99 and gateway CPU per request. None of the rules matches the bench's
traffic, so this is the cost every clean request pays. Time to first token is measured
separately (sequential streamed requests of scenario c), since the stream window's
holdback delays the first token by design.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

TENANT = "bench-safety"
# Realistic shapes: the presets (secrets, e-mails, phones, injection phrases) and
# word/number patterns of the kind operators add.
RULES_CODE = """
from apps.safety.models import SafetyRule
from apps.safety.presets import PRESETS
from apps.safety.services import rule_put
from apps.tenants.models import Tenant
tenant = Tenant.objects.get(slug={tenant!r})
SafetyRule.objects.filter(name__startswith="bench-").delete()
presets = list(PRESETS.values())
for stage in ("prompt", "response"):
    for i in range({n}):
        if i < len(presets):
            preset = presets[i]
            pattern, flags = preset.pattern, preset.flags
            action = "redact" if preset.action == "redact" else "block"
        else:
            pattern = [r"\\bforbidden{{i}}\\b", r"secret-{{i}}-[0-9]{{{{4,8}}}}",
                       r"project (?:alpha|beta|gamma)-{{i}}"][i % 3].format(i=i)
            flags, action = "i", ("block", "flag")[i % 2]
        rule_put(name=f"bench-{{stage}}-{{i}}", stage=stage, action=action, pattern=pattern,
                 flags=flags, tenant=tenant)
print(SafetyRule.objects.filter(name__startswith="bench-").count())
"""


def setup(gateway: Any, rules: int) -> str:
    """The bench-safety tenant, its key and its rules; returns the raw key."""
    gateway.manage("create_tenant", TENANT, check=False)
    out = gateway.manage("create_api_key", TENANT, "--name", f"bench-{time.time_ns()}")
    key = out.stdout.strip().splitlines()[-1].strip()
    gateway.manage("shell", "-c", RULES_CODE.format(tenant=TENANT, n=rules))
    return key


def ttft_ms(url: str, key: str, body: str, *, requests: int = 30) -> float:
    """Median time to the first streamed content, sequential requests."""
    times = []
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as client:
        for _ in range(requests):
            started = time.perf_counter()
            with client.stream("POST", url, content=body, headers=headers) as response:
                for line in response.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        times.append((time.perf_counter() - started) * 1000)
                        break
    return statistics.median(times) if times else float("nan")


def print_table(rows: list[tuple[Any, list[Any], list[Any]]], rules: int) -> None:
    """rows: (scenario, gateway results per round, safety results per round)."""
    header = (
        f"{f'safety: {rules}+{rules} regex rules':<33} {'gateway r/s':>11} {'+rules r/s':>10} "
        f"{'ratio':>6}  {'added p50/p99 ms':>16}  {'CPU us gw/+rules':>16} {'added CPU':>9}"
    )
    print(header)
    print("-" * len(header))
    for scenario, plain, safe in rows:
        pairs = list(zip(plain, safe, strict=True))
        ratio = statistics.median(s.rps / p.rps for p, s in pairs if p.rps)
        p50 = statistics.median(s.p50_ms - p.p50_ms for p, s in pairs)
        p99 = statistics.median(s.p99_ms - p.p99_ms for p, s in pairs)
        cpu_p = statistics.median(p.cpu_us.get("server", 0) for p in plain)
        cpu_s = statistics.median(s.cpu_us.get("server", 0) for s in safe)
        added = (cpu_s / cpu_p - 1) * 100 if cpu_p else float("nan")
        print(
            f"{scenario.key}) {scenario.title:<30} {statistics.median(p.rps for p in plain):11.0f} "
            f"{statistics.median(s.rps for s in safe):10.0f} {ratio:6.3f}  "
            f"{p50:7.2f} / {p99:6.2f}  {cpu_p:7.0f} / {cpu_s:6.0f} {added:8.1f}%"
        )
    print()
