"""GGUF's K-quants (q4_k, q6_k): decoding equal to gguf.quants' bit for bit, the file's bytes back unchanged, the
bytes a layer holds, llama.cpp's quantizer, stochastic rounding, and zeroth-order training over them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY_BERT, tiny_recipe
from gguf import GGMLQuantizationType, GGUFReader, quants
from test_zo import same_bits, weights, zo_recipe

from ftkit.errors import RecipeError, UserError
from ftkit.gguf.layout import BY_TYPE, LAYOUTS, layer_from_file, layer_to_file
from ftkit.optim.trace import read_trace
from ftkit.optim.zo import TRACE_FILE
from ftkit.quant.kquants import unpack_scale_mins
from ftkit.quant.linear import QuantLinear
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training.loop import train

TYPES = {"q4_k": GGMLQuantizationType.Q4_K, "q6_k": GGMLQuantizationType.Q6_K}
BYTES = {"q4_k": 144, "q6_k": 210}
WIDE_BERT = {**TINY_BERT, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1}  # rows of 256


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of random bytes: every code and sub-block scale pattern, finite float16 d (and dmin)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, BYTES[fmt]), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // 256, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if fmt == "q4_k":
        raw[..., 0:4] = d.reshape(rows, -1, 4)
    else:
        raw[..., 208:210] = d[..., :2]
    return raw.reshape(rows, -1)


def from_file(fmt: str, raw: np.ndarray, cols: int) -> QuantLinear:
    assert LAYOUTS[fmt].ggml_type == TYPES[fmt] and BY_TYPE[TYPES[fmt]] == fmt  # registered with the simple types
    return layer_from_file(fmt, raw, cols)


def to_file(layer: QuantLinear) -> np.ndarray:
    return layer_to_file(layer)


def quantized(fmt: str, weight: torch.Tensor) -> QuantLinear:
    source = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    source.weight.data.copy_(weight)
    return QuantLinear.from_linear(source, fmt)


def reference_matrix() -> torch.Tensor:
    weight = torch.randn(70, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    weight[3] = 0.0  # empty super-blocks
    weight[4, :256] = 0.25  # one value: a flat fit
    weight[5, 32:64] = 0.0  # a sub-block of zeros beside non-zero ones
    weight[6] *= 1e3  # large values: float16 d near its range
    weight[7, :16] = 40.0  # one sub-block dominates: the others' 6-bit scales round to small integers or 0
    return weight


@pytest.mark.parametrize("fmt", list(TYPES))
def test_decoding_equals_gguf_quants_bit_for_bit_and_the_bytes_come_back(fmt):
    raw = random_blocks(fmt, 70, 512)
    layer = from_file(fmt, raw, 512)
    expected = quants.dequantize(raw, TYPES[fmt])
    assert np.array_equal(layer.dequantize().numpy().view(np.uint32), expected.view(np.uint32))  # -0 too
    assert np.array_equal(to_file(layer), raw)
    weight = reference_matrix()
    own = quantized(fmt, weight)
    assert np.array_equal(own.dequantize().numpy().view(np.uint32),
                          quants.dequantize(to_file(own), TYPES[fmt]).view(np.uint32))


@pytest.mark.parametrize("fmt", list(TYPES))
def test_a_layer_counts_the_bytes_it_holds(fmt):
    layer = QuantLinear(512, 70, fmt, bias=False)
    blocks = 70 * 512 // 256
    # Q4_K: the file's 144 bytes per block, codes in rows padded to 64 as int4's; Q6_K: one int8 per code
    expected = blocks * 144 + (128 - 70) * 512 // 2 if fmt == "q4_k" else blocks * (256 + 16 + 2)
    assert layer.stored_bytes == expected
    assert {name for name, _ in layer.named_buffers()} == {"codes", *layer.stored_names}


def test_quantizer_error_is_below_the_simpler_formats_on_gaussian_weights():
    """Root-mean-square error on N(0, 0.05^2) weights: Q4_K's fitted scales and minimums beat Q4_1's range (same
    4-bit codes, 4.5 against 5 bits a weight), and Q6_K is about four times finer still."""
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)) * 0.05
    rmse = {fmt: (quantized(fmt, weight).dequantize() - weight).pow(2).mean().sqrt().item()
            for fmt in ("q4_1", "q4_k", "q6_k")}
    assert rmse["q4_k"] < 0.97 * rmse["q4_1"]
    assert rmse["q6_k"] < rmse["q4_k"] / 3.5


def test_q4_k_rounds_a_six_bit_minimum_on_a_tie_as_llama_cpp_does():
    """Sub-blocks on an exact grid (step 1/16) whose minimums, like those of weights read from a Q4_1 file, put
    63 m / max m on 27.5 exactly for sub-block 6: llama.cpp's 63.f / max_min, one rounding, gives 27.5 and the even
    28 (its quantize_row_q4_K_ref wrote these eight minimums for this super-block); the reciprocal times 63 rounds
    twice, to 27.499998 and 27."""
    mins = torch.tensor([0.349609375, 0.58203125, 0.44140625, 0.73828125, 0.388671875, 0.2578125, 0.322265625,
                         0.337890625])
    weight = (-mins[:, None] + torch.arange(32).remainder(16) / 16).reshape(1, 256)
    packed = quantized("q4_k", weight).sub_scales.view(1, 1, 12)
    sc, m = unpack_scale_mins(packed)
    assert m.flatten().tolist() == [30, 50, 38, 63, 33, 22, 28, 29] and sc.flatten().tolist() == [63] * 8


# (row, super-block) of SmolLM2's blk.3.ffn_down -> the bytes llama.cpp's quantize_row_q4_K_ref (llama-cpp-python
# 0.3.36) writes for its float32 weights (scripts/make_gguf.py --compare checks every block of the model)
LLAMA_CPP_Q4_K = {
    (2, 3): (
        "22150022a4bfacbe9e72667f1b64cbdda07f95990afc947936af776e735b75b67e80778958798c6c477469739dad3562"
        "6aa3bb97aba3ebf8b4bc8fa47dc880a96805e4b69895e2984db9cabe7bbcb7c852aa2bfad8ba87993635a980646c6748"
        "4aa9768c3e5f7d0745725467137a50563087baaa09297755c971a7b784692981857c481289a9635da0a7621f7695aaf6"),
    (300, 4): (
        "e914db20e1bf9feddcbf5db0300ff0c3d55138a55f87b07bdf9856a69c67ba0e7bc63ab96a78546c729359f67c5bab66"
        "78755c84cb99a97de6778eb785a69af16a8649c0838f44a967b5b6d8c90c753e4d2c37863a6b575b59c8478cdf098a69"
        "6a6e78377012f228aa8d775c5c65893561c24a2388037a9d50c2677672bb545b798b6d40a74e74fac409995b7771461f"),
}


def test_q4_k_writes_llama_cpps_bytes_where_float32_rounding_decides():
    """Two super-blocks of the packaged model (Q4_1 weights, so on a 4-bit grid, where ties are common): a 6-bit
    minimum on a tie (the test above) and a sub-block whose RMS, torch's float32 sqrt one unit off, changed the
    weights of the fit and the minimum it chose: ftkit writes llama.cpp's bytes for both."""
    from ftkit.models.packaged import smollm2_gguf

    reader = GGUFReader(smollm2_gguf())
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    for (row, block), expected in LLAMA_CPP_Q4_K.items():
        weight = quants.dequantize(np.asarray(tensor.data)[row:row + 1], tensor.tensor_type)[:, block * 256:][:, :256]
        assert to_file(quantized("q4_k", torch.from_numpy(weight.copy()))).tobytes().hex() == expected, (row, block)


@pytest.mark.parametrize("fmt", list(TYPES))
def test_stochastic_rounding_on_the_grid_is_unbiased(fmt):
    """4000 stochastic roundings of values between interior grid points (one uniform per element from an explicit
    generator): their mean is within 0.04 of the value (5 standard deviations of a mean of 4000 Bernoulli draws)."""
    layer = quantized(fmt, reference_matrix()[:8, :256])
    codec, generator = layer.codec, torch.Generator().manual_seed(1)
    x = torch.rand(256, generator=generator) * (codec.qmax - codec.qmin - 2) + codec.qmin + 1
    mean = torch.stack([codec.round(x, "stochastic", generator) for _ in range(4000)]).mean(0)
    assert (mean - x).abs().max() < 0.04
    assert torch.equal(codec.round(x, "nearest"), torch.round(x))


def test_updates_move_no_code_of_a_sub_block_of_scale_zero():
    """A sub-block whose 6-bit scale is 0 decodes to its minimum whatever its codes: updates divide by an infinite
    scale there, so they move none of its codes, while the other sub-blocks move; decoding stays exact."""
    from ftkit.optim.zo_targets import land

    raw = random_blocks("q4_k", 64, 256, seed=2)
    raw[:, 4:16] = 0
    raw[:, 4] = 20  # sub-block 0 of every row: sc = 20, m = 0; sub-blocks 1..7: sc = 0
    layer = from_file("q4_k", raw, 256)
    before = layer.code_values()
    assert torch.isinf(layer.scales[:, 1:]).all() and (layer.group_params()["scales"][:, 1:] == 0).all()
    land(layer, 0, torch.full((64, 256), 10.0), step_seed=5, rounding="stochastic", decay=0.0)
    after = layer.code_values()
    assert torch.equal(after[:, 32:], before[:, 32:]) and not torch.equal(after[:, :32], before[:, :32])
    assert np.array_equal(layer.dequantize().numpy(), quants.dequantize(to_file(layer), TYPES["q4_k"]))


def test_q4_k_runs_the_int4_kernel_with_its_minimums_as_zero_points():
    layer = quantized("q4_k", reference_matrix()[:64])
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    assert layer.kernel_for(x) == "int4pack"
    exact = x @ layer.dequantize().T
    assert (layer(x) - exact).abs().max() < 0.01 * exact.abs().max()  # bf16 activations and scales


def test_quzo_resume_over_q4_k_is_bit_exact_and_replays(write_recipe, tmp_path):
    sections = dict(quant={"format": "q4_k"}, model={"config": WIDE_BERT})
    full = zo_recipe(write_recipe, tmp_path, "full", train={"max_steps": 4, "save_every": 2}, **sections)
    train(full)
    first = zo_recipe(write_recipe, tmp_path, "parts", train={"max_steps": 2, "save_every": 2}, **sections)
    train(first)
    rest = zo_recipe(write_recipe, tmp_path, "parts", train={"max_steps": 4, "save_every": 2}, **sections)
    train(rest, resume=True)
    assert same_bits(weights(tmp_path / "full"), weights(tmp_path / "parts"))
    start = zo_recipe(write_recipe, tmp_path, "zero", train={"max_steps": 1, "lr": 0.0}, **sections)
    train(start)
    assert not same_bits(weights(tmp_path / "full"), weights(tmp_path / "zero"))  # the codes moved
    assert len(read_trace(tmp_path / "parts" / TRACE_FILE)[1]) == 4
    replay(rest, tmp_path / "parts" / TRACE_FILE, tmp_path / "replayed")
    assert same_bits(weights(tmp_path / "parts"), weights(tmp_path / "replayed"))


@pytest.mark.parametrize("direction", ["rademacher", "lowrank"])
def test_the_sparse_and_low_rank_updates_move_k_quant_codes(write_recipe, tmp_path, direction):
    """Random signs and low-rank directions take their drawn-moves paths (one scale per sub-block, Q6_K's negative
    scales stepping codes the other way) over both formats."""
    for fmt in TYPES:
        recipe = zo_recipe(write_recipe, tmp_path, fmt, quant={"format": fmt}, model={"config": WIDE_BERT},
                           method={"zo": {"direction": direction}}, train={"max_steps": 2, "lr": 1e-4})
        train(recipe)
        start = zo_recipe(write_recipe, tmp_path, f"{fmt}-zero", quant={"format": fmt}, model={"config": WIDE_BERT},
                          method={"zo": {"direction": direction}}, train={"max_steps": 1, "lr": 0.0})
        train(start)
        moved, before = weights(tmp_path / fmt), weights(tmp_path / f"{fmt}-zero")
        codes = [k for k in moved if k.endswith(".codes")]
        assert codes and any(not torch.equal(moved[k], before[k]) for k in codes)
        assert all(torch.equal(moved[k], before[k]) for k in moved if k.endswith((".d", ".sub_scales")))


def test_validate_refuses_trained_scales_and_other_groups_in_one_line(write_recipe):
    for fmt, block in (("q4_k", 32), ("q6_k", 16)):
        with pytest.raises(RecipeError, match=f"method.zo.low_bit: {fmt}'s sub-block scales are .* use "
                                              f"method.zo.low_bit: codes") as refused:
            load_recipe(write_recipe(tiny_recipe(quant={"format": fmt}, method={"optimizer": "quzo",
                                                                               "zo": {"low_bit": "scales"}})))
        assert "\n" not in str(refused.value)
        with pytest.raises(RecipeError, match=f"quant.group_size: {fmt} stores blocks of {block} weights"):
            load_recipe(write_recipe(tiny_recipe(quant={"format": fmt, "group_size": 64})))


def test_a_layer_whose_rows_are_not_whole_super_blocks_is_refused_by_name(write_recipe, tmp_path):
    recipe = zo_recipe(write_recipe, tmp_path, "narrow", quant={"format": "q4_k"}, train={"max_steps": 1})
    with pytest.raises(UserError, match=r"cannot quantize layer .*query: q4_k stores super-blocks of 256 weights "
                                        r"along each row, and 32 input features are not a multiple of 256 \(list"):
        train(recipe)
