"""LoRETTA and LoRA: TT layers (shapes, counts, both forwards), identity init, exact merge, save/load, paper counts."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    REPO,
    TINY_LLAMA,
    TINY_OPT,
    assert_sums_close,
    tiny_recipe,
    tt_magnitude,
    tt_terms,
)

from ftkit.adapters.loretta_rep.layer import LorettaRepLinear
from ftkit.adapters.tt import TTLinear, balanced_factors, default_modes
from ftkit.data.batches import collate, encode
from ftkit.data.dataset import load_task_data
from ftkit.errors import UserError
from ftkit.models.build import build_model
from ftkit.models.count import count_parameters
from ftkit.models.load import load_tokenizer
from ftkit.recipe import load_recipe, recipe_from_dict


@pytest.mark.parametrize("n", [384, 768, 1024, 1536, 2048, 3072, 4096, 11008, 97, 64, 8])
def test_automatic_factors_multiply_back_and_are_balanced(n):
    factors = balanced_factors(n, default_modes(n))
    assert math.prod(factors) == n and len(factors) <= default_modes(n)
    if n != 97:  # a prime stays whole
        assert max(factors) <= 6 * min(factors) or 43 in factors  # 11008 = 2^8 * 43


def test_explicit_shapes_are_validated():
    with pytest.raises(ValueError, match=r"TT shape \[8, 8, 8\] multiplies to 512, but a 768 x 64 matrix needs 49152"):
        TTLinear(768, 64, 5, [8, 8, 8])


@pytest.mark.parametrize("in_f, out_f, shape", [(768, 64, [8, 8, 12, 8, 8]), (64, 768, None), (384, 384, None),
                                                (4096, 8, [16, 16, 8, 4, 4]), (8, 4096, [16, 16, 8, 4, 4]),
                                                (97, 5, None), (4096, 64, [16, 16, 16, 4, 4, 4])])
def test_parameter_count_and_both_forwards_agree(in_f, out_f, shape):
    torch.manual_seed(0)
    layer = TTLinear(in_f, out_f, 5, shape, bias=True)
    ranks = [1] + [5] * (len(layer.shape) - 1) + [1]
    expected = sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(layer.shape))
    assert layer.num_parameters == expected == sum(c.numel() for c in layer.cores)
    x = torch.randn(3, 4, in_f)
    built = layer(x, mode="materialise")
    with torch.no_grad():
        magnitude, terms = x.abs() @ tt_magnitude(layer) + layer.bias.abs(), tt_terms(layer)
        assert_sums_close(built, x @ layer.to_matrix() + layer.bias, magnitude, terms, "materialise")
        if layer.split is None:  # unaligned: only the built matrix defines the map
            assert layer.flops(12)[0] == math.inf
            with pytest.raises(ValueError, match="not aligned"):
                layer(x, mode="contract")
        else:
            assert_sums_close(layer(x, mode="contract"), built, magnitude, terms, "contract")
        assert_sums_close(layer(x), built, magnitude, terms, "auto")


def test_forward_picks_the_cheaper_path_by_flop_count():
    adapter_sized = TTLinear(4096, 64, 5, [16, 16, 16, 4, 4, 4])
    contract, materialise = adapter_sized.flops(2048)
    assert contract < materialise  # contracting core by core never builds the 4096 x 64 matrix
    small = TTLinear(16, 16, 5, [4, 4, 4, 4])
    assert small.flops(1)[0] < small.flops(1)[1]  # one row: building the matrix is not worth it
    assert small.flops(10_000)[1] < small.flops(10_000)[0]  # many rows: one small matmul beats four contractions


def test_paper_init_matches_glorot_scale():
    torch.manual_seed(0)
    stds = [TTLinear(768, 64, 5, [8, 8, 12, 8, 8]).to_matrix().std().item() for _ in range(20)]
    assert sum(stds) / len(stds) == pytest.approx(math.sqrt(1 / (768 + 64)), rel=0.15)


def built(adapter: str, config: dict | None = None, quant: str = "none", **loretta):
    model_options = {"config": dict(config)} if config else {}
    recipe = recipe_from_dict(tiny_recipe(model=model_options, method={"adapter": adapter, "loretta": loretta},
                                          quant={"format": quant}))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    batch = collate(encode(task.splits["train"][:6], tokenizer, kind, task, 32), tokenizer.pad_token_id)
    return recipe, model, batch


def base_logits(config=None):
    _, model, batch = built("none", config)
    return model.eval()(batch)


@pytest.mark.parametrize("config", [None, TINY_LLAMA, TINY_OPT], ids=["bert", "llama", "opt"])
@pytest.mark.parametrize("adapter", ["loretta_adp", "loretta_rep", "lora"])
def test_identity_init_leaves_outputs_unchanged_and_gradients_flow(config, adapter):
    _, model, batch = built(adapter, config)
    model.eval()
    assert torch.equal(model(batch), base_logits(config))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("loretta_" in n or "lora_" in n or n.startswith("head.") or "norm" in n.lower()
                             for n in trainable)
    model(batch).logsumexp(-1).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "loretta_" in n or "lora_" in n)


def test_paper_init_changes_the_model():
    _, model, batch = built("loretta_adp", init="paper")
    assert not torch.allclose(model.eval()(batch), base_logits())


def test_adapter_placement_per_architecture():
    from ftkit.adapters.loretta_adp.layer import InputAdapter, OutputAdapter

    _, bert, _ = built("loretta_adp")
    wrapped = {n for n, m in bert.named_modules() if isinstance(m, OutputAdapter)}
    assert wrapped == {f"encoder.encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("attention.output", "output")}
    _, llama, _ = built("loretta_adp", TINY_LLAMA)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in llama.named_modules() if isinstance(m, OutputAdapter)}
    assert kinds == {"gate_proj": InputAdapter, "up_proj": InputAdapter, "down_proj": OutputAdapter}


def test_merged_loretta_rep_equals_unmerged_and_unmerges():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    original = base.weight.detach().clone()
    layer = LorettaRepLinear(base, r=8, alpha=16, dropout=0.0, tensor_rank=5, init="paper")
    x = torch.randn(5, 64)
    with torch.no_grad():
        unmerged = layer(x)
        update = layer.scaling * (tt_magnitude(layer.loretta_a) @ tt_magnitude(layer.loretta_b)).T
        magnitude = x.abs() @ (original.abs() + update).T + base.bias.abs()
        terms = 64 + 1 + tt_terms(layer.loretta_a) + tt_terms(layer.loretta_b)
        layer.merge()
        assert_sums_close(layer(x), unmerged, magnitude, terms, "merged")
        layer.unmerge()
        assert_sums_close(base.weight, original, original.abs() + update, 2 + terms, "unmerged weight")
        assert_sums_close(layer(x), unmerged, magnitude, terms, "unmerged")


def test_wrong_explicit_shape_is_a_user_error_naming_the_key(write_recipe):
    # Caught from the model's config, before any weight is read (and by `validate` when the config is known).
    expected = r"method.loretta.shapes.a: \[4, 4\] multiplies to 16, but the a factor of this model's layers is a 32 x 8"
    with pytest.raises(UserError, match=expected):
        built("loretta_rep", shapes={"a": [4, 4]})
    with pytest.raises(UserError, match=expected):
        load_recipe(write_recipe(tiny_recipe(method={"adapter": "loretta_rep", "loretta": {"shapes": {"a": [4, 4]}}})))
    # Where the config does not tell the layers' sizes (explicit target modules), building the layer says it.
    with pytest.raises(UserError, match=r"method.loretta.shapes: layer .*query: TT shape \[4, 4\] multiplies to 16"):
        built("loretta_rep", shapes={"a": [4, 4]}, target_modules=["query"])


def test_adapter_checkpoint_round_trip_restores_outputs_with_norms_and_head(write_recipe, tmp_path):
    from ftkit.training import checkpoint as ckpt
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(
        method={"adapter": "loretta_adp", "loretta": {"tt_head": True}},
        train={"max_steps": 6, "lr": 1e-2, "output_dir": str(tmp_path / "run")})))
    train(recipe)
    step = ckpt.resolve(tmp_path / "run" / "checkpoints")
    from safetensors.torch import load_file

    saved = load_file(str(step / ckpt.WEIGHTS))
    assert any("LayerNorm" in k for k in saved) and "head.weight" in saved
    import json

    description = json.loads((step / "adapter_config.json").read_text())
    assert description["adapter"] == "loretta_adp" and description["options"]["tt_head"] is True
    assert description["base_model"] == "minilm"
    assert any(k.startswith("pre_head.") for k in saved) and all(".base." not in k for k in saved)
    _, fresh, batch = built("loretta_adp", tt_head=True)
    before = fresh.eval()(batch)
    ckpt.load_checkpoint(step, fresh)
    trained = fresh.eval()(batch)
    assert not torch.allclose(before, trained)
    _, again, _ = built("loretta_adp", tt_head=True)
    ckpt.load_checkpoint(step, again)
    assert torch.equal(again.eval()(batch), trained)


@pytest.mark.parametrize("recipe, trainable", [
    ("deberta_base_loretta_adp.yaml", 99_194),
    ("llama2_7b_loretta_adp.yaml", 876_800),
    ("llama2_7b_loretta_rep.yaml", 102_400),
    ("llama2_7b_lora.yaml", 4_194_304),
])
def test_paper_parameter_counts(recipe, trainable):
    assert count_parameters(load_recipe(REPO / "recipes" / "paper" / recipe))["trainable"] == trainable


def test_minilm_counts_of_the_comparison_recipes():
    counts = {name: count_parameters(load_recipe(REPO / "recipes" / f"{name}_sst2.yaml"))["trainable"]
              for name in ("lora", "loretta_rep")}
    assert counts["lora"] == 6 * 2 * 2 * 384 * 8 + 770
    assert counts["lora"] >= 10 * counts["loretta_rep"]


@pytest.mark.parametrize("adapter, quant", [("loretta_rep", "none"), ("lora", "none"), ("loretta_rep", "int8")])
def test_export_merge_gives_a_plain_model_with_the_same_outputs(write_recipe, tmp_path, adapter, quant):
    from transformers import AutoModel
    from typer.testing import CliRunner

    from ftkit.cli import app
    from ftkit.models.heads import mean_pool
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(
        method={"adapter": adapter}, quant={"format": quant},
        train={"max_steps": 4, "lr": 5e-2, "output_dir": str(tmp_path / "run")})))
    train(recipe)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf"), "--merge"])
    assert result.exit_code == 0, result.output
    _, model, batch = built(adapter, quant=quant)
    from ftkit.training import checkpoint as ckpt

    ckpt.load_checkpoint(ckpt.resolve(tmp_path / "run" / "checkpoints", "best"), model)
    model.eval()
    expected = model.embed(batch)
    plain = AutoModel.from_pretrained(tmp_path / "hf").eval()
    hidden = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
    # A whole network computed by two implementations: its outputs agree to a relative 1e-4 of their scale.
    torch.testing.assert_close(mean_pool(hidden, batch["attention_mask"]), expected, rtol=1e-4,
                               atol=1e-4 * expected.abs().max().item())


def test_loretta_adp_refuses_to_merge_and_exports_its_tensors(write_recipe, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from ftkit.cli import app
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(method={"adapter": "loretta_adp"},
                                                  train={"max_steps": 2, "output_dir": str(tmp_path / "run")})))
    train(recipe)
    runner = CliRunner()
    refused = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "a"), "--merge"])
    assert refused.exit_code == 2 and "cannot be merged" in refused.output
    kept = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "b")])
    assert kept.exit_code == 0, kept.output
    tensors = load_file(str(tmp_path / "b" / "ftkit_adapter.safetensors"))
    _, model, _ = built("loretta_adp")
    adapter_tensors = {n.removeprefix("encoder.") for n, _ in model.named_parameters() if "loretta_" in n}
    assert set(tensors) == adapter_tensors and len(tensors) == 4 * 10  # 4 adapters x (2 x 4 cores + 2 biases)


@pytest.mark.parametrize("adapter", ["loretta_adp", "loretta_rep", "lora"])
@pytest.mark.parametrize("quant", [{"format": "int4"}, {"format": "int4", "engine": "bitsandbytes"}],
                         ids=["native-int4", "bnb-nf4"])
def test_adapters_over_quantized_frozen_bases(adapter, quant):
    recipe = recipe_from_dict(tiny_recipe(method={"adapter": adapter}, quant=quant))
    task = load_task_data(recipe, splits=("train",))
    tokenizer = load_tokenizer(recipe.model)
    if adapter == "lora" and quant.get("engine") != "bitsandbytes":
        with pytest.raises(UserError, match="method.adapter lora"):
            build_model(recipe, task, tokenizer)
        return
    model, kind, _ = build_model(recipe, task, tokenizer)
    batch = collate(encode(task.splits["train"][:6], tokenizer, kind, task, 32), tokenizer.pad_token_id)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("codes" in n or ".base." in n and "weight" in n for n in trainable)
    loss = model(batch).logsumexp(-1).sum()
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "loretta_" in n or "lora_" in n)


def test_built_matrix_is_cached_without_autograd_and_refreshed_when_a_core_changes():
    torch.manual_seed(0)
    layer = TTLinear(384, 64, 5, bias=True)
    x = torch.randn(10, 384)
    with torch.inference_mode():
        first = layer(x, mode="materialise")
        cached = layer._matrix_cache[1]
        assert torch.equal(layer(x, mode="materialise"), first) and layer._matrix_cache[1] is cached
        layer.cores[1].add_(0.5)  # as a zeroth-order perturbation does, in place
        moved = layer(x, mode="materialise")
    with torch.no_grad():
        assert_sums_close(moved, x @ layer.to_matrix() + layer.bias, x.abs() @ tt_magnitude(layer) + layer.bias.abs(),
                          tt_terms(layer), "after a core moved")
    assert not torch.allclose(moved, first)
    trained = layer(x)  # with autograd the matrix is rebuilt in the graph, never taken from the cache
    trained.sum().backward()
    assert layer.cores[0].grad is not None
