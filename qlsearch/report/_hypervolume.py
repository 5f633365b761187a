"""Hypervolume of a front, for minimisation: Optuna's when it is there, else a small exact one.

``optuna._hypervolume.compute_hypervolume`` is private API; the fallback
(slicing over the last objective, exact in any dimension, fine for the tens
to hundreds of points a study has) keeps the report working if it moves.
"""

from __future__ import annotations

import numpy as np


def hypervolume(points, reference) -> float:
    """The volume dominated by ``points`` (rows, minimised) and bounded by ``reference``.

    Points not strictly better than the reference in every objective add nothing.

    >>> hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0])
    3.0
    """
    points = np.asarray(points, dtype=float).reshape(-1, len(reference))
    reference = np.asarray(reference, dtype=float)
    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    try:
        from optuna._hypervolume import compute_hypervolume
    except ImportError:  # pragma: no cover - depends on the installed Optuna
        return _slice_volume(points, reference)
    return float(compute_hypervolume(points, reference))


def _slice_volume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume by slicing along the last objective (HSO)."""
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    order = np.argsort(points[:, -1], kind="stable")
    points = points[order]
    volume = 0.0
    for i in range(len(points)):
        top = points[i + 1, -1] if i + 1 < len(points) else reference[-1]
        depth = top - points[i, -1]
        if depth > 0:  # the slab [z_i, z_{i+1}) is dominated by the first i+1 points' projections
            volume += depth * _slice_volume(points[: i + 1, :-1], reference[:-1])
    return volume
