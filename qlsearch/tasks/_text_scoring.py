"""Causal-LM encoding for training, and scoring: choice log-likelihood and greedy generation.

The route may only see the prompt (DESIGN.md, "Unit state"): every batch
carries a ``route_mask`` that is 1 on prompt tokens and 0 on the answer and on
padding, so the routed operator is the same in training, in choice scoring and
at the prefill of ``generate``. Models whose ``forward``/``generate`` name
``route_mask`` or ``instruction`` in their signature (the queryable adapter) get
them; others (plain models, PEFT models) get the usual inputs only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qlsearch.tasks._text_answers import answers_match, extract_final_answer

if TYPE_CHECKING:
    from qlsearch.tasks.text import TextExample

#: Between the prompt and the answer (lm-eval's convention: the space belongs to the answer).
ANSWER_SEPARATOR = " "
IGNORE_INDEX = -100


# ---- tokens ----------------------------------------------------------------------------

def _bos(tokenizer) -> list[int]:
    """The BOS the tokenizer adds on its own (Llama does, Qwen does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _split_tokens(tokenizer, prompts: Sequence[str], continuations: Sequence[str]
                  ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with BOS, continuation ids) per pair.

    The pair is tokenised whole and cut after the prompt's tokens, as lm-eval
    does, so the continuation's tokens are the ones the model sees after that
    prompt (SentencePiece treats a lone leading space differently).
    """
    if not prompts:
        return []
    bos = _bos(tokenizer)
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    whole = tokenizer([p + c for p, c in zip(prompts, continuations, strict=True)],
                      add_special_tokens=False)["input_ids"]
    pairs = []
    for i, (p, w) in enumerate(zip(enc, whole, strict=True)):
        if w[:len(p)] != p:  # merged across the boundary: tokenise the parts apart
            w = p + tokenizer(continuations[i], add_special_tokens=False)["input_ids"]
        pairs.append((bos + p, w[len(p):]))
    return pairs


def _fit(prompt: list[int], answer: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Cut to ``max_length``: the prompt loses its start first (at least one token stays,
    so the route has something to read), then the answer its end."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    keep = max(1, max_length - len(answer))
    prompt = prompt[-keep:]
    return prompt, answer[:max_length - len(prompt)]


def _right_pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def encode_for_training(tokenizer, examples: Sequence[TextExample], max_length: int) -> dict:
    """Right-padded causal-LM batch: the loss is on the answer (and its EOS) only.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt and
    padding tokens), ``route_mask`` (1 on prompt tokens only: the route never
    sees the answer) as ``batch x tokens`` long tensors, padded to the longest
    row (at most ``max_length``), and ``instruction`` (one string per row).

    >>> batch = encode_for_training(tokenizer, examples, max_length=512)
    >>> loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
    ...              route_mask=batch["route_mask"], instruction=batch["instruction"]).loss
    """
    if not examples:
        raise ValueError("examples: got none; allowed: one or more TextExample")
    if max_length < 2:
        raise ValueError(f"max_length: got {max_length}; allowed: an integer >= 2")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pairs = _split_tokens(tokenizer, [e.prompt for e in examples],
                          [ANSWER_SEPARATOR + e.answer for e in examples])
    ids, labels, route = [], [], []
    for prompt, answer in pairs:
        prompt, answer = _fit(prompt, answer + eos, max_length)
        ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
        route.append([1] * len(prompt) + [0] * len(answer))
    input_ids = _right_pad(ids, _pad_id(tokenizer))
    return {
        "input_ids": input_ids,
        "attention_mask": _right_pad([[1] * len(r) for r in ids], 0),
        "labels": _right_pad(labels, IGNORE_INDEX),
        "route_mask": _right_pad(route, 0),
        "instruction": [e.instruction for e in examples],
    }


# ---- what the model accepts ------------------------------------------------------------

def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _routing_kwargs(fn: Callable, route_mask: Tensor, instructions: list[str],
                    pass_instruction: bool | None) -> dict:
    """``route_mask`` and ``instruction`` for models that take them (see module docstring)."""
    kwargs = {}
    if _accepts(fn, "route_mask"):
        kwargs["route_mask"] = route_mask
    if pass_instruction or (pass_instruction is None and _accepts(fn, "instruction")):
        kwargs["instruction"] = instructions
    return kwargs


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _chunks(n: int, size: int):
    if size < 1:
        raise ValueError(f"batch_size: got {size}; allowed: an integer >= 1")
    return (range(i, min(i + size, n)) for i in range(0, n, size))


class _evaluating:
    """``model.eval()`` and no grad inside; the training flag comes back after."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


# ---- multiple choice -------------------------------------------------------------------

def choice_log_likelihoods(model: nn.Module, tokenizer, examples: Sequence[TextExample],
                           batch_size: int, *, max_length: int | None = None,
                           pass_instruction: bool | None = None) -> list[list[float]]:
    """Per example, per choice: ``sum log p(choice tokens | prompt)``.

    One row per (example, choice); ``batch_size`` rows go through one forward.
    """
    rows = [(i, c) for i, e in enumerate(examples) for c in range(len(e.choices or []))]
    pairs = _split_tokens(tokenizer, [examples[i].prompt for i, _ in rows],
                          [ANSWER_SEPARATOR + examples[i].choices[c] for i, c in rows])
    pairs = [_fit(p, c, max_length) for p, c in pairs]
    scores: list[list[float]] = [[0.0] * len(e.choices or []) for e in examples]
    device = _device(model)
    with _evaluating(model):
        for chunk in _chunks(len(rows), batch_size):
            seqs = [pairs[j][0] + pairs[j][1] for j in chunk]
            input_ids = _right_pad(seqs, _pad_id(tokenizer)).to(device)
            attention = _right_pad([[1] * len(s) for s in seqs], 0).to(device)
            route = _right_pad([[1] * len(pairs[j][0]) for j in chunk], 0)
            route = torch.nn.functional.pad(route, (0, input_ids.shape[1] - route.shape[1])).to(device)
            extra = _routing_kwargs(model.forward, route, [examples[rows[j][0]].instruction for j in chunk],
                                    pass_instruction)
            logits = model(input_ids=input_ids, attention_mask=attention, **extra).logits
            for b, j in enumerate(chunk):
                start, stop = len(pairs[j][0]), len(seqs[b])
                # the logits at position t predict token t + 1
                logp = logits[b, start - 1:stop - 1].float().log_softmax(-1)
                target = input_ids[b, start:stop].unsqueeze(-1)
                i, c = rows[j]
                scores[i][c] = logp.gather(-1, target).sum().item()
    return scores


def evaluate_multiple_choice(model: nn.Module, tokenizer, examples: Sequence[TextExample],
                             batch_size: int, *, max_length: int | None = None,
                             pass_instruction: bool | None = None) -> dict:
    """Accuracy of the highest-likelihood choice, the route read from the prompt only.

    Returns ``accuracy`` (argmax of the summed log-likelihood), ``accuracy_norm``
    (argmax of it divided by the continuation's length in characters, lm-eval's
    ``acc_norm``) and ``n``. ``pass_instruction``: None passes ``instruction=``
    when ``model.forward`` names it; True/False force it.
    """
    for e in examples:
        if not e.choices or e.label is None:
            raise ValueError("examples: multiple-choice scoring needs choices and a label on each")
    scores = choice_log_likelihoods(model, tokenizer, examples, batch_size, max_length=max_length,
                                    pass_instruction=pass_instruction)
    hits = hits_norm = 0
    for e, s in zip(examples, scores, strict=True):
        norm = [v / len(ANSWER_SEPARATOR + c) for v, c in zip(s, e.choices, strict=True)]
        hits += max(range(len(s)), key=s.__getitem__) == e.label
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == e.label
    n = len(examples)
    return {"accuracy": hits / n if n else 0.0, "accuracy_norm": hits_norm / n if n else 0.0, "n": n}


# ---- generation ------------------------------------------------------------------------

def generate_answers(model: nn.Module, tokenizer, examples: Sequence[TextExample],
                     max_new_tokens: int, batch_size: int, *, max_length: int | None = None,
                     pass_instruction: bool | None = None) -> list[str]:
    """Greedy continuations of the prompts (left-padded batches), decoded without specials."""
    if not examples:
        return []
    bos = _bos(tokenizer)
    prompts = [bos + ids for ids in tokenizer([e.prompt for e in examples],
                                              add_special_tokens=False)["input_ids"]]
    if max_length is not None:
        prompts = [p[-max_length:] for p in prompts]
    pad = _pad_id(tokenizer)
    device = _device(model)
    texts = []
    with _evaluating(model):
        for chunk in _chunks(len(examples), batch_size):
            width = max(len(prompts[j]) for j in chunk)
            input_ids = torch.tensor([[pad] * (width - len(prompts[j])) + prompts[j] for j in chunk],
                                     device=device)
            attention = torch.tensor([[0] * (width - len(prompts[j])) + [1] * len(prompts[j])
                                      for j in chunk], device=device)
            extra = _routing_kwargs(model.generate, attention,
                                    [examples[j].instruction for j in chunk], pass_instruction)
            out = model.generate(input_ids=input_ids, attention_mask=attention,
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, **extra)
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def evaluate_generation(model: nn.Module, tokenizer, examples: Sequence[TextExample],
                        max_new_tokens: int, batch_size: int, *, max_length: int | None = None,
                        pass_instruction: bool | None = None) -> dict:
    """Exact match of the final answer of greedy outputs against the reference solutions'.

    Both sides go through :func:`extract_final_answer` and are compared in
    normal form. Returns ``accuracy``, ``n`` (examples scored) and ``unscorable``
    (examples whose reference has no final answer, e.g. NuminaMath proofs; left out).
    """
    gold = [extract_final_answer(e.answer) for e in examples]
    scored = [e for e, g in zip(examples, gold, strict=True) if g is not None]
    outputs = generate_answers(model, tokenizer, scored, max_new_tokens, batch_size,
                               max_length=max_length, pass_instruction=pass_instruction)
    refs = [g for g in gold if g is not None]
    hits = sum(answers_match(extract_final_answer(o), g) for o, g in zip(outputs, refs, strict=True))
    n = len(scored)
    return {"accuracy": hits / n if n else 0.0, "n": n, "unscorable": len(examples) - n}
