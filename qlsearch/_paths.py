"""Every folder a command writes or deletes is checked to lie inside the folder it belongs to.

Names are validated where a study is parsed; this is the second line: whatever a name
holds (``..``, ``.``, an absolute path, a symlink out), no command writes outside its
study's run folder (under ``--root``) or report folder (under ``--out``).
"""

from __future__ import annotations

from pathlib import Path


def inside(base: str | Path, *parts: str, what: str = "name") -> Path:
    """``base/parts...``, after checking that it resolves to a folder strictly inside ``base``.

    Returns the path as given (relative stays relative); raises ``ValueError`` naming ``what``.
    """
    path = Path(base).joinpath(*parts)
    root, target = Path(base).resolve(), path.resolve()
    if target == root or root not in target.parents:
        raise ValueError(f"{what}: {'/'.join(parts)!r} leads to {target}, outside {root}; "
                         "allowed: a name of letters, digits, '-' and '_'")
    return path
