"""Chat prompts from the tokenizer's chat template (data.chat, data.system) and how a causal LM scores candidates
(data.scoring: mean, sum, per_char), against references computed by hand from the language model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA_DIR, TINY_LLAMA, tiny_recipe

from ftkit.errors import RecipeError, UserError
from ftkit.recipe import load_recipe

SST2_CHAT = ("<|im_start|>user\nIs the sentiment of this movie review positive or negative?\n{sentence}<|im_end|>\n"
             "<|im_start|>assistant\n")
QUESTION = "Is the sentiment of this movie review positive or negative?\n{sentence}"
# ChatML as SmolLM2-Instruct's tokenizer writes it (a default system message when none is given), and without it.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_CHATML = CHATML.replace("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
                              + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}", "")


def tiny_chat_tokenizer(directory, template: str | None):
    """A byte-level BPE tokenizer trained on a few SST-2 sentences, with ChatML's special tokens and `template`,
    saved to `directory` (model.tokenizer reads it from there)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (DATA_DIR / "sst2" / "train.tsv").read_text().splitlines()[1:400]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines + [QUESTION, DEFAULT_SYSTEM, "system user assistant"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)
    return directory


def chat_recipe(write_recipe, tokenizer_dir, **data) -> object:
    config = {**TINY_LLAMA, "max_position_embeddings": 512}  # no prompt is cut: the ids compare whole
    recipe = tiny_recipe(model={"name": "minilm", "config": config, "tokenizer": str(tokenizer_dir)},
                         data={"label_words": {0: "negative", 1: "positive"}, "max_seq_len": 512, **data})
    return load_recipe(write_recipe(recipe, f"r{len(json.dumps(data))}.yaml"))


def first_prompt_ids(recipe):
    from ftkit.training.setup import build_run

    run = build_run(recipe, splits=("train", "dev"))
    feature = run.encoded("dev")[0]
    masks = feature.get("option_masks", [[0] * len(feature["rows"][0])])  # the candidate's tokens follow the prompt
    return run, [t for t, m in zip(feature["rows"][0], masks[0]) if not m]


def test_a_chat_prompt_without_a_default_system_message_is_todays_hand_written_one_in_ids_and_scores(
        write_recipe, tmp_path):
    """The SST-2 chat recipes' question as the user turn of a ChatML template with no default system message: the
    same token ids as the hand-written prompt, so the same scores, bit for bit."""
    tokenizer = tiny_chat_tokenizer(tmp_path / "tok", PLAIN_CHATML)
    hand, hand_ids = first_prompt_ids(chat_recipe(write_recipe, tokenizer, template=SST2_CHAT))
    chat, chat_ids = first_prompt_ids(chat_recipe(write_recipe, tokenizer, template=QUESTION, chat=True))
    assert chat_ids == hand_ids
    assert chat.encoded("dev") == hand.encoded("dev")  # the label words follow directly in both
    assert chat.evaluate("dev") == hand.evaluate("dev")


def test_a_chat_prompt_carries_the_templates_default_system_message_or_the_recipes(write_recipe, tmp_path):
    from ftkit.data.batches import prompt_text

    tokenizer = tiny_chat_tokenizer(tmp_path / "tok", CHATML)
    for system, turn in ((None, DEFAULT_SYSTEM), ("Answer in one word.", "Answer in one word."), ("", "")):
        extra = {} if system is None else {"system": system}
        run, ids = first_prompt_ids(chat_recipe(write_recipe, tokenizer, template=QUESTION, chat=True, **extra))
        example = run.task.splits["dev"][0]
        expected = f"<|im_start|>system\n{turn}<|im_end|>\n" + SST2_CHAT.format(sentence=example.texts[0])
        assert prompt_text(run.task, example, run.tokenizer) == expected
        assert ids == run.tokenizer(expected)["input_ids"]


def test_chat_needs_a_chat_template_and_a_causal_lm_each_refused_in_one_line(write_recipe, tmp_path):
    from ftkit.training.setup import build_run

    recipe = chat_recipe(write_recipe, tiny_chat_tokenizer(tmp_path / "tok", None), template=QUESTION, chat=True)
    with pytest.raises(UserError, match=r"^data.chat: the tokenizer of .*tok has no chat template; write the chat "
                                        r"turns in data.template instead and remove data.chat$"):
        build_run(recipe, splits=("train", "dev"), encode=("dev",))
    with pytest.raises(RecipeError, match=r"data.chat: renders the prompt through a causal LM's chat template; "
                                          r"minilm is an encoder"):
        load_recipe(write_recipe(tiny_recipe(data={"chat": True})))
    with pytest.raises(RecipeError, match=r"data.system: is the system message of a chat prompt; set data.chat"):
        load_recipe(write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)}, data={"system": "Be brief."})))
    with pytest.raises(RecipeError, match=r"data.scoring: task squad is generation"):
        load_recipe(write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)},
                                             data={"task": "squad", "scoring": "sum"})))


# --- scoring ------------------------------------------------------------------------------------------------------

CANDIDATES = ["yes", "not at all", "it depends on the weather today"]  # 1, 3 and 6 words: different token counts


def choice_recipe(write_recipe, tmp_path, **data):
    rows = [{"premise": f"question {i}", "choices": CANDIDATES, "label": i % 3} for i in range(6)]
    path = tmp_path / "choices.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"kind": "multiple_choice", "train": str(path), "dev": str(path), "text_columns": ["premise"],
            "candidates_column": "choices", "template": "{premise}"}
    return load_recipe(write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)}, data={
        "task": "mine", "tasks": {"mine": task}, "n_train": None, "n_dev": None, **data})))


def reference_logprobs(run, prompt: str, candidate: str) -> tuple[float, int]:
    """(sum of the candidate's token log-probabilities after the prompt, their number), from the LM's full logits
    over prompt + candidate alone."""
    tok = run.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    candidate_ids = tok(" " + candidate, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + candidate_ids])
    with torch.no_grad():
        logprobs = run.model.backbone(input_ids=ids).logits[0].float().log_softmax(-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(candidate_ids) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, candidate_ids)), len(candidate_ids)


def test_each_scoring_of_multi_token_candidates_matches_a_reference_from_the_logits(write_recipe, tmp_path):
    from ftkit.data.batches import collate
    from ftkit.training.setup import build_run

    run = build_run(choice_recipe(write_recipe, tmp_path), splits=("train", "dev"))
    run.model.eval()
    features = run.encoded("dev")
    counts = [len(c) for c in features[0]["candidate_ids"]]  # after one pass over the shared prompt
    assert len(set(counts)) == 3, counts  # three token counts
    with torch.no_grad():
        scores = run.model.scores(collate(features, run.pad_id))
    for row, example in enumerate(run.task.splits["dev"]):
        for c, candidate in enumerate(CANDIDATES):
            total, tokens = reference_logprobs(run, example.texts[0], candidate)
            expected = {"sum": total, "mean": total / tokens, "per_char": total / len(candidate)}
            for name, value in expected.items():  # float32 sums of a few terms, padded batch vs one row
                assert scores[name][row, c].item() == pytest.approx(value, rel=1e-5, abs=1e-5), (name, row, c)


def test_single_token_candidates_sum_equals_mean_and_per_char_divides_by_the_words_length(write_recipe):
    from ftkit.data.batches import collate
    from ftkit.training.setup import build_run

    run = build_run(load_recipe(write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)}))), splits=("train", "dev"))
    run.model.eval()
    batch = collate(run.encoded("dev")[:8], run.pad_id)
    assert "next_tokens" in batch  # " terrible" and " great" are one token each
    with torch.no_grad():
        scores = run.model.scores(batch)
    assert torch.equal(scores["sum"], scores["mean"])
    lengths = torch.tensor([len(w) for w in run.task.label_words], dtype=torch.float32)
    torch.testing.assert_close(scores["per_char"], scores["sum"] / lengths, rtol=0, atol=0)


def test_the_scoring_decides_the_training_scores_and_eval_reports_every_scoring(write_recipe, tmp_path):
    from ftkit.data.batches import collate
    from ftkit.training.setup import build_run

    default = build_run(choice_recipe(write_recipe, tmp_path), splits=("train", "dev"))
    assert default.model.scoring == "sum"  # recipe-defined tasks: the sum (docs/tasks.md)
    for name in ("mean", "sum", "per_char"):
        run = build_run(choice_recipe(write_recipe, tmp_path, scoring=name), splits=("train", "dev"))
        run.model.eval()
        batch = collate(run.encoded("dev"), run.pad_id)
        with torch.no_grad():
            assert torch.equal(run.model(batch), run.model.scores(batch)[name])
        metrics = run.evaluate("dev")
        assert {"accuracy_mean", "accuracy_sum", "accuracy_per_char"} <= set(metrics)
        assert metrics["accuracy"] == metrics[f"accuracy_{name}"]
    builtin = build_run(load_recipe(write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)}))),
                        splits=("train", "dev"))
    assert builtin.model.scoring == "mean"  # built-in tasks keep MeZO's protocol


def test_validate_shows_the_chat_prompt_and_the_scoring(write_recipe):
    from typer.testing import CliRunner

    from ftkit.cli import app

    path = write_recipe(tiny_recipe(model={"config": dict(TINY_LLAMA)},
                                    data={"chat": True, "system": "Be brief.", "scoring": "per_char"}))
    shown = CliRunner().invoke(app, ["validate", str(path)], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    assert "task sst2 (chat prompt with system message 'Be brief.', candidates scored by per_char)" in shown.output
    shown = CliRunner().invoke(app, ["validate", str(write_recipe(tiny_recipe()))], terminal_width=400)
    assert "task sst2 (candidates scored by mean (auto))" in shown.output


def test_eval_prints_the_accuracy_under_each_scoring(write_recipe, tmp_path):
    from typer.testing import CliRunner

    from ftkit.cli import app

    recipe = choice_recipe(write_recipe, tmp_path, scoring="per_char")
    shown = CliRunner().invoke(app, ["eval", recipe.source, "--json"], terminal_width=400)
    assert shown.exit_code == 0, shown.output
    metrics = json.loads(shown.output)
    assert metrics["accuracy"] == metrics["accuracy_per_char"]
    table = CliRunner().invoke(app, ["eval", recipe.source], terminal_width=400).output
    assert (f"accuracy by scoring: mean {metrics['accuracy_mean']:.4f}, sum {metrics['accuracy_sum']:.4f}, "
            f"per_char {metrics['accuracy_per_char']:.4f}") in table


def test_the_race_keeps_the_hand_written_sst2_chat_prompt_it_started_with(tmp_path):
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import zo_race

    data = zo_race.task_data("sst2", tmp_path)
    assert data["template"] == SST2_CHAT and not data.get("chat")
    assert data["label_words"] == {0: "negative", 1: "positive"}
