"""The declarative baseline files: one TOML per method, and the seed paper's tables as CSV.

``baselines/<method>.toml`` holds a method's citation, defaults (equal to the
registry's knobs), parameter formula and the assumptions we made;
``baselines/paper/tableNN_*.csv`` holds the paper's published Tables 1-11 in
long format, numbers as printed (see ``baselines/paper/README.md``).

>>> baseline("lora")["citation"]["arxiv"]
'2106.09685'
>>> int(paper_table(6).set_index("method").loc["lora", "trainable_params"])
4399104
"""

from __future__ import annotations

from pathlib import Path

from qlsearch._toml import tomllib

#: The repository's ``baselines/`` folder (next to the ``qlsearch`` package).
BASELINES_DIR = Path(__file__).resolve().parent.parent / "baselines"
PAPER_DIR = BASELINES_DIR / "paper"


def baseline_names() -> list[str]:
    """Names of the methods that have a ``baselines/<name>.toml``, sorted."""
    return sorted(p.stem for p in BASELINES_DIR.glob("*.toml"))


def baseline(name: str) -> dict:
    """The parsed ``baselines/<name>.toml`` of a method (a registry name such as ``"lora"``).

    Returns a dict with at least ``name``, ``citation``, ``summary``,
    ``defaults``, ``parameter_formula`` and ``assumptions``. Knobs whose
    registry default is ``None`` are absent from ``defaults`` (TOML has no null).
    """
    path = BASELINES_DIR / f"{name}.toml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ValueError(
            f"baseline: unknown method {name!r}; allowed: {', '.join(baseline_names())}"
        )
    with path.open("rb") as f:
        return tomllib.load(f)


def paper_tables() -> dict[int, Path]:
    """The paper's tables on disk: ``{table number: CSV path}``."""
    return {int(p.name[5:7]): p for p in sorted(PAPER_DIR.glob("table[0-9][0-9]_*.csv"))}


def paper_table(name_or_number: int | str):
    """One of the paper's Tables 1-11 as a ``pandas.DataFrame``.

    ``name_or_number`` is the table number (``6``, ``"6"``, ``"table06"``) or the
    file's name with or without ``.csv`` (``"table06_parameters"``). Entries the
    paper prints as ``inf`` parse as ``float("inf")``; cells the table leaves
    empty (e.g. ``std`` of Tables 9-10) as NaN.

    >>> paper_table("table01_synthetic_train_mse").query("function == 'dropwave'").shape
    (6, 4)
    """
    import pandas as pd

    tables = paper_tables()
    key = str(name_or_number).strip().removesuffix(".csv")
    number = None
    if isinstance(name_or_number, int) and not isinstance(name_or_number, bool):
        number = name_or_number
    elif key.isdigit():
        number = int(key)
    elif key.startswith("table") and key[5:7].isdigit():
        number = int(key[5:7])
        if len(key) > 7 and tables.get(number, Path()).stem != key:
            number = None
    if number not in tables:
        allowed = ", ".join(f"{n} ({p.stem})" for n, p in tables.items())
        raise ValueError(f"paper_table: unknown table {name_or_number!r}; allowed: {allowed}")
    return pd.read_csv(tables[number])
