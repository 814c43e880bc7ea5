"""Map an LLM-GW configuration (lua_config) onto engines, served models and variants.

- Each `connect` URL (one llama-server address, shared by every model and variant that
  names it: LLM-GW runs one of them at a time there) becomes one managed Engine,
  `<prefix>-<host>-<port>`, whose replica swaps between those variants like LLM-GW does.
- Each model becomes a ServedModel of its `name`; each variant an EngineVariant with
  `ctx_size = context`, `model_path` from its `-m` argument and the rest of its `args`
  as `extra_args`. `-c`, `--host`, `--port` and `-np` are the gateway's to choose (its
  command passes `-c {ctx_total} -np {slots} --host {host} --port {port}`); `-np` sets
  the engine's slots.
- The file's `binary` is not run: the command uses `{llama_server}` (LLAMA_SERVER_BIN).
  `engine_startup_timeout` and `engine_idle_timeout` (variant, else model, else server)
  set the engine's start-up timeout and idle stop (the largest of its variants).
"""

from __future__ import annotations

import math
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from apps.engines.launch import models_dir, resolve_model_path
from apps.engines.lua_config import LuaConfig, LuaConfigError, LuaVariant
from apps.engines.models import Engine, EngineVariant, ServedModel

COMMAND_TEMPLATE = (
    "{llama_server} -m {model_path} --host {host} --port {port} -c {ctx_total} -np {slots} "
    "{extra_args}"
)
_OWNED_FLAGS = {"-c": "ctx", "--ctx-size": "ctx", "--host": "host", "--port": "port",
                "-np": "slots", "--parallel": "slots", "-m": "model", "--model": "model"}  # fmt: skip


@dataclass
class VariantPlan:
    model: str
    ctx_size: int
    model_path: str
    extra_args: str


@dataclass
class EnginePlan:
    name: str
    slots: int = 1
    startup_timeout_seconds: float | None = None
    idle_ttl_seconds: int | None = None
    variants: list[VariantPlan] = field(default_factory=list)


def plan_engines(config: LuaConfig, *, prefix: str) -> list[EnginePlan]:
    engines: dict[str, EnginePlan] = {}
    slots: dict[str, set[int]] = defaultdict(set)
    for model in config.models:
        for index, variant in enumerate(model.variants, 1):
            where = f"{model.name} variant {index}"
            name = engine_name(variant.connect, prefix=prefix, where=where)
            plan = engines.setdefault(name, EnginePlan(name=name))
            variant_plan, variant_slots = _variant(model.name, variant, where)
            plan.variants.append(variant_plan)
            slots[name].add(variant_slots)
            _take_timeouts(plan, variant)
    for name, plan in engines.items():
        if len(slots[name]) > 1:
            raise LuaConfigError(
                f"The variants at {name} ask for different -np ({sorted(slots[name])}); "
                "one engine has one slot count."
            )
        plan.slots = slots[name].pop()
    return list(engines.values())


def engine_name(connect: str, *, prefix: str, where: str) -> str:
    parts = urlsplit(connect)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LuaConfigError(f"{where}: connect must be an http(s) URL, got {connect!r}.")
    host = parts.hostname.replace(".", "-").replace(":", "-")
    return slugify(f"{prefix}-{host}-{parts.port or 80}")[:64]


def _variant(model: str, variant: LuaVariant, where: str) -> tuple[VariantPlan, int]:
    owned: dict[str, str] = {}
    rest: list[str] = []
    args = iter(variant.args)
    for arg in args:
        flag, eq, inline = arg.partition("=")
        key = _OWNED_FLAGS.get(flag)
        if key is None:
            rest.append(arg)
            continue
        value = inline if eq else next(args, None)
        if value is None:
            raise LuaConfigError(f"{where}: {flag} needs a value.")
        owned[key] = value
    if "model" not in owned:
        raise LuaConfigError(f"{where}: args must name the model file with -m.")
    slots = owned.get("slots", "1")
    if not slots.isdigit() or int(slots) < 1:
        raise LuaConfigError(f"{where}: -np must be a positive number, got {slots!r}.")
    plan = VariantPlan(
        model=model,
        ctx_size=variant.context,
        model_path=local_model_path(owned["model"], where=where),
        extra_args=shlex.join(rest),
    )
    return plan, int(slots)


def local_model_path(raw: str, *, where: str) -> str:
    """The file relative to MODELS_DIR: as is when it is inside it, else its file name
    (LLM-GW configs name absolute paths, often Windows ones; copy the files over)."""
    windows = "\\" in raw or re.match(r"^[A-Za-z]:", raw)
    pure = PureWindowsPath(raw) if windows else PurePosixPath(raw)
    relative = pure.name
    if not windows and pure.is_absolute() and PurePosixPath(models_dir()) in pure.parents:
        relative = str(pure.relative_to(models_dir()))
    elif not pure.is_absolute():
        relative = str(pure)
    try:
        resolve_model_path(relative)
    except ValidationError as exc:
        raise LuaConfigError(f"{where}: {' '.join(exc.messages)}") from None
    return relative


def _take_timeouts(plan: EnginePlan, variant: LuaVariant) -> None:
    if variant.startup_timeout is not None:
        plan.startup_timeout_seconds = max(
            plan.startup_timeout_seconds or 0.0, variant.startup_timeout
        )
    if variant.idle_timeout is not None:
        idle = math.ceil(variant.idle_timeout)
        plan.idle_ttl_seconds = max(plan.idle_ttl_seconds or 0, idle)


def _engine_values(plan: EnginePlan) -> dict[str, object]:
    values: dict[str, object] = {
        "kind": Engine.Kind.MANAGED,
        "flavor": Engine.Flavor.LLAMACPP,
        "command_template": COMMAND_TEMPLATE,
        "slots": plan.slots,
        "idle_ttl_seconds": plan.idle_ttl_seconds,
    }
    if plan.startup_timeout_seconds is not None:
        values["startup_timeout_seconds"] = plan.startup_timeout_seconds
    return values


@transaction.atomic
def import_engines(plans: list[EnginePlan], *, dry_run: bool) -> list[str]:
    """Bring the database to the plans; the changes, one line each. A dry run (or any
    error) rolls everything back, so both print exactly what an import does."""
    changes: list[str] = []
    for plan in plans:
        engine = _sync_engine(plan, changes)
        _sync_variants(engine, plan, changes)
    if dry_run:
        transaction.set_rollback(True)
    return changes


def _sync_engine(plan: EnginePlan, changes: list[str]) -> Engine:
    engine = Engine.objects.filter(name=plan.name).first()
    values = _engine_values(plan)
    if engine is None:
        engine = Engine(name=plan.name, **values)
        idle = f"{plan.idle_ttl_seconds} s" if plan.idle_ttl_seconds else "never"
        changes.append(
            f"create engine {plan.name} (managed, slots={plan.slots}, idle stop: {idle}, "
            f"start-up timeout {engine.startup_timeout_seconds:g} s)"
        )
    else:
        for key, value in values.items():
            if getattr(engine, key) != value:
                changes.append(
                    f"update engine {plan.name}: {key} {getattr(engine, key)!r} → {value!r}"
                )
                setattr(engine, key, value)
    engine.base_url, engine.extra_base_urls = "", []
    engine.full_clean()
    engine.save()
    return engine


def _sync_variants(engine: Engine, plan: EnginePlan, changes: list[str]) -> None:
    wanted = {(v.model, v.ctx_size, v.model_path): v for v in plan.variants}
    models = {name for name, _, _ in wanted}
    for name in sorted(models):
        if not ServedModel.objects.filter(name=name).exists():
            changes.append(f"create model {name}")
            ServedModel.objects.create(name=name)
    existing = EngineVariant.objects.filter(engine=engine, model__name__in=models)
    for variant in existing.select_related("model"):
        key = (variant.model.name, variant.ctx_size, variant.model_path)
        target = wanted.pop(key, None)
        if target is None:
            changes.append(f"remove variant {variant.label} from {engine.name}")
            variant.delete()
        elif variant.extra_args != target.extra_args:
            changes.append(f"update variant {variant.label}: extra_args → {target.extra_args!r}")
            variant.extra_args = target.extra_args
            variant.save(update_fields=["extra_args"])
    for target in wanted.values():
        variant = EngineVariant(
            engine=engine,
            model=ServedModel.objects.get(name=target.model),
            ctx_size=target.ctx_size,
            model_path=target.model_path,
            extra_args=target.extra_args,
        )
        variant.full_clean()
        variant.save()
        changes.append(f"add variant {variant.label} to {engine.name}: {target.extra_args}")
