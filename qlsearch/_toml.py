"""Reading the TOML files people write (study and trial files): one place for the details.

``tomllib`` on every supported Python (``tomli`` on 3.10). A UTF-8 byte-order mark,
which some editors write, is accepted; a duplicate key is reported by name (tomllib
gives only its line and column).
"""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["read_toml", "tomllib"]


def read_toml(path: str | Path, what: str) -> dict:
    """The parsed file; a problem raises one ``ValueError("<what> <path>: ...")`` line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{what} {path}: {_problem(text, err)}") from None


def _problem(text: str, err: Exception) -> str:
    message = str(err)
    if "overwrite" not in message and "twice" not in message:
        return f"not valid TOML ({message})"
    lineno = getattr(err, "lineno", None) or _line_of(message)
    line = text.splitlines()[lineno - 1] if lineno else ""
    key = line.split("=", 1)[0].strip().strip("[]").strip() or "?"
    return (f"duplicate key {key!r} (line {lineno}); allowed: each key once per table (an included "
            "file's values are overridden by the including file)")


def _line_of(message: str) -> int | None:
    """``(at line 3, column 1)`` in tomllib's message (before Python 3.14 it has no ``lineno``)."""
    import re

    match = re.search(r"at line (\d+)", message)
    return int(match.group(1)) if match else None
