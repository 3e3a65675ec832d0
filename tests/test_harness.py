"""`ftkit eval --harness`: lm-evaluation-harness on a run's model as trained (int4 layers and a LoRETTA adapter here),
checked against `ftkit eval` and against log-likelihoods and greedy decodes computed by hand. Importing lm_eval
takes a few seconds: three tests import it."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
import yaml
from conftest import REPO, TINY_LLAMA, tiny_recipe
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.errors import UserError
from ftkit.harness import _load_model, evaluate_harness
from ftkit.recipe import load_recipe
from ftkit.runs import checkpoint_to_use, evaluate_target
from ftkit.training.loop import train

TASKS = REPO / "tests" / "fixtures" / "harness"  # reviews.yaml (the harness's task) over reviews.jsonl
REVIEWS = {"train": str(TASKS / "reviews.jsonl"), "dev": str(TASKS / "reviews.jsonl"), "text_columns": ["text"],
           "label_column": "label", "label_words": {0: "bad", 1: "good"}, "template": "{text} It was"}
LLAMA = {"name": "minilm", "config": dict(TINY_LLAMA), "head_init": "random"}


def reviews_recipe(tmp_path, name: str = "recipe.yaml"):
    """A recipe of the tiny Llama on the 16 reviews (train and dev alike), its run in tmp_path/run."""
    data = {"task": "reviews", "tasks": {"reviews": dict(REVIEWS)}, "max_seq_len": 32, "n_train": None,
            "n_dev": None}
    recipe = tiny_recipe(model=dict(LLAMA), data=data)
    recipe["train"].update(output_dir=str(tmp_path / "run"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def by_hand(lm, ids: list[int], scored: int) -> float:
    """The sum of the log-probabilities of the last `scored` tokens of `ids`, from one unpadded forward pass."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logits[i - 1, ids[i]].item() for i in range(len(ids) - scored, len(ids)))


def test_harness_agrees_with_ftkit_eval_on_a_trained_int4_adapter_run(tmp_path, monkeypatch):
    # A tiny Llama in int4 with a LoRETTA_rep adapter, trained on the 16 reviews until it tells most apart.
    spec = load_recipe(reviews_recipe(tmp_path), ["quant.format=int4", "method.adapter=loretta_rep",
                                                  "train.max_steps=16", "train.lr=3e-2", "train.eval_every=8"])
    train(spec)
    run_dir = tmp_path / "run"
    ftkit = evaluate_target(run_dir, "dev", device="cpu")
    assert 0.75 <= ftkit["accuracy"] < 1  # trained, and not a constant prediction: agreement means something
    monkeypatch.chdir(TASKS)  # the task's data_files are relative, as lm-eval reads them
    output = evaluate_harness(run_dir, "reviews_ftkit", TASKS, batch_size=5, device="cpu", log_samples=True)
    assert output["results"]["reviews_ftkit"]["acc,none"] == pytest.approx(ftkit["accuracy"], abs=1e-12)
    # Each candidate's log-likelihood is the sum of its tokens' log-probabilities after ftkit's prompt (ftkit's
    # tokenisation: the prompt with the tokenizer's special tokens, the word after it without), from the checkpoint.
    model, tokenizer = _load_model(spec, checkpoint_to_use(run_dir), None, torch.device("cpu"))
    samples = output["samples"]["reviews_ftkit"]
    assert len(samples) == 16
    for sample in samples:
        prompt = tokenizer(f"{sample['doc']['text']} It was")["input_ids"]
        for word, (logprob, _) in zip(["bad", "good"], (r[0] for r in sample["resps"])):
            word_ids = tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
            assert logprob == pytest.approx(by_hand(model.lm, prompt + word_ids, len(word_ids)), abs=1e-5)
    saved = json.loads((run_dir / "harness" / "reviews_ftkit.json").read_text())
    assert saved["results"]["reviews_ftkit"]["acc,none"] == ftkit["accuracy"] and "samples" not in saved

    # The command: a table, the same figure; unknown tasks and stray options in one line each.
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--harness", "reviews_ftkit", "--include-path",
                                      str(TASKS), "--limit", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["results"]["reviews_ftkit"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in sorted(samples, key=lambda s: s["doc_id"])[:4]) / 4)
    import lm_eval.tasks

    local_only = lm_eval.tasks.TaskManager  # lm-eval's own index of 15,000 tasks takes seconds: leave it out here
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: local_only(**{**kw, "include_defaults": False}))
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--harness", "reviews_ftkit,nope", "--include-path",
                                      str(TASKS)])
    assert result.exit_code == 2 and "unknown task nope: not one of lm-eval's tasks" in result.stderr
    monkeypatch.chdir(run_dir)
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--harness", "reviews_ftkit", "--include-path",
                                      str(TASKS)])
    missing = f"Unable to find '{run_dir / 'reviews.jsonl'}' (a task's relative data_files are read from the working"
    assert result.exit_code == 2 and missing in result.stderr
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--limit", "4"])
    assert result.exit_code == 2 and "--include-path, --limit and --batch-size apply with --harness" in result.stderr


def test_harness_model_answers_each_request_type_as_computed_by_hand(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from ftkit.harness_lm import FtkitLM

    spec = load_recipe(reviews_recipe(tmp_path))
    model, tokenizer = _load_model(spec, None, None, torch.device("cpu"))
    lm, prefix = model.lm, tokenizer.cls_token_id  # the minilm tokenizer has no BOS or EOS: CLS stands in

    def requests(kind, *args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    # loglikelihood: multi-token continuations, a trailing space moved onto the continuation, an empty context,
    # one-token continuations of one context (scored from one row).
    harness = FtkitLM(model, tokenizer, batch_size=2)
    pairs = [("the film was", " a complete disaster"), ("short", " yes"), ("a long prompt with many words in it ",
             "unbelievably"), ("", "hello world"), ("short", " no")]  # " yes" and " no" share a row
    got = harness.loglikelihood(requests("loglikelihood", *pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context.endswith(" "):
            context, continuation = context[:-1], " " + continuation
        head = tokenizer(context)["input_ids"] if context else [prefix]
        tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        assert logprob == pytest.approx(by_hand(lm, head + tail, len(tail)), abs=1e-5)
        with torch.no_grad():
            argmax = lm(input_ids=torch.tensor([head + tail])).logits[0, len(head) - 1 : -1].argmax(-1).tolist()
        assert greedy == (argmax == tail)

    # loglikelihood_rolling: the whole text after the prefix token in one window (the context fits), and in the
    # harness's windows of 8 tokens each scored by hand; an empty text has log-likelihood 0.
    text = "the quick brown fox jumps over the lazy dog and then runs far away into the dark woods"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    whole = harness.loglikelihood_rolling(requests("loglikelihood_rolling", (text,), ("",)))
    assert whole[0] == pytest.approx(by_hand(lm, [prefix] + ids, len(ids)), abs=1e-4) and whole[1] == 0.0
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, 8, 1)]
    assert len(windows) > 2
    short = FtkitLM(model, tokenizer, batch_size=2, max_length=8).loglikelihood_rolling(
        requests("loglikelihood_rolling", (text,)))
    assert short[0] == pytest.approx(sum(by_hand(lm, c + p, len(p)) for c, p in windows), abs=1e-4)

    # generate_until: greedy decodes of each context alone (transformers' generate, no padding), cut at the stop
    # string; batched with left padding, contexts of different lengths, two groups of generation options.
    contexts = ["the film was", "a long prompt with many more words in it than the first", "why"]

    def alone(context, budget):
        prompt = torch.tensor([tokenizer(context)["input_ids"]])
        with torch.no_grad():
            out = lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=budget,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)

    full = [alone(c, 12) for c in contexts]
    stop = full[1].split()[3]  # a word the second decode reaches: it is cut there
    options = [{"until": [stop], "max_gen_toks": 12, "do_sample": False}, {"until": [], "max_gen_toks": 5}]
    args = [(c, options[0]) for c in contexts] + [(contexts[0], options[1])]
    got = harness.generate_until(requests("generate_until", *args))
    assert got[:3] == [f.split(stop)[0] for f in full] and stop not in got[1] and got[1]
    assert got[3] == alone(contexts[0], 5)


def test_harness_refuses_an_encoder_and_names_the_missing_extra(write_recipe, tmp_path, monkeypatch):
    encoder = write_recipe(tiny_recipe(), "encoder.yaml")
    with pytest.raises(UserError, match="--harness needs a causal language model; minilm is an encoder"):
        evaluate_harness(encoder, "sst2", device="cpu")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"lm-evaluation-harness, an optional extra: pip install 'ftkit\[eval\]'"):
        evaluate_harness(reviews_recipe(tmp_path), "reviews_ftkit", device="cpu")


def test_the_harness_runs_without_notes_that_do_not_concern_the_run(caplog, tmp_path, monkeypatch):
    """lm-eval's warnings (a custom dataset's --metadata hint) and its `git describe` of the working directory
    ("fatal: not a git repository" outside one) are kept out of an evaluation, and put back after it."""
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator as evaluator

    from ftkit.harness import quiet

    monkeypatch.chdir(tmp_path)  # not a git checkout
    calls = []
    monkeypatch.setattr(evaluator, "get_git_commit_hash", lambda: calls.append(1) or "abc")
    with caplog.at_level(logging.WARNING):
        with quiet():
            logging.getLogger("lm_eval.api.task").warning("reviews: Custom kwargs can be passed to `--metadata`")
            assert evaluator.get_git_commit_hash() is None and not calls
        assert not [r for r in caplog.records if r.name.startswith("lm_eval")]
        logging.getLogger("lm_eval.api.task").warning("after the evaluation")
    assert [r.getMessage() for r in caplog.records] == ["after the evaluation"]
    assert evaluator.get_git_commit_hash() == "abc"
