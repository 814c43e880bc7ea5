-- A representative LLM-GW configuration: a main llama-server port shared by two chat
-- models with several context variants, and an auxiliary CPU port for embeddings.

server = {
  listen_v4 = "127.0.0.1:7777",
  listen_v6 = "none",
  health_check_timeout = 5.0,
  engine_startup_timeout = 60.0,
  engine_idle_timeout = 120.0,
}

local main_url = "http://127.0.0.1:7778"
local common = { "--host", "127.0.0.1", "--port", "7778", "--no-webui", "-np", "1", "--no-warmup" }
local llama = "/opt/llama/bin/llama-server"

-- args for one chat variant: the common ones, the context, KV-cache types if given, the file
local function chat_args(gguf, ctx, ctk)
  local args = concat_arrays(common, { "-c", tostring(ctx), "--jinja" })
  if ctk then args = concat_arrays(args, { "-ctk", ctk, "-ctv", ctk }) end
  return concat_arrays(args, { "-m", gguf })
end

local gemma_file = "gemma-3-270m-q4_k_m.gguf"
gemma = {
  engine = presets.engines.llamacpp,
  name = "gemma-3-270m",
  connect = main_url,
  variants = {},
}
for _, ctx in ipairs({ 4096, 8192 }) do
  table.insert(gemma.variants, { binary = llama, args = chat_args(gemma_file, ctx), context = ctx })
end
table.insert(gemma.variants,
  { binary = llama, args = chat_args(gemma_file, 32768, "q8_0"), context = 32768,
    engine_startup_timeout = 90.0 })

qwen = {
  engine = presets.engines.llamacpp,
  name = "qwen3-30b-instruct",
  connect = main_url,
  variants = {
    { binary = llama, args = chat_args([[C:\Qwen\Qwen3-30B-A3B-Instruct-Q3_K_XL.gguf]], 20480), context = 20480 },
    { binary = llama, args = chat_args([[C:\Qwen\Qwen3-30B-A3B-Instruct-Q3_K_XL.gguf]], 40960, "q8_0"), context = 40960 },
  },
}

qwen_high = merge_tables(qwen, { name = "qwen3-30b-instruct-precise" })
qwen_high.variants = {}
for _, v in ipairs(qwen.variants) do
  local copy = merge_tables(v, {})
  copy.args = concat_arrays(v.args, { "--temp", "0.2" })
  table.insert(qwen_high.variants, copy)
end

embed = {
  engine = presets.engines.llamacpp_secondary,
  name = "arctic-embed",
  connect = "http://127.0.0.1:7779",
  engine_idle_timeout = 10.0,
  variants = {
    { binary = llama, context = 8192,
      args = { "--host", "127.0.0.1", "--port", "7779", "--embedding", "-c", "8192",
               "-ub", "4096", "-m", "/srv/models/snowflake-arctic-embed-l-v2.0-f16.gguf" } },
  },
}

models = { gemma, qwen, qwen_high, embed }
