"""Regex rules compiled with RE2 (linear time in the input: no pattern can hang a worker).

A rule's flags are RE2's inline flags (`i` case-insensitive, `m` multi-line, `s` dot
matches newline), so a pattern and its flags compile the same everywhere.
"""

from __future__ import annotations

import functools
import re._parser as re_parser

import re2

ALLOWED_FLAGS = frozenset("ims")
# RE2's default budget; a pattern that needs more (e.g. a{1000}{1000}) is refused on save.
MAX_PROGRAM_MEMORY = 8 << 20


class BadPattern(ValueError):
    """RE2 cannot compile the pattern; the message is RE2's."""


def options() -> re2.Options:
    opts = re2.Options()
    opts.log_errors = False  # a bad pattern is reported to the operator, not to stderr
    opts.max_mem = MAX_PROGRAM_MEMORY
    return opts


def with_flags(pattern: str, flags: str) -> str:
    return f"(?{flags}){pattern}" if flags else pattern


def flags_validate(flags: str) -> str:
    unknown = set(flags) - ALLOWED_FLAGS
    if unknown:
        raise BadPattern(f"unknown flag(s) {''.join(sorted(unknown))!r}; use i, m or s")
    return "".join(sorted(set(flags)))


@functools.lru_cache(maxsize=4096)
def compiled(pattern: str, flags: str = "") -> re2._Regexp:
    """The compiled pattern, once per process for each (pattern, flags)."""
    if not pattern:
        raise BadPattern("the pattern is empty")
    try:
        return re2.compile(with_flags(pattern, flags_validate(flags)), options())
    except re2.error as exc:
        raise BadPattern(_message(exc)) from None


def pattern_error(pattern: str, flags: str = "") -> str | None:
    """RE2's message if the pattern does not compile, else None."""
    try:
        compiled(pattern, flags)
    except BadPattern as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=4096)
def max_match_length(pattern: str, flags: str = "") -> int | None:
    """The longest text the pattern can match, when that is bounded; None when it is not,
    or unknown. Python's regex parser reads RE2's common syntax; what it cannot read (RE2
    extras such as \\p{Greek} or \\Q...\\E) counts as unknown, and where the two differ
    it overestimates ([[:alpha:]]), which only holds back more."""
    try:
        width = re_parser.parse(with_flags(pattern, flags)).getwidth()[1]
    except Exception:  # any parse failure (or recursion limit) means "unknown"
        return None
    return None if width >= re_parser.MAXREPEAT else int(width)


def pattern_set(patterns: list[str]) -> re2.Set:
    """One RE2 set over already valid patterns: a single pass tells which of them match."""
    matcher = re2.Set.SearchSet(options())
    for pattern in patterns:
        matcher.Add(pattern)
    matcher.Compile()
    return matcher


def _message(exc: re2.error) -> str:
    detail = exc.args[0] if exc.args else str(exc)
    return detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
