"""For migrations that redefine a server-side SQL function by changing one statement of an
earlier migration's text, so the change reads as what it is."""


def replaced(sql: str, old: str, new: str) -> str:
    """`sql` with its one occurrence of `old` replaced by `new`; fails loudly otherwise."""
    assert sql.count(old) == 1, "the statement to replace is not in the function (once)"
    return sql.replace(old, new)
