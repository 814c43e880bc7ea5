"""Choosing the sandbox: bubblewrap, or the weaker rlimits-only mode only when allowed."""

from __future__ import annotations

import pytest

from apps.tools.sandbox.base import SandboxUnavailable
from apps.tools.sandbox.bwrap import BwrapSandbox, RlimitsOnlySandbox
from apps.tools.sandbox.config import describe_sandbox, sandbox_from_settings, tool_argv
from tests.tools.sandbox_helpers import limits


def test_it_uses_bubblewrap_by_default(settings):
    assert isinstance(sandbox_from_settings(), BwrapSandbox)


def test_it_refuses_to_run_without_bwrap_unless_allowed(settings):
    settings.TOOLS_BWRAP = "/nonexistent/bwrap"
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        sandbox_from_settings()
    assert describe_sandbox().startswith("Unavailable: The tools sandbox needs bubblewrap")


async def test_a_sandbox_without_bwrap_refuses_each_run():
    with pytest.raises(SandboxUnavailable, match="TOOLS_SANDBOX_RLIMITS_ONLY"):
        await BwrapSandbox(bwrap="/nonexistent/bwrap").run(["true"], limits=limits())


async def test_the_rlimits_only_mode_runs_when_the_operator_allows_it(settings):
    settings.TOOLS_BWRAP = "/nonexistent/bwrap"
    settings.TOOLS_SANDBOX_RLIMITS_ONLY = True
    sandbox = sandbox_from_settings()
    assert isinstance(sandbox, RlimitsOnlySandbox)
    assert "weaker" in describe_sandbox()
    result = await sandbox.run(tool_argv("bash", "echo $HOME; env | wc -l"), limits=limits())
    home, variables = result.stdout.split()
    assert home.startswith("/tmp/tool-run-")
    assert int(variables) <= 8


def test_an_unknown_backend_is_refused(settings):
    settings.TOOLS_SANDBOX_BACKEND = "chroot"
    with pytest.raises(SandboxUnavailable, match="not a sandbox backend"):
        sandbox_from_settings()
