"""Low-rank directions (method.zo.direction: lowrank, LOZO): the output-side perturbation of a quantized layer, the
estimate's statistics (fixed seeds, stated tolerances), the thinned update of integer codes, and training through
the loop, the library and the Trainer with exact resume and replay."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import two_processes
from conftest import assert_sums_close, tiny_recipe
from test_library import assert_same_bits, cli_recipe, cli_weights, setup, zo_options, zo_trainer
from test_zo import least_squares, same_bits, weights, zo_recipe

from ftkit.errors import RecipeError
from ftkit.optim import QuZO, lowrank_update
from ftkit.optim.directions.lowrank import FloatMatrix, LowRankStep, QuantMatrix
from ftkit.optim.trace import read_trace
from ftkit.optim.zo import TRACE_FILE
from ftkit.optim.zo_streams import Q1, derive
from ftkit.optim.zo_targets import Directions, FloatTarget, QuantTarget
from ftkit.quant.linear import QuantLinear
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training.loop import train


def lowrank(bits=4, independent=True, rank=2, refresh=1, rounding="stochastic") -> Directions:
    return Directions(bits=bits, independent=independent, update_rounding=rounding, distribution="lowrank",
                      options=(("rank", rank), ("refresh", refresh)))


def quant_layer(fmt="int4", out_features=64, in_features=128, group_size=32, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), fmt, group_size=group_size)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loop runs at train.threads 1
    yield
    torch.set_num_threads(threads)


# --- where the direction lands ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["dequantize", "auto"])
def test_a_perturbed_quantized_layer_adds_its_low_rank_path_to_its_own_kernel_and_equals_the_dense_weight(kernel):
    """The layer's own kernel plus eps (x V) U^T / sqrt(r), with no dense weight delta (`perturbation` stays unset):
    with fp32 numerics (dequantize) x (W + eps U V^T / sqrt(r))^T + b within float32 rounding of the sums; with the
    CPU int4 kernel (bf16 activations) its own unperturbed output plus the low-rank path. A full-precision matrix
    moves in place to W + eps U V^T / sqrt(r), and both take the same factors of the step."""
    d, eps = lowrank(rank=3), 1e-2
    layer = quant_layer()
    layer.kernel = kernel
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    target = QuantTarget("w", layer, 0)
    step = d.begin_step(7, 0)
    (quant,) = step.pass_over([target], 11)
    assert isinstance(quant, QuantMatrix)
    with torch.inference_mode():
        plain = layer(x)
        quant.move(d, 11, 0.0, eps)
        assert layer.perturbation is None and layer.output_perturbation is not None
        perturbed = layer(x)
    assert layer.kernel_for(x) == ("int4pack" if kernel == "auto" else "dequantize")
    u, v = step.factors(d, 11, 0, target.shape, "cpu", Q1)
    assert u.shape == (64, 3) and v.shape == (128, 3)
    low_rank = eps * (x @ v) @ u.T / math.sqrt(3)
    if kernel == "dequantize":
        expected = x @ (layer.dequantize() + eps * (u @ v.T) / math.sqrt(3)).T + layer.bias.detach()
        magnitude = x.abs() @ (layer.dequantize().abs() + eps * (u.abs() @ v.abs().T) / math.sqrt(3)).T
        assert_sums_close(perturbed, expected, magnitude + layer.bias.detach().abs(), terms=128 + 3, what="output")
    else:
        torch.testing.assert_close(perturbed, plain + low_rank, rtol=2e-6, atol=1e-6)
    quant.move(d, 11, eps, 0.0)
    assert layer.output_perturbation is None

    dense = nn.Parameter(torch.randn(64, 128, generator=torch.Generator().manual_seed(2)))
    before = dense.detach().clone()
    (moved,) = step.pass_over([FloatTarget("w", dense, 0, decay=True)], 11)
    assert isinstance(moved, FloatMatrix)
    moved.move(d, 11, 0.0, eps)
    torch.testing.assert_close(dense.detach(), before + eps * (u @ v.T) / math.sqrt(3), rtol=0, atol=1e-6)


def test_vectors_keep_gaussian_directions_and_v_is_kept_for_a_window_while_u_is_redrawn():
    d = lowrank(rank=2, refresh=3)
    bias = FloatTarget("b", nn.Parameter(torch.zeros(8)), 1, decay=False)
    assert list(d.begin_step(0, 0).pass_over([bias], 5)) == [bias]  # moved by the general path, a Gaussian
    shape = (16, 24)
    factors = [d.begin_step(0, step).factors(d, derive(step, 0), 0, shape, "cpu", None) for step in range(4)]
    assert all(torch.equal(factors[0][1], f[1]) for f in factors[1:3])  # V of steps 0, 1, 2: window 0
    assert not torch.equal(factors[0][1], factors[3][1])  # step 3 opens window 1
    assert not torch.equal(factors[0][0], factors[1][0])  # U is the query's


# --- the estimate's statistics --------------------------------------------------------------------------------------


def test_independent_roundings_of_both_factors_keep_the_second_moment_and_one_rounding_inflates_it():
    """E[z1 z2^T | U, V] = z z^T with z1, z2 rounded with independent bits: over 300 draws the mean of z1 * z2 - z * z
    is zero (within 4 standard errors of the draws' means, which is under 0.3 of the growth one rounding gives).
    With one rounding its diagonal grows by the rounding variance of the products,
    (1/r) sum_a (U^2 var V + V^2 var U + var U var V), as predicted within 10%."""
    shape, n, rank = (48, 40), 300, 2
    indep, shared, predicted = [], [], []
    for s in range(n):
        d, one = lowrank(rank=rank, refresh=1), lowrank(rank=rank, refresh=1, independent=False)
        step, step_one = d.begin_step(0, s), one.begin_step(0, s)
        u, v = step.factors(d, s, 0, shape, "cpu", None)
        z = u @ v.T / rank ** 0.5
        z1, z2 = (a @ b.T / rank ** 0.5 for a, b in (step.factors(d, s, 0, shape, "cpu", q) for q in (1, 2)))
        indep.append((z1 * z2 - z * z).mean())
        w1, w2 = (a @ b.T / rank ** 0.5 for a, b in (step_one.factors(one, s, 0, shape, "cpu", one.update_stream)
                                                      for _ in range(2)))
        shared.append((w1 * w2 - z * z).mean())
        var_u, var_v = rounding_variance(u), rounding_variance(v)
        grown = (u * u) @ var_v.T + var_u @ (v * v).T + var_u @ var_v.T
        predicted.append((grown / rank).mean())
    spread = torch.stack(indep).std().item() / math.sqrt(n)  # a draw's rounding errors share rows and columns
    indep, shared, predicted = (torch.stack(x).mean().item() for x in (indep, shared, predicted))
    assert abs(indep) < 4 * spread < 0.3 * predicted
    assert predicted > 0.02 and shared == pytest.approx(predicted, rel=0.1)


def rounding_variance(u: torch.Tensor, bits: int = 4) -> torch.Tensor:
    step = u.abs().max() / (2 ** (bits - 1) - 1)
    frac = u / step - torch.floor(u / step)
    return step ** 2 * frac * (1 - frac)


def test_mean_low_rank_quzo_estimate_matches_the_true_gradient():
    """As tests/test_zo.py checks Gaussian QuZO: the mean of g z2 over 4000 directions (a new V each, refresh 1) of an
    int8 layer's 32 weights points along the backpropagated gradient (cosine >= 0.98)."""
    d = lowrank(rank=2, refresh=1)
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(8, 4), "int8")
    loss, truth = least_squares(layer)
    target, eps, total, n = QuantTarget("w", layer, 0), 1e-3, torch.zeros_like(truth), 4000
    for s in range(n):
        step = d.begin_step(0, s)
        (matrix,) = step.pass_over([target], s)
        matrix.move(d, s, 0.0, eps)
        plus = loss()
        matrix.move(d, s, eps, -eps)
        minus = loss()
        matrix.move(d, s, -eps, 0.0)
        u2, v2 = step.factors(d, s, 0, truth.shape, "cpu", d.update_stream)
        total += (plus - minus) / (2 * eps) * (u2 @ v2.T) / math.sqrt(2)
    cosine = torch.nn.functional.cosine_similarity((total / n).flatten(), truth.flatten(), dim=0).item()
    assert cosine >= 0.98


# --- the update of integer codes, drawn as its moves ----------------------------------------------------------------


def test_the_thinned_update_moves_each_code_with_its_rounding_probability_along_its_sign():
    """Over 1500 updates with fixed factors, each of an int8 layer's 4,096 codes (groups of 32) moves by +-1 only,
    with mean move p_ij = coef (U V^T)_ij / scale: every code within 5 standard errors, the regression slope 1
    within 2%, and the moves of two codes uncorrelated."""
    layer = quant_layer("int8", 32, 128, group_size=32, seed=3)
    u = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    v = torch.randn(128, 2, generator=torch.Generator().manual_seed(5))
    codes = layer.code_values()
    wanted = (u @ v.T) / layer.scales.float().repeat_interleave(32, dim=1)
    coef = 0.4 / lowrank_update.bounds(layer, u, v, 1.0).max().item()  # the largest bound: 0.4 of a step
    wanted = coef * wanted
    state, total, pair, n = {k: t.clone() for k, t in layer.state_dict().items()}, torch.zeros_like(codes), 0.0, 1500
    for s in range(n):
        layer.load_state_dict(state)
        assert lowrank_update.update([(layer, 0, u, v)], "stochastic", s, coef) == [layer]
        moved = layer.code_values() - codes
        assert set(moved.unique().tolist()) <= {-1.0, 0.0, 1.0}
        total += moved
        pair += (moved[0, 0] * moved[1, 0]).item()
    inside = codes.abs() < 126  # away from the clamp at +-127
    mean, p = (total / n)[inside], wanted[inside]
    se = (p.abs() * (1 - p.abs()) / n).sqrt().clamp(min=1 / n)
    assert ((mean - p).abs() / se).max() < 5
    assert (mean * p).sum() / (p * p).sum() == pytest.approx(1.0, abs=0.02)
    expected_pair = (wanted[0, 0] * wanted[1, 0]).item()
    assert abs(pair / n - expected_pair) < 5 * math.sqrt(abs(wanted[0, 0] * wanted[1, 0]).item() / n) + 1e-3


def test_the_thinned_update_leaves_large_moves_and_fp8_to_the_general_path_and_nearest_small_ones_in_place():
    layer, fp8 = quant_layer("int4", 64, 64, group_size=32), quant_layer("fp8_e4m3", 64, 64, group_size=0)
    u, v = torch.randn(64, 2), torch.randn(64, 2)
    big = 2.0 / lowrank_update.bounds(layer, u, v, 1.0).max().item()
    before = layer.codes.clone()
    assert lowrank_update.update([(layer, 0, u, v), (fp8, 1, u, v)], "stochastic", 0, big) == []
    small = 0.3 / lowrank_update.bounds(layer, u, v, 1.0).max().item()
    assert lowrank_update.update([(layer, 0, u, v)], "nearest", 0, small) == [layer]
    assert torch.equal(layer.codes, before)


def test_the_thinned_update_moves_q4_0_weights_along_coef_u_v_whatever_the_sign_of_their_scale():
    """Q4_0's scales are often negative (the block's signed largest value / -8): each moved weight still moves along
    coef (U V^T)_ij, by one |scale|."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 256), "q4_0")
    assert (layer.scales < 0).any() and (layer.scales > 0).any()
    u, v = torch.randn(256, 2), torch.randn(128, 2)
    coef = 0.5 / lowrank_update.bounds(layer, u, v, 1.0).max().item()
    before = layer.dequantize()
    assert lowrank_update.update([(layer, 0, u, v)], "stochastic", 3, coef) == [layer]
    change, moved = layer.dequantize() - before, layer.dequantize() != before
    assert moved.sum() > 20
    assert torch.equal(change[moved].sign(), (coef * u @ v.T)[moved].sign())
    scale = layer.scales.float().abs().repeat_interleave(32, dim=1)
    torch.testing.assert_close(change[moved].abs(), scale[moved], rtol=1e-6, atol=0)
    expected = (coef * u @ v.T / scale).abs().sum().item()  # each code moves with probability |p_ij|
    assert abs(moved.sum().item() - expected) < 4 * math.sqrt(expected) + 0.02 * expected  # a few clamp away


# --- training: the loop, resume, replay, the library, the Trainer, two processes -----------------------------------

LOWRANK = {"direction": "lowrank", "rank": 2, "refresh": 3}


@pytest.mark.parametrize("optimizer, quant, lr, path", [
    ("quzo", {"format": "int4"}, 1e-5, "moves"),  # every update of the codes drawn as its moves
    ("quzo", {"format": "q4_0"}, 1e-5, "moves"),  # the same with Q4_0's scales of either sign
    ("quzo", {"format": "int8", "group_size": 16}, 2e-3, "general"),  # moves too large (mostly): the general path
    ("mezo", {}, 2e-3, None),  # full-precision matrices moved in place
])
def test_low_rank_runs_train_resume_and_replay_bit_for_bit(write_recipe, tmp_path, monkeypatch, optimizer, quant, lr,
                                                          path):
    """Steps 1-6 at refresh 3 (two windows of V): the weights move and the loss stays finite, 3 + 3 steps resumed
    equal 6 straight (the resume opens the second window), and the trace (recording rank and refresh) replays."""
    from ftkit.optim.directions import lowrank as kind

    calls = {"moves": 0, "general": 0}
    moves, land = lowrank_update.moves, kind.land
    monkeypatch.setattr(lowrank_update, "moves", lambda *a: calls.update(moves=calls["moves"] + 1) or moves(*a))
    monkeypatch.setattr(kind, "land", lambda *a: calls.update(general=calls["general"] + 1) or land(*a))
    settings = dict(quant=quant, method={"zo": LOWRANK})
    full = zo_recipe(write_recipe, tmp_path, "full", optimizer, **settings,
                     train={"max_steps": 6, "save_every": 3, "lr": lr})
    train(zo_recipe(write_recipe, tmp_path, "start", optimizer, **settings, train={"max_steps": 1, "lr": 0.0}))
    train(full)
    if path == "moves":
        assert calls == {"moves": 6, "general": 0}
    else:
        assert (calls["general"] > 0) == (path == "general")
    start, end = weights(tmp_path / "start"), weights(tmp_path / "full")
    matrices = [k for k in end if k.endswith(".codes") or (k.endswith(".weight") and end[k].ndim == 2)]
    assert sum(not torch.equal(start[k], end[k]) for k in matrices) >= 4
    header, records = read_trace(tmp_path / "full" / TRACE_FILE)
    assert (header["direction"], header["rank"], header["refresh"]) == ("lowrank", 2, 3) and len(records) == 6
    assert all(math.isfinite(g) for r in records for g in r["gradients"])

    replay(full, tmp_path / "full" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(end, weights(tmp_path / "replayed"))
    train(zo_recipe(write_recipe, tmp_path, "parts", optimizer, **settings,
                    train={"max_steps": 3, "save_every": 3, "lr": lr}))
    train(zo_recipe(write_recipe, tmp_path, "parts", optimizer, **settings,
                    train={"max_steps": 6, "save_every": 3, "lr": lr}), resume=True)
    assert same_bits(end, weights(tmp_path / "parts"))


def test_low_rank_runs_through_the_optimizer_and_the_trainer_with_the_loops_bits(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", steps=4, quant={"format": "int4"}, method={"zo": LOWRANK})
    expected = cli_weights(recipe)
    options = zo_options(recipe)
    assert (options["direction"], options["rank"], options["refresh"]) == ("lowrank", 2, 3)
    model, loss, batches = setup(recipe)
    optimizer = QuZO(model, **options)
    for batch in batches:
        optimizer.step(lambda: loss(model(batch), batch))
    assert_same_bits(expected, model)
    model, loss, batches = setup(recipe)
    zo_trainer(recipe, model, loss, batches, tmp_path / "hf").train()  # ZOTrainer(..., rank=2, refresh=3)
    assert_same_bits(expected, model)


TWO_PROCESSES = two_processes.run("low rank", method={"optimizer": "quzo", "zo": LOWRANK}, quant={"format": "int4"},
                                  train={"max_steps": 4})


def test_low_rank_on_two_processes_is_bit_identical_to_one(two_process_runs, tmp_path):
    from test_distributed import final, recipe_file

    train(load_recipe(recipe_file(tmp_path, "one", **two_processes.sections_of(TWO_PROCESSES))))
    assert same_bits(final(tmp_path / "one"), final(two_process_runs[TWO_PROCESSES][0]))


@pytest.mark.parametrize("zo, message", [
    ({"direction": "gaussian", "rank": 2}, "method.zo.rank: applies to direction lowrank, and method.zo.direction "
                                           "is gaussian"),
    ({"direction": "rademacher", "refresh": 10}, "method.zo.refresh: applies to direction lowrank"),
    ({"direction": "lowrank", "rank": 0}, "method.zo.rank: must be at least 1, got 0"),
    ({"direction": "lowrank", "refresh": -1}, "method.zo.refresh: must be at least 1, got -1"),
])
def test_low_rank_options_are_checked_by_name(write_recipe, zo, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe(tiny_recipe(method={"optimizer": "quzo", "zo": zo}, quant={"format": "int4"})))


def test_the_library_refuses_low_rank_options_for_other_directions():
    with pytest.raises(ValueError, match="direction 'gaussian' takes no option rank"):
        QuZO([nn.Parameter(torch.zeros(3, 3))], rank=2)
    with pytest.raises(ValueError, match="needs rank >= 1"):
        QuZO([nn.Parameter(torch.zeros(3, 3))], direction="lowrank", rank=0)


def test_a_low_rank_step_needs_its_step_for_a_matrix_direction():
    with pytest.raises(ValueError, match="drawn within a step"):
        lowrank().perturbation(0, 0, (4, 4), "cpu")
    assert isinstance(lowrank().begin_step(), LowRankStep)
