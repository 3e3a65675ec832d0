"""Tiny LLaMA-shaped GGUF files for tests: SmolLM2's tokenizer cut to its first VOCAB tokens (the special and byte
tokens and the merges that make the rest) and its chat template, copied from the packaged file's metadata; two
blocks of width 64; random weights quantized by gguf.quants (llama.cpp's quantizers). The short vocabulary keeps
reading the file's tokenizer fast (the whole one takes seconds to parse)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from ftkit.gguf.metadata import copy_fields

WIDTH, FFN, HEADS, KV_HEADS, BLOCKS = 64, 128, 4, 2, 2
VOCAB = 1024
SHAPES = {  # GGUF name -> [rows, cols] (the Hugging Face weight's shape)
    "attn_q": (WIDTH, WIDTH), "attn_k": (WIDTH // HEADS * KV_HEADS, WIDTH), "attn_v": (WIDTH // HEADS * KV_HEADS, WIDTH),
    "attn_output": (WIDTH, WIDTH), "ffn_gate": (FFN, WIDTH), "ffn_up": (FFN, WIDTH), "ffn_down": (WIDTH, FFN),
}


def tiny_llama_gguf(path: Path, linear: GGMLQuantizationType | dict = GGMLQuantizationType.Q4_1,
                    embedding: GGMLQuantizationType = GGMLQuantizationType.Q8_0, seed: int = 0) -> Path:
    """Write a two-block LLaMA GGUF file to `path`: linear weights in `linear` (one type, or a dict from a tensor
    kind such as "ffn_down" to its type, others Q4_1), the token embedding in `embedding` (tied: no output.weight),
    norms in F32."""
    source = packaged_source()
    vocab = VOCAB
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    copy_fields(source, writer, replace={**short_tokenizer(source, vocab), "llama.vocab_size": vocab,
        "general.name": "tiny llama (tests)", "llama.block_count": BLOCKS, "llama.context_length": 256,
        "llama.embedding_length": WIDTH, "llama.feed_forward_length": FFN, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS, "llama.rope.dimension_count": WIDTH // HEADS})
    _add(writer, "token_embd.weight", rng.normal(0, 0.05, (vocab, WIDTH)), embedding)
    for block in range(BLOCKS):
        for norm in ("attn_norm", "ffn_norm"):
            _add(writer, f"blk.{block}.{norm}.weight", 1 + rng.normal(0, 0.05, WIDTH), GGMLQuantizationType.F32)
        for kind, shape in SHAPES.items():
            kind_type = linear.get(kind, GGMLQuantizationType.Q4_1) if isinstance(linear, dict) else linear
            _add(writer, f"blk.{block}.{kind}.weight", rng.normal(0, 0.08, shape), kind_type)
    _add(writer, "output_norm.weight", 1 + rng.normal(0, 0.05, WIDTH), GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@lru_cache(maxsize=1)
def packaged_source() -> GGUFReader:
    """The packaged SmolLM2 file, parsed once per session (its metadata takes seconds to read)."""
    from ftkit.models.packaged import smollm2_gguf

    return GGUFReader(smollm2_gguf())


@lru_cache(maxsize=2)
def short_tokenizer(source: GGUFReader, vocab: int) -> dict:
    """The first `vocab` tokens of the file's BPE vocabulary and the merges among them: a smaller tokenizer that
    still encodes any text (the byte tokens come first)."""
    tokens = source.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    merges = [m for m in source.fields["tokenizer.ggml.merges"].contents()
              if set(m.split(" ")) <= known and m.replace(" ", "") in known]
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": source.fields["tokenizer.ggml.token_type"].contents()[:vocab]}


def _add(writer: GGUFWriter, name: str, values: np.ndarray, ggml: GGMLQuantizationType) -> None:
    values = values.astype(np.float32)
    if ggml == GGMLQuantizationType.F32:
        writer.add_tensor(name, values)
        return
    writer.add_tensor(name, quants.quantize(values, ggml), raw_dtype=ggml)
