"""The sandbox and limits the settings choose (TOOLS_* in config/settings.py)."""

from __future__ import annotations

from django.conf import settings

from apps.tools.sandbox.base import RunLimits, Sandbox, SandboxUnavailable
from apps.tools.sandbox.bwrap import BwrapSandbox, RlimitsOnlySandbox

MB = 1024 * 1024


def limits_from_settings() -> RunLimits:
    return RunLimits(
        timeout_seconds=settings.TOOLS_TIMEOUT_SECONDS,
        cpu_seconds=settings.TOOLS_CPU_SECONDS,
        memory_bytes=settings.TOOLS_MEMORY_MB * MB,
        max_processes=settings.TOOLS_MAX_PROCESSES,
        max_open_files=settings.TOOLS_MAX_OPEN_FILES,
        max_file_bytes=settings.TOOLS_MAX_FILE_MB * MB,
        max_output_bytes=settings.TOOLS_MAX_OUTPUT_BYTES,
    )


def sandbox_from_settings() -> Sandbox:
    """The configured backend; the subprocess one without bwrap only in rlimits-only mode
    (else SandboxUnavailable says what to install or set)."""
    work_root = settings.TOOLS_WORK_ROOT or None
    backend = settings.TOOLS_SANDBOX_BACKEND
    if backend == "docker":
        from apps.tools.sandbox.docker_backend import DockerSandbox

        return DockerSandbox(
            image=settings.TOOLS_DOCKER_IMAGE, base_url=settings.TOOLS_DOCKER_URL or None
        )
    if backend != "subprocess":
        raise SandboxUnavailable(
            f"TOOLS_SANDBOX_BACKEND={backend!r} is not a sandbox backend (subprocess, docker)."
        )
    sandbox = BwrapSandbox(bwrap=settings.TOOLS_BWRAP, work_root=work_root)
    try:
        sandbox.check_available()
    except SandboxUnavailable:
        if not settings.TOOLS_SANDBOX_RLIMITS_ONLY:
            raise
        return RlimitsOnlySandbox(work_root=work_root)
    return sandbox


def describe_sandbox() -> str:
    """One line for the admin: which sandbox runs the tools, or why none can."""
    try:
        sandbox = sandbox_from_settings()
    except SandboxUnavailable as exc:
        return f"Unavailable: {exc}"
    if isinstance(sandbox, RlimitsOnlySandbox):
        return "rlimits-only (TOOLS_SANDBOX_RLIMITS_ONLY=1): no namespace isolation, weaker"
    return f"{sandbox.name} ({type(sandbox).__name__})"


def tool_argv(tool: str, source: str) -> list[str]:
    """The program a built-in tool's call runs: python code, or a bash command."""
    if tool == "python":
        return [settings.TOOLS_PYTHON, "-I", "-c", source]
    if tool == "bash":
        return [settings.TOOLS_BASH, "--noprofile", "--norc", "-c", source]
    raise ValueError(f"not a sandboxed tool: {tool}")
