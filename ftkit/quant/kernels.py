"""Matmul paths of a quantized layer, and which one runs.

`dequantize` materialises the layer's weight (a block of rows at a time) and runs one dense matmul: it works for
every format on every device, with weight-only numerics, and is the fallback of every other path. The others read
the stored codes, or a layout derived from them:

| kernel      | device   | reads                     | numerics                          | derived copy              |
| ----------- | -------- | ------------------------- | --------------------------------- | ------------------------- |
| `int4pack`  | CPU      | nibbles, scales           | weight-only, bf16 activations     | none: the stored layout   |
| `int4pack`  | CUDA     | nibbles, scales           | weight-only, bf16 activations     | the tiled layout, cached  |
| `int8pack`  | CPU      | int8 codes, per channel   | weight-only                       | none                      |
| `int_mm`    | CPU/CUDA | int8 codes, per channel   | activations to int8 per row (W8A8)| none                      |
| `scaled_mm` | CUDA     | float8 codes, per channel | activations to e4m3 per row       | none                      |

Which formats have which kernel is declared once, by each format (`Format.kernels` in ftkit.quant.FORMATS); a layer
takes only kernels its format declares, and only with a codec of codes and scales alone, except int4pack, whose
zero points take a grid's minimums (GGUF's Q4_1).

`auto` (quant.kernel) picks per device from what scripts/bench_quant.py measured (BENCHMARKS.md): on the CPU,
int4pack below SMALL_BATCH_ROWS rows and int8pack for bf16 activations; on a GPU, int4pack for up to
GPU_INT4_ROWS rows (decoding) and scaled_mm on compute capability 8.9 and newer. A named kernel runs where its
rules hold. A kernel that fails on this hardware anyway (an unsupported dtype combination, an old driver) is
reported once and replaced by `dequantize` from then on.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ftkit.errors import first_line
from ftkit.quant.packing import unpack_nibbles

# Below this many input rows (tokens) the CPU int4 kernel beats dequantize + fp32 matmul.
SMALL_BATCH_ROWS = 512
# Up to this many rows the GPU int4 kernel (made for decoding) is used; larger batches dequantize into cuBLAS.
GPU_INT4_ROWS = 128
# Group sizes PyTorch's int4 kernels accept.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# (kernel, device type, format) that failed at run time: dequantize runs instead, without trying again.
_UNUSABLE: set[tuple[str, str, str]] = set()


def matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for `x` through its chosen kernel, or dequantize-then-matmul where that kernel fails."""
    kernel = kernel_for(layer, x)
    if kernel != "dequantize":
        try:
            return KERNELS[kernel].matmul(layer, x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # this hardware or build lacks the kernel for these dtypes: say so once
            _UNUSABLE.add((kernel, x.device.type, layer.fmt))
            reason = first_line(err)
            warnings.warn(f"quant.kernel {kernel} is not usable for {layer.fmt} on {x.device.type} ({reason}); "
                          f"dequantize-then-matmul runs instead", stacklevel=2)
    return dequantize_matmul(layer, x)


def kernel_for(layer, x: torch.Tensor) -> str:
    """The matmul path for this input (see the table above)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return "dequantize"  # backprop to the input: the packed kernels have no derivative
    if layer.kernel != "auto":
        return layer.kernel if usable(layer.kernel, layer, x) else "dequantize"
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu":
        if rows < SMALL_BATCH_ROWS and usable("int4pack", layer, x):
            return "int4pack"
        # _weight_int8pack_mm is fast only with bf16 activations (with fp32 ones it is far slower than dequantize).
        if x.dtype == torch.bfloat16 and usable("int8pack", layer, x):
            return "int8pack"
    elif x.device.type == "cuda":
        if rows <= GPU_INT4_ROWS and usable("int4pack", layer, x):
            return "int4pack"
        if usable("scaled_mm", layer, x):
            return "scaled_mm"
    return "dequantize"


def usable(kernel: str, layer, x: torch.Tensor) -> bool:
    """Whether `kernel` can compute this layer for this input: the format has it, the device runs it, the shapes
    and the scales' grouping are ones it takes, and it has not failed here before."""
    if kernel == "dequantize":
        return True
    if kernel not in layer.format_kernels or (kernel, x.device.type, layer.fmt) in _UNUSABLE:
        return False
    if tuple(layer.codec.params) != ("scales",) and not KERNELS[kernel].zeros:  # it reads codes and scales only
        return False
    return KERNELS[kernel].runs(layer, x, x.device.type, layer.scales.shape[1] == 1)


def _int4pack_runs(layer, x, device: str, per_channel: bool) -> bool:
    if int4_group(layer) is None:
        return False
    if device == "cuda":
        return _capability(x.device) >= (8, 0) and _inner_k_tiles(layer.in_features) is not None
    return device == "cpu"


def _int8pack_runs(layer, x, device: str, per_channel: bool) -> bool:
    return device == "cpu" and per_channel


def _int_mm_runs(layer, x, device: str, per_channel: bool) -> bool:
    """cuBLAS's int8 matmul wants more than 16 rows and dimensions in multiples of 8."""
    rows, k, n = x.numel() // x.shape[-1], layer.in_features, layer.out_features
    return per_channel and (device == "cpu" or (device == "cuda" and rows > 16 and k % 8 == 0 and n % 8 == 0))


def _scaled_mm_runs(layer, x, device: str, per_channel: bool) -> bool:
    """FP8 tensor cores from compute capability 8.9, dimensions in multiples of 16; the CPU runs it too, when named
    (a slow reference)."""
    k, n = layer.in_features, layer.out_features
    cuda_ok = device == "cuda" and _capability(x.device) >= (8, 9) and k % 16 == 0 and n % 16 == 0
    return per_channel and (device == "cpu" or cuda_ok)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _finish(layer, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[rows, N] kernel output back to x's shape and dtype, plus the bias."""
    out = out.to(x.dtype).view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


def _derived(layer, name: str, sources: tuple, build):
    """A copy derived from the layer's stored tensors, cached until one of them changes (their version counters,
    or a drop_derived() when the codes are rewritten)."""
    key = tuple((t._version, t.data_ptr()) for t in sources)
    cached = layer._derived.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = build()
    layer._derived[name] = (key, value)
    return value


# --- the kernels ----------------------------------------------------------------------------------------------

def dequantize_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dequantize().to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


def int8pack_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    out = torch.ops.aten._weight_int8pack_mm(_flat(x), layer.codes, layer.scales[:, 0].to(x.dtype))
    return _finish(layer, out, x)


def int_mm_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 with activations quantized per row on the fly (W8A8 numerics)."""
    flat = _flat(x).to(torch.float32)
    x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    x_codes = torch.round(flat / x_scale).to(torch.int8)
    acc = torch._int_mm(x_codes, layer.codes.t())
    return _finish(layer, acc.to(torch.float32) * x_scale * layer.scales[:, 0].to(torch.float32), x)


def int4_group(layer) -> int | None:
    """The group size the int4 kernels run the layer with: its own, or for per-channel scales the largest kernel
    group dividing its inputs (each row's scale repeated over the groups)."""
    if layer.group_size in INT4_KERNEL_GROUPS:
        return layer.group_size
    if layer.group_size == 0:
        return next((g for g in reversed(INT4_KERNEL_GROUPS) if layer.in_features % g == 0), None)
    return None


def int4_scales_and_zeros(layer, group: int) -> torch.Tensor:
    """The int4 kernels' [groups, padded N, 2] bf16 table of scales and zero points; a weight is
    (nibble - 8) * scale + zero. A symmetric grid (nibble = code + 8) has zero points 0; an unsigned one with
    minimums (nibble = code, w = code * scale + minimum) has minimum + 8 * scale, summed in float32."""

    def build():
        params = layer.group_params()
        if "minimums" in params:
            scales = params["scales"].float()
            return table(scales, params["minimums"].float() + (8 + layer.codec.qmin) * scales)
        return table(params["scales"], None)

    def table(scales, zeros):
        scales = scales.to(torch.bfloat16)
        zeros = torch.zeros_like(scales) if zeros is None else zeros.to(torch.bfloat16)
        if layer.group_size == 0:
            scales, zeros = scales.expand(-1, layer.in_features // group), zeros.expand(-1, layer.in_features // group)
        rows = layer.codes.shape[0]
        if rows != layer.out_features:  # padded rows get scale 0
            pad = scales.new_zeros(rows - layer.out_features, scales.shape[1])
            scales, zeros = torch.cat([scales, pad]), torch.cat([zeros, pad])
        return torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()

    sources = tuple(getattr(layer, name) for name in layer.stored_names)
    return _derived(layer, f"int4_table_{group}", sources, build)


def int4pack_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    group = int4_group(layer)
    table = int4_scales_and_zeros(layer, group)
    if x.device.type == "cuda":
        out = torch.ops.aten._weight_int4pack_mm(_flat(x).to(torch.bfloat16), int4_tiled(layer), group, table)
    else:  # the CPU kernel reads ftkit's own stored layout
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x).to(torch.bfloat16), layer.codes, group, table)
    return _finish(layer, out[:, : layer.out_features], x)


def int4_nibble_pairs(layer) -> torch.Tensor:
    """The codes as [padded N, K/2] uint8, two consecutive inputs per byte (even input in the high nibble), each
    code + 8: the layout PyTorch's CUDA int4 kernel converts from."""
    nibbles = unpack_nibbles(layer.codes, layer.codes.shape[0], layer.in_features)
    return (nibbles[:, ::2] << 4) | nibbles[:, 1::2]


def int4_tiled(layer) -> torch.Tensor:
    """The CUDA kernel's tiled layout of the codes: a second copy (half a byte per weight), cached until the codes
    change, and made only where the kernel runs (small batches; training batches dequantize instead)."""
    tiles = _inner_k_tiles(layer.in_features)
    return _derived(layer, "int4_tiled", (layer.codes,),
                    lambda: torch.ops.aten._convert_weight_to_int4pack(int4_nibble_pairs(layer), tiles))


def _inner_k_tiles(k: int) -> int | None:
    """The CUDA int4 kernel's tiling along the inputs: K must be a multiple of 16 x tiles."""
    return next((tiles for tiles in (8, 4, 2) if k % (16 * tiles) == 0), None)


def scaled_mm_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """FP8 on GPUs: activations quantized per row to e4m3 (which pairs with e4m3 and e5m2 weights), one fused
    matmul scaled per row of the activations and per output channel of the weight."""
    flat = _flat(x).to(torch.float32)
    e4m3 = torch.float8_e4m3fn
    x_scale = (flat.abs().amax(dim=1, keepdim=True) / torch.finfo(e4m3).max).clamp(min=1e-12)
    x_fp8 = (flat / x_scale).to(e4m3)
    out = torch._scaled_mm(x_fp8, layer.codes.t(), scale_a=x_scale, scale_b=layer.scales.to(torch.float32).t(),
                           out_dtype=torch.bfloat16)
    return _finish(layer, out, x)


class Kernel(NamedTuple):
    matmul: Callable  # (layer, x) -> the layer's output
    runs: Callable  # (layer, x, device type, per-channel scales) -> whether it computes this layer for this input
    zeros: bool = False  # whether it takes per-group zero points (a grid's minimums) besides the scales


# Every kernel, once: its matmul and where it runs (which formats have it: their `Format.kernels`).
KERNELS = {
    "dequantize": Kernel(dequantize_matmul, lambda *_: True),
    "int8pack": Kernel(int8pack_matmul, _int8pack_runs),
    "int_mm": Kernel(int_mm_matmul, _int_mm_runs),
    "int4pack": Kernel(int4pack_matmul, _int4pack_runs, zeros=True),
    "scaled_mm": Kernel(scaled_mm_matmul, _scaled_mm_runs),
}
