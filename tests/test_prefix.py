"""Candidates of several tokens scored from one pass over their shared prompt (ftkit.models.prefix) against the
general layout, one full row per candidate: the same scores and the same gradients, to float rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_LLAMA, TINY_OPT, tiny_recipe

from ftkit.data.batches import collate, encode, eval_chunks
from ftkit.data.dataset import load_task_data
from ftkit.models.build import build_model
from ftkit.models.load import load_tokenizer
from ftkit.recipe import recipe_from_dict

# Prompts of 3 to 7 tokens (one with a leading 101, the tokenizer's BOS-like [CLS]) and candidates of 1 to 3 tokens,
# two or three per example: every kind of padding the batch can hold.
PROMPTS = [[101, 7, 8, 9, 10, 11, 12], [101, 13, 14], [15, 16, 17, 18, 19]]
CANDIDATES = [[[20], [21, 22, 23], [24, 25]], [[26, 27], [28]], [[29, 30, 31], [32, 33, 34], [35]]]
LABELS = [1, 0, 2]


def model_for(config=TINY_LLAMA, **sections):
    recipe = recipe_from_dict(tiny_recipe(model={"config": dict(config)}, **sections))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    assert kind == "causal_lm"
    return model, tokenizer.pad_token_id


def both_layouts(pad_id: int) -> tuple[dict, dict]:
    shared = [{"rows": [p], "candidate_ids": c, "labels": y} for p, c, y in zip(PROMPTS, CANDIDATES, LABELS)]
    general = [{"rows": [p + c for c in cs], "option_masks": [[0] * len(p) + [1] * len(c) for c in cs], "labels": y}
               for p, cs, y in zip(PROMPTS, CANDIDATES, LABELS)]
    return collate(shared, pad_id), collate(general, pad_id)


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_OPT], ids=["llama", "opt"])
def test_shared_prompt_scores_equal_one_row_per_candidate(config):
    model, pad_id = model_for(config)
    model.eval()
    shared, general = both_layouts(pad_id)
    assert shared["input_ids"].shape == (3, 7) and shared["candidate_ids"].shape == (8, 3)
    with torch.no_grad():
        scores, expected = model(shared), model(general)
    assert scores.shape == (3, 3) and torch.isinf(scores[1, 2]) and torch.isinf(expected[1, 2])
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=1e-5)
    # a candidate's score is not its first token's alone: the continuation pass counts
    assert (expected[finite] - expected[finite].round(decimals=1)).abs().max() > 0


@pytest.mark.parametrize("sections", [{}, {"method": {"adapter": "lora"}}], ids=["full", "lora"])
def test_first_order_gradients_flow_through_the_cache(sections):
    """The loss and every trainable parameter's gradient agree between the layouts: gradients reach the prompt's
    pass through the cached keys and values."""
    model, pad_id = model_for(**sections)
    model.train()
    grads = []
    for batch in both_layouts(pad_id):
        model.zero_grad()
        loss = F.cross_entropy(model(batch), batch["labels"])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss, shared), (expected_loss, general) = grads
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert shared.keys() == general.keys() and len(shared) > 0
    for name in general:
        scale = general[name].abs().max().item() + 1e-12
        torch.testing.assert_close(shared[name], general[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # the prompt's tokens get gradient from the candidates' tokens only through the cache
    if not sections:
        embedding = shared["lm.model.embed_tokens.weight"]
        assert embedding[[7, 8, 13, 15]].abs().sum() > 0


def test_low_bit_model_scores_equal_one_row_per_candidate():
    model, pad_id = model_for(quant={"format": "int4"})
    model.eval()
    shared, general = both_layouts(pad_id)
    with torch.no_grad():
        scores, expected = model(shared), model(general)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=1e-5)


def test_multi_token_candidates_share_the_prompt_row():
    """encode: label words of one to three tokens give one prompt row per example with every word after it; the
    prompt is cut so the longest word fits; the rows sort as their one-row-per-candidate rows do."""
    recipe = recipe_from_dict(tiny_recipe(model={"config": dict(TINY_LLAMA)}))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    # label words of one and of three tokens: the layout depends only on their token counts
    words = dict(zip(task.labels, ["great", "unbelievably dreadful"]))
    task = dataclasses.replace(task, spec=dataclasses.replace(task.spec, label_words=words))
    examples = task.splits["train"][:12]
    features = encode(examples, tokenizer, "causal_lm", task, 16)
    general = encode(examples, tokenizer, "causal_lm", task, 16, one_row_per_candidate=True)
    lengths = sorted({len(c) for c in features[0]["candidate_ids"]})
    assert lengths[0] == 1 and lengths[-1] >= 3
    for f, g in zip(features, general):
        (prompt,) = f["rows"]
        assert len(prompt) + lengths[-1] <= 16
        assert [prompt + c for c in f["candidate_ids"]][-1] == g["rows"][-1]
    assert eval_chunks(features, 5) == eval_chunks(general, 5)
