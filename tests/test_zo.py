"""MeZO and QuZO: the estimator's statistics (fixed seeds, stated tolerances), the update's rounding, replay from the
trace bit for bit, bit-exact resume, and the trainable sets over every weight format."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY_BERT, assert_sums_close, tiny_recipe
from safetensors.torch import load_file

from ftkit.data.batches import Shard
from ftkit.errors import RecipeError, UserError
from ftkit.optim.trace import read_trace, record_format
from ftkit.optim.zo import TRACE_FILE, ZerothOrder
from ftkit.optim.zo_streams import derive, gaussian, quantize_direction, signs
from ftkit.optim.zo_targets import Directions, FloatTarget, QuantTarget
from ftkit.quant.linear import QuantLinear
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train

QUZO = Directions(bits=4, independent=True, update_rounding="stochastic")
SHARED = Directions(bits=4, independent=False, update_rounding="stochastic")


def quant_layer(fmt="int8", out_features=4, in_features=8, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(in_features, out_features), fmt)


# --- directions -----------------------------------------------------------------------------------------------


def test_quantized_direction_is_unbiased_on_a_17_level_grid_and_never_clipped():
    u = gaussian((4096,), seed=1)
    draws = torch.stack([quantize_direction(u.clone(), 4, seed=s) for s in range(400)])
    step = u.abs().max() / 7
    levels = torch.unique(torch.round(draws / step))
    assert levels.min() >= -7 and levels.max() <= 7
    # E[Q(u)] = u: per-element error of the mean of 400 draws is at most step / 2 / sqrt(400) * 4 sigma
    assert (draws.mean(0) - u).abs().max() < 4 * step / 2 / math.sqrt(400)


def test_shared_rounding_inflates_the_diagonal_as_predicted_and_independent_ones_do_not():
    shape, n = (64, 64), 300
    indep, shared, predicted = [], [], []
    for s in range(n):
        u = gaussian(shape, derive(s, 0, 0))
        step = u.abs().max() / 7
        frac = u / step - torch.floor(u / step)
        predicted.append((step**2 * frac * (1 - frac)).mean())  # variance of one stochastic rounding
        u1, u2 = QUZO.both(s, 0, shape, "cpu")
        indep.append((u1 * u2).mean() - (u * u).mean())
        v1, v2 = SHARED.both(s, 0, shape, "cpu")
        assert v1 is v2
        shared.append((v1 * v2).mean() - (u * u).mean())
    indep, shared, predicted = (torch.stack(x).mean().item() for x in (indep, shared, predicted))
    # E[q1 q2 | u] = u u^T; E[q q | u] = u^2 + Var(SR): the diagonal grows by the rounding variance (~4% here)
    assert abs(indep) < 2e-3
    assert predicted > 0.02 and shared == pytest.approx(predicted, rel=0.1)


def test_random_signs_are_fair_independent_bits_whatever_the_cut_and_thread_count(monkeypatch):
    """Rademacher directions: +-1 exactly, each sign a fair coin (mean 0 within 4 standard errors), neighbouring
    signs uncorrelated (they are bits of one word), the same numbers at any thread count and however the range is
    cut into chunks (one chunk, 1,024-element chunks), and what stochastic rounding onto QuZO's grid returns
    unchanged, which is why no rounding is drawn for them."""
    from ftkit.optim import zo_streams

    previous, draws = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            draws.append(zo_streams.signs((3, 70_001), seed=5))
    finally:
        torch.set_num_threads(previous)
    monkeypatch.setattr(zo_streams, "CHUNK_ELEMENTS", 1024)
    chunked = torch.cat([c for _, c in zo_streams.sign_chunks(3 * 70_001, seed=5)])
    whole = draws[0].view(-1)
    assert torch.equal(draws[1], draws[0]) and torch.equal(chunked, whole)
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    n = whole.numel()
    assert abs(whole.mean().item()) < 4 / math.sqrt(n)
    assert abs((whole[1:] * whole[:-1]).mean().item()) < 4 / math.sqrt(n - 1)
    assert abs((whole[16:] * whole[:-16]).mean().item()) < 4 / math.sqrt(n - 16)  # same bit of the next word
    assert abs(whole[15::16].mean().item()) < 4 / math.sqrt(n / 16)  # the highest bit used is as fair as the rest
    assert torch.equal(quantize_direction(whole[:4096].clone(), 4, seed=3), whole[:4096])


def least_squares(layer) -> tuple:
    """(loss, its backpropagated gradient at the layer's dequantized weight) of 0.5 |layer(x) - y|^2 on a fixed
    batch of 16: the problem whose zeroth-order estimates the unbiasedness tests average."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    target_out = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))

    def loss() -> float:
        with torch.inference_mode():
            return 0.5 * ((layer(x) - target_out) ** 2).sum().item()

    weight = layer.dequantize().requires_grad_(True)
    (0.5 * ((x @ weight.T + layer.bias.detach() - target_out) ** 2).sum()).backward()
    return loss, weight.grad


@pytest.mark.parametrize("directions", [QUZO, Directions(bits=4, independent=True, update_rounding="stochastic",
                                                          distribution="rademacher")], ids=["gaussian", "rademacher"])
def test_mean_quzo_estimate_matches_the_true_gradient(directions):
    QUZO = directions  # noqa: N806  (the estimate under test)
    layer = quant_layer("int8", 4, 8)
    loss, truth = least_squares(layer)
    target, eps, total, n = QuantTarget("w", layer, 0), 1e-3, torch.zeros_like(truth), 4000
    for s in range(n):
        target.move(QUZO, s, 0.0, eps)
        plus = loss()
        target.move(QUZO, s, eps, -eps)
        minus = loss()
        target.move(QUZO, s, -eps, 0.0)
        total += (plus - minus) / (2 * eps) * QUZO.update_direction(s, 0, truth.shape, "cpu")
    # 32 weights, 4000 directions: the sampling error of the mean is about sqrt(32 / 4000) of the gradient's norm
    cosine = torch.nn.functional.cosine_similarity((total / n).flatten(), truth.flatten(), dim=0).item()
    assert cosine >= 0.98


# --- the update onto the weight grid ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3"])
def test_lr_zero_leaves_stored_codes_bit_identical(fmt):
    layer = quant_layer(fmt, 16, 32)
    before = layer.codes.clone()
    target = QuantTarget("w", layer, 0)
    target.move(QUZO, 5, 0.0, 1e-3)
    target.update(QUZO, step_seed=9, query_seeds=[5], coefs=[-0.0], restore=1e-3, decay=0.0)
    assert torch.equal(layer.codes.view(torch.uint8), before.view(torch.uint8))
    assert layer.perturbation is None


def test_nearest_updates_vanish_at_small_lr_while_stochastic_ones_move_the_right_amount():
    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(256, 128), "int8")
    codes = base.code_values()
    u2 = QUZO.update_direction(7, 0, codes.shape, "cpu")
    coef = -0.4 * base.scales.float().min().item() / u2.abs().max().item()  # lr * g: under half a grid step
    expected = coef * u2 / base.scales.float()  # per-channel scales [N, 1]
    assert expected.abs().max() < 0.5

    moved = {}
    for rounding in ("nearest", "stochastic"):
        layer = QuantLinear.from_linear(nn.Linear(256, 128), "int8")
        layer.load_state_dict(base.state_dict())
        d = Directions(bits=4, independent=True, update_rounding=rounding)
        QuantTarget("w", layer, 0).update(d, step_seed=11, query_seeds=[7], coefs=[coef], restore=0.0, decay=0.0)
        moved[rounding] = layer.code_values() - codes
    assert not moved["nearest"].any()  # every |change| < half a step rounds back
    inside = codes.abs() < 126  # away from the clamp at +-127
    actual, wanted = moved["stochastic"][inside], expected[inside]
    assert set(actual.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # unbiased: the mean error is within 4 standard errors of zero, and the regression slope is 1 within 5%
    se = math.sqrt((wanted.abs() * (1 - wanted.abs())).sum().item()) / actual.numel()
    assert abs((actual - wanted).mean().item()) < 4 * se
    assert (actual * wanted).sum() / (wanted * wanted).sum() == pytest.approx(1.0, abs=0.05)



# --- the update of random signs on an integer grid, drawn as its moves (ftkit.optim.sparse_update) -------------------

SIGNS = Directions(bits=4, independent=True, update_rounding="stochastic", distribution="rademacher")


def test_binomial_counts_have_the_binomial_mean_and_variance_down_to_tiny_probabilities():
    from ftkit.optim.sparse_update import binomial_counts
    from ftkit.optim.zo_streams import uniform64

    m = 400_000
    for k, (p, n) in enumerate([(1e-6, 64), (2e-4, 64), (0.03, 64), (0.02, 576), (0.9, 16)]):
        counts = binomial_counts(torch.full((m,), p, dtype=torch.float64), n, uniform64(m, seed=k)).double()
        mean, var = n * p, n * p * (1 - p)
        assert counts.min() >= 0 and counts.max() <= n
        assert abs(counts.mean().item() - mean) < 4 * math.sqrt(var / m), (p, n)  # 4 standard errors
        if n * p > 1:
            assert counts.var().item() == pytest.approx(var, rel=0.03), (p, n)
    # one size per element, as for layers of different widths side by side
    p, n = torch.tensor([0.1, 0.2] * 50_000, dtype=torch.float64), torch.tensor([10, 40] * 50_000)
    counts = binomial_counts(p, n, uniform64(100_000, seed=9))
    assert counts[0::2].double().mean().item() == pytest.approx(1.0, abs=4 * math.sqrt(0.9 / 50_000))
    assert counts[1::2].double().mean().item() == pytest.approx(8.0, abs=4 * math.sqrt(6.4 / 50_000))
    assert counts[0::2].max() <= 10


def int4_layer(out_features: int, in_features: int, seed: int = 0, group: int = 64) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    linear.weight.data *= 1 + 2 * torch.rand(out_features, 1)  # scales spread over 3x, as in real layers
    return QuantLinear.from_linear(linear, "int4", group)


def test_the_sparse_update_moves_each_code_with_its_rounding_probability_along_its_sign():
    """Stochastic rounding of c + coef * u_i / s_g onto the integers: one step along sign(coef) u_i with probability
    |coef| / s_g, clamped; nothing else moves. Checked on 2M codes against the per-group expectation."""
    layer = int4_layer(2048, 1024)
    before = layer.code_values()
    coef = -0.02 * layer.scales.float().min().item()  # p_g from 0.02 down: most groups move a code or two
    target = QuantTarget("w", layer, 3)
    target.update(SIGNS, step_seed=11, query_seeds=[7], coefs=[coef], restore=0.0, decay=0.0)
    change = layer.code_values() - before
    u = signs(before.shape, derive(7, 3, 0))
    moved = change != 0
    assert set(change.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(change[moved], -u[moved])  # coef < 0: against the sign
    at_end = (before == -8) & (u > 0) | (before == 7) & (u < 0)  # moves that clamp away
    p = (abs(coef) / layer.scales.double()).repeat_interleave(64, dim=1)
    free = ~at_end
    expected, observed = p[free].sum().item(), moved[free].sum().item()
    assert abs(observed - expected) < 4 * math.sqrt(expected), (observed, expected)
    # per group: the moves follow p_g (regression slope 1 within 5%)
    per_group = moved.double().view(2048, 16, 64).sum(-1)
    p_group = abs(coef) / layer.scales.double()
    assert (per_group * p_group).sum() / (64 * p_group * p_group).sum() == pytest.approx(1.0, abs=0.05)


def test_the_sparse_update_keeps_probabilities_the_dense_rounding_noise_cannot_resolve():
    """The general path's noise has 15 bits: an update of 1e-5 of a grid step (below 2^-16) moves no code there, so
    it is lost. Drawn as its moves it moves 1e-5 of the codes, as stochastic rounding should."""
    from ftkit.optim.zo_streams import uniform_chunks

    layer = int4_layer(4096, 1024, seed=1)
    coef = 1e-5 * layer.scales.float().min().item()
    p = (coef / layer.scales.double()).repeat_interleave(64, dim=1)
    noise = next(uniform_chunks(p.numel(), seed=3))[1]
    assert not torch.floor(p.view(-1)[: noise.numel()].float() + noise).any()  # the dense rounding: no move
    before = layer.code_values()
    QuantTarget("w", layer, 0).update(SIGNS, step_seed=2, query_seeds=[4], coefs=[coef], restore=0.0, decay=0.0)
    moved = (layer.code_values() != before).sum().item()
    expected = p.sum().item()  # about 27
    assert abs(moved - expected) < 4 * math.sqrt(expected) and moved > 0, (moved, expected)


def test_the_sparse_update_is_the_same_at_any_thread_count_with_kept_or_drawn_words_and_alone_or_together():
    def run(threads: int, keep: bool, together: bool) -> list[torch.Tensor]:
        layers = [int4_layer(256, 512, seed=0), int4_layer(192, 128, seed=1, group=32)]
        targets = [QuantTarget(f"w{i}", layer, i) for i, layer in enumerate(layers)]
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            step = SIGNS.begin_step()
            x = [torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)) for layer in layers]
            for target, inputs in zip(targets, x):
                target.move(SIGNS, 21, 0.0, 1e-3, step if keep else None)
                with torch.inference_mode():
                    target.layer(inputs)
            coef = [-0.05 * min(layer.scales.float().min().item() for layer in layers)]
            if together:
                assert (step if keep else SIGNS.begin_step()).update_together(targets, SIGNS, 8, [21], coef, 0.0) == []
            else:
                for target in targets:
                    target.update(SIGNS, 8, [21], coef, restore=1e-3, decay=0.0)
        finally:
            torch.set_num_threads(previous)
        return [layer.codes.clone() for layer in layers]

    reference = run(1, keep=False, together=False)
    untrained = [int4_layer(256, 512), int4_layer(192, 128, seed=1, group=32)]
    assert any(not torch.equal(a, b.codes) for a, b in zip(reference, untrained))
    for threads, keep, together in [(2, False, False), (2, True, True), (1, True, True), (3, False, True)]:
        assert all(torch.equal(a, b) for a, b in zip(reference, run(threads, keep, together)))


def test_kept_sign_words_perturb_a_quantized_layer_exactly_as_drawn_ones():
    from ftkit.optim.zo_streams import words_to_signs

    layer = int4_layer(128, 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    target, outputs, step = QuantTarget("w", layer, 0), [], SIGNS.begin_step()
    for to, keep in [(1e-3, False), (1e-3, True), (-1e-3, False), (-1e-3, True)]:
        target.move(SIGNS, 4, 0.0, to, step if keep else None)
        with torch.inference_mode():
            outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[3])
    assert list(step.kept) == [(4, 0)]  # drawn once, by the first forward that needed them
    words = step.kept[(4, 0)]
    for value in (1.0, 1e-3, -1e-3, -2.5):
        assert torch.equal(words_to_signs(words, 0, 1000, value), words_to_signs(words, 0, 1000) * value)


def test_updates_outside_the_sparse_case_take_the_general_path(monkeypatch):
    """Several queries, weight decay, Gaussian directions, an FP8 grid or a move of a whole step or more are not
    drawn as moves; an update under half a step with nearest rounding changes nothing, without drawing."""
    from ftkit.optim import sparse_update

    drawn = []
    monkeypatch.setattr(sparse_update, "moves", lambda *a, **k: drawn.append(1) or [])
    layer = int4_layer(64, 128)
    small = 0.1 * layer.scales.float().min().item()
    assert sparse_update.applies(layer, "stochastic", [small], 0.0)
    for rounding, coefs, decay, fmt_layer in [
            ("stochastic", [small, small], 0.0, layer), ("stochastic", [small], 0.01, layer),
            ("stochastic", [1e3], 0.0, layer),
            ("stochastic", [3 * small], 0.0, layer),  # up to 0.3 x 64 = 19 moves a group: too many
            ("stochastic", [small], 0.0, quant_layer("fp8_e4m3", 8, 16))]:
        assert not sparse_update.applies(fmt_layer, rounding, coefs, decay)
    gaussian_layer = int4_layer(64, 128)  # Gaussian directions never ask: the general path, a uniform per code
    before = gaussian_layer.codes.clone()
    QuantTarget("w", gaussian_layer, 0).update(QUZO, step_seed=1, query_seeds=[2], coefs=[small], restore=0.0,
                                               decay=0.0)
    assert not torch.equal(gaussian_layer.codes, before) and not drawn
    nearest = Directions(bits=4, independent=True, update_rounding="nearest", distribution="rademacher")
    before = layer.codes.clone()
    QuantTarget("w", layer, 0).update(nearest, step_seed=1, query_seeds=[2], coefs=[4 * small], restore=0.0,
                                      decay=0.0)
    assert torch.equal(layer.codes, before) and not drawn
    # the smallest scale is read once and kept until the scales change: larger scales, smaller moves, few enough
    layer.scales.mul_(4)
    assert sparse_update.applies(layer, "stochastic", [3 * small], 0.0)


def test_rounding_noise_does_not_depend_on_its_chunk_size_and_is_uniform():
    from ftkit.optim.zo_streams import uniform_chunks

    whole = torch.cat([noise for _, noise in uniform_chunks(300_001, seed=4, size=400_000)])
    for size in (1_000, 999, 65_537):  # chunks across the stream's blocks, odd ones included
        chunked = [(part, noise) for part, noise in uniform_chunks(300_001, seed=4, size=size)]
        assert chunked[-1][0].stop == 300_001 and torch.equal(torch.cat([noise for _, noise in chunked]), whole)
    # (k + 1/2) / 2^15: strictly inside (0, 1), mean 1/2 within 4 standard errors (sd 1/sqrt(12))
    assert 0 < whole.min() and whole.max() < 1
    assert abs(whole.mean().item() - 0.5) < 4 / math.sqrt(12 * whole.numel())


def test_directions_are_the_same_whatever_the_thread_count_and_any_range_draws_alone():
    """Streams are cut into blocks with seeds of their own: the CPU draws the blocks on every core at once, and the
    numbers neither depend on the thread count nor on which range of the tensor is drawn."""
    from ftkit.optim.zo_streams import BLOCK, gaussian, gaussian_chunks, uniform_chunks

    previous, draws = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            noise = torch.cat([n for _, n in uniform_chunks(3 * BLOCK + 5, seed=2, size=BLOCK + 3)])
            draws.append((gaussian((3, BLOCK + 7), seed=1), noise))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(u, draws[0][0]) and torch.equal(n, draws[0][1]) for u, n in draws)
    whole = draws[0][0].view(-1)
    assert torch.equal(torch.cat([u for _, u in gaussian_chunks(whole.numel(), seed=1)]), whole)
    assert abs(whole.mean().item()) < 4 / math.sqrt(whole.numel()) and abs(whole.std().item() - 1) < 0.01


@pytest.mark.parametrize("fill, dtype", [("_normal", torch.float32), ("_words", torch.int32)])
def test_a_small_tensor_draws_only_the_start_of_its_block_and_gets_the_same_numbers(fill, dtype):
    """A block is drawn only as far as a tensor needs it (in multiples of 16): the numbers must be the first ones of
    the whole block's draw, which holds because torch draws a block's numbers in order, Gaussians 16 at a time."""
    from ftkit.optim import zo_streams

    draw = getattr(zo_streams, fill)
    whole = torch.empty(zo_streams.BLOCK, dtype=dtype)
    draw(whole, torch.Generator().manual_seed(9))
    for count in (1, 15, 16, 17, 576, 4095, zo_streams.BLOCK - 1):
        part = torch.empty(-(-count // 16) * 16, dtype=dtype)
        draw(part, torch.Generator().manual_seed(9))
        assert torch.equal(part[:count], whole[:count]), count
    assert torch.equal(zo_streams._draw_blocks(4, 0, 100, dtype, draw),
                       zo_streams._draw_blocks(4, 0, 2 * zo_streams.BLOCK, dtype, draw)[:100])


def test_a_perturbed_forward_draws_its_direction_on_several_threads_inside_inference_mode():
    """A quantized layer's perturbation is drawn inside its forward, which the zeroth-order step runs under
    inference_mode; the drawing threads must write in that mode (they do not inherit it), and give the numbers one
    thread gives. 256 x 512 is two blocks of the stream."""
    layer = quant_layer("int4", out_features=256, in_features=512)
    d = Directions(bits=4, independent=True, update_rounding="stochastic")
    QuantTarget("w", layer, 0).move(d, 7, 0.0, 1e-3)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    previous, outputs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outputs.append(layer(x).clone())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 0), ("int8", 0), ("fp8_e5m2", 32), ("q4_0", 32),
                                       ("q4_1", 32), ("q5_0", 32), ("q8_0", 32)])
def test_row_blocks_and_noise_chunks_do_not_change_a_single_bit(monkeypatch, fmt, group):
    """Large layers are perturbed, dequantized and rewritten a block of rows at a time to bound their temporaries;
    the arithmetic per element is the same, so 64-row blocks (200 rows: 64, 64, 64, 8) give what one block gives."""
    import ftkit.optim.zo_streams as streams
    import ftkit.quant.linear as linear

    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    results = []
    for elements in (1 << 22, 64 * 128):
        monkeypatch.setattr(linear, "BLOCK_ELEMENTS", elements)
        monkeypatch.setattr(streams, "CHUNK_ELEMENTS", elements // 2)
        torch.manual_seed(0)
        layer = QuantLinear.from_linear(nn.Linear(128, 200), fmt, group)
        target = QuantTarget("w", layer, 0)
        assert len(layer.row_blocks()) == (1 if elements == 1 << 22 else 4)
        target.move(QUZO, 5, 0.0, 1e-2)
        perturbed = layer(x)
        target.update(QUZO, step_seed=9, query_seeds=[5, 6], coefs=[40.0, -25.0], restore=-1e-2, decay=0.01)
        results.append((perturbed, layer.codes.view(torch.uint8).clone(), layer.dequantize()))
    for whole, blocked in zip(*results):
        assert torch.equal(whole, blocked)
    if fmt == "int4":
        with pytest.raises(ValueError, match="must start at a multiple of 64, got 10"):
            layer.code_values(slice(10, 74))


def test_a_quzo_step_of_a_large_int4_layer_needs_under_two_float_copies_of_its_weight():
    """Beyond its codes, one perturbed forward and one update of a 16384 x 4096 int4 layer need one float copy of
    it (the direction) and chunks of 16 MiB: under 2 copies (512 MiB) in all (BENCHMARKS.md has the figure)."""
    script = """
import json, torch
from ftkit.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from ftkit.optim.zo_targets import Directions, QuantTarget
from ftkit.quant.linear import QuantLinear
torch.set_num_threads(1)
layer = QuantLinear(4096, 16384, "int4", group_size=128, bias=False)
target, d = QuantTarget("w", layer, 0), Directions(bits=4, independent=True, update_rounding="stochastic")
x = torch.randn(4, 4096)
layer(x)
before, reset = current_rss_mb(), reset_peak_rss()
with torch.no_grad():
    target.move(d, 1, 0.0, 1e-3); layer(x); target.move(d, 1, 1e-3, 0.0)
    target.update(d, 2, [1], [1.0], 0.0, 0.0)
print(json.dumps({"reset": reset, "above_mb": peak_rss_mb() - before}))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    weight_mb = 16384 * 4096 * 4 / 2**20
    assert measured["reset"], "the high-water mark could not be reset (/proc/self/clear_refs)"
    assert measured["above_mb"] < 2 * weight_mb, measured


@pytest.mark.parametrize("numel", [15_000, 3 * 1024 + 5])  # many chunks; a tail under 16 joins the last
@pytest.mark.parametrize("bits, independent, decay", [(0, True, 0.0), (4, True, 0.0), (4, True, 0.1), (4, False, 0.0),
                                                      (2, True, 0.1)])
def test_full_precision_tensors_move_a_chunk_at_a_time_with_the_bits_of_whole_tensor_arithmetic(
        monkeypatch, numel, bits, independent, decay):
    """A large full-precision tensor (a 32000 x 4096 head) is perturbed and updated a chunk of its direction at a time:
    the same numbers, bit for bit, as whole-tensor arithmetic on the whole direction (here with 1,024-element chunks)."""
    from ftkit.optim import zo_streams

    monkeypatch.setattr(zo_streams, "CHUNK_ELEMENTS", 1024)
    d = Directions(bits=bits, independent=independent, update_rounding="stochastic")
    param = nn.Parameter(torch.randn(numel, generator=torch.Generator().manual_seed(0)))
    expected = param.detach().clone()
    target = FloatTarget("w", param, 3, decay=True)
    seeds, coefs, eps = [11, 12], [-0.05, 0.02], 1e-3
    with torch.no_grad():
        target.move(d, seeds[1], 0.0, eps)
        target.move(d, seeds[1], eps, -eps)
        target.update(d, 7, seeds, coefs, restore=eps, decay=decay)
    u1 = d.perturbation(seeds[1], 3, (numel,), "cpu")
    expected.add_(u1, alpha=eps).add_(u1, alpha=-2 * eps)
    first, second = d.both(seeds[1], 3, (numel,), "cpu")
    if decay:
        expected.add_(first, alpha=eps).mul_(1.0 - decay).add_(second, alpha=coefs[1])
    elif first is second:
        expected.add_(first, alpha=eps + coefs[1])
    else:
        expected.add_(first, alpha=eps).add_(second, alpha=coefs[1])
    expected.add_(d.update_direction(seeds[0], 3, (numel,), "cpu"), alpha=coefs[0])
    assert len(zo_streams.chunk_slices(numel)) > 1 and torch.equal(param.detach(), expected)


@pytest.mark.parametrize("ahead,keep", [(1 << 24, 64 << 20), (3000, 64 << 20), (1 << 24, 0), (3000, 700)],
                         ids=["one window", "windows of a tensor or two", "nothing kept", "some kept"])
def test_sign_words_drawn_ahead_give_the_step_of_tensors_that_draw_their_own(monkeypatch, ahead, keep):
    """With random-sign directions the float targets' words are drawn ahead, a window of tensors at a time by every
    thread (`SignStep.pass_over`), and kept through the step within a bound: a MeZO step over tensors of assorted sizes
    (one larger than a chunk, which draws its own) moves every weight exactly as each tensor's own `signs` say, at
    one thread and at three, whatever is kept."""
    from ftkit.optim import zo_streams
    from ftkit.optim.core import zeroth_order_step
    from ftkit.optim.directions import rademacher
    from ftkit.optim.zo_streams import U, sign_words, signs

    monkeypatch.setattr(zo_streams, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(rademacher, "AHEAD_ELEMENTS", ahead)
    monkeypatch.setattr(rademacher, "KEEP_BYTES", keep)
    requested = []  # the tensors whose words are drawn ahead, each time

    def counted(requests):
        requested.extend(numel for numel, _ in requests)
        return sign_words(requests)

    monkeypatch.setattr(rademacher, "sign_words", counted)
    d = Directions(bits=0, independent=True, update_rounding="stochastic", distribution="rademacher")
    sizes = [7, 1500, 4096, 20_000, 33, 2900, 1]
    start = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    eps, lr, grad = 1e-3, 0.1, 0.75
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            params = [nn.Parameter(w.clone()) for w in start]
            targets = [FloatTarget(f"w{i}", w, i, decay=False) for i, w in enumerate(params)]
            zeroth_order_step(targets, d, step_seed=9, lr=lr, eps=eps, n_queries=1, weight_decay=0.0,
                              gradients=[grad])
            results.append([w.detach().clone() for w in params])
            # the words of each tensor of a chunk or less: drawn once and kept for the step's other two passes
            # while they fit in KEEP_BYTES (in drawing order), drawn for each of the three passes otherwise
            once, held = [], 0
            for n in (n for n in sizes if n <= 4096):
                if held + 4 * -(-n // 16) <= keep:
                    once.append(n)
                    held += 4 * -(-n // 16)
            thrice = [n for n in sizes if n <= 4096 and n not in once]
            assert sorted(requested) == sorted(once + thrice * 3) and (keep or not once)
            requested.clear()
            words = sign_words([(n, derive(5, i, U)) for i, n in enumerate(sizes[:3])])
            assert all(torch.equal(zo_streams.words_to_signs(w, 0, n), signs(n, derive(5, i, U)))
                       for i, (w, n) in enumerate(zip(words, sizes)))
    finally:
        torch.set_num_threads(previous)
    query = derive(9, 0)
    for i, (w, n) in enumerate(zip(start, sizes)):
        u = signs(n, derive(query, i, U))
        expected = w.clone().add_(u, alpha=eps).add_(u, alpha=-2 * eps).add_(u, alpha=eps - lr * grad)
        assert torch.equal(results[0][i], expected) and torch.equal(results[1][i], expected), n
    kept = rademacher.KeptWords()
    for i, n in enumerate((100, 300, 400)):
        kept.offer((1, i), torch.zeros(n, dtype=torch.int32))
    assert kept.nbytes <= keep and kept.nbytes == sum(w.nbytes for w in kept.values())
    assert zo_streams._balanced_runs([5, 1, 1, 5, 2], 2) == [range(0, 3), range(3, 5)]
    assert zo_streams._balanced_runs([10], 3) == [range(0, 1)]


@pytest.mark.parametrize("keep", [64 << 20, 0], ids=["kept", "nothing kept"])
def test_several_queries_update_with_their_kept_sign_words(monkeypatch, keep):
    """With several queries a step, the update applies every query's direction: the earlier queries' words come
    from the step's kept ones (no draw of their own while they fit), and the weights are as each tensor's own
    `signs` say, in the step's order of operations."""
    from ftkit.optim import zo_streams
    from ftkit.optim.core import zeroth_order_step
    from ftkit.optim.directions import rademacher
    from ftkit.optim.zo_streams import U, signs

    monkeypatch.setattr(rademacher, "KEEP_BYTES", keep)
    own_draws = []  # sign directions drawn without words (a tensor drawing its own)

    def counted(numel, seed, device, words=None):
        if words is None:
            own_draws.append(numel)
        return zo_streams.sign_chunks(numel, seed, device, words)

    monkeypatch.setattr(rademacher, "sign_chunks", counted)
    d = Directions(bits=0, independent=True, update_rounding="stochastic", distribution="rademacher")
    sizes, eps, lr, grads = [300, 5, 1000], 1e-3, 0.1, [0.75, -0.5, 0.25]
    start = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    params = [nn.Parameter(w.clone()) for w in start]
    targets = [FloatTarget(f"w{i}", w, i, decay=False) for i, w in enumerate(params)]
    zeroth_order_step(targets, d, step_seed=4, lr=lr, eps=eps, n_queries=3, weight_decay=0.0, gradients=grads)
    # kept: every draw is ahead (sign_words); nothing kept: the update draws the two earlier queries' own
    assert sorted(own_draws) == ([] if keep else sorted(sizes * 2))
    coefs = [-lr * g / 3 for g in grads]
    for i, (w, n) in enumerate(zip(start, sizes)):
        u = [signs(n, derive(derive(4, q), i, U)) for q in range(3)]
        expected = w.clone()
        for q in range(2):
            expected.add_(u[q], alpha=eps).add_(u[q], alpha=-2 * eps).add_(u[q], alpha=eps)
        expected.add_(u[2], alpha=eps).add_(u[2], alpha=-2 * eps).add_(u[2], alpha=eps + coefs[2])
        expected.add_(u[0], alpha=coefs[0]).add_(u[1], alpha=coefs[1])
        assert torch.equal(params[i].detach(), expected), n


def test_a_zeroth_order_update_of_a_large_full_precision_tensor_holds_a_few_chunks_not_copies():
    """An 8192 x 4096 fp32 tensor (128 MiB, eight chunks): perturbing and updating it with QuZO's rounded directions
    adds a few 16 MiB chunks to memory, whatever its size, not the two whole float copies (256 MiB) whole-tensor
    directions took."""
    script = """
import json, torch
from ftkit.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from ftkit.optim.zo_targets import Directions, FloatTarget
from ftkit.memory import reuse_freed_memory
torch.set_num_threads(1)
reuse_freed_memory()  # as training does
param = torch.nn.Parameter(torch.ones(8192, 4096))  # written, so its pages are resident before measuring
target, d = FloatTarget("w", param, 0, decay=True), Directions(bits=4, independent=True, update_rounding="stochastic")
before, reset = current_rss_mb(), reset_peak_rss()
with torch.no_grad():
    target.move(d, 1, 0.0, 1e-3); target.move(d, 1, 1e-3, -1e-3)
    target.update(d, 2, [1], [1e-3], 1e-3, 0.01)
print(json.dumps({"reset": reset, "above_mb": peak_rss_mb() - before}))
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["reset"], "the high-water mark could not be reset (/proc/self/clear_refs)"
    assert measured["above_mb"] < 96, measured  # a few chunks: well under one whole float copy (128 MiB)


# --- MeZO on full-precision tensors -------------------------------------------------------------------------------


def test_mezo_projected_gradient_is_the_directional_derivative_and_the_update_is_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(12, 6)
    targets = [FloatTarget(n, p, i, decay=p.ndim >= 2) for i, (n, p) in enumerate(model.named_parameters())]
    d = Directions(bits=0, independent=True, update_rounding="stochastic")

    def loss():
        return model(x).pow(2).mean()

    before = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(loss(), list(model.parameters()))
    z = [gaussian(p.shape, derive(3, i, 0)) for i, p in enumerate(model.parameters())]
    directional = sum((g * zi).sum() for g, zi in zip(grads, z)).item()
    eps = 1e-3
    with torch.no_grad():
        for t in targets:
            t.move(d, 3, 0.0, eps)
        plus = loss().item()
        for t in targets:
            t.move(d, 3, eps, -eps)
        minus = loss().item()
        g = (plus - minus) / (2 * eps)
        assert g == pytest.approx(directional, rel=1e-2)
        lr, wd = 0.1, 0.01
        for t in targets:
            t.update(d, 0, [3], [-lr * g], restore=eps, decay=lr * wd)
    for p, p0, zi in zip(model.parameters(), before, z):
        decay = lr * wd if p.ndim >= 2 else 0.0  # no weight decay on biases
        # a few additions per element, in another order: a few roundings of the largest term
        magnitude = p0.abs() + 3 * eps * zi.abs() + abs(lr * g) * zi.abs()
        assert_sums_close(p.detach(), p0 * (1 - decay) - lr * g * zi, magnitude, 6, "updated weight")


# --- runs: training, replay, resume, trainable sets ---------------------------------------------------------------


def zo_recipe(write_recipe, tmp_path, name, optimizer="quzo", **sections):
    sections.setdefault("train", {}).update(output_dir=str(tmp_path / name))
    sections["train"].setdefault("lr", 2e-3)
    sections["train"].setdefault("eval_every", 0)
    sections.setdefault("method", {})["optimizer"] = optimizer
    return load_recipe(write_recipe(tiny_recipe(**sections), f"{name}.yaml"))


def weights(run_dir: Path, which: str = "last") -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints", which) / ckpt.WEIGHTS))


def same_bits(a: dict, b: dict) -> bool:
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731  (compares FP8 and NaN payloads too)
    return a.keys() == b.keys() and all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def test_replay_of_a_200_step_quzo_int4_run_is_bit_identical(write_recipe, tmp_path):
    recipe = zo_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"},
                       train={"max_steps": 200, "save_every": 0, "lr": 1e-3, "schedule": "linear"})
    train(recipe)
    run_dir = tmp_path / "quzo"
    header, records = read_trace(run_dir / TRACE_FILE)
    assert [r["step"] for r in records] == list(range(1, 201)) and header["method"] == "quzo"
    size = (run_dir / TRACE_FILE).stat().st_size
    assert size - 200 * record_format(1).size < 20_000  # the header (recipe, step-0 head); 31 bytes per step

    initial = load_recipe(run_dir / "recipe.yaml")
    replay(initial, run_dir / TRACE_FILE, tmp_path / "replayed")
    trained, rebuilt = weights(run_dir), weights(tmp_path / "replayed")
    assert same_bits(trained, rebuilt)
    # The header alone replays to the step-0 model: the int4 codes themselves were trained.
    header_only = tmp_path / "header.ftz"
    header_only.write_bytes((run_dir / TRACE_FILE).read_bytes()[: size - 200 * record_format(1).size])
    replay(initial, header_only, tmp_path / "step0")
    start = weights(tmp_path / "step0")
    codes = [k for k in trained if k.endswith(".codes")]
    assert codes and sum(not torch.equal(trained[k], start[k]) for k in codes) == len(codes)


@pytest.mark.parametrize("optimizer, quant, zo", [
    ("mezo", {}, {"n_queries": 2, "weight_decay": 0.1}),
    ("quzo", {"format": "fp8_e4m3"}, {"n_queries": 3, "independent_roundings": False}),
    ("quzo", {"format": "int8", "group_size": 16}, {"update_rounding": "nearest", "weight_decay": 0.01}),
    ("quzo", {"format": "int4"}, {"direction": "rademacher", "n_queries": 2}),
    ("mezo", {}, {"direction": "rademacher"}),
])
def test_replay_is_bit_identical_for_every_variant(write_recipe, tmp_path, optimizer, quant, zo):
    model = {"dtype": "bfloat16"} if optimizer == "mezo" else {}  # MeZO on bf16 weights
    recipe = zo_recipe(write_recipe, tmp_path, "run", optimizer, quant=quant, method={"zo": zo}, model=model,
                       train={"max_steps": 15, "lr": 1e-3})
    if model:
        with pytest.warns(UserWarning, match="mezo on bfloat16 weights"):
            train(recipe)
    else:
        train(recipe)
    replay(load_recipe(tmp_path / "run" / "recipe.yaml"), tmp_path / "run" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(weights(tmp_path / "run"), weights(tmp_path / "replayed"))
    _, records = read_trace(tmp_path / "run" / TRACE_FILE)
    assert all(len(r["gradients"]) == zo.get("n_queries", 1) for r in records)



def test_a_run_whose_updates_are_drawn_as_moves_replays_and_resumes_bit_for_bit(write_recipe, tmp_path, monkeypatch):
    """Full-parameter QuZO int4 with random signs at a small rate: every step's update of the codes is drawn as its
    moves (counted), the codes do move, and replay and resume reproduce the run exactly."""
    from ftkit.optim import sparse_update

    drawn = []
    moves = sparse_update.moves
    monkeypatch.setattr(sparse_update, "moves", lambda *a, **k: drawn.append(len(a[0])) or moves(*a, **k))
    settings = dict(quant={"format": "int4"}, method={"zo": {"direction": "rademacher"}})
    full = zo_recipe(write_recipe, tmp_path, "full", **settings, train={"max_steps": 8, "save_every": 4, "lr": 1e-5})
    train(full)
    assert len(drawn) == 8 and all(count == drawn[0] > 0 for count in drawn)
    end = weights(tmp_path / "full")
    replay(full, tmp_path / "full" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(end, weights(tmp_path / "replayed"))
    train(zo_recipe(write_recipe, tmp_path, "parts", **settings, train={"max_steps": 4, "save_every": 4, "lr": 1e-5}))
    half = weights(tmp_path / "parts")
    assert any(not torch.equal(half[k], end[k]) for k in end if k.endswith(".codes"))  # steps 5-8 moved codes
    train(zo_recipe(write_recipe, tmp_path, "parts", **settings, train={"max_steps": 8, "save_every": 4, "lr": 1e-5}),
          resume=True)
    assert same_bits(end, weights(tmp_path / "parts"))
    # A trace of an earlier layout (version 1 drew these updates with a uniform number per code) is refused in one
    # line, not replayed into other weights.
    from ftkit.optim.trace import VERSION, _header_size, header_bytes, read_trace

    trace = tmp_path / "full" / TRACE_FILE
    header, _ = read_trace(trace)
    assert header["version"] == VERSION == 2
    with open(trace, "rb") as f:
        records = trace.read_bytes()[_header_size(f):]
    (tmp_path / "old.ftz").write_bytes(header_bytes({**header, "version": 1}) + records)
    with pytest.raises(UserError, match="old.ftz is a version 1 trace and this ftkit reads version 2: replay it with "
                                        "the ftkit that wrote it"):
        replay(full, tmp_path / "old.ftz", tmp_path / "old")


def test_replay_refuses_a_different_recipe(write_recipe, tmp_path):
    recipe = zo_recipe(write_recipe, tmp_path, "mezo", "mezo", train={"max_steps": 3})
    train(recipe)
    changed = zo_recipe(write_recipe, tmp_path, "mezo", "mezo", train={"max_steps": 3, "lr": 5e-3})
    with pytest.raises(Exception, match="train.lr was 0.002 and is now 0.005"):
        replay(changed, tmp_path / "mezo" / TRACE_FILE, tmp_path / "other")


@pytest.mark.parametrize("optimizer, quant", [("quzo", {"format": "int4"}), ("mezo", {}), ("quzo", {"format": "q4_1"}),
                                              ("quzo", {"format": "q5_0"})])
def test_resume_is_bit_exact_and_the_trace_continues(write_recipe, tmp_path, optimizer, quant):
    full = zo_recipe(write_recipe, tmp_path, "full", optimizer, quant=quant, train={"max_steps": 12, "save_every": 6})
    train(full)
    first = zo_recipe(write_recipe, tmp_path, "parts", optimizer, quant=quant, train={"max_steps": 6, "save_every": 6})
    train(first)
    # Pretend the process died after step 8: the trace holds records the checkpoint (step 6) does not.
    rest = zo_recipe(write_recipe, tmp_path, "parts", optimizer, quant=quant, train={"max_steps": 12, "save_every": 6})
    with open(tmp_path / "parts" / TRACE_FILE, "ab") as f:
        f.write(b"\0" * record_format(1).size * 2)
    train(rest, resume=True)
    assert same_bits(weights(tmp_path / "full"), weights(tmp_path / "parts"))
    (full_header, full_records), (header, records) = (read_trace(tmp_path / d / TRACE_FILE) for d in ("full", "parts"))
    assert records == full_records and len(records) == 12  # the stray records were cut before resuming
    assert header["initial_tensors"] == full_header["initial_tensors"]
    replay(rest, tmp_path / "parts" / TRACE_FILE, tmp_path / "replayed")  # the resumed run's trace replays too
    assert same_bits(weights(tmp_path / "parts"), weights(tmp_path / "replayed"))


def test_resume_without_its_trace_is_refused_with_a_way_out(write_recipe, tmp_path):
    train(zo_recipe(write_recipe, tmp_path, "run", "mezo", train={"max_steps": 4, "save_every": 2}))
    (tmp_path / "run" / TRACE_FILE).unlink()
    longer = zo_recipe(write_recipe, tmp_path, "run", "mezo", train={"max_steps": 6, "save_every": 2})
    with pytest.raises(UserError, match="trace.ftz is missing; restore it, or resume with method.zo.trace=false"):
        train(longer, resume=True)
    untraced = zo_recipe(write_recipe, tmp_path, "run", "mezo", method={"zo": {"trace": False}},
                         train={"max_steps": 6, "save_every": 2})
    assert train(untraced, resume=True)["steps"] == 6


@pytest.mark.parametrize("adapter, quant", [("loretta_rep", {"format": "int4"}), ("loretta_adp", {"format": "fp8_e4m3"}),
                                            ("lora", {"format": "int4", "engine": "bitsandbytes"}),
                                            ("none", {"format": "int8"}), ("loretta_rep", {"format": "q4_1"}),
                                            ("none", {"format": "q4_0"})])
def test_quzo_trains_adapters_over_any_frozen_base_and_full_weights(write_recipe, tmp_path, adapter, quant):
    # bitsandbytes' CPU 4-bit inference needs rows of at least one 64-element block
    model = {"config": {**TINY_BERT, "hidden_size": 64, "intermediate_size": 128}} if "engine" in quant else {}
    recipe = zo_recipe(write_recipe, tmp_path, "run", quant=quant, method={"adapter": adapter}, model=model,
                       train={"max_steps": 4, "lr": 1e-2})
    train(recipe)
    before_dir = tmp_path / "zero"
    zero = zo_recipe(write_recipe, tmp_path, "zero", quant=quant, method={"adapter": adapter}, model=model,
                     train={"max_steps": 1, "lr": 0.0})
    train(zero)
    after, start = weights(tmp_path / "run"), weights(before_dir)
    changed = {k for k in after if not torch.equal(after[k].view(torch.uint8), start[k].view(torch.uint8))}
    if adapter == "none":
        assert any(k.endswith(".codes") for k in changed)  # the int8 codes themselves
    else:
        assert changed and all(("lora_" in k or "loretta_" in k or k.startswith("head.") or "norm" in k.lower())
                               for k in changed)
        assert not any(k.endswith(".codes") for k in changed)  # the quantized base stays frozen


def test_word_embeddings_are_frozen_for_zeroth_order_by_default(write_recipe, tmp_path):
    from ftkit.models.count import count_parameters

    full = count_parameters(zo_recipe(write_recipe, tmp_path, "a", "mezo"))
    with_embeddings = count_parameters(zo_recipe(write_recipe, tmp_path, "b", "mezo",
                                                 method={"zo": {"train_embeddings": True}}))
    vocab_rows = with_embeddings["trainable"] - full["trainable"]
    assert vocab_rows == with_embeddings["groups"]["embeddings"]["trainable"] - full["groups"]["embeddings"]["trainable"]
    assert vocab_rows > 0 and vocab_rows % 32 == 0  # vocab x hidden
    quzo = count_parameters(zo_recipe(write_recipe, tmp_path, "c", "quzo", quant={"format": "int4"}))
    assert quzo["trainable"] == full["trainable"]  # the int4 codes count as trained weights


@pytest.mark.parametrize("sections, message", [
    ({"method": {"optimizer": "mezo"}, "quant": {"format": "int4"}}, "mezo trains full-precision weights"),
    ({"method": {"optimizer": "quzo"}, "train": {"weight_decay": 0.1}}, "set method.zo.weight_decay"),
    ({"method": {"optimizer": "mezo"}, "train": {"grad_clip": 1.0}}, "train.grad_clip: clips a backpropagated"),
    ({"method": {"optimizer": "quzo", "zo": {"eps": 0}}}, "method.zo.eps: must be positive"),
    ({"method": {"optimizer": "quzo", "zo": {"perturb_bits": 1}}}, "method.zo.perturb_bits"),
    ({"method": {"optimizer": "mezo", "zo": {"direction": "sobol"}}},
     "method.zo.direction: unknown direction 'sobol' (available: gaussian, rademacher, lowrank)"),
    ({"method": {"optimizer": "quzo"}, "quant": {"format": "int4", "engine": "bitsandbytes"}},
     "bitsandbytes weights are frozen"),
    ({"method": {"optimizer": "quzo", "zo": {"update_round": "nearest"}}}, "did you mean 'method.zo.update_rounding'"),
    ({"train": {"micro_batch_size": 100}}, "train.micro_batch_size: 100 is more than train.batch_size (8)"),
])
def test_zeroth_order_recipe_mistakes_are_named(write_recipe, sections, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe(tiny_recipe(**sections)))


def test_non_finite_loss_restores_the_weights_and_stops(write_recipe, tmp_path):
    recipe = zo_recipe(write_recipe, tmp_path, "nan", "mezo", train={"max_steps": 3})
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    task, tokenizer = load_task_data(recipe), load_tokenizer(recipe.model)
    model, _, _ = build_model(recipe, task, tokenizer)
    method = ZerothOrder(model, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    calls = iter([1.0, math.nan])
    method._chunk_losses = lambda shard: [next(calls)]  # L+ finite, L- not
    metrics = method.step(Shard([], [0], num_chunks=1, total=1), 1e-3)
    assert math.isnan(metrics["projected_grad"]) and math.isnan(metrics["loss"])
    query_seed = derive(method.core.step_seed(0), 0)
    for target in method.targets:
        p = target.param.detach()
        u = method.directions.perturbation(query_seed, target.index, p.shape, p.device)
        # w + eps u - 2 eps u + eps u: four roundings of at most |w| + 2 eps |u| each
        assert_sums_close(p, before[target.name], before[target.name].abs() + 2e-3 * u.abs(), 4, target.name)


@pytest.mark.parametrize("config", ["llama", "opt"])
@pytest.mark.parametrize("optimizer, quant", [("mezo", {}), ("quzo", {"format": "int4"})])
def test_zeroth_order_lowers_the_loss_of_tiny_causal_lms(write_recipe, tmp_path, config, optimizer, quant):
    """Candidate scoring on causal LMs (MeZO's protocol): 80 steps lower both the train and the held-out loss."""
    from conftest import TINY_LLAMA, TINY_OPT

    from ftkit.training.metrics import read_events

    architecture = {"llama": TINY_LLAMA, "opt": TINY_OPT}[config]
    recipe = zo_recipe(write_recipe, tmp_path, "run", optimizer, quant=quant,
                       model={"config": dict(architecture), "head_init": "random"},
                       train={"max_steps": 80, "lr": 3e-3, "batch_size": 16, "eval_every": 80})
    train(recipe)
    events = read_events(tmp_path / "run" / "metrics.jsonl")
    losses = [e["loss"] for e in events if e["split"] == "train"]
    dev = [e["loss"] for e in events if e["split"] == "dev"]
    assert sum(losses[-20:]) < sum(losses[:20]) and dev[-1] < dev[0] - 0.005


def test_zeroth_order_loss_over_micro_batches_is_the_batch_mean(write_recipe, tmp_path):
    from ftkit.data.batches import encode, micro_batches
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    recipe = zo_recipe(write_recipe, tmp_path, "run", "quzo", quant={"format": "int8"})
    task, tokenizer = load_task_data(recipe, splits=("train",)), load_tokenizer(recipe.model)
    features = encode(task.splits["train"][:12], tokenizer, "encoder", task, 32)
    found = []
    for size in (None, 5):
        model, _, _ = build_model(recipe, task, tokenizer)
        method = ZerothOrder(model, recipe)
        found.append(method.step(micro_batches(features, size, tokenizer.pad_token_id), 0.0))
    assert found[1]["loss"] == pytest.approx(found[0]["loss"], rel=1e-6)
    # the projected gradient divides a loss difference by 2 eps: the losses' relative 1e-6 becomes this
    eps = recipe.method.zo.eps
    assert found[1]["projected_grad"] == pytest.approx(found[0]["projected_grad"], abs=2e-6 * found[0]["loss"] / eps)


@pytest.mark.parametrize("adapter", ["loretta_rep", "loretta_adp"])
def test_zeroth_order_moves_tensor_train_adapters_whose_layers_cache_their_matrix(write_recipe, tmp_path, adapter):
    """A tensor-train layer caches its built matrix outside autograd, keyed on its cores' version counters; a
    perturbation must bump them, or every forward reuses the step-0 matrix and the adapter never trains."""
    from ftkit.data.batches import collate, encode
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    recipe = zo_recipe(write_recipe, tmp_path, "run", "mezo", method={"adapter": adapter,
                                                                     "loretta": {"bottleneck": 8, "init": "paper"}})
    task, tokenizer = load_task_data(recipe, splits=("train",)), load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    method = ZerothOrder(model, recipe)
    batch = collate(encode(task.splits["train"][:8], tokenizer, kind, task, 32), tokenizer.pad_token_id)
    adapters = [t for t in method.targets if "loretta_" in t.name]
    with torch.inference_mode():
        model.eval()
        before = model(batch).clone()
        for target in adapters:
            target.move(method.directions, 5, 0.0, 1e-2)
        moved = model(batch).clone()
        for target in adapters:
            target.move(method.directions, 5, 1e-2, 0.0)
        back = model(batch)
    assert not torch.equal(moved, before)  # the perturbation reached the forward
    assert torch.allclose(back, before, atol=1e-5 * before.abs().max().item())  # and left with the restore


def test_the_sparse_update_moves_q4_0_codes_against_negative_scales_along_the_weight_direction():
    """Q4_0's scale is the block's signed largest value / -8, often negative: a move of +1 code is then a move of -|d|
    in the weight. Drawn as its moves, every moved weight goes along -sign(coef) u, whatever its scale's sign, and
    as often as |coef| / |d| says."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(256, 512), "q4_0")
    assert (layer.scales < 0).any() and (layer.scales > 0).any()
    before = layer.dequantize()
    coef = -0.02 * layer.scales.float().abs().min().item()
    QuantTarget("w", layer, 3).update(SIGNS, step_seed=11, query_seeds=[7], coefs=[coef], restore=0.0, decay=0.0)
    change = layer.dequantize() - before
    u = signs(before.shape, derive(7, 3, 0))
    moved = change != 0
    assert moved.sum() > 20 and torch.equal(change[moved].sign(), -u[moved])  # coef < 0: against the sign
    expected = (abs(coef) / layer.scales.double().abs()).repeat_interleave(32, dim=1).sum().item()
    assert abs(moved.sum().item() - expected) < 4 * math.sqrt(expected) + 0.02 * expected  # a few clamp away
