"""GGUF's block layouts against gguf.quants (bit-exact with llama.cpp): a file's blocks become a layer with nothing
rounded, the layer decodes to gguf.quants' weights exactly, and writes the same bytes back; the converter's q/k row
permutation is undone exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from ftkit.gguf.layout import LAYOUTS, layer_from_file, layer_to_file
from ftkit.gguf.names import gguf_name, hf_name, to_file_rows, to_hf_rows
from ftkit.quant.linear import QuantLinear

SIMPLE = ["q4_0", "q4_1", "q5_0", "q8_0"]


def weights(rows=70, cols=96, seed=0) -> torch.Tensor:
    """Rows not a multiple of 64 (ftkit's packing pads them), a constant block (d = 0 in the file), an outlier."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, 32:64] = 0.0
    w[5, 0:32] = 0.25
    w[7, 40] = 1.5
    return w


@pytest.mark.parametrize("fmt", SIMPLE)
def test_a_files_blocks_load_as_they_are_and_write_back_byte_for_byte(fmt):
    w = weights()
    ggml = LAYOUTS[fmt].ggml_type
    raw = quants.quantize(w.numpy(), ggml)
    layer = layer_from_file(fmt, raw, w.shape[1])
    reference = torch.from_numpy(quants.dequantize(raw, ggml))
    assert torch.equal(layer.dequantize(), reference)  # exact, float32
    assert np.array_equal(layer_to_file(layer), raw)


@pytest.mark.parametrize("fmt", SIMPLE)
def test_ftkit_quantizing_a_float_weight_writes_llama_cpps_bytes(fmt):
    w = weights(seed=1)
    layer = QuantLinear.from_linear(_linear(w), fmt)
    assert np.array_equal(layer_to_file(layer), quants.quantize(w.numpy(), LAYOUTS[fmt].ggml_type))


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    return linear


def test_a_trained_block_writes_its_new_codes():
    w = weights(seed=2)
    raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    layer = layer_from_file("q4_1", raw, w.shape[1])
    layer.step_codes(torch.tensor([0, 97]), torch.tensor([1, -1]))
    written = layer_to_file(layer)
    assert (written != raw).sum() == 2  # two nibbles in two bytes, nothing else
    assert torch.equal(torch.from_numpy(quants.dequantize(written, GGMLQuantizationType.Q4_1)), layer.dequantize())


def test_a_q5_0_code_moved_across_16_writes_its_high_bit():
    w = weights(seed=3)
    raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q5_0)
    layer = layer_from_file("q5_0", raw, w.shape[1])
    at = int((layer.code_values().view(-1) == -1).nonzero()[0])  # q = 15 -> 16: low nibble 15 -> 0, high bit set
    layer.step_codes(torch.tensor([at]), torch.tensor([1]))
    written = layer_to_file(layer)
    row, block, j = at // 96, at % 96 // 32, at % 32
    assert [tuple(i) for i in np.argwhere(written != raw)] == [(row, block * 22 + 2 + j // 8), (row, block * 22 + 6 + j % 16)]
    assert torch.equal(torch.from_numpy(quants.dequantize(written, GGMLQuantizationType.Q5_0)), layer.dequantize())


def test_the_query_and_key_row_permutation_is_undone_exactly():
    def converter_permute(w, heads):  # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(576, 16)
    assert torch.equal(to_file_rows(w, 9), converter_permute(w, 9))
    assert torch.equal(to_hf_rows(converter_permute(w[:192], 3), 3), w[:192])
    assert hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    assert gguf_name("model.layers.7.self_attn.k_proj.weight") == "blk.7.attn_k.weight"
    assert hf_name("rope_freqs.weight") is None


def test_the_packaged_smollm2_tensors_round_trip():
    from ftkit.models.packaged import smollm2_gguf

    reader = GGUFReader(smollm2_gguf())
    for tensor in [t for t in reader.tensors if t.name in ("blk.0.attn_k.weight", "blk.29.ffn_down.weight")]:
        rows, cols = tensor.data.shape[0], int(tensor.shape[0])
        layer = layer_from_file("q4_1", np.asarray(tensor.data), cols)
        assert layer.dequantize().shape == (rows, cols)
        assert np.array_equal(layer_to_file(layer), np.asarray(tensor.data))
        assert torch.equal(layer.dequantize(), torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type)))
