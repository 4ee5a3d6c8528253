"""Names that become folder names: agents in a store, merged models, merge records."""

from __future__ import annotations

import re

from ram_trl.errors import InputError

#: fullmatch: no ".", "..", "a/b" or "a\n"; at most 64 characters
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str = "agent") -> str:
    """``name`` if it is a safe folder name, else an InputError saying what is allowed."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise InputError(
            f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(up to 64 characters, starting with a letter or digit)"
        )
    return name
