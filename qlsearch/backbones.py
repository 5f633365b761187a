"""Backbones: the synthetic suite's regressors (pre-trained once, cached) and HF loading.

* ``TransformerRegressor`` (§4.1): the 2-D input becomes one token per
  coordinate (``x_i·w_i + b_i``, a learned embedding per coordinate, which also
  tells the tokens apart), then ``depth`` pre-norm layers (attention, GELU MLP),
  a final LayerNorm, mean-pool over tokens and a scalar head.
* ``DeepMLP`` (§B.3): ``depth`` GELU layers of ``width`` units and a scalar head.

Both keep their layers in ``layers`` (an ``nn.ModuleList``), so an adapter finds
its units there; the linears have the names adapters target (``SYNTHETIC_TARGETS``):
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``up_proj``, ``down_proj``
(transformer) and ``linear`` (MLP). ``model.config`` carries the architecture,
with the HF-style ``num_attention_heads`` that head-wise methods (HyRA) read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlsearch.tasks.synthetic import SyntheticSplits, make_splits

# Bump when a backbone, the tasks or pre-training change, so old caches are not reused.
CACHE_VERSION = "1"


# ---- the transformer ----------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    depth: int = 8
    width: int = 256
    num_heads: int = 8
    mlp_ratio: int = 4
    in_features: int = 2
    model_type: str = "qlsearch_transformer"

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    num_key_value_heads = num_attention_heads
    hidden_size = property(lambda self: self.width)
    num_hidden_layers = property(lambda self: self.depth)

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q/k/v/o`` projections.

    Written out (not SDPA) so FLOP counters see its matmuls on CPU; with two
    tokens its cost is negligible anyway.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"num_heads: got {num_heads}; allowed: a divisor of width ({width})")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.o_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        batch, tokens, width = h.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(h)))


class TransformerLayer(nn.Module):
    """Pre-norm: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.input_norm, self.self_attn = nn.LayerNorm(width), Attention(width, num_heads)
        self.post_attention_norm, self.mlp = nn.LayerNorm(width), MLP(width, mlp_ratio * width)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_norm(h))
        return h + self.mlp(self.post_attention_norm(h))


class TransformerRegressor(nn.Module):
    """Scalar regression from ``in_features`` coordinates, one token each (n×2 → n×1)."""

    def __init__(self, depth: int = 8, width: int = 256, num_heads: int = 8, mlp_ratio: int = 4,
                 in_features: int = 2):
        super().__init__()
        self.config = TransformerConfig(depth, width, num_heads, mlp_ratio, in_features)
        self.coordinate_weight = nn.Parameter(torch.randn(in_features, width))
        self.coordinate_bias = nn.Parameter(torch.randn(in_features, width))
        self.layers = nn.ModuleList(
            TransformerLayer(width, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(-1) * self.coordinate_weight + self.coordinate_bias  # n × tokens × width
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))


# ---- the deep MLP -------------------------------------------------------------------


@dataclass(frozen=True)
class MLPConfig:
    depth: int = 32
    width: int = 32
    in_features: int = 2
    model_type: str = "qlsearch_mlp"

    hidden_size = property(lambda self: self.width)
    num_hidden_layers = property(lambda self: self.depth)

    def to_dict(self) -> dict:
        return asdict(self)


class MLPBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        # He init keeps the signal's scale through 32 GELU layers; PyTorch's default
        # init shrinks it layer by layer until the head sees a constant.
        nn.init.kaiming_normal_(self.linear.weight, nonlinearity="relu")
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.linear(h))


class DeepMLP(nn.Module):
    """``depth`` hidden GELU layers of ``width`` units (the first from ``in_features``),
    then a scalar head (n×2 → n×1). Each layer is one adapter unit."""

    def __init__(self, depth: int = 32, width: int = 32, in_features: int = 2):
        super().__init__()
        self.config = MLPConfig(depth, width, in_features)
        self.layers = nn.ModuleList(
            MLPBlock(in_features if i == 0 else width, width) for i in range(depth)
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


BACKBONES: dict[str, type[nn.Module]] = {"transformer": TransformerRegressor, "mlp": DeepMLP}

# Every linear inside each backbone's layers, by name: what adapters target
# (PEFT's "all-linear" only knows HF models). The heads stay frozen.
SYNTHETIC_TARGETS: dict[str, list[str]] = {
    "transformer": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    "mlp": ["linear"],
}


def build_backbone(name: str, **overrides) -> nn.Module:
    """A fresh backbone: ``"transformer"`` (8×256) or ``"mlp"`` (32×32), with ``overrides``
    of its constructor's arguments (``depth``, ``width``, ...)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone: got {name!r}; allowed: {', '.join(BACKBONES)}")
    return BACKBONES[name](**overrides)


# ---- pre-training and its cache -----------------------------------------------------


@torch.no_grad()
def _mse(model: nn.Module, data: tuple[Tensor, Tensor], device: torch.device) -> float:
    x, y = data
    return F.mse_loss(model(x.to(device)), y.to(device)).item()


def pretrain(backbone: nn.Module, splits: SyntheticSplits, epochs: int = 300, lr: float = 3e-3,
             batch_size: int = 64, seed: int = 0) -> dict:
    """Train every parameter of ``backbone`` on ``splits.source_train`` (AdamW, MSE).

    Returns ``{"source_train_mse", "source_test_mse", "initial_source_test_mse",
    "epochs"}``, the MSEs after the last epoch. Raises ``FloatingPointError`` when the
    loss turns NaN/inf. The model is left in eval mode.
    """
    device = next(backbone.parameters()).device
    x, y = (t.to(device) for t in splits.source_train)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr)
    backbone.eval()
    initial = _mse(backbone, splits.source_test, device)
    for epoch in range(epochs):
        backbone.train()
        for idx in torch.randperm(len(x), generator=gen).to(device).split(batch_size):
            loss = F.mse_loss(backbone(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pre-training diverged at epoch {epoch}: loss {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    backbone.eval()
    return {
        "source_train_mse": _mse(backbone, splits.source_train, device),
        "source_test_mse": _mse(backbone, splits.source_test, device),
        "initial_source_test_mse": initial,
        "epochs": epochs,
    }


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock, so concurrent trials train a missing backbone once (POSIX only)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the write is still atomic
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pretrained_backbone(function: str, backbone: str, seed: int, cache_dir: str | Path,
                        epochs: int = 300, lr: float = 3e-3, batch_size: int = 64,
                        device: str | torch.device = "cpu", **overrides) -> nn.Module:
    """The backbone pre-trained on ``function``'s source split under ``seed``, cached.

    The cache key holds the function, backbone, architecture ``overrides``, seed,
    epochs, lr, batch size and ``CACHE_VERSION``; a hit loads the weights
    (``<key>.safetensors``) instead of training. ``<key>.json`` records the
    settings and the pre-training MSEs. Returned in eval mode on ``device``.
    """
    settings = {"function": function, "backbone": backbone, "overrides": overrides, "seed": seed,
                "epochs": epochs, "lr": lr, "batch_size": batch_size, "version": CACHE_VERSION}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"{function}-{backbone}-seed{seed}-{digest}"
    weights, record = stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(backbone, **overrides)
    model.to(device)
    with _file_lock(stem.with_suffix(".lock")):
        if weights.exists():
            model.load_state_dict(load_file(str(weights), device=str(device)))
            return model.eval()
        metrics = pretrain(model, make_splits(function, seed), epochs=epochs, lr=lr,
                           batch_size=batch_size, seed=seed)
        tmp = weights.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        record.write_text(json.dumps({**settings, "metrics": metrics}, indent=2) + "\n")
        os.replace(tmp, weights)  # the weights appear last: their presence means complete
    return model.eval()


# ---- Hugging Face models ------------------------------------------------------------

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def load_hf_model(model_id_or_path: str | Path, dtype: torch.dtype | str = torch.float32,
                  device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """An HF causal LM: ``from_pretrained`` (hub id, local cache or folder), or, for a
    folder holding a ``config.json`` but no weights, ``from_config`` with random weights
    (initialised under ``seed``). Raises ``OSError`` saying what to do when neither works
    (e.g. offline and not cached)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    path = Path(model_id_or_path)
    if (path / "config.json").is_file() and not any(any(path.glob(p)) for p in _WEIGHT_FILES):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(path)
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32 if dtype == "auto" else dtype
            )
        return model.to(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_id_or_path), dtype=dtype)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise OSError(
            f"cannot load model {str(model_id_or_path)!r}: it is neither a folder with config.json "
            f"nor a model in the Hugging Face cache{' (HF_HUB_OFFLINE is set)' if offline else ''}. "
            "Download it first (`hf download <id>`), pass a local folder with its weights, or a "
            f"folder holding only config.json for random weights. Cause: {err}"
        ) from err
    return model.to(device)
