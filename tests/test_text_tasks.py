"""Text tasks: loaders on tiny files in each dataset's real schema, answer extraction,
training masks, and scoring on tiny models with a character-level tokenizer built here."""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from qlsearch.adapters import attach
from qlsearch.tasks.instructions import INSTRUCTIONS
from qlsearch.tasks.text import (
    TEXT_TASKS,
    TextExample,
    answers_match,
    encode_for_training,
    evaluate_generation,
    evaluate_multiple_choice,
    extract_final_answer,
    last_boxed,
    load_task,
    normalize_answer,
)
from tests.conftest import VOCAB, randomize_adapter, tiny_llama, tiny_qwen2

# ---- tiny files in the real schemas ------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _abcd(texts):
    return {"text": texts, "label": list("ABCD")[:len(texts)]}


ARC_ROWS = [
    {"id": "Q1", "question": "Which gas do plants take in?",
     "choices": _abcd(["oxygen", "carbon dioxide", "helium", "neon"]), "answerKey": "B"},
    {"id": "Q2", "question": "What melts ice fastest?",
     "choices": {"text": ["salt", "sand", "sugar", "stone"], "label": ["1", "2", "3", "4"]},
     "answerKey": "1"},
    {"id": "Q3", "question": "Which is a mammal?",
     "choices": _abcd(["shark", "whale", "trout"]), "answerKey": "B"},
]


def test_arc_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "test-00000-of-00001.parquet", ARC_ROWS)
    examples = load_task("arc_challenge", "test", data_files=str(path))
    assert [e.label for e in examples] == [1, 0, 1]
    first = examples[0]
    assert first.prompt == "Question: Which gas do plants take in?\nAnswer:"
    assert first.choices == ["oxygen", "carbon dioxide", "helium", "neon"]
    assert first.answer == "carbon dioxide"
    assert first.instruction == INSTRUCTIONS["arc_challenge"]
    assert len(examples[2].choices) == 3
    assert load_task("arc_easy", "test", data_files=str(path))[0].instruction == INSTRUCTIONS["arc_easy"]


def test_openbookqa(tmp_path):
    rows = [{"id": "7-1", "question_stem": "The sun is responsible for",
             "choices": _abcd(["puppies learning tricks", "children growing up", "flowers wilting",
                               "plants sprouting and growing"]), "answerKey": "D"},
            {"id": "7-2", "question_stem": "A magnet will stick to",
             "choices": _abcd(["a wooden door", "an iron nail", "a glass jar", "a rubber ball"]),
             "answerKey": "B"}]
    examples = load_task("openbookqa", "train", data_files=write_jsonl(tmp_path / "train.jsonl", rows))
    assert [e.label for e in examples] == [3, 1]
    assert examples[0].prompt == "Question: The sun is responsible for\nAnswer:"
    assert examples[1].answer == "an iron nail"


HELLASWAG_ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car",
     "ctx_a": "Then, the man writes over the snow covering the window of a car.", "ctx_b": "then",
     "ctx": "Then, the man writes over the snow covering the window of a car. then",
     "endings": [", the man adds wax to the windshield.", ", a person drives away.",
                 ", the man continues removing the snow on his car.", ", the man sings."],
     "source_id": "activitynet~v_x", "split": "val", "split_type": "indomain", "label": "2"},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips [title] Pick a spot.",
     "ctx_b": "dig", "ctx": "...", "endings": ["a hole. [step] Make it deep.", "a lake.", "the sky.", "nothing."],
     "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
]


def test_hellaswag_cleans_wikihow_markup_and_test_means_validation(tmp_path):
    path = write_jsonl(tmp_path / "validation.jsonl", HELLASWAG_ROWS)
    examples = load_task("hellaswag", "test", data_files={"validation": str(path)})
    assert [e.label for e in examples] == [2, 0]
    assert examples[0].prompt == ("Removing ice from car: Then, the man writes over the snow "
                                  "covering the window of a car. Then")
    assert examples[1].prompt == "Home and Garden: How to plant tulips. Pick a spot. Dig"
    assert examples[1].choices[0] == "a hole. Make it deep."


def test_validation_is_never_the_test_set(tmp_path):
    """Where the hub's validation split is our test (hidden test labels), validation is a
    seeded slice of train, disjoint from what train reads; elsewhere it is the hub's own."""
    train_rows = [{**HELLASWAG_ROWS[i % 2], "ind": i, "activity_label": f"act{i}"} for i in range(20)]
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", train_rows)),
             "validation": str(write_jsonl(tmp_path / "validation.jsonl", HELLASWAG_ROWS))}
    test = load_task("hellaswag", "test", data_files=files)
    val = load_task("hellaswag", "validation", data_files=files)
    train = load_task("hellaswag", "train", data_files=files)
    assert (len(train), len(val), len(test)) == (18, 2, 2)
    heads = lambda rows: {e.prompt.split(":")[0] for e in rows}  # noqa: E731
    assert heads(val) <= {f"act{i}" for i in range(20)} and not heads(val) & heads(train)
    assert heads(val) == heads(load_task("hellaswag", "validation", data_files=files))  # seeded
    assert heads(val) != heads(load_task("hellaswag", "validation", data_files=files, seed=1))
    arc = {"train": str(write_parquet(tmp_path / "arc_train.parquet", ARC_ROWS[:1])),
           "validation": str(write_parquet(tmp_path / "arc_val.parquet", ARC_ROWS[1:]))}
    assert len(load_task("arc_challenge", "validation", data_files=arc)) == 2  # the hub's own split
    assert len(load_task("arc_challenge", "train", data_files=arc)) == 1


def test_hidden_test_labels_are_refused(tmp_path):
    rows = [{**HELLASWAG_ROWS[0], "label": ""}]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(ValueError, match="without a label"):
        load_task("hellaswag", "test[:]", data_files={"test": str(path)})


def test_boolq_and_race(tmp_path):
    boolq = [{"question": "is the sky blue", "answer": True, "passage": "Sky -- The sky is blue."},
             {"question": "do fish fly", "answer": False, "passage": "Fish -- Fish swim."}]
    examples = load_task("boolq", "train[:]", data_files=write_jsonl(tmp_path / "b.jsonl", boolq))  # all rows
    assert [(e.label, e.answer) for e in examples] == [(1, "yes"), (0, "no")]
    assert examples[0].prompt == "Sky -- The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    race = [{"example_id": "high1.txt", "article": "Tom likes tea.", "answer": "C",
             "question": "What does Tom like?", "options": ["milk", "juice", "tea", "coffee"]},
            {"example_id": "high2.txt", "article": "Ann runs.", "answer": "A",
             "question": "Who runs?", "options": ["Ann", "Bob", "Cat", "Dan"]}]
    examples = load_task("race", "test", data_files=write_parquet(tmp_path / "r.parquet", race))
    assert [e.label for e in examples] == [2, 0]
    assert examples[0].prompt == "Article: Tom likes tea.\n\nQuestion: What does Tom like?\nAnswer:"


SUPERGLUE = {
    "boolq": ([{"question": "is it cold", "passage": "It snows.", "idx": 0, "label": 1}], ["no", "yes"], 1),
    "cb": ([{"premise": "It rained.", "hypothesis": "The ground is dry", "idx": 0, "label": 1}],
           ["True", "False", "Neither"], 1),
    "copa": ([{"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
               "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0}],
             ["the sun was rising.", "the grass was cut."], 0),
    "rte": ([{"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "idx": 0, "label": 0}],
            ["True", "False"], 0),
    "wic": ([{"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "She robbed a bank.",
              "start1": 14, "start2": 13, "end1": 18, "end2": 17, "idx": 0, "label": 0}], ["no", "yes"], 0),
    "wsc": ([{"text": "Mark told Pete he was late.", "span1_index": 0, "span2_index": 3,
              "span1_text": "Mark", "span2_text": "he", "idx": 0, "label": 1}], ["no", "yes"], 1),
}


@pytest.mark.parametrize("config", sorted(SUPERGLUE))
def test_superglue(tmp_path, config):
    rows, choices, label = SUPERGLUE[config]
    path = write_jsonl(tmp_path / "val.jsonl", rows + [{**rows[0], "idx": 1}])
    examples = load_task(f"superglue_{config}", "test", data_files=path)  # test = validation
    assert len(examples) == 2
    assert examples[0].choices == choices and examples[0].label == label
    assert examples[0].answer == choices[label]
    if config == "copa":
        assert examples[0].prompt == "My body cast a shadow over the grass because"


def _gpqa_rows(n: int) -> list[dict]:
    return [{"Pre-Revision Question": "old", "Question": f"  Made-up question {i}, with a comma?\n",
             "Correct Answer": f" right {i}", "Incorrect Answer 1": f"wrong a{i}",
             "Incorrect Answer 2": f"wrong b{i}", "Incorrect Answer 3": f"wrong c{i}",
             "Explanation": "because", "Subdomain": "Physics", "Record ID": f"rec{i}",
             "High-level domain": "Physics"} for i in range(n)]


def test_gpqa_shuffles_choices_deterministically_per_example(tmp_path):
    rows = _gpqa_rows(5)
    path = tmp_path / "gpqa_diamond.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    train = load_task("gpqa_diamond", "train", data_files=str(path))
    val = load_task("gpqa_diamond", "validation", data_files=str(path))
    test = load_task("gpqa_diamond", "test", data_files=str(path))
    # the hub has one split: its last 20% is test, a seeded 10% of the rest validation
    assert (len(train), len(val), len(test)) == (3, 1, 1)
    every = sorted(train + val, key=lambda e: e.prompt) + test
    for i, e in enumerate(every):
        assert e.prompt == f"Question: Made-up question {i}, with a comma?\nAnswer:"
        assert sorted(e.choices) == sorted([f"right {i}", f"wrong a{i}", f"wrong b{i}", f"wrong c{i}"])
        assert e.choices[e.label] == e.answer == f"right {i}"
    assert len({e.label for e in every}) > 1  # shuffled, not always first
    again = load_task("gpqa_diamond", "train", data_files=str(path))
    assert [e.choices for e in again] == [e.choices for e in train]
    other_seed = load_task("gpqa_diamond", "train", data_files=str(path), seed=1)
    assert [e.choices for e in other_seed] != [e.choices for e in train]


GSM8K_ROWS = [
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
     "answer": "Ann has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 250 pens. How many pens are in 4 boxes?",
     "answer": "4 * 250 = <<4*250=1000>>1000 pens.\n#### 1000"},
    {"question": "Tom has 10 dollars and spends 6. How much is left?",
     "answer": "10 - 6 = <<10-6=4>>4\n#### 4"},
]


def test_math_tasks(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS[:1])
    gsm = load_task("gsm8k", "test", data_files=tmp_path / "gsm8k")  # a folder: a repo snapshot
    assert len(gsm) == 3 and gsm[0].choices is None and gsm[0].label is None
    assert gsm[0].prompt == f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:"
    assert [extract_final_answer(e.answer) for e in gsm] == ["7", "1000", "4"]

    math_rows = [{"problem": "What is $1/2 + 1/2$?", "level": "Level 1", "type": "Prealgebra",
                  "solution": "We add: $\\frac12+\\frac12 = \\boxed{1}$."},
                 {"problem": "Simplify $x \\cdot x$.", "level": "Level 2", "type": "Algebra",
                  "solution": "It is $\\boxed{x^{2}}$."}]
    math_path = write_parquet(tmp_path / "m.parquet", math_rows)
    math = sorted(load_task("math", "train", data_files=math_path) +  # no hub validation: a slice of train
                  load_task("math", "validation", data_files=math_path), key=lambda e: e.prompt, reverse=True)
    assert math[0].prompt == "Problem: What is $1/2 + 1/2$?\nSolution:"
    assert [extract_final_answer(e.answer) for e in math] == ["1", "x^{2}"]

    orca = [{"question": "Sue had 12.5 dollars and found 3. How much now?",
             "answer": "She has 12.5 + 3 = 15.50 dollars."}] * 4
    orca_path = write_jsonl(tmp_path / "orca.jsonl", orca)
    both = [load_task("orca_math", split, data_files=orca_path) for split in ("train", "validation", "test")]
    assert [len(b) for b in both] == [2, 1, 1]  # disjoint slices of the hub's one split
    both = both[0]
    assert normalize_answer(extract_final_answer(both[0].answer)) == "15.5"

    numina = [{"source": "olympiads", "problem": "Find $2^{10}$.",
               "solution": "Since $2^{10}=1024$, the answer is $\\boxed{1,024}$.",
               "messages": [{"content": "Find $2^{10}$.", "role": "user"},
                            {"content": "...", "role": "assistant"}]},
              {"source": "cn_k12", "problem": "Prove it.", "solution": "Trivial.", "messages": []}]
    numina_path = write_jsonl(tmp_path / "numina.jsonl", numina)
    examples = load_task("numina_math", "train", data_files=[str(numina_path)]) + \
        load_task("numina_math", "validation", data_files=[str(numina_path)])
    examples.sort(key=lambda e: "2^{10}" not in e.prompt)
    assert normalize_answer(extract_final_answer(examples[0].answer)) == "1024"


def test_limit_is_a_seeded_subset(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    a = load_task("gsm8k", "test", limit=2, data_files=path, seed=3)
    assert len(a) == 2 and a == load_task("gsm8k", "test", limit=2, data_files=path, seed=3)
    assert len(load_task("gsm8k", "test", limit=10, data_files=path)) == 3
    with pytest.raises(ValueError, match="limit"):
        load_task("gsm8k", "test", limit=-1, data_files=path)


def test_bad_task_names_and_files_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="allowed: .*arc_challenge.*gsm8k") as err:
        load_task("gsm8", "test")
    assert "Did you mean 'gsm8k'" in str(err.value)
    wrong = write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "solution": "s"}])
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['answer'\]"):
        load_task("gsm8k", "test", data_files=wrong)
    with pytest.raises(ValueError, match="no files for split 'test'"):
        load_task("gsm8k", "test", data_files={"train": str(wrong)})
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_task("gsm8k", "test", data_files=str(tmp_path / "rows.txt"))


def test_hub_ids_configs_and_splits(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"problem": f"{name}?", "solution": r"\boxed{1}"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    math = load_task("math", "test")
    assert len(math) == 7 and calls[0] == ("EleutherAI/hendrycks_math", "algebra", "test")
    calls.clear()
    with pytest.raises(ValueError):  # the fake rows lack SuperGLUE's fields; the call is what counts
        load_task("superglue_wsc", "test")
    assert calls == [("aps/super_glue", "wsc.fixed", "validation")]

    def offline(*args, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="Idavidrein/gpqa.*data_files"):
        load_task("gpqa_diamond", "test")


def test_every_task_has_an_instruction_and_a_kind():
    assert set(INSTRUCTIONS) == set(TEXT_TASKS)
    kinds = {t.kind for t in TEXT_TASKS.values()}
    assert kinds == {"multiple_choice", "generation"}
    assert {n for n, t in TEXT_TASKS.items() if t.kind == "generation"} == \
        {"gsm8k", "math", "orca_math", "numina_math"}


# ---- final answers -----------------------------------------------------------------------


def test_boxed_keeps_nested_braces_and_takes_the_last():
    assert last_boxed(r"first \boxed{2}, then $\boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"so \boxed 5$") == "5"
    assert last_boxed(r"broken \boxed{3") is None
    assert last_boxed("no box") is None


def test_final_answer_rules():
    assert extract_final_answer("He pays 5 * 200 = 1,000.\n#### 1,000") == "1,000"
    assert extract_final_answer("#### 72 apples") == "72"
    assert extract_final_answer("so 3 and then 4.5 remain.") == "4.5"
    assert extract_final_answer(r"#### 3 but \boxed{4}") == "4"
    assert extract_final_answer("no digits here") is None


def test_numbers_normalise():
    for same in ("1,000", "1000", "1000.0", "$1,000", "1000.", " 1000 "):
        assert normalize_answer(same) == "1000"
    assert normalize_answer(".5") == normalize_answer("0.50") == "0.5"
    assert normalize_answer(r"\dfrac{1}{2}") == normalize_answer(r"\frac{1}{2}")
    assert normalize_answer(r"90^\circ") == "90"
    assert not answers_match("-3", "3")
    assert not answers_match(None, "3")
    assert answers_match(r"\text{(B)}", "(B)")


# ---- a tokenizer built here --------------------------------------------------------------

CHARS = string.ascii_letters + string.digits + " \n.,:?!'\"-#$()+*/=\\{}_^"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def char_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per character; Llama-style BOS when ``bos``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _mc(prompt, choices, label, instruction="Pick one.") -> TextExample:
    return TextExample(prompt, choices[label], choices, label, instruction)


def test_training_masks_cover_prompt_and_padding_exactly():
    tok = char_tokenizer()
    examples = [TextExample("Q: 2+2?\nA:", "4", None, None, "Add."),
                TextExample("Q: say hi\nA:", "hi there", None, None, "Greet.")]
    batch = encode_for_training(tok, examples, max_length=64)
    assert batch["instruction"] == ["Add.", "Greet."]
    width = batch["input_ids"].shape[1]
    for row, e in enumerate(examples):
        n_prompt = 1 + len(e.prompt)  # BOS + one token per character
        n_answer = len(" " + e.answer) + 1  # + EOS
        ids = batch["input_ids"][row]
        assert tok.decode(ids[1:n_prompt]) == e.prompt
        assert tok.decode(ids[n_prompt:n_prompt + n_answer - 1]) == " " + e.answer
        assert ids[n_prompt + n_answer - 1] == tok.eos_token_id
        prompt = torch.arange(width) < n_prompt
        real = torch.arange(width) < n_prompt + n_answer
        assert torch.equal(batch["attention_mask"][row].bool(), real)
        assert torch.equal(batch["route_mask"][row].bool(), prompt)
        labels = batch["labels"][row]
        assert torch.equal(labels == -100, prompt | ~real)
        assert torch.equal(labels[real & ~prompt], ids[real & ~prompt])


def test_training_truncates_the_prompt_from_the_left():
    tok = char_tokenizer(bos=False)
    batch = encode_for_training(tok, [TextExample("abcdefghij", "xyz", None, None, "")], max_length=8)
    assert batch["input_ids"].shape == (1, 8)
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "hij xyz"  # + EOS
    assert batch["route_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_training_route_ignores_the_answer():
    """Same prompt, different answers: the loss differs, the route does not."""
    tok = char_tokenizer()
    model = attach(tiny_qwen2(), "queryable", r=4, num_atoms=4, top_k=2, num_blocks=2, d_k=8)
    randomize_adapter(model)
    examples = [TextExample("Q: colour?\nA:", answer, None, None, "Name it.")
                for answer in ("red", "a long and different answer")]
    batch = encode_for_training(tok, examples, max_length=64)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "route_mask")}
    loss = model(**inputs, instruction=torch.zeros(384)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for block in model.routing_trace():
        assert torch.allclose(block["alpha"][0], block["alpha"][1], atol=1e-6)


# ---- scoring -----------------------------------------------------------------------------


def unigram_qwen2(tok, scores: dict[str, float], default: float = -10.0):
    """A real Qwen2 whose next-token logits are ``scores`` whatever the context: the layers
    add nothing to the residual stream, every embedding is the same vector, and lm_head
    row t is ``score_t`` times its direction. Log-likelihoods are then known exactly."""
    model = tiny_qwen2()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        logits = torch.full((VOCAB,), default)
        for text, value in scores.items():
            logits[tok.convert_tokens_to_ids(text)] = value
        hidden = model.config.hidden_size
        model.lm_head.weight.copy_(logits[:, None].expand(-1, hidden) / hidden)
    return model


def test_choice_scores_follow_the_model_likelihoods():
    tok = char_tokenizer()
    # log p: "x" high, " " and "b" lower; the summed score prefers the short choice,
    # the per-character one the long run of likely "x"s
    model = unigram_qwen2(tok, {"x": 0.0, " ": -1.0, "b": -2.0})
    examples = [_mc("Which?", ["x" * 9, "b"], 0), _mc("Again?", ["b", "x" * 9], 1)]
    result = evaluate_multiple_choice(model, tok, examples, batch_size=3)
    assert result == {"accuracy": 0.0, "accuracy_norm": 1.0, "n": 2}
    clear = [_mc("Q", ["xx", "bb", "b"], 0), _mc("Q", ["bb", "xx"], 1)]
    assert evaluate_multiple_choice(model, tok, clear, batch_size=1)["accuracy"] == 1.0


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama])
def test_random_model_accuracy_is_a_fraction(build):
    tok = char_tokenizer()
    examples = [_mc(f"Question {i}: pick\nAnswer:", ["red", "green", "blue"], i % 3) for i in range(5)]
    result = evaluate_multiple_choice(build(), tok, examples, batch_size=4)
    assert result["n"] == 5
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["accuracy_norm"] <= 1.0


def test_peft_models_are_scored_without_routing_inputs():
    tok = char_tokenizer()
    model = attach(tiny_qwen2(), "lora", r=4)
    result = evaluate_multiple_choice(model, tok, [_mc("Q:", ["a", "b"], 1)], batch_size=2)
    assert result["n"] == 1


def test_route_reads_the_prompt_only():
    """The rows of one example differ only in the choice; their routes must be equal."""
    tok = char_tokenizer()
    model = attach(tiny_qwen2(), "queryable", r=4, num_atoms=4, top_k=2, num_blocks=2, d_k=8)
    randomize_adapter(model)
    example = _mc("Question: which colour?\nAnswer:", ["red", "a much longer green answer", "b"], 0)
    evaluate_multiple_choice(model, tok, [example], batch_size=3)
    for block in model.routing_trace():
        alpha = block["alpha"]
        assert torch.allclose(alpha, alpha[:1].expand_as(alpha), atol=1e-6)


def test_generation_exact_match_end_to_end_with_the_instruction_adapter():
    tok = char_tokenizer()
    model = unigram_qwen2(tok, {"7": 0.0})  # greedy output is "7777..."
    model = attach(model, "instr-queryable", r=4, num_atoms=4, top_k=2, num_blocks=2, d_k=8)
    examples = [TextExample("Question: how many?\nAnswer:", "So.\n#### 7,777", None, None, INSTRUCTIONS["gsm8k"]),
                TextExample("Q: more?\nA:", "#### 5", None, None, INSTRUCTIONS["gsm8k"]),
                TextExample("Problem: x?\nSolution:", r"$\boxed{7777}$", None, None, INSTRUCTIONS["math"]),
                TextExample("Prove it.", "Trivial.", None, None, INSTRUCTIONS["numina_math"])]
    result = evaluate_generation(model, tok, examples, max_new_tokens=4, batch_size=2)
    # B starts at zero: the adapter leaves the output as the base model's
    assert result == {"accuracy": 2 / 3, "n": 3, "unscorable": 1}

    randomize_adapter(model)
    result = evaluate_generation(model, tok, examples[:2], max_new_tokens=3, batch_size=2)
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0
