"""Writing a model back into the GGUF file it came from: the source file's metadata and tensor order, each tensor in
the block format the model holds it in, with nothing rounded a second time.

- a QuantLinear in a GGUF block format: its codes and scales as the file's blocks (ftkit.gguf.layout), byte for
  byte, with llama.cpp's q/k row order put back (a row permutation moves whole blocks);
- a float tensor whose source is F32 / F16 / BF16: in that type;
- a float tensor whose source is quantized (SmolLM2's Q8_0 token embedding): the source's own bytes while it still
  equals their dequantization exactly, else (it was trained) quantized to the source's type by gguf.quants, with a
  note;
- a tensor the model does not compute (llama.cpp's rope_freqs): copied as it was.

A file without output.weight ties the output layer to the token embedding; so does the written one. Everything is
checked and encoded before the file is opened, written under a temporary name beside the target and linked into
place whole: an error leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, quants

from ftkit.errors import UserError
from ftkit.gguf.layout import FLOAT_TYPES, LAYOUTS, layer_to_file
from ftkit.gguf.metadata import copy_fields, field_value
from ftkit.gguf.names import gguf_name, hf_name, permuted_heads, to_file_rows
from ftkit.gguf.read import open_gguf
from ftkit.quant.linear import QuantLinear
from ftkit.safe_files import remove, storage_error

# general.file_type of a file whose linear weights are all of one block type (llama.cpp's "mostly" types)
FILE_TYPES = {GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0, GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0, GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0}
TIED = ("lm_head.weight", "model.embed_tokens.weight")  # the output layer and the embedding it is tied to
SUGGEST = "train with a GGUF format (q4_0, q4_1, q5_0, q8_0, q4_k, q6_k, or gguf: the file's own), or export --format hf"


def refusal(recipe, source: Path | None, merge: bool) -> str | None:
    """Why a run's model cannot be written as GGUF, judged from its recipe before anything is loaded; None if it
    can."""
    from ftkit.adapters import ADAPTERS
    from ftkit.quant import FORMATS

    fmt, adapter = recipe.quant.format, ADAPTERS[recipe.method.adapter]
    if source is None or recipe.model.config:
        return (f"model.name {recipe.model.name} is not read from a GGUF file (a .gguf path or smollm2-135m); "
                f"export --format hf")
    low_bit = fmt != "none" and (fmt not in FORMATS or FORMATS[fmt].low_bit)  # "gguf": each tensor the file's
    if low_bit and (fmt not in LAYOUTS and fmt != "gguf" or recipe.quant.engine != "native"):
        return f"quant.format {fmt} (engine {recipe.quant.engine}) has no GGUF block type; {SUGGEST}"
    if adapter.trains_base:
        return None
    if not adapter.mergeable:
        return f"{adapter.name} adapters are not a weight update GGUF can hold; export --format hf"
    if low_bit:
        return (f"a {adapter.name} update cannot be merged into {fmt} codes exactly; export --format hf --merge "
                f"(dequantized weights with the update merged)")
    if not merge:
        return (f"a GGUF file has no place for {adapter.name} tensors; add --merge (merged weights are quantized to "
                f"the file's types) or export --format hf")
    return None


def check_recorded(source: Path, recorded: dict | None) -> None:
    """Refuse a source file whose size or sha256 differs from what the run recorded when training began."""
    if not recorded:
        return
    from ftkit.data.provenance import sha256

    if source.stat().st_size != recorded.get("size") or sha256(source) != recorded.get("sha256"):
        raise UserError(f"{source} has changed since the run was trained (its size or sha256 differs from the "
                        f"run's record); export --format hf, or restore the file")


def model_tensors(model: nn.Module) -> dict[str, QuantLinear | torch.Tensor]:
    """The model's weights by Hugging Face name: a QuantLinear for `NAME.weight` of a low-bit layer, a float tensor
    for every other parameter (shared ones under each of their names)."""
    found: dict[str, QuantLinear | torch.Tensor] = {}
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for name, layer in layers.items():
        found[f"{name}.weight"] = layer
        if layer.bias is not None:
            found[f"{name}.bias"] = layer.bias.detach()
    inside = tuple(f"{name}." for name in layers)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not name.startswith(inside):
            found[name] = parameter.detach()
    return found


def write_gguf(model: nn.Module, source: Path, out: Path, note: Callable[[str], None] = print,
               recorded: dict | None = None, types_from_file: bool = False, reader: GGUFReader | None = None) -> Path:
    """Write `model` (a LLaMA-architecture Hugging Face model whose linear layers may be QuantLinear) as a GGUF file
    at `out`, shaped after `source`. `recorded` ({"size", "sha256"}: data.json's "model" entry): the source as the run saw it;
    `types_from_file`: the layers took their formats from the file, so a layer of another type means it changed;
    `reader`: the source already open (parsing a tokenizer's metadata takes seconds)."""
    check_recorded(source, recorded)
    reader = reader or open_gguf(source)  # one line for a missing, short, foreign or other-architecture file
    tensors = model_tensors(model)
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{source}: general.architecture is {arch}; GGUF export writes LLaMA-architecture files")
    heads = (field_value(reader, f"{arch}.attention.head_count"), field_value(reader, f"{arch}.attention.head_count_kv"))
    _check_names(tensors, {t.name for t in reader.tensors}, source)
    requantized: list[str] = []
    plan = [(t.name, *_encode(t, tensors, heads, types_from_file, requantized, source)) for t in reader.tensors]
    if requantized:
        note(f"note: {len(requantized)} tensor(s) trained in full precision were quantized to their source type by "
             f"gguf.quants: {', '.join(requantized)}")
    return _write_atomically(out, lambda path: _write(path, reader, arch, plan, _file_type(reader, plan)))


def _check_names(tensors: dict, names: set[str], source: Path) -> None:
    """Every model weight has its tensor in the file (the output layer may be tied), and the other way round."""
    for name, value in tensors.items():
        if gguf_name(name) in names:
            continue
        if name == TIED[0] and TIED[1] in tensors and not isinstance(value, QuantLinear) \
                and torch.equal(value, tensors[TIED[1]]):
            continue  # tied, as in the file
        where = "is tied to the token embedding in" if name == TIED[0] else "has no counterpart in"
        raise UserError(f"{name}: the model's tensor {where} {source}; export --format hf")
    for name in names:
        hf = hf_name(name)
        if hf is not None and hf not in tensors:
            raise UserError(f"{source}: tensor {name} has no counterpart ({hf}) in the model; the file is not the "
                            f"one the run was trained from")


def _encode(tensor, tensors: dict, heads: tuple, types_from_file: bool, requantized: list, source: Path):
    """The bytes (or float array) and type to write for the source's `tensor`."""
    name, ggml = tensor.name, tensor.tensor_type
    hf = hf_name(name)
    if hf is None:  # computed by llama.cpp's converter, not by the model: as it was
        return np.asarray(tensor.data), ggml
    value = tensors[hf]
    shape = tuple(int(n) for n in reversed(tensor.shape))
    held = (value.out_features, value.in_features) if isinstance(value, QuantLinear) else tuple(value.shape)
    if held != shape[-len(held):] or len(held) != len(shape):
        raise UserError(f"{source}: tensor {name} is {list(shape)} where the model's {hf} is {list(held)}; the file "
                        f"has changed since training")
    permuted = permuted_heads(name, *heads)
    if isinstance(value, QuantLinear):
        return _blocks(name, value, permuted, ggml if types_from_file else None, source)
    values = value.to(torch.float32).cpu()
    values = to_file_rows(values, permuted) if permuted else values
    return _floats(name, values.numpy(), tensor, requantized)


def _blocks(name: str, layer: QuantLinear, permuted: int | None, expected, source: Path):
    layout = LAYOUTS.get(layer.fmt)
    if layout is None:
        raise UserError(f"{name}: format {layer.fmt} has no GGUF block type; {SUGGEST}")
    if expected is not None and layout.ggml_type != expected:
        raise UserError(f"{source}: tensor {name} is {expected.name} where the run trained it as "
                        f"{layout.ggml_type.name}; the file has changed since training")
    raw = layer_to_file(layer)
    return (to_file_rows(torch.from_numpy(raw), permuted).numpy() if permuted else raw), layout.ggml_type


def _floats(name: str, values: np.ndarray, tensor, requantized: list):
    ggml = tensor.tensor_type
    if ggml in FLOAT_TYPES:
        return (values if ggml == GGMLQuantizationType.F32 else quants.quantize(values, ggml)), ggml
    raw = np.asarray(tensor.data)
    try:
        if np.array_equal(quants.dequantize(raw, ggml), values):
            return raw, ggml  # untouched: the source's own bytes
        encoded = quants.quantize(values, ggml)
    except NotImplementedError:  # gguf.quants dequantizes K-quants but quantizes only the simple types
        raise UserError(f"{name}: the source's type {ggml.name} for this full-precision tensor has no "
                        f"gguf.quants codec here; export --format hf") from None
    requantized.append(name)
    return encoded, ggml


def _file_type(reader: GGUFReader, plan: list) -> dict:
    """general.file_type: as it was while the linear weights keep the source's types, else the "mostly" type of
    their one type (a file whose layers all changed format), else as it was."""
    def linear(name: str) -> bool:
        return name.startswith("blk.") and "_norm" not in name

    written = {name: ggml for name, _, ggml in plan if linear(name)}
    kinds = set(written.values())
    if written == {t.name: t.tensor_type for t in reader.tensors if linear(t.name)} or len(kinds) != 1:
        return {}
    kind = next(iter(kinds))
    return {"general.file_type": int(FILE_TYPES[kind])} if kind in FILE_TYPES else {}


def _write(path: Path, reader: GGUFReader, arch: str, plan: list, replace: dict) -> None:
    writer = GGUFWriter(str(path), arch)
    alignment = field_value(reader, "general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    copy_fields(reader, writer, replace)
    for name, data, ggml in plan:
        writer.add_tensor(name, data, raw_dtype=None if ggml == GGMLQuantizationType.F32 else ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Write through `write(temporary path)`, then link the file into place: never over an existing file, never
    half-written."""
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} exists; choose another -o")
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        remove(staging)
        write(staging)
        os.link(staging, out)  # fails if another export got there first
    except Exception as error:
        failure = storage_error(error)
        if failure is None:
            raise
        if failure.errno == errno.EEXIST:
            raise UserError(f"{out} was written by another process meanwhile; choose another -o") from None
        raise UserError(f"cannot write {out}: {failure.strerror or failure}; nothing was left behind") from None
    finally:
        remove(staging)
    return out
