"""The models under test and the calls that are timed on them.

One frozen base model is built from the config with random weights (nothing
is downloaded). Each method adapts its own deep copy whose frozen tensors are
the base's own (a deepcopy memo), so N methods cost one model's memory and
every method reads the very same weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qlsearch.adapters import attach, auxiliary_loss, get_method
from qlsearch.adapters._precision import adapted_targets, precision_of
from qlsearch.params import load_config
from qlsearch.profiling._settings import FROZEN, MERGED, PEFT_DEFAULT, ProfileSettings


@dataclass
class Subject:
    """One model under test: ``model`` as built, ``runner`` what forward and training call
    (``torch.compile(model)`` under ``--compile``), and the extra keywords it needs.

    ``adapter_dtype``/``compute_dtype`` (``precision_of``) and ``targets`` (the adapted
    linears' names) are read when it is built; ``form`` is the inference form its forward
    and decode are timed in (``frozen`` and ``merged`` from the start, the others when
    ``inference_form`` is entered)."""

    name: str
    model: nn.Module
    runner: nn.Module
    extra: dict = field(default_factory=dict)
    adapter_dtype: str | None = None
    compute_dtype: str | None = None
    targets: list[str] = field(default_factory=list)
    form: str | None = None

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_base(settings: ProfileSettings) -> nn.Module:
    """The frozen model for ``settings.model`` (a causal LM, or a synthetic backbone with
    random weights), in eval mode, on the device.

    transformers 5 builds in the config's own dtype (bf16 for Qwen2.5), so the
    dtype is always given.
    """
    torch.manual_seed(settings.seed)
    if settings.synthetic:
        from qlsearch.backbones import build_backbone

        model = build_backbone(settings.model).to(settings.device, settings.torch_dtype)
        return model.eval().requires_grad_(False)
    from transformers import AutoModelForCausalLM

    config = load_config(settings.model)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=settings.torch_dtype, attn_implementation=settings.attn_implementation
        )
    return model.eval().requires_grad_(False)


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` that shares its parameters and buffers.

    Adapters never write the frozen weights (they wrap the layers that hold
    them), so sharing is safe and keeps a 0.5B comparison in one model's memory.
    """
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, memo)


def merged(model: nn.Module) -> nn.Module:
    """PEFT ``model`` merged into its frozen weights and unwrapped (``merge_and_unload``):
    what a user deploys, at the frozen model's cost. The adapted linears' weights are
    copied first: they are shared with every other model of the comparison."""
    for module in model.modules():
        linear = getattr(module, "base_layer", None)
        if isinstance(linear, nn.Linear):
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    return model.merge_and_unload()


def build_subjects(base: nn.Module, settings: ProfileSettings) -> list[Subject]:
    """The frozen base and one adapted copy per method, all in eval mode, in ``settings.measured`` order.

    ``lora@<variant>`` is LoRA merged (``MERGED``), under PEFT's own default precision
    (``PEFT_DEFAULT``), or under the named precision policy.
    """
    compute = str(settings.torch_dtype).removeprefix("torch.")
    subjects = []
    for name in settings.measured:
        torch.manual_seed(settings.seed)
        method, _, variant = name.partition("@")
        info: dict = {"form": FROZEN, "compute_dtype": compute}
        if name == FROZEN:
            model = base
        else:
            precision = {MERGED: settings.precision, PEFT_DEFAULT: None}.get(variant, variant or settings.precision)
            model = attach(shared_copy(base), method, precision=precision, **settings.knobs_for(method)).eval()
            info = {**precision_of(model), "targets": adapted_targets(model), "form": None}
            if variant == MERGED:
                model, info["form"] = merged(model).eval(), MERGED
        extra = {}
        if name != FROZEN and get_method(method).instruction:
            # a fixed embedding stands in for the encoded instruction text (e(c), batch x d_e)
            width = getattr(getattr(model, "config", None), "instruction_dim", 384)
            gen = torch.Generator().manual_seed(settings.seed)
            extra["instruction"] = torch.randn(settings.batch, width, generator=gen).to(
                settings.device, settings.torch_dtype)
        runner = torch.compile(model) if settings.compile else model
        subjects.append(Subject(name, model, runner, extra, **info))
    return subjects


def make_inputs(base: nn.Module, settings: ProfileSettings) -> dict[str, Tensor]:
    """Random token ids (batch x seq) and a full attention mask, the same for every method;
    for a synthetic backbone, ``x``: batch x its input coordinates."""
    gen = torch.Generator().manual_seed(settings.seed)
    if settings.synthetic:
        x = torch.randn(settings.batch, base.config.in_features, generator=gen)
        return {"x": x.to(settings.device, settings.torch_dtype)}
    ids = torch.randint(0, base.config.vocab_size, (settings.batch, settings.seq), generator=gen)
    ids = ids.to(settings.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; shared tensors counted once, as ``parameters()`` does."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's own parameters and buffers (each storage once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def forward_call(subject: Subject, inputs: dict[str, Tensor]) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return subject.runner(**inputs, **subject.extra)

    return call


def generation_kwargs(config, new_tokens: int, compiled: bool = False) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens (min = max, so EOS cannot stop it early).

    ``compiled``: transformers' static cache, whose decode step transformers compiles itself
    (``torch.compile`` of the model's call, its default ``CompileConfig``: CUDA graphs on a
    GPU); on a CPU, where transformers compiles only when told to, told to. The prompt's
    forward stays eager, as transformers runs it."""
    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    kwargs = {"do_sample": False, "num_beams": 1, "min_new_tokens": new_tokens,
              "max_new_tokens": new_tokens, "pad_token_id": 0 if pad is None else pad}
    if compiled:
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers' own switch for CPUs
        kwargs.update(cache_implementation="static", compile_config=compile_config)
    return kwargs


def generate_call(subject: Subject, inputs: dict[str, Tensor], kwargs: dict) -> Callable[[], Tensor]:
    """``generate`` on the model itself: it drives the model's own forward (eager under
    ``--compile``, where ``generation_kwargs`` has transformers compile the decode step)."""
    expected = inputs["input_ids"].shape[1] + kwargs["max_new_tokens"]

    def call() -> Tensor:
        with torch.inference_mode():
            out = subject.model.generate(**inputs, **subject.extra, **kwargs)
        if out.shape[1] != expected:
            raise RuntimeError(f"{subject.name}: generate returned {out.shape[1]} tokens, "
                               f"expected {expected}")
        return out

    return call


def backward_call(subject: Subject, inputs: dict[str, Tensor]) -> Callable[[], None]:
    """A training step's forward and backward: causal-LM loss (a synthetic backbone: the mean
    square of its output, a regression loss against target 0) plus the method's auxiliary
    terms, backward."""
    labels = {"labels": inputs["input_ids"]} if "input_ids" in inputs else {}

    def call() -> None:
        out = subject.runner(**inputs, **labels, **subject.extra)
        loss = out.loss if labels else out.float().square().mean()
        (loss + auxiliary_loss(subject.model)).backward()

    return call


def train_call(subject: Subject, inputs: dict[str, Tensor]) -> Callable[[], None]:
    """One training step: ``backward_call``'s forward and backward, then AdamW."""
    optimizer = torch.optim.AdamW(subject.trainable, lr=1e-4)
    backward = backward_call(subject, inputs)

    def call() -> None:
        optimizer.zero_grad(set_to_none=True)
        backward()
        optimizer.step()

    return call


def peak_phases(subject: Subject, train: bool) -> tuple[str, ...]:
    """The phases whose peak memory counts: a training step only where there is something to
    train (the frozen model has no trainable tensor; AdamW refuses an empty parameter list)."""
    return ("forward", "train") if train and subject.trainable else ("forward",)


def cuda_peak_bytes(subject: Subject, inputs: dict[str, Tensor], train: bool) -> int:
    """The model's own tensors plus the most it allocates above them in one forward and,
    with ``train``, one training step with a fresh AdamW (gradients and optimizer state included).

    Every model lives on the same GPU during a comparison, so the raw
    ``max_memory_allocated`` would charge each method for all the others.
    """
    peaks = []
    try:
        for phase in peak_phases(subject, train):
            subject.model.train(phase == "train")
            call = forward_call(subject, inputs) if phase == "forward" else train_call(subject, inputs)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
    finally:
        subject.model.zero_grad(set_to_none=True)
        subject.model.eval()
    return resident_bytes(subject.model) + max(peaks)
