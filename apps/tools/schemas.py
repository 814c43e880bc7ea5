"""The function schemas the model sees for the built-in tools (README documents them)."""

from __future__ import annotations

from typing import Any

from apps.tools.models import BASH, PYTHON, WEB_SEARCH


def _function(name: str, description: str, argument: str, about: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {argument: {"type": "string", "description": about}},
                "required": [argument],
            },
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    PYTHON: _function(
        PYTHON,
        "Run Python 3 code in a sandbox without network access and return its stdout, "
        "stderr and exit code. Print what you want to see.",
        "code",
        "The Python program to run.",
    ),
    BASH: _function(
        BASH,
        "Run a bash command in a sandbox without network access and return its stdout, "
        "stderr and exit code.",
        "command",
        "The command line to run.",
    ),
    WEB_SEARCH: _function(
        WEB_SEARCH,
        "Search the web; returns titles, URLs and snippets of the top results.",
        "query",
        "What to search for.",
    ),
}
ARGUMENT = {PYTHON: "code", BASH: "command", WEB_SEARCH: "query"}
