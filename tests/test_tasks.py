"""Task kinds for causal LMs, defined in a recipe over local files: multiple choice (candidates per row, scored by
mean log-probability, padded with -inf when rows differ in count) and generation (LM loss on the answer, greedy
decoding scored by exact match and token F1)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY_LLAMA, TINY_OPT, tiny_recipe

from ftkit.data.batches import collate, encode
from ftkit.data.dataset import load_task_data
from ftkit.errors import DataError, RecipeError, UserError
from ftkit.eval import evaluate
from ftkit.models.build import build_model
from ftkit.models.load import load_tokenizer
from ftkit.recipe import load_recipe
from ftkit.textmetrics import exact_match, normalize_answer, token_f1
from ftkit.training.loop import train
from ftkit.training.metrics import read_events

FIXTURES = REPO / "tests" / "fixtures"
CHOICE = {"kind": "multiple_choice", "train": str(FIXTURES / "choice.jsonl"), "dev": str(FIXTURES / "choice.jsonl"),
          "text_columns": ["premise"], "candidates_column": "choices", "label_column": "label",
          "template": "{premise}"}
QA = {"kind": "generation", "train": str(FIXTURES / "qa.jsonl"), "dev": str(FIXTURES / "qa.jsonl"),
      "text_columns": ["question"], "answer_column": "answers", "template": "{question}", "metric": "f1",
      "max_new_tokens": 3}
LLAMA = {"name": "minilm", "config": dict(TINY_LLAMA), "head_init": "random"}


def task_recipe(write_recipe, tmp_path, task: dict, name="run", model=None, **sections):
    sections.setdefault("train", {}).update(output_dir=str(tmp_path / name))
    data = {"task": "mine", "tasks": {"mine": task}, "max_seq_len": 32, "n_train": None, "n_dev": None}
    return load_recipe(write_recipe(tiny_recipe(model=model or dict(LLAMA), data=data, **sections), f"{name}.yaml"))


def test_text_metrics_on_known_strings():
    assert normalize_answer("  The Cat,  sat!") == "cat sat"
    assert exact_match("the Cat", ["a dog", "cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0
    assert token_f1("big red dog", ["red dog"]) == pytest.approx(0.8)  # precision 2/3, recall 1
    assert token_f1("blue", ["red", "dark blue"]) == pytest.approx(2 / 3)  # the best reference counts
    assert token_f1("", ["red"]) == 0.0 and token_f1("the", ["a"]) == 1.0  # both empty after normalising


def test_multiple_choice_prompts_and_candidate_scores_match_a_hand_computation(write_recipe, tmp_path):
    recipe = task_recipe(write_recipe, tmp_path, CHOICE)
    task, tokenizer = load_task_data(recipe), load_tokenizer(recipe.model)
    examples = task.splits["train"][:3]
    assert [e.candidates for e in examples] == [("barks", "quacks"), ("barks", "meows", "bleats"), ("quacks", "moos")]
    features = encode(examples, tokenizer, "causal_lm", task, 32, one_row_per_candidate=True)
    for example, feature in zip(examples, features):
        for candidate, row, mask in zip(example.candidates, feature["rows"], feature["option_masks"]):
            # the prompt as the tokenizer encodes it (with its special tokens), then " candidate"
            prompt = tokenizer(example.texts[0])["input_ids"]
            assert row == prompt + tokenizer(" " + candidate, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode([t for t, m in zip(row, mask) if m]) == candidate
    model, kind, _ = build_model(recipe, task, tokenizer)
    batch = collate(features, tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        scores = model(batch)  # a recipe-defined task: the sum (docs/tasks.md); the mean is MeZO's
        means = model.scores(batch)["mean"]
        logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert scores.shape == (3, 3) and torch.isinf(scores[0, 2]) and torch.isinf(scores[2, 2])
    logprobs = logits.log_softmax(-1)
    row = 0
    for i, example in enumerate(examples):
        for j in range(len(example.candidates)):
            ids, mask = batch["input_ids"][row], batch["option_mask"][row]
            positions = [t for t in range(1, len(ids)) if mask[t]]
            expected = sum(logprobs[row, t - 1, ids[t]].item() for t in positions)
            assert scores[i, j].item() == pytest.approx(expected, rel=1e-5)  # same network, another path
            assert means[i, j].item() == pytest.approx(expected / len(positions), rel=1e-5)
            row += 1
    with torch.no_grad():  # the default layout: the candidates continue one pass over their shared prompt
        shared = encode(examples, tokenizer, "causal_lm", task, 32)
        torch.testing.assert_close(model(collate(shared, tokenizer.pad_token_id)), scores, rtol=0, atol=1e-5)
    metrics = evaluate(model, features, "multiple_choice", 8, tokenizer.pad_token_id, 0)
    assert set(metrics) == {"accuracy", "loss", "n", "accuracy_mean", "accuracy_sum", "accuracy_per_char"}
    assert metrics["n"] == 3 and metrics["accuracy"] == metrics["accuracy_sum"]


def test_generation_trains_on_the_answer_and_decodes(write_recipe, tmp_path):
    recipe = task_recipe(write_recipe, tmp_path, QA)
    task, tokenizer = load_task_data(recipe), load_tokenizer(recipe.model)
    example = task.splits["train"][1]
    assert example.answers == ("blue", "dark blue")
    # a one-token answer without EOS (BERT's tokenizer has none) alone in its split is scored from the prompt's row;
    # the general layout appends the answer and marks it
    feature = encode([example], tokenizer, "causal_lm", task, 32)[0]
    assert feature["next_tokens"] == tokenizer(" blue", add_special_tokens=False)["input_ids"]
    feature = encode([example], tokenizer, "causal_lm", task, 32, one_row_per_candidate=True)[0]
    (row,), (mask,) = feature["rows"], feature["option_masks"]
    assert tokenizer.decode([t for t, m in zip(row, mask) if m]) == "blue"  # the first answer (no EOS in BERT's)
    assert row[: len(feature["prompt"])] == feature["prompt"] and feature["answers"] == ["blue", "dark blue"]

    summary = train(task_recipe(write_recipe, tmp_path, QA, "fo", train={"max_steps": 40, "lr": 3e-3,
                                                                          "eval_every": 40}))
    events = read_events(tmp_path / "fo" / "metrics.jsonl")
    dev = [e for e in events if e["split"] == "dev"]
    assert {"exact_match", "f1", "loss", "n"} <= set(dev[0]) and dev[-1]["loss"] < 0.5 * dev[0]["loss"]
    assert dev[-1]["f1"] > dev[0]["f1"] and summary["metric"] == "f1"  # the tiny model learns the colours


@pytest.mark.parametrize("optimizer, quant, architecture", [
    ("adamw", {}, "llama"), ("adamw", {}, "opt"),
    ("quzo", {"format": "int4"}, "llama"),  # zeroth-order on both architectures: tests/test_zo.py (SST-2)
])
def test_multiple_choice_training_lowers_the_loss(write_recipe, tmp_path, optimizer, quant, architecture):
    model = {**LLAMA, "config": dict(TINY_LLAMA if architecture == "llama" else TINY_OPT)}
    recipe = task_recipe(write_recipe, tmp_path, CHOICE, method={"optimizer": optimizer}, quant=quant, model=model,
                         train={"max_steps": 60, "lr": 3e-3, "eval_every": 60, "batch_size": 16})
    train(recipe)
    dev = [e["loss"] for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["split"] == "dev"]
    assert dev[-1] < dev[0] - 0.005


@pytest.mark.parametrize("change, error, message", [
    ({"label_column": "premise"}, DataError, "choice.jsonl: line 1: label 'the dog' is not the index of one of"),
    ({"candidates_column": "options"}, DataError, "column 'options' not found"),
    ({"candidates_column": None}, RecipeError, "a multiple_choice task needs the column holding its candidates"),
    ({"metric": "f1"}, RecipeError, "a multiple_choice task is scored by accuracy, not f1"),
])
def test_task_mistakes_are_named(write_recipe, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        load_task_data(task_recipe(write_recipe, tmp_path, {**CHOICE, **change}))


def test_encoders_refuse_generation_tasks(write_recipe, tmp_path):
    recipe = task_recipe(write_recipe, tmp_path, QA)
    recipe.model.config = None  # MiniLM: an encoder
    with pytest.raises(UserError, match="generation tasks need a causal language model"):
        build_model(recipe, load_task_data(recipe), load_tokenizer(recipe.model))


# Built-in tasks: the first fixture row of each (raw hub format, tests/fixtures/tasks/) and what it must become.
BUILTIN_FIRST_ROWS = {
    "rte": ('Dana Reeve died of lung cancer.\nDoes this mean that "Dana Reeve is dead." is true? Yes or No?\n',
            "Yes", None),
    "cb": ('Suppose It was raining all day. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n', "Yes", None),
    "boolq": ("Water boils at 100 degrees at sea level. Does water boil at 100 degrees?", "Yes", None),
    "wic": ('Does the word "bank" have the same meaning in these two sentences? Yes, No?\nHe sat on the river bank.\n'
            'She went to the bank to deposit money.\n', "No", None),
    "wsc": ("Mark told Pete many lies about himself, which Pete included in his book. He should have been more "
            'skeptical.\nIn the previous sentence, does the pronoun "he" refer to Pete? Yes or No?\n', "Yes", None),
    "copa": ("My body cast a shadow over the grass because", "the sun was rising.",
             ("the sun was rising.", "the grass was cut.")),
    "multirc": ('Sara bought three apples and ate one.\nQuestion: How many apples are left?\nI found this answer "Two". '
                "Is that correct? Yes or No?\n", "Yes", None),
    "record": ('Paris hosted the games. @highlight\\nLondon watched.\n@placeholder hosted the games\nQuestion: what is '
               'the "@placeholder"\nAnswer:', "Paris", ("Paris", "London")),
    "squad": ("Title: Cats\nContext: Cats sleep sixteen hours a day.\nQuestion: How long do cats sleep?\nAnswer:",
              "sixteen hours", ("sixteen hours", "sixteen hours a day")),
    "drop": ("Passage: The Bears scored 7 points, then 3 more.\nQuestion: How many points in all?\nAnswer:", "10",
             ("10",)),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_FIRST_ROWS))
def test_every_builtin_task_builds_its_prompts_from_its_fixture_rows(write_recipe, name):
    from ftkit.data.batches import prompt_text

    recipe = load_recipe(write_recipe({"model": dict(LLAMA), "data": {
        "task": name, "train_file": str(FIXTURES / "tasks" / f"{name}.jsonl")}}))
    task = load_task_data(recipe, splits=("train",))
    first, second = task.splits["train"]
    prompt, target, options = BUILTIN_FIRST_ROWS[name]
    assert prompt_text(task, first) == prompt
    if task.spec.kind == "classification":
        assert task.label_words[first.label] == target and second.label != first.label
    elif task.spec.kind == "multiple_choice":
        assert first.candidates == options and first.candidates[first.label] == target
    else:
        assert first.answers == options and first.answers[0] == target
    features = encode([first], load_tokenizer(recipe.model), "causal_lm", task, 512)
    # single-token candidates share one row, longer ones one prompt pass; a generation answer has its own row
    scored = features[0].get("next_tokens", features[0].get("candidate_ids", features[0]["rows"]))
    assert len(scored) == {"classification": len(task.labels), "multiple_choice": len(options or ()),
                           "generation": 1}[task.spec.kind]


def test_a_recipe_gives_a_builtin_task_its_own_prompt_and_label_words(write_recipe):
    """data.template and data.label_words replace a built-in task's (here SST-2 in a chat format ending a line, so
    the label word follows it directly), and only those."""
    from ftkit.data.batches import prompt_text
    from ftkit.data.dataset import after_prompt
    from ftkit.data.tasks import BUILTIN_TASKS

    template = "<|user|>\nReview: {sentence}\nPositive or negative?\n<|assistant|>\n"
    data = {"task": "sst2", "n_train": 4, "n_dev": 2, "template": template,
            "label_words": {0: "negative", 1: "positive"}}
    recipe = load_recipe(write_recipe({"model": dict(LLAMA), "data": data}))
    task = load_task_data(recipe, splits=("train",))
    example = task.splits["train"][0]
    assert prompt_text(task, example) == template.format(sentence=example.texts[0])
    assert task.label_words == ["negative", "positive"] and after_prompt(task, "positive") == "positive"
    builtin = BUILTIN_TASKS["sst2"].spec
    assert task.spec.label_phrases == builtin.label_phrases and task.spec.text_columns == builtin.text_columns
    assert builtin.template == "{sentence} It was" and builtin.label_words == {"0": "terrible", "1": "great"}
    tokenizer = load_tokenizer(recipe.model)
    feature = encode([example], tokenizer, "causal_lm", task, 128)[0]
    prompt = tokenizer(prompt_text(task, example), add_special_tokens=True)["input_ids"]
    assert feature["rows"][0][: len(prompt)] == prompt


def test_record_rows_whose_answer_is_no_entity_are_reported(write_recipe, tmp_path):
    bad = tmp_path / "record.jsonl"
    bad.write_text('{"passage": "p", "query": "q @placeholder", "entities": ["A", "B"], "answers": ["C"]}\n')
    recipe = load_recipe(write_recipe({"model": dict(LLAMA), "data": {"task": "record", "train_file": str(bad)}}))
    with pytest.raises(DataError, match="record.jsonl: line 1: label '-1' is not the index of one of its 2"):
        load_task_data(recipe, splits=("train",))


def test_the_task_reference_lists_every_template_exactly():
    from ftkit.data.tasks import BUILTIN_TASKS

    reference = (REPO / "docs" / "tasks.md").read_text()
    for name, task in BUILTIN_TASKS.items():
        assert f"## {name}\n" in reference and "`" + task.spec.template.replace("\n", "\\n") + "`" in reference, name


@pytest.mark.parametrize("task, metrics", [(None, ["accuracy", "macro_f1"]), (CHOICE, ["accuracy"]),
                                           (QA, ["exact_match", "f1"])],
                         ids=["classification", "multiple_choice", "generation"])
def test_eval_prints_the_metrics_its_task_kind_declares(write_recipe, tmp_path, task, metrics):
    from typer.testing import CliRunner

    from ftkit.cli import app

    if task is None:
        path = write_recipe(tiny_recipe(model=dict(LLAMA)))
    else:
        data = {"task": "mine", "tasks": {"mine": task}, "max_seq_len": 32, "n_train": None, "n_dev": None}
        path = write_recipe(tiny_recipe(model=dict(LLAMA), data=data))
    result = CliRunner().invoke(app, ["eval", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "source" in line)
    assert [c.strip() for c in header.strip("┃│ ").split("┃") if c.strip()] == ["source", *metrics, "loss"]


def test_answers_follow_the_prompt_as_in_mezo_directly_after_a_line_end_else_after_a_space():
    """MeZO's CB template ends "Yes, No, or Maybe?\\n" and is followed by "Yes"; a space there would be scored as
    part of the answer (on SmolLM2-135M that space costs CB 11 points of macro-F1 zero-shot)."""
    from ftkit.data.dataset import after_prompt
    from ftkit.data.tasks import BUILTIN_TASKS

    found = {name: after_prompt(task, "Yes") for name, task in BUILTIN_TASKS.items()}
    assert {n for n, text in found.items() if text == "Yes"} == {"rte", "cb", "wic", "wsc", "multirc"}
    assert {n for n, text in found.items() if text == " Yes"} == {"sst2", "boolq", "copa", "record", "squad", "drop"}
