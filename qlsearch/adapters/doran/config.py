"""Hyperparameters of DoRAN, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlsearch.adapters._knobs import POSITIVE, Knob
from qlsearch.adapters.replora.config import RepLoRAConfig

MAGNITUDE_INITS = ("norm", "norm_plus_tau")


@dataclass
class DoRANConfig(RepLoRAConfig):
    """DoRAN hyperparameters (Diep et al. 2025, arXiv 2510.04331; symbols in brackets).

    Per adapted projection, with ``V = W0 + (alpha/r) B A`` and row norms ``||V||``
    (one per output unit, detached as in DoRA):

    ``W' = m * V / (||V|| + tau)``,  ``tau = softplus(rho) > 0`` learnable, ``m`` init ``||W0||``.

    ``A``, ``B`` come from auxiliary networks exactly as in RepLoRA (learnable
    inputs ``A0``, ``B0``; first layer ``W1_A``, ``W1_B`` shared by the projections
    of a layer and, as it acts row by row, by all heads; one head per projection).
    """

    tau_init: float = field(default=1e-3, metadata={"knob": POSITIVE, "help": "initial noise in the denominator [tau] > 0"})
    magnitude_init: str = field(default="norm", metadata={"knob": Knob(str, choices=MAGNITUDE_INITS),
        "help": "'norm': m = ||W0|| (DoRA's; the output is W0 x scaled by ||W0||/(||W0||+tau) at init); "
                "'norm_plus_tau': m = ||W0|| + tau (the output equals the base model's at init)"})
