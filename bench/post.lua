-- wrk script for bench/run.py: POST a fixed JSON body, print a machine-readable summary.
-- Inputs come from the environment so one script serves every scenario and target:
--   BENCH_PATH  request path (default /v1/chat/completions)
--   BENCH_BODY  the JSON body
--   BENCH_KEY   API key sent as "Authorization: Bearer <key>" (omitted when empty)
--   BENCH_SESSIONS  if > 0: each request sends X-Session-Id, cycling through this many
--               sessions per wrk thread, so the gateway loads and stores history
--   BENCH_RUN   part of every session id (a fresh one per run: history never carries over)
-- No response() callback on purpose: defining one makes wrk hand every response to Lua,
-- which would slow the load generator that shares the machine's two cores.

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY") or ""
if key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

local sessions = tonumber(os.getenv("BENCH_SESSIONS") or "0") or 0
local run = os.getenv("BENCH_RUN") or "run"
local thread_count = 0
local counter = 0

setup = function(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

request = function()
  if sessions > 0 then
    counter = counter + 1
    wrk.headers["X-Session-Id"] = string.format("%s-%d-%d", run, thread_id, counter % sessions)
  end
  return wrk.format(nil, wrk.path)
end

-- One line, prefixed so bench/run.py can find it among wrk's own output.
-- Latencies are in microseconds, as wrk records them.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
