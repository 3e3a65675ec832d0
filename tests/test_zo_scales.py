"""Scale-space zeroth-order training (QZO, method.zo.low_bit: scales) and the clipping of projected gradients
(method.zo.clip_gradient): the codes never move, the perturbed forward is the layer with perturbed scales, bf16
updates are unbiased, clipping bounds what is recorded and applied, and runs resume, replay, run through the
library and on two processes bit for bit."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import two_processes
from conftest import REPO, tiny_recipe
from test_distributed import one_and_two_processes
from test_library import OPTIMIZERS, assert_same_bits, cli_recipe, cli_weights, setup, zo_options, zo_trainer
from test_zo import same_bits, weights, zo_recipe

from ftkit.errors import RecipeError
from ftkit.models.count import count_parameters
from ftkit.optim.core import zeroth_order_step
from ftkit.optim.trace import read_trace, record_format
from ftkit.optim.zo import TRACE_FILE
from ftkit.optim.zo_streams import derive, uniform_chunks
from ftkit.optim.zo_targets import Directions, ScaleTarget
from ftkit.quant.codecs import round_to_dtype
from ftkit.quant.linear import QuantLinear
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training.loop import train

QUZO = Directions(bits=4, independent=True, update_rounding="stochastic")
SIGNS = Directions(bits=4, independent=True, update_rounding="stochastic", distribution="rademacher")
MEZO = Directions(bits=0, independent=True, update_rounding="stochastic")


def scales(**zo) -> dict:
    """Recipe sections of int4 layers (groups of 16) that train their scales, with more method.zo options."""
    return {"quant": {"format": "int4", "group_size": 16}, "method": {"zo": {"low_bit": "scales", **zo}}}


def layer(scale_dtype=torch.bfloat16, fmt="int4", seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(64, 48), fmt, group_size=16, scale_dtype=scale_dtype)


@pytest.mark.parametrize("directions", [QUZO, SIGNS, MEZO], ids=["quzo", "signs", "mezo"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_the_perturbed_forward_is_the_layer_with_scales_s_plus_eps_u_exactly(directions, scale_dtype):
    quant = layer(scale_dtype)
    target, eps, x = ScaleTarget("l.scales", quant, 3), 1e-2, torch.randn(5, 64)
    codes, scales = quant.codes.clone(), quant.scales.clone()
    target.move(directions, 99, 0.0, eps)
    perturbed = quant(x)
    u1 = directions.perturbation(99, 3, tuple(scales.shape), "cpu")
    reference = QuantLinear(64, 48, "int4", group_size=16, scale_dtype=torch.float32)
    reference.codes.copy_(codes)
    reference.scales.copy_(scales.to(torch.float32) + eps * u1)
    assert torch.equal(perturbed, F.linear(x, reference.dequantize(), quant.bias))
    assert not torch.equal(perturbed, F.linear(x, quant.dequantize(), quant.bias))
    target.move(directions, 99, eps, 0.0)  # the perturbation is gone, nothing stored was written
    assert quant.scale_perturbation is None
    assert torch.equal(quant.codes, codes) and torch.equal(quant.scales, scales)


@pytest.mark.parametrize("directions", [QUZO, SIGNS, MEZO], ids=["quzo", "signs", "mezo"])
def test_a_step_moves_the_scales_along_minus_lr_g_u2_and_never_the_codes(directions):
    quant = layer(torch.float32)
    target, lr, g = ScaleTarget("l.scales", quant, 0), 1e-3, 2.5
    codes, scales = quant.codes.clone(), quant.scales.clone()
    zeroth_order_step([target], directions, 7, lr, 1e-2, 1, 0.0, gradients=[g])
    u2 = directions.update_direction(derive(7, 0), 0, tuple(scales.shape), "cpu")
    assert torch.equal(quant.codes, codes) and quant.scale_perturbation is None
    assert torch.equal(quant.scales, -lr * g * u2 + scales)  # fp32 scales: a plain add


@pytest.mark.parametrize("dtype, spacing", [(torch.bfloat16, 2.0**-7), (torch.float16, 2.0**-10)])
def test_stochastic_rounding_onto_bf16_is_unbiased_and_nearest_loses_small_updates(dtype, spacing):
    # 1 + 0.3 spacings (bf16: 2^-7 at 1; float16, GGUF's scales: 2^-10): 200,000 roundings with the update's own
    # noise stream. The mean's standard error is spacing * sqrt(0.21 / 200,000); the noise's 15 bits leave a bias
    # under 2^-16 spacing.
    n = 200_000
    x = torch.full((n,), 1.0 + 0.3 * spacing)
    noise = next(uniform_chunks(n, 1234, size=n))[1]
    rounded = round_to_dtype(x, dtype, "stochastic", noise)
    assert rounded.dtype == dtype and set(rounded.float().unique().tolist()) == {1.0, 1.0 + spacing}
    assert abs(rounded.float().mean().item() - x[0].item()) < spacing * (4 * (0.21 / n) ** 0.5 + 2.0**-16)
    assert torch.equal(round_to_dtype(x, dtype, "nearest"), torch.ones(n, dtype=dtype))
    # A negative value rounds its magnitude the same way.
    negative = round_to_dtype(-x, dtype, "stochastic", noise)
    assert torch.equal(negative, -rounded)


def test_a_bf16_scale_update_far_below_the_spacing_moves_the_scales_by_the_right_amount_on_average():
    """lr g u2 about 1% of a bf16 spacing per scale: stochastic rounding moves the sum of the scales by the sum of the
    updates (within 4 standard errors); nearest rounding moves nothing."""
    moved = {}
    for rounding in ("stochastic", "nearest"):
        quant = QuantLinear(64, 4096, "int4", group_size=16)  # 16,384 scales of 1.0: bf16 spacing 2^-7 there
        d = Directions(bits=0, independent=True, update_rounding=rounding)
        coef = 0.01 * 2.0**-7
        zeroth_order_step([ScaleTarget("s", quant, 0)], d, 5, coef, 1e-3, 1, 0.0, gradients=[-1.0])
        moved[rounding] = quant.scales.float() - 1.0
    u = d.update_direction(derive(5, 0), 0, (4096, 4), "cpu")
    expected = (coef * u).sum().item()
    # Each scale moves by a whole spacing with probability |coef u| / spacing: variance spacing^2 * p (1 - p).
    p = (coef * u).abs() / 2.0**-7
    sigma = (2.0**-7 * (p * (1 - p)).sum().sqrt()).item()
    assert abs(moved["stochastic"].sum().item() - expected) < 4 * sigma
    assert (moved["stochastic"] != 0).sum() > 50 and not moved["nearest"].any()


def test_clipping_bounds_the_applied_gradient():
    clipped, unclipped = layer(torch.float32), layer(torch.float32)
    kept = zeroth_order_step([ScaleTarget("s", clipped, 0)], QUZO, 3, 1e-3, 1e-2, 2, 0.0, gradients=[50.0, -0.5],
                             clip=2.0)[0]
    zeroth_order_step([ScaleTarget("s", unclipped, 0)], QUZO, 3, 1e-3, 1e-2, 2, 0.0, gradients=[2.0, -0.5])
    assert kept == [2.0, -0.5] and torch.equal(clipped.scales, unclipped.scales)


def test_clipping_bounds_the_recorded_gradients_and_replays(write_recipe, tmp_path):
    settings = dict(quant={"format": "int4"}, train={"max_steps": 3, "lr": 1e-3})
    train(zo_recipe(write_recipe, tmp_path, "free", **settings))
    clip = 1e-3
    recipe = zo_recipe(write_recipe, tmp_path, "clip", method={"zo": {"clip_gradient": clip}}, **settings)
    train(recipe)
    (_, free), (header, clipped) = (read_trace(tmp_path / d / TRACE_FILE) for d in ("free", "clip"))
    raw = free[0]["gradients"][0]  # the first step starts from the same weights: the raw gradient of both runs
    assert abs(raw) > clip and clipped[0]["gradients"][0] == math.copysign(clip, raw)
    assert all(abs(g) <= clip for r in clipped for g in r["gradients"]) and header["clip_gradient"] == clip
    replay(recipe, tmp_path / "clip" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(weights(tmp_path / "clip"), weights(tmp_path / "replayed"))


@pytest.mark.parametrize("optimizer, quant, zo", [
    ("quzo", {"format": "int4", "group_size": 16}, {"clip_gradient": 5.0}),
    ("quzo", {"format": "int8"}, {"direction": "rademacher", "n_queries": 2}),
    ("mezo", {"format": "int4", "group_size": 16, "scale_dtype": "float32"}, {}),
    ("quzo", {"format": "q4_0"}, {}),  # float16 scales, rounded stochastically
    ("quzo", {"format": "q5_0"}, {}),
])
def test_scales_train_the_codes_stay_and_runs_resume_and_replay_bit_for_bit(write_recipe, tmp_path, optimizer, quant,
                                                                          zo):
    settings = dict(quant=quant, method={"zo": {"low_bit": "scales", **zo}})
    full = zo_recipe(write_recipe, tmp_path, "full", optimizer, **settings, train={"max_steps": 4, "save_every": 2})
    train(full)
    header = tmp_path / "header.ftz"  # the trace without its 4 records replays to the step-0 model
    records = 4 * record_format(zo.get("n_queries", 1)).size
    header.write_bytes((tmp_path / "full" / TRACE_FILE).read_bytes()[:-records])
    replay(full, header, tmp_path / "start")
    start, end = weights(tmp_path / "start"), weights(tmp_path / "full")
    codes, scales = ([k for k in end if k.endswith(suffix)] for suffix in (".codes", ".scales"))
    assert codes and all(torch.equal(start[k], end[k]) for k in codes)
    assert sum(not torch.equal(start[k], end[k]) for k in scales) == len(scales)
    replay(full, tmp_path / "full" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(end, weights(tmp_path / "replayed"))
    train(zo_recipe(write_recipe, tmp_path, "parts", optimizer, **settings, train={"max_steps": 2, "save_every": 2}))
    train(zo_recipe(write_recipe, tmp_path, "parts", optimizer, **settings, train={"max_steps": 4, "save_every": 2}),
          resume=True)
    assert same_bits(end, weights(tmp_path / "parts"))


@pytest.mark.parametrize("zo", [{"direction": "lowrank", "rank": 2, "refresh": 3},
                                {"estimator": "one_sided", "n_queries": 2, "direction": "rademacher"}],
                         ids=["lowrank", "one_sided"])
def test_scales_train_with_every_direction_kind_and_estimator(write_recipe, tmp_path, zo):
    """Low-rank kinds leave the scales full Gaussian directions (they are few); one-sided estimates move them too."""
    runs = {}
    for name, lr in (("still", 0.0), ("trained", 2e-3)):
        train(zo_recipe(write_recipe, tmp_path, name, train={"max_steps": 2, "lr": lr}, **scales(**zo)))
        runs[name] = weights(tmp_path / name)
    before, after = runs["still"], runs["trained"]
    moved = [k for k in after if k.endswith("scales") and not torch.equal(after[k], before[k])]
    assert moved and all(torch.equal(after[k], before[k]) for k in after if k.endswith("codes"))


def test_scales_and_norms_count_as_the_trainable_set(write_recipe, tmp_path):
    recipe = zo_recipe(write_recipe, tmp_path, "count", **scales())
    recipe.method.freeze = ["^(?!.*(LayerNorm|scales)).*$"]
    counts = count_parameters(recipe)
    # Tiny BERT: per layer q, k, v, o (32 x 32), intermediate (64 x 32), output (32 x 64): 8,192 weights, 512
    # scales in groups of 16; LayerNorms: embeddings' and two per layer, weight and bias of 32 each.
    assert counts["trainable"] == 2 * 512 + 5 * 2 * 32
    assert counts["groups"]["norms"]["trainable"] == 5 * 2 * 32
    recipe.method.freeze = ["attention", "^(?!.*(LayerNorm|scales)).*$"]  # a pattern freezes scales by name
    assert count_parameters(recipe)["trainable"] == 2 * 256 + 2 * 2 * 32 + 2 * 32


@pytest.mark.parametrize("optimizer, sections", [
    ("quzo", scales(clip_gradient=3.0)),
    ("mezo", scales(direction="rademacher")),
])
def test_the_library_optimizers_train_the_scales_the_cli_trains(write_recipe, tmp_path, optimizer, sections):
    recipe = cli_recipe(write_recipe, tmp_path, optimizer, steps=4, **sections)
    model, loss, batches = setup(recipe)
    for module in model.modules():  # as ftkit.quantize marks them: the option switches them to scales
        if isinstance(module, QuantLinear):
            module.train_codes, module.train_scales = True, False
    clip = recipe.method.zo.clip_gradient
    zo = OPTIMIZERS[optimizer](model, **zo_options(recipe), low_bit="scales", clip_gradient=clip)
    codes = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".codes")}
    for batch in batches:
        zo.step(lambda: loss(model(batch), batch))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in codes.items())
    assert_same_bits(cli_weights(recipe), model)


def test_zo_trainer_trains_the_scales_the_cli_trains(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", steps=3, **scales())
    model, loss, batches = setup(recipe)
    trainer = zo_trainer(recipe, model, loss, batches, tmp_path / "hf")
    assert trainer.zo_options["low_bit"] is None  # the model built from the recipe is marked already
    trainer.train()
    assert_same_bits(cli_weights(recipe), model)


@pytest.mark.parametrize("sections, message", [
    ({"method": {"optimizer": "quzo", "zo": {"low_bit": "scales"}}},
     "method.zo.low_bit: scales trains the per-group scales of low-bit layers, and quant.format is none"),
    ({"method": {"optimizer": "quzo", "zo": {"low_bit": "scales"}}, "quant": {"format": "int4",
                                                                           "engine": "bitsandbytes"}},
     "method.zo.low_bit: scales trains the scales of ftkit's own low-bit layers; bitsandbytes layers are frozen"),
    ({"method": {"optimizer": "quzo", "adapter": "lora", "zo": {"low_bit": "scales"}}, "quant": {"format": "int4"}},
     "method.zo.low_bit: scales trains the base model's scales, and method.adapter lora freezes the base"),
    ({"method": {"optimizer": "quzo", "zo": {"low_bit": "weights"}}}, "method.zo.low_bit"),
    ({"method": {"optimizer": "mezo", "zo": {"clip_gradient": -1.0}}},
     "method.zo.clip_gradient: must be positive (or null: no clipping), got -1.0"),
])
def test_impossible_scale_recipes_are_refused_naming_the_key(write_recipe, sections, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe(tiny_recipe(**sections)))


def test_mezo_trains_scales_of_a_quantized_model_but_not_its_codes(write_recipe):
    load_recipe(write_recipe(tiny_recipe(method={"optimizer": "mezo", "zo": {"low_bit": "scales"}},
                                         quant={"format": "int4"})))
    with pytest.raises(RecipeError, match="mezo trains full-precision weights"):
        load_recipe(write_recipe(tiny_recipe(method={"optimizer": "mezo"}, quant={"format": "int4"})))


SCALES = two_processes.run("scales", method={"optimizer": "quzo", "zo": {"low_bit": "scales", "clip_gradient": 2.0}},
                           quant={"format": "int4", "group_size": 16},
                           train={"max_steps": 4, "eval_every": 0, "save_every": 4})


def test_scales_on_two_processes_are_bit_identical_to_one(two_process_runs, tmp_path):
    one_and_two_processes(two_process_runs, tmp_path, SCALES)


def test_validate_shows_the_trainable_set_and_the_clipping():
    from typer.testing import CliRunner

    from ftkit.cli import app

    recipe = REPO / "recipes" / "smollm2" / "quzo_int4_scales_chat.yaml"
    shown = CliRunner().invoke(app, ["validate", str(recipe)], terminal_width=400)
    assert shown.exit_code == 0 and "optimizer quzo, low-bit layers train their scales, not their codes, projected " \
                                     "gradients clipped to [-100, 100], task sst2" in shown.output
    refused = CliRunner().invoke(app, ["validate", str(recipe), "method.adapter=lora"], terminal_width=400)
    assert refused.exit_code != 0 and "method.zo.low_bit: scales trains the base model's scales" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
