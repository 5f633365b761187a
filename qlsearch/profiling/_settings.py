"""What one profile run measures, validated once at the edge.

Every method in a comparison shares these settings (model, shapes, dtype,
device), so one object is passed around instead of a dozen arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: The paper's targets for Tables 5-7: attention and MLP projections.
PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: ``--model`` names of the synthetic suite's backbones (qlsearch.backbones), profiled at
#: their default sizes (8x256 transformer regressor, 32x32 deep MLP) with every linear in
#: their layers adapted; any other name is an HF config.
SYNTHETIC_MODELS = ("mlp", "transformer")
#: Names of torch dtypes (``torch.<name>``); this module imports no torch, so the CLI parses fast.
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
#: Phases that can be left out; the forward pass is always measured (the ratios need it).
SKIPPABLE = ("decode", "train", "flops")  # flops: the FLOP and the kernel counts
#: The untouched base model, measured beside the adapters so overheads are absolute too.
FROZEN = "frozen"
#: Ratios are to PEFT LoRA measured in the same process (DESIGN.md, "Profiling"), under the
#: same precision policy as every other method.
REFERENCE = "lora"
#: The precision policies (``qlsearch.adapters._precision.PRECISIONS``; repeated here so the
#: CLI parses without importing torch, and a test keeps the two equal).
PRECISIONS = ("mixed", "model")
#: Extra rows of the reference, ``lora@<variant>``: merged into the frozen weights, and on a
#: model that is not float32, PEFT's own default (``autocast_adapter_dtype=True``: float32
#: weights, activations cast to float32) and the other policy (for ``model``: PEFT's
#: ``autocast_adapter_dtype=False``).
MERGED, PEFT_DEFAULT = "merged", "peft-default"


@dataclass(frozen=True)
class ProfileSettings:
    """One benchmark: a model config, the methods, the workload and how to time it.

    ``model`` is an HF config (a folder or a cached hub id), or a synthetic backbone
    (``SYNTHETIC_MODELS``): these take ``batch`` examples of 2 coordinates (``seq`` does
    not apply; the transformer sees one token per coordinate) and do not generate, so
    decode is not measured on them.
    ``methods`` are registry names; ``frozen`` and ``lora`` are always measured
    (the baseline of ``overhead_ms`` and the reference of every ratio).
    ``r``, ``num_atoms``, ``top_k``, ``num_blocks`` and ``target_modules`` go to
    every method that has that knob; ``target_modules=None`` means the model's own:
    ``PAPER_TARGETS`` on an HF config, every linear in the layers of a synthetic backbone.
    """

    model: str
    methods: tuple[str, ...] = ("lora", "dora", "queryable")
    batch: int = 1
    seq: int = 128
    new_tokens: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    repeats: int = 20
    warmup: int = 3
    skip: frozenset[str] = frozenset()
    threads: int | None = None
    attn_implementation: str = "sdpa"
    r: int = 8
    num_atoms: int = 16
    top_k: int = 4
    num_blocks: int = 4
    target_modules: tuple[str, ...] | None = None
    precision: str = "mixed"
    seed: int = 0
    tag: str | None = None  # file name under --out; None: derived from the machine
    trace: str | None = None  # folder for one torch.profiler trace per method (None: no traces)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; allowed: {allowed}")

        for name in ("batch", "seq", "repeats", "r", "num_atoms", "top_k", "num_blocks"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "an integer >= 1")
        need(isinstance(self.warmup, int) and self.warmup >= 0, "warmup", "an integer >= 0")
        # decode throughput divides by N - 1 decode steps
        need(isinstance(self.new_tokens, int) and self.new_tokens >= 2, "new_tokens",
             "an integer >= 2")
        need(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
             "threads", "an integer >= 1, or None for torch's default")
        need(self.dtype in DTYPES, "dtype", ", ".join(DTYPES))
        need(self.device in DEVICES, "device", ", ".join(DEVICES))
        need(self.precision in PRECISIONS, "precision", ", ".join(PRECISIONS))
        import torch

        from qlsearch.adapters import get_method

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device: got 'cuda' but no GPU is visible to torch {torch.__version__}; "
                "allowed here: cpu"
            )
        need(set(self.skip) <= set(SKIPPABLE), "skip", ", ".join(SKIPPABLE))
        if self.target_modules is None:
            from qlsearch.backbones import SYNTHETIC_TARGETS

            own = SYNTHETIC_TARGETS[self.model] if self.synthetic else PAPER_TARGETS
            object.__setattr__(self, "target_modules", tuple(own))
        need(len(self.target_modules) > 0, "target_modules", "one or more module names")
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "skip", frozenset(self.skip))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in self.methods:
            if name == FROZEN:
                continue
            try:
                get_method(name)
            except ValueError as err:
                raise ValueError(f"methods: {str(err).removeprefix('method: ')}") from None

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def references(self) -> tuple[str, ...]:
        """LoRA's extra rows (``MERGED`` and ``PEFT_DEFAULT`` above), as ``lora@<variant>``."""
        variants = [MERGED]
        if self.dtype != "float32":  # on float32 every precision is the same
            variants += [PEFT_DEFAULT, next(p for p in PRECISIONS if p != self.precision)]
        return tuple(f"{REFERENCE}@{v}" for v in variants)

    @property
    def synthetic(self) -> bool:
        """A synthetic backbone, not an HF config."""
        return self.model in SYNTHETIC_MODELS

    @property
    def measured(self) -> tuple[str, ...]:
        """Every model timed, in build order: the frozen base, LoRA and its
        ``references``, then the rest."""
        rest = [m for m in dict.fromkeys(self.methods) if m not in (FROZEN, REFERENCE)]
        return (FROZEN, REFERENCE, *self.references, *rest)

    def runs(self, phase: str) -> bool:
        return phase not in self.skip

    def knobs_for(self, method: str) -> dict:
        """The shared knobs that ``method`` declares (the registry lists each method's knobs)."""
        from qlsearch.adapters import get_method

        shared = {"r": self.r, "num_atoms": self.num_atoms, "top_k": self.top_k,
                  "num_blocks": self.num_blocks, "target_modules": list(self.target_modules)}
        declared = get_method(method).knobs
        return {k: v for k, v in shared.items() if k in declared}

    def as_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.measured)
        data["skip"] = sorted(self.skip)
        data["target_modules"] = list(self.target_modules)
        return data
