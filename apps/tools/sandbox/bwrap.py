"""The `subprocess` backend: each run a local process group inside bubblewrap namespaces.

    no network (own empty net namespace), own PID namespace and /proc, own IPC/UTS,
    root file system: /usr (and the /bin, /lib symlinks) read-only, nothing else of the
    host; the work directory the only writable place (plus a small /tmp); the environment
    built from nothing; an unprivileged uid (a root gateway drops to nobody first);
    rlimits (CPU, address space, processes, open files, file size) and a wall-clock
    timeout, after which the whole process group is killed (--die-with-parent takes the
    sandbox's PID namespace, and so every process in it, down with it).

`RlimitsOnlySandbox` is the weaker mode without namespaces, for hosts without bwrap: only
with an explicit setting (TOOLS_SANDBOX_RLIMITS_ONLY), never chosen silently.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from apps.tools.sandbox.base import RunLimits, RunResult, SandboxUnavailable
from apps.tools.sandbox.local import (
    NOBODY,
    drop_privileges_prefix,
    list_files,
    make_work_dir,
    remove_work_dir,
    run_process_group,
)

SANDBOX_HOME = "/sandbox"  # where the work directory appears inside the sandbox
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": SANDBOX_HOME,
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}
_READ_ONLY = ("/usr",)
_SYMLINKS = (
    ("usr/bin", "/bin"),
    ("usr/sbin", "/sbin"),
    ("usr/lib", "/lib"),
    ("usr/lib64", "/lib64"),
)
TMP_BYTES = 16 * 1024 * 1024


class BwrapSandbox:
    name = "subprocess"

    def __init__(self, *, bwrap: str = "bwrap", work_root: str | None = None) -> None:
        self.bwrap = bwrap
        self.work_root = work_root

    def check_available(self) -> None:
        if shutil.which(self.bwrap) is None:
            raise SandboxUnavailable(
                f"The tools sandbox needs bubblewrap (`{self.bwrap}` not found): install it "
                "(`apt-get install bubblewrap`), or set TOOLS_SANDBOX_RLIMITS_ONLY=1 to allow "
                "the weaker rlimits-only mode (no network, file system or PID isolation)."
            )

    def wrap(self, argv: list[str], work_dir: Path) -> list[str]:
        args = [
            self.bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--uid", str(NOBODY),
            "--gid", str(NOBODY),
            "--hostname", "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop", "ALL",
            "--clearenv",
        ]  # fmt: skip
        for path in _READ_ONLY:
            args += ["--ro-bind", path, path]
        for target, link in _SYMLINKS:
            if Path(link).is_symlink() or Path(link).exists():
                args += ["--symlink", target, link]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
        args += ["--bind", str(work_dir), SANDBOX_HOME, "--chdir", SANDBOX_HOME]
        args += ["--remount-ro", "/"]  # bwrap's root tmpfs, once the mount points exist
        for key, value in SANDBOX_ENV.items():
            args += ["--setenv", key, value]
        return [*drop_privileges_prefix(), *args, "--", *argv]

    async def run(self, argv: list[str], *, limits: RunLimits) -> RunResult:
        self.check_available()
        work_dir = make_work_dir(self.work_root)
        try:
            result = await run_process_group(
                self.wrap(argv, work_dir), limits=limits, work_dir=work_dir
            )
            result.files = list_files(work_dir, limit=limits.max_listed_files)
            return result
        finally:
            remove_work_dir(work_dir)


class RlimitsOnlySandbox:
    """No namespaces: the command sees the host's file system (as nobody, when the gateway
    is root) and network. Only for hosts without bubblewrap, when the operator says so."""

    name = "rlimits-only"

    def __init__(self, *, work_root: str | None = None) -> None:
        self.work_root = work_root

    def check_available(self) -> None:
        return None

    async def run(self, argv: list[str], *, limits: RunLimits) -> RunResult:
        work_dir = make_work_dir(self.work_root)
        try:
            result = await run_process_group(
                [*drop_privileges_prefix(), "env", "-i", *_env_args(work_dir), *argv],
                limits=limits,
                work_dir=work_dir,
            )
            result.files = list_files(work_dir, limit=limits.max_listed_files)
            return result
        finally:
            remove_work_dir(work_dir)


def _env_args(work_dir: Path) -> list[str]:
    env = {**SANDBOX_ENV, "HOME": str(work_dir), "TMPDIR": str(work_dir)}
    return [f"{key}={value}" for key, value in env.items()]
