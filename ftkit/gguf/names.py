"""A LLaMA-architecture GGUF file's tensor names as the Hugging Face model's, and the row order llama.cpp's
converter gives the query and key projections.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of q_proj and k_proj within
each head, from Hugging Face's rotary layout (the two halves of a head's dimensions) to GGML's (interleaved pairs).
A row permutation moves whole rows, and a block never crosses a row, so the codes and scales of a quantized tensor
are permuted with their rows and nothing is requantized: `to_hf_rows` undoes it on reading, `to_file_rows` redoes it
on writing.
"""

from __future__ import annotations

import re

import torch

# GGUF name (with {i} for the block) -> Hugging Face LlamaForCausalLM name
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Tensors a file may carry that the Hugging Face model computes itself (llama.cpp's precomputed rotary factors).
DERIVED = ("rope_freqs.weight",)
_PATTERNS = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in LLAMA_NAMES.items()]
_REVERSE = [(re.compile("^" + re.escape(h).replace(r"\{i\}", r"(\d+)") + "$"), g) for g, h in LLAMA_NAMES.items()]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one this architecture does not have."""
    for pattern, name in _PATTERNS:
        match = pattern.match(gguf_name)
        if match:
            return name.replace("{i}", match.group(1)) if match.groups() else name
    return None


def gguf_name(hf: str) -> str | None:
    """The GGUF name of a Hugging Face LLaMA tensor (the inverse of hf_name)."""
    for pattern, name in _REVERSE:
        match = pattern.match(hf)
        if match:
            return name.replace("{i}", match.group(1)) if match.groups() else name
    return None


def permuted_heads(gguf_name: str, heads: int, kv_heads: int) -> int | None:
    """How many heads llama.cpp's converter permuted this tensor's rows over: q by the attention heads, k by the
    key-value heads; None for every other tensor."""
    if gguf_name.endswith(".attn_q.weight"):
        return heads
    if gguf_name.endswith(".attn_k.weight"):
        return kv_heads
    return None


def file_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row r of the file's tensor is row `order[r]` of the Hugging Face one (convert_hf_to_gguf's permute applied
    to the row indices)."""
    index = torch.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def to_hf_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """A file's rows (of codes, scales or weights) in the Hugging Face order."""
    out = torch.empty_like(tensor)
    out[file_row_order(tensor.shape[0], heads)] = tensor
    return out


def to_file_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rows in the file's order (the converter's permute)."""
    return tensor[file_row_order(tensor.shape[0], heads)]
