"""A LLaMA-architecture GGUF file as ftkit's model, without requantizing: config and tokenizer (chat template
included) from the file's metadata, through transformers; weights one tensor at a time from the memory-mapped file.

A linear weight stored in the recipe's `quant.format` (or, under `quant.format: gguf`, in any block format ftkit
has a layout for, ftkit.gguf.layout.LAYOUTS) becomes that format's layer holding the file's codes and scales as they
are; llama.cpp's q/k row permutation is undone on the rows of the blocks (ftkit.gguf.names). Every other tensor is
dequantized exactly by gguf.quants (norms, the token embedding, a linear weight of another type), and a linear
layer asked in another format is converted from those weights as a full-precision model would be (convert_linear).
`quant.skip` keeps a linear layer in full precision (the dequantized weights).

A file that is not GGUF, is cut short, holds another architecture, lacks a tensor the model needs or holds a type
that cannot become the asked format ends in one line naming the file and the tensor, before any weight is loaded.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, quants

from ftkit import devices
from ftkit.devices import CPU
from ftkit.errors import UserError, first_line
from ftkit.gguf.layout import BY_TYPE, FLOAT_TYPES, layer_from_file
from ftkit.gguf.metadata import field_value
from ftkit.gguf.names import DERIVED, gguf_name, hf_name, permuted_heads, to_hf_rows
from ftkit.memory import memory_returned_while_loading
from ftkit.modules import module_names, replace_module
from ftkit.quant import ENGINES, FORMATS
from ftkit.quant.convert import convert_linear, is_skipped, skip_patterns

ARCHITECTURES = ("llama",)  # what ftkit.gguf.names maps
MAGIC = b"GGUF"


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def open_gguf(path: Path) -> GGUFReader:
    """The file's reader (memory-mapped; one per file and version in a process), or one line saying why it is not a
    LLaMA GGUF file ftkit can read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.name: {path}: no such GGUF file")
    return _open(*_stamp(path))


@lru_cache(maxsize=4)
def _open(resolved: str, size: int, mtime_ns: int) -> GGUFReader:
    with open(resolved, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise UserError(f"model.name: {resolved} is not a GGUF file (it does not begin with GGUF's magic bytes)")
    try:
        reader = _BoundedReader(resolved)
    except _ShortTensor as short:
        raise UserError(f"model.name: {resolved} is truncated: tensor {short.args[0]} needs bytes up to "
                        f"{short.args[1]:,} and the file has {size:,}") from None
    except Exception as err:  # gguf's reader fails in many ways on a damaged file; all mean the same to the user
        raise UserError(f"model.name: {resolved} is truncated or damaged (size {size:,} bytes): "
                        f"{first_line(err)}") from None
    architecture = field_value(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise UserError(f"model.name: {resolved} holds a '{architecture}' model; ftkit reads GGUF files of the "
                        f"LLaMA architecture (general.architecture: llama)")
    return reader


class _ShortTensor(Exception):
    """(tensor name, the byte its data would end at): the file ends before it."""


class _BoundedReader(GGUFReader):
    """gguf's reader, checking first that every tensor's data lies within the file (gguf's own reader fails on a
    short file with a numpy message that names no tensor)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_bytes // block
            if end > len(self.data):
                raise _ShortTensor(bytes(name).decode("utf-8", "replace"), end)
        super()._build_tensors(start_offs, fields)


def file_config(path: Path):
    """The model's transformers config, from the file's metadata (read once per file and version in a process)."""
    from transformers import AutoConfig

    open_gguf(path)  # the file's own checks first: transformers' messages do not name the file
    return copy.deepcopy(_from_file(AutoConfig, "config", *_stamp(Path(path))))


def file_tokenizer(path: Path):
    """The file's tokenizer with its chat template, as transformers builds it from the metadata."""
    from transformers import AutoTokenizer

    open_gguf(path)
    return copy.deepcopy(_from_file(AutoTokenizer, "tokenizer", *_stamp(Path(path))))


@lru_cache(maxsize=8)
def _from_file(auto, what: str, resolved: str, size: int, mtime_ns: int):
    path = Path(resolved)
    try:
        return auto.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as err:
        # transformers' GGUF reader raises NotImplementedError for a tokenizer model or architecture it does not
        # convert, KeyError / ValueError for missing or malformed metadata: each is the user's file, in one line
        raise UserError(f"model.name: cannot read the {what} of {path}: {first_line(err)}") from None


def target_format(tensor, quant, path) -> str | None:
    """The format a linear weight of the file becomes under `quant` (None: it stays in full precision)."""
    if not FORMATS[quant.format].from_file:
        return quant.format if FORMATS[quant.format].low_bit else None
    if tensor.tensor_type in FLOAT_TYPES:
        return None
    if tensor.tensor_type not in BY_TYPE:
        raise UserError(f"model.name: {path}: tensor {tensor.name} is {tensor.tensor_type.name}, which ftkit holds in "
                        f"no format of its own (quant.format gguf keeps {', '.join(sorted(BY_TYPE.values()))}); set "
                        f"quant.format to one of those, or none, to convert it from its dequantized weights")
    return BY_TYPE[tensor.tensor_type]


def file_tensors(reader: GGUFReader, model: nn.Module, path: Path) -> dict:
    """The file's tensors by the model's parameter names; one line for a tensor the model lacks or the reverse."""
    tensors = {hf_name(t.name): t for t in reader.tensors}
    tied = _tied(model)
    for name, param in model.named_parameters():
        if name not in tensors and param is tied:
            continue  # the output embedding, tied to the input embedding (the file has no output.weight)
        if name not in tensors:
            raise UserError(f"model.name: {path}: missing tensor {gguf_name(name) or name} (the model's {name})")
        tensor = tensors[name]
        if tuple(reversed([int(n) for n in tensor.shape])) != tuple(param.shape):
            raise UserError(f"model.name: {path}: tensor {tensor.name} has shape {list(tensor.shape)}, and the "
                            f"file's metadata makes {name} {list(reversed(param.shape))}")
    for tensor in reader.tensors:  # after the missing ones: a misnamed tensor is first of all a missing one
        if hf_name(tensor.name) is None and tensor.name not in DERIVED:
            raise UserError(f"model.name: {path}: tensor {tensor.name} has no place in a LLaMA model")
    tensors.pop(None, None)
    return tensors


def _tied(model: nn.Module) -> nn.Parameter | None:
    """The output embedding's weight when the config ties it to the input embedding."""
    output = model.get_output_embeddings()
    return output.weight if getattr(model.config, "tie_word_embeddings", False) and output is not None else None


def dequantized(tensor, config, path: Path) -> torch.Tensor:
    """A tensor's weights as float32, exactly as gguf.quants dequantizes them, rows in the Hugging Face order."""
    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as err:  # gguf.quants has no dequantizer for this type
        raise UserError(f"model.name: {path}: tensor {tensor.name} is {tensor.tensor_type.name}, which cannot be "
                        f"dequantized ({first_line(err)})") from None
    weight = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: F32 tensors come as the read-only map
    weight = weight.reshape([int(n) for n in reversed(tensor.shape)])
    return _hf_rows(weight, tensor.name, config)


def _hf_rows(rows: torch.Tensor, name: str, config) -> torch.Tensor:
    heads = permuted_heads(name, config.num_attention_heads, config.num_key_value_heads)
    return rows if heads is None else to_hf_rows(rows, heads)


def file_linear(tensor, quant, config, path: Path, dtype: torch.dtype, device, name: str, generator) -> nn.Module:
    """The layer a linear weight of the file becomes: the file's blocks as they are when they are in the asked
    format (and ftkit's own engine holds them), else the dequantized weights, converted to the asked format."""
    fmt = target_format(tensor, quant, path)
    rows, cols = (int(n) for n in reversed(tensor.shape))
    # Only ftkit's own layers hold the blocks; another engine (bitsandbytes, straight-through) converts.
    if fmt is not None and fmt == BY_TYPE.get(tensor.tensor_type) and ENGINES[quant.engine].zo_trains_weights:
        raw = _hf_rows(torch.from_numpy(np.array(tensor.data)), tensor.name, config)  # a copy: the map is read-only
        return layer_from_file(fmt, raw.numpy(), cols, kernel=quant.kernel).to(device)
    linear = nn.Linear(cols, rows, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantized(tensor, config, path))
    return linear if fmt is None else convert_linear(linear, name, replace(quant, format=fmt), generator)


def load_gguf_backbone(path: Path, auto_class, config, quant, dtype: torch.dtype, skip_prefix: str = "lm.",
                       device: torch.device = CPU) -> nn.Module:
    """Build `auto_class` from `config` on the meta device and fill it from the GGUF file at `path` one module at a
    time on `device` (module docstring): the file's full-precision weights never all exist at once."""
    from accelerate import init_empty_weights

    reader = open_gguf(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = auto_class.from_config(config, dtype=dtype)
    tensors = file_tensors(reader, model, path)
    for name, module in model.named_modules():  # refuse a type the format cannot hold before loading anything
        if type(module) is nn.Linear and f"{name}.weight" in tensors:
            target_format(tensors[f"{name}.weight"], quant, path)
    patterns, generator = skip_patterns(quant), devices.generator(quant.seed, device)
    tied = _tied(model) is not None
    with memory_returned_while_loading():
        for name in module_names(model):
            module = model.get_submodule(name)
            own = list(module.named_parameters(recurse=False))
            if not own or not any(p.is_meta for _, p in own):
                continue  # no weights, or tied to ones already loaded
            if type(module) is nn.Linear and not is_skipped(skip_prefix + name, patterns):
                layer = file_linear(tensors[f"{name}.weight"], quant, config, path, dtype, device, name, generator)
                replace_module(model, name, layer)
                continue
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                for leaf, param in module.named_parameters(recurse=False):  # the new ones to_empty made
                    param.copy_(dequantized(tensors[f"{name}.{leaf}"], config, path))
            if tied and module is model.get_input_embeddings():
                model.tie_weights()  # now, so the output embedding shares this weight instead of allocating its own
    return model.to(device)


def quantize_meta(model: nn.Module, path: Path, quant, skip_prefix: str = "lm.") -> nn.Module:
    """On the meta device, each linear layer in the format `load_gguf_backbone` gives it (`count-params` under
    quant.format: gguf): the file's header decides, no weight is read."""
    reader = open_gguf(path)
    tensors, patterns = file_tensors(reader, model, path), skip_patterns(quant)
    for name in module_names(model):
        module = model.get_submodule(name)
        if type(module) is nn.Linear and not is_skipped(skip_prefix + name, patterns) and f"{name}.weight" in tensors:
            fmt = target_format(tensors[f"{name}.weight"], quant, path)
            if fmt is not None:
                replace_module(model, name, convert_linear(module, name, replace(quant, format=fmt)))
    return model
