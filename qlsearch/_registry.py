"""The one way a registry answers a name: the entry, or an error listing the allowed names."""

from __future__ import annotations

from collections.abc import Mapping
from difflib import get_close_matches
from typing import TypeVar

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, field: str, what: str) -> T:
    """``registry[name]``; a miss raises ``ValueError("field: unknown what 'x'; allowed: ... Did you mean ...?")``."""
    try:
        return registry[name]
    except KeyError:
        close = get_close_matches(str(name), list(registry), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{field}: unknown {what} {name!r}; allowed: {', '.join(sorted(registry))}.{hint}"
        ) from None
