"""Models: parameter counts on the meta device, the prototype head, and causal-LM candidate scoring."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_LLAMA, TINY_OPT, tiny_recipe
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.data.batches import collate, encode
from ftkit.data.dataset import load_task_data
from ftkit.eval import evaluate
from ftkit.models.build import build_model
from ftkit.models.count import count_parameters, group_of
from ftkit.models.load import load_tokenizer
from ftkit.recipe import load_recipe, recipe_from_dict

LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


def test_llama_2_7b_counts_on_meta_device(write_recipe):
    path = write_recipe({"model": {"name": "meta-llama/Llama-2-7b-hf", "config": LLAMA_2_7B}})
    result = CliRunner().invoke(app, ["count-params", str(path), "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.output)
    assert counts["total"] == 6_738_415_616 and counts["trainable"] == 6_738_415_616
    assert counts["stored_bytes"] == 4 * 6_738_415_616
    assert counts["groups"]["norms"]["total"] == 65 * 4096
    assert counts["groups"]["embeddings"]["total"] == counts["groups"]["head"]["total"] == 32000 * 4096


def test_minilm_full_fine_tuning_counts():
    counts = count_parameters(load_recipe(REPO / "recipes" / "full_ft_sst2.yaml"))
    head = 384 * 2 + 2
    assert counts["backbone"] == 22_713_216
    assert counts["total"] == 22_713_216 + head
    # BERT's pooler is not used by mean pooling: it stays frozen and is not perturbed or updated.
    assert counts["groups"]["pooler"] == {"total": 147_840, "trainable": 0, "stored_bytes": 4 * 147_840}
    assert counts["trainable"] == 22_713_216 - 147_840 + head


def test_bfloat16_halves_stored_bytes(write_recipe):
    path = write_recipe({"model": {"config": LLAMA_2_7B | {"num_hidden_layers": 1}, "dtype": "bfloat16"}})
    counts = count_parameters(load_recipe(path))
    assert counts["stored_bytes"] == 2 * counts["total"]


@pytest.mark.parametrize("name, group", [
    ("encoder.encoder.layer.0.attention.output.LayerNorm.weight", "norms"),
    ("encoder.encoder.layer.0.attention.self.query.weight", "attention"),
    ("encoder.encoder.layer.0.output.dense.weight", "mlp"),
    ("lm.model.layers.3.mlp.down_proj.weight", "mlp"),
    ("lm.model.embed_tokens.weight", "embeddings"),
    ("head.weight", "head"),
])
def test_parameter_groups(name, group):
    assert group_of(name) == group


def test_prototype_head_starts_far_above_chance():
    """Zero-shot accuracy of the real MiniLM with the prototype head on 200 dev sentences (71% on all 872)."""
    recipe = recipe_from_dict({"data": {"n_train": None, "n_dev": None, "calibration_examples": 256}})
    task = load_task_data(recipe)
    tokenizer = load_tokenizer(recipe.model)
    model, kind, facts = build_model(recipe, task, tokenizer)
    assert kind == "encoder" and facts["prototype_scale"] > 0
    features = encode(task.splits["dev"][:200], tokenizer, kind, task, 64)
    accuracy = evaluate(model, features, "classification", 100, tokenizer.pad_token_id, 2)["accuracy"]
    assert accuracy > 0.64  # chance is 0.5; the full dev set gives 0.712


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_OPT], ids=["llama", "opt"])
def test_candidate_scores_match_hand_computation(config):
    recipe = recipe_from_dict(tiny_recipe(model={"config": dict(config)}))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    assert kind == "causal_lm"
    model.eval()
    examples = task.splits["train"][:3]
    features = encode(examples, tokenizer, kind, task, 32)
    # SST-2's label words are one token each: one row per example (the prompt), the candidates' tokens beside it
    assert all(len(f["rows"]) == 1 and len(f["next_tokens"]) == 2 for f in features)
    batch = collate(features, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(batch)
        assert scores.shape == (3, 2)
        for example, feature in enumerate(features):
            (prompt,) = feature["rows"]
            for candidate, token in enumerate(feature["next_tokens"]):
                logits = model.lm(input_ids=torch.tensor([prompt + [token]])).logits[0].float()
                expected = F.log_softmax(logits, -1)[len(prompt) - 1, token].item()
                # the same network run batched (padded) and alone: equal to a relative 1e-5
                assert scores[example, candidate].item() == pytest.approx(expected, rel=1e-5)
        # The general layout (a row per candidate, its tokens marked) scores the same: one forward per example
        # instead of two changes nothing but the cost.
        general = encode(examples, tokenizer, "causal_lm", task, 32, one_row_per_candidate=True)
        assert all(len(f["rows"]) == 2 and "next_tokens" not in f for f in general)
        torch.testing.assert_close(model(collate(general, tokenizer.pad_token_id)), scores, rtol=1e-5, atol=1e-6)


def test_single_token_candidates_of_differing_counts_score_as_their_own_rows():
    """One row per example with `next_tokens` (padded with -1) against the general layout built by hand: equal
    scores, and -inf where an example has fewer candidates."""
    recipe = recipe_from_dict(tiny_recipe(model={"config": dict(TINY_LLAMA)}))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    model, _, _ = build_model(recipe, task, tokenizer)
    model.eval()
    prompts, tokens = [[101, 7, 8, 9, 10], [101, 11, 12]], [[20, 21, 22], [23, 24]]
    shared = [{"rows": [p], "next_tokens": t, "labels": 0} for p, t in zip(prompts, tokens)]
    general = [{"rows": [p + [c] for c in t], "option_masks": [[0] * len(p) + [1] for _ in t], "labels": 0}
               for p, t in zip(prompts, tokens)]
    with torch.no_grad():
        scores = model(collate(shared, tokenizer.pad_token_id))
        expected = model(collate(general, tokenizer.pad_token_id))
    assert scores.shape == (2, 3) and torch.isinf(scores[1, 2]) and torch.isinf(expected[1, 2])
    torch.testing.assert_close(scores[torch.isfinite(scores)], expected[torch.isfinite(expected)], rtol=1e-5,
                               atol=1e-6)


def test_local_directory_loads_through_transformers(tmp_path, write_recipe):
    """A model saved with save_pretrained (weights + tokenizer) loads by path, with its trained weights."""
    from conftest import TINY_BERT
    from transformers import AutoModel

    from ftkit.models.load import load_config
    from ftkit.models.packaged import minilm_path

    config = load_config(recipe_from_dict({"model": {"config": dict(TINY_BERT)}}).model)
    config.vocab_size = 30522
    torch.manual_seed(1)
    saved = AutoModel.from_config(config)
    saved.save_pretrained(tmp_path / "tiny")
    load_tokenizer(recipe_from_dict({}).model).save_pretrained(tmp_path / "tiny")
    recipe = load_recipe(write_recipe(tiny_recipe(model={"name": str(tmp_path / "tiny"), "config": None})))
    task = load_task_data(recipe, splits=("train",))
    model, kind, _ = build_model(recipe, task, load_tokenizer(recipe.model))
    assert kind == "encoder" and minilm_path() != tmp_path / "tiny"
    assert torch.equal(model.encoder.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("quant", [{}, {"format": "int8"}])
def test_inline_config_with_pretrained_weights_loads_the_weights(tmp_path, write_recipe, quant):
    """Paper-scale recipes state their architecture inline (offline validate / count-params) and train the
    pretrained weights of `model.name` (`weights: pretrained`); `weights: auto` with a config is a random model."""
    from transformers import AutoModelForCausalLM

    from ftkit.models.load import load_config

    config = load_config(recipe_from_dict({"model": {"config": dict(TINY_LLAMA)}}).model)
    config.vocab_size = 30522  # MiniLM's tokenizer, saved beside the weights
    torch.manual_seed(7)
    saved = AutoModelForCausalLM.from_config(config)
    saved.save_pretrained(tmp_path / "llama")
    load_tokenizer(recipe_from_dict({}).model).save_pretrained(tmp_path / "llama")
    built = {}
    for weights in ("pretrained", "auto"):
        model_spec = {"name": str(tmp_path / "llama"), "config": dict(TINY_LLAMA), "weights": weights,
                      "head_init": "random"}
        recipe = load_recipe(write_recipe(tiny_recipe(model=model_spec, quant=quant), f"{weights}.yaml"))
        task = load_task_data(recipe, splits=("train",))
        model, kind, _ = build_model(recipe, task, load_tokenizer(recipe.model))
        built[weights] = model.backbone
    reference = saved.model.layers[0].self_attn.q_proj
    for weights, expect_equal in (("pretrained", True), ("auto", False)):
        layer = built[weights].model.layers[0].self_attn.q_proj
        weight = layer.dequantize() if hasattr(layer, "dequantize") else layer.weight.detach()
        close = torch.allclose(weight, reference.weight.detach(), atol=0.02 * reference.weight.abs().max().item())
        assert close is expect_equal, weights


def test_paper_scale_recipes_count_offline():
    """The OPT-1.3B and LLaMA-2-7B recipes carry their architecture inline: counts need no download."""
    paper = REPO / "recipes" / "paper"
    full = count_parameters(load_recipe(paper / "opt1.3b_full_ft.yaml"))
    assert full["total"] == full["trainable"] == 1_315_758_080
    quzo = count_parameters(load_recipe(paper / "opt1.3b_quzo_int4.yaml"))
    word_embeddings = 50272 * 2048  # frozen by default for zeroth-order methods
    assert quzo["total"] == 1_315_758_080 and quzo["trainable"] == 1_315_758_080 - word_embeddings
    assert quzo["stored_bytes"] < full["stored_bytes"] / 5  # int4 codes and bf16 scales against fp32
    assert count_parameters(load_recipe(paper / "llama2_7b_mezo.yaml"))["total"] == 6_738_415_616
