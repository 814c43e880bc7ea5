"""Run an LLM-GW configuration file (`*.cfg.lua`) in a sandboxed Lua and read its `server`
and `models` tables.

The file is a program: it may define helper functions and build argument lists (LLM-GW's
own example does). It runs in lupa's Lua 5.4 with only the pure libraries (string, table,
math, utf8 and the base functions but load/dofile/loadfile/require/collectgarbage/print;
no string.dump or pattern matching, whose backtracking runs in C where no instruction
count can stop it): no os, io, package, debug or the Python bridge; text chunks only (no
bytecode); at most
MAX_MEMORY_BYTES of memory and MAX_INSTRUCTIONS instructions, counted by a debug hook.
LLM-GW's helpers are provided: `presets.engines.llamacpp`/`llamacpp_secondary`,
`concat_arrays(a1, a2)` and `merge_tables(t1, t2)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lupa.lua54 as lupa

MAX_MEMORY_BYTES = 64 * 1024 * 1024
MAX_INSTRUCTIONS = 50_000_000
_HOOK_EVERY = 10_000
_MAX_DEPTH = 32

# Our own Lua, run before the file: LLM-GW's helpers, then the sandbox.
_PRELUDE = """
presets = {engines = {llamacpp = "llama.cpp", llamacpp_secondary = "llama.cpp.secondary"}}

function concat_arrays(a1, a2)
  local out = {}
  for _, v in ipairs(a1) do out[#out + 1] = v end
  for _, v in ipairs(a2) do out[#out + 1] = v end
  return out
end

function merge_tables(t1, t2)
  local out = {}
  for k, v in pairs(t1) do out[k] = v end
  for k, v in pairs(t2) do
    if math.type(k) == "integer" and k >= 1 then out[#out + 1] = v else out[k] = v end
  end
  return out
end
"""
_SAFE_GLOBALS = (
    "assert", "error", "getmetatable", "ipairs", "math", "next", "pairs", "pcall", "rawequal",
    "rawget", "rawlen", "rawset", "select", "setmetatable", "string", "table", "tonumber",
    "tostring", "type", "utf8", "xpcall", "_VERSION", "presets", "concat_arrays",
    "merge_tables",
)  # fmt: skip
# The file's globals: a fresh table holding only the safe names, so neither the file nor
# anything it can reach sees the real _G (which lupa itself keeps using).
_SANDBOX = """
local safe, limit, every = ...
local env = {}
for _, name in ipairs(safe) do env[name] = _G[name] end
env._G = env
-- Lua runs message handlers and finalizers with hooks off, where an endless loop could
-- never be stopped: xpcall calls its handler after unwinding instead, and no __gc.
env.xpcall = function(f, handler, ...)
  local result = table.pack(pcall(f, ...))
  if result[1] then return table.unpack(result, 1, result.n) end
  return false, handler(result[2])
end
env.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in a configuration file", 2)
  end
  return setmetatable(t, mt)
end
-- Shared through every string's metatable. Pattern matching runs in C, where no hook
-- fires, and can backtrack for hours: it goes too.
for _, name in ipairs({"dump", "find", "match", "gmatch", "gsub"}) do string[name] = nil end
setmetatable(env, {__index = function(_, name)
  if name == "os" or name == "io" or name == "require" or name == "load" or name == "dofile"
      or name == "loadfile" or name == "package" or name == "debug" or name == "python" then
    error("'" .. name .. "' is not available in a sandboxed configuration file", 2)
  end
end})
local count = 0
local message = "the configuration ran more than " .. limit .. " instructions (an endless loop?)"
local function over()
  error(message, 2)  -- level 2: the file's line that was running
end
local function start()
  debug.sethook(function()
    count = count + every
    if count > limit then
      -- From now on every instruction fails, so a pcall cannot swallow the error and loop:
      -- the first instruction outside it fails too.
      debug.sethook(over, "", 1)
      error(message, 2)
    end
  end, "", every)
end
return env, start
"""


class LuaConfigError(ValueError):
    """The file cannot be run or does not describe models the way LLM-GW expects."""


@dataclass(frozen=True)
class LuaVariant:
    context: int
    args: tuple[str, ...]
    binary: str
    connect: str
    startup_timeout: float | None
    idle_timeout: float | None


@dataclass(frozen=True)
class LuaModel:
    name: str
    secondary: bool
    variants: tuple[LuaVariant, ...]


@dataclass(frozen=True)
class LuaConfig:
    server: dict
    models: tuple[LuaModel, ...]


def run_lua_config(path: Path) -> tuple[dict, list]:
    """Execute the file in the sandbox; its `server` and `models` as Python values."""
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LuaConfigError(f"Cannot read {path}: {exc}") from None
    runtime = lupa.LuaRuntime(
        register_eval=False, register_builtins=False, max_memory=MAX_MEMORY_BYTES
    )
    runtime.execute(_PRELUDE)
    # C functions, called from Python: no Lua instruction runs, so no hook fires.
    sethook, rawget = runtime.globals().debug.sethook, runtime.globals().rawget
    env, start = runtime.execute(
        _SANDBOX, runtime.table(*_SAFE_GLOBALS), MAX_INSTRUCTIONS, _HOOK_EVERY
    )
    loaded = runtime.globals().load(source, f"={path.name}", "t", env)  # "t": no bytecode
    if isinstance(loaded, tuple):  # (nil, message)
        raise LuaConfigError(f"Syntax error: {loaded[1]}")
    try:
        start()
        loaded()
    except lupa.LuaMemoryError:
        raise LuaConfigError(
            f"{path.name} used more than {MAX_MEMORY_BYTES // 2**20} MiB of memory."
        ) from None
    except lupa.LuaError as exc:
        message = str(exc).split("\nstack traceback:", 1)[0]
        raise LuaConfigError(f"Error running {path.name}: {message}") from None
    finally:
        sethook()
    server, models = rawget(env, "server"), rawget(env, "models")
    return to_python(server, "server"), to_python(models, "models")


def to_python(value: object, where: str, depth: int = 0) -> object:
    """Lua tables as dicts, or lists when their keys are 1..n; other values as they are."""
    if depth > _MAX_DEPTH:
        raise LuaConfigError(f"{where}: tables nested deeper than {_MAX_DEPTH} levels.")
    if lupa.lua_type(value) == "function":
        raise LuaConfigError(f"{where}: a function where a value was expected.")
    if lupa.lua_type(value) != "table":
        return value
    items = {k: to_python(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if items and list(items) == list(range(1, len(items) + 1)):
        return list(items.values())
    return items


def load_lua_config(path: Path) -> LuaConfig:
    """Run the file and check its tables the way LLM-GW does (variant values override the
    model's, the model's the server's), naming the place of each problem."""
    server, models = run_lua_config(path)
    if not isinstance(server, dict):
        raise LuaConfigError("The file must define a `server` table.")
    if models == {}:
        models = []
    if not isinstance(models, list) or not models:
        raise LuaConfigError("The file must define `models`, a list of model tables.")
    parsed = tuple(_model(m, f"models[{i}]", server) for i, m in enumerate(models, 1))
    names = [m.name for m in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LuaConfigError(f"Model names must be unique: {', '.join(duplicates)}.")
    return LuaConfig(server=server, models=parsed)


def _model(model: object, where: str, server: dict) -> LuaModel:
    if not isinstance(model, dict):
        raise LuaConfigError(f"{where}: must be a table (did you list an undefined name?).")
    name = _string(model, "name", where)
    where = f"{where} ({name})"
    engine = _string(model, "engine", where)
    if engine not in ("llama.cpp", "llama.cpp.secondary"):
        raise LuaConfigError(f"{where}.engine: unknown engine type {engine!r}.")
    variants = model.get("variants")
    if not isinstance(variants, list) or not variants:
        raise LuaConfigError(f"{where}.variants: must list at least one variant.")
    inherited = {k: model.get(k, server.get(k)) for k in _INHERITED}
    inherited["connect"] = model.get("connect")
    return LuaModel(
        name=name,
        secondary=engine == "llama.cpp.secondary",
        variants=tuple(
            _variant(v, f"{where}.variants[{i}]", inherited) for i, v in enumerate(variants, 1)
        ),
    )


_INHERITED = ("engine_startup_timeout", "engine_idle_timeout")


def _variant(variant: object, where: str, inherited: dict) -> LuaVariant:
    if not isinstance(variant, dict):
        raise LuaConfigError(f"{where}: must be a table.")
    values = {**inherited, **{k: v for k, v in variant.items() if v is not None}}
    context = values.get("context")
    if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
        raise LuaConfigError(f"{where}.context: must be a positive whole number of tokens.")
    args = values.get("args")
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise LuaConfigError(f"{where}.args: must be a list of strings.")
    return LuaVariant(
        context=context,
        args=tuple(str(a) for a in args),
        binary=_string(values, "binary", where),
        connect=_string(values, "connect", where),
        startup_timeout=_seconds(values, "engine_startup_timeout", where),
        idle_timeout=_seconds(values, "engine_idle_timeout", where),
    )


def _string(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LuaConfigError(f"{where}.{key}: must be a non-empty string.")
    return value


def _seconds(table: dict, key: str, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise LuaConfigError(f"{where}.{key}: must be a positive number of seconds.")
    return float(value)
