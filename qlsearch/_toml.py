"""``tomllib`` on every supported Python (``tomli`` on 3.10): one place for the fallback."""

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["tomllib"]
