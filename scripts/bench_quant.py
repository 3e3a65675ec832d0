"""Forward speed and load memory of each weight format, measured side by side in one run.

    python scripts/bench_quant.py                 # linear 4096x4096 (batch 64) + OPT-125m shape (16 x 128 tokens)
    python scripts/bench_quant.py --llama-7b      # also: LLaMA-2-7B shape loaded straight into int4, one forward
    python scripts/bench_quant.py --device cuda --sections linear   # each GPU path against a bf16 dense matmul

Times are medians of repeated forwards after a warm-up, as ratios to fp32 measured in the same process. Memory is
peak RSS minus the RSS after imports, each configuration in its own process (raw peaks are printed too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil
import torch
import torch.nn as nn
from _common import LLAMA_2_7B, OPT_125M, round_robin_medians, utc_stamp

from ftkit.memory import peak_rss_mb
from ftkit.models.load import load_backbone
from ftkit.quant.linear import QuantLinear
from ftkit.recipe.schema import ModelSpec, QuantSpec

# (label, format, group size, kernel); None format is the fp32 nn.Linear reference.
LINEAR_CASES = [
    ("fp32", None, 0, None),
    ("int8 per-channel, dequantize", "int8", 0, "dequantize"),
    ("int8 per-channel, _weight_int8pack_mm", "int8", 0, "int8pack"),
    ("int8 per-channel, _int_mm (dynamic int8 activations)", "int8", 0, "int_mm"),
    ("int4 per-channel, dequantize", "int4", 0, "dequantize"),
    ("int4 per-channel, _weight_int4pack_mm_for_cpu", "int4", 0, "int4pack"),
    ("int4 group 128, dequantize", "int4", 128, "dequantize"),
    ("int4 group 128, _weight_int4pack_mm_for_cpu", "int4", 128, "int4pack"),
    ("fp8_e4m3 per-channel, dequantize", "fp8_e4m3", 0, "dequantize"),
    ("fp8_e5m2 per-channel, dequantize", "fp8_e5m2", 0, "dequantize"),
    ("fp8_e4m3 per-channel, _scaled_mm (fp8 activations)", "fp8_e4m3", 0, "scaled_mm"),
]


# On a GPU: (label, format, group size, kernel) against a bf16 dense matmul (None format).
GPU_LINEAR_CASES = [
    ("bf16 dense", None, 0, None),
    ("int4 per-channel, dequantize", "int4", 0, "dequantize"),
    ("int4 per-channel, _weight_int4pack_mm (tiled copy)", "int4", 0, "int4pack"),
    ("int4 group 128, _weight_int4pack_mm (tiled copy)", "int4", 128, "int4pack"),
    ("int8 per-channel, dequantize", "int8", 0, "dequantize"),
    ("int8 per-channel, _int_mm (int8 activations)", "int8", 0, "int_mm"),
    ("fp8_e4m3 per-channel, dequantize", "fp8_e4m3", 0, "dequantize"),
    ("fp8_e4m3 per-channel, _scaled_mm (e4m3 activations)", "fp8_e4m3", 0, "scaled_mm"),
    ("fp8_e5m2 per-channel, _scaled_mm (e4m3 activations)", "fp8_e5m2", 0, "scaled_mm"),
]


# GGUF's block formats against int4 groups of 64, on a SmolLM2-135M MLP layer (576 inputs, 1536 outputs).
GGUF_CASES = [("int4 group 64", "int4", 64, "auto"), ("q4_0", "q4_0", 0, "auto"), ("q4_1", "q4_1", 0, "auto"),
              ("q5_0", "q5_0", 0, "auto"), ("q8_0", "q8_0", 0, "auto"), ("q4_k", "q4_k", 0, "auto"),
              ("q6_k", "q6_k", 0, "auto"), ("q4_0, dequantize", "q4_0", 0, "dequantize"),
              ("q4_1, dequantize", "q4_1", 0, "dequantize"), ("q4_k, dequantize", "q4_k", 0, "dequantize")]
# SmolLM2's ffn_down: its 1,536 inputs are whole super-blocks of 256, so the K-quants run on it too
GGUF_SHAPE = (1536, 576)


def bench_gguf(repeats: int, rows: int) -> list[tuple[str, float]]:
    """Each GGUF format's forward (the kernel `auto` picks, and dequantize-then-matmul) against int4 g64's."""
    torch.manual_seed(0)
    reference, x = nn.Linear(*GGUF_SHAPE), torch.randn(rows, GGUF_SHAPE[0])
    cases = []
    for label, fmt, group, kernel in GGUF_CASES:
        layer = QuantLinear.from_linear(reference, fmt, group_size=group, kernel=kernel)
        cases.append((f"{label} ({layer.kernel_for(x)})", lambda layer=layer: layer(x)))
    return round_robin_medians(cases, repeats)


def bench_linear(repeats: int, device: torch.device = torch.device("cpu"), rows: int = 64) -> list[tuple[str, float]]:
    """A 4096 x 4096 layer: each path's median time (on a GPU, against bf16; on the CPU, against fp32)."""
    torch.manual_seed(0)
    reference = nn.Linear(4096, 4096).to(device)
    x = torch.randn(rows, 4096, device=device)
    cases = []
    for label, fmt, group, kernel in (GPU_LINEAR_CASES if device.type == "cuda" else LINEAR_CASES):
        if fmt is None:
            dense = reference.to(torch.bfloat16) if device.type == "cuda" else reference
            xs = x.to(torch.bfloat16) if device.type == "cuda" else x
            cases.append((label, lambda dense=dense, xs=xs: dense(xs)))
            continue
        layer = QuantLinear.from_linear(reference, fmt, group_size=group, kernel=kernel)
        cases.append((label, lambda layer=layer: layer(x)))
    return round_robin_medians(cases, repeats, device=device)


def bench_model(repeats: int) -> list[tuple[str, float]]:
    input_ids = torch.randint(0, 50272, (16, 128), generator=torch.Generator().manual_seed(0))
    cases = []
    for label, quant in [("fp32", QuantSpec()), ("int8 (auto kernel)", QuantSpec(format="int8")),
                         ("int8 (_int_mm)", QuantSpec(format="int8", kernel="int_mm")),
                         ("int4 (auto kernel)", QuantSpec(format="int4")),
                         ("int4 group 128 (auto kernel)", QuantSpec(format="int4", group_size=128)),
                         ("fp8_e4m3", QuantSpec(format="fp8_e4m3")), ("fp8_e5m2", QuantSpec(format="fp8_e5m2"))]:
        torch.manual_seed(0)
        model = load_backbone(ModelSpec(config=dict(OPT_125M)), "causal_lm", quant=quant).eval()
        cases.append((label, lambda model=model: model(input_ids=input_ids)))
    return round_robin_medians(cases, repeats, warmup=1)


def stored_bytes_minilm() -> list[tuple[str, float]]:
    """Measured bytes per weight (codes + scales) over MiniLM's 36 encoder linear layers."""
    rows = []
    for fmt in ("int8", "int4", "fp8_e4m3", "fp8_e5m2"):
        for group, scale_dtype in ((0, "bfloat16"), (0, "float32"), (128, "bfloat16"), (128, "float32")):
            model = load_backbone(ModelSpec(), "encoder",
                                  quant=QuantSpec(format=fmt, group_size=group, scale_dtype=scale_dtype))
            layers = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and "encoder.layer" in n]
            weights = sum(m.in_features * m.out_features for m in layers)
            stored = sum(m.stored_bytes for m in layers)
            rows.append((f"{fmt}, {'per-channel' if not group else f'group {group}'}, {scale_dtype} scales",
                         stored / weights))
    return rows


def memory_child(config_name: str, fmt: str, forward_tokens: int) -> dict:
    """Runs in its own process: RSS after imports, then peak while loading (and one forward)."""
    config = {"opt-125m": OPT_125M, "llama-2-7b": LLAMA_2_7B}[config_name]
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model = load_backbone(ModelSpec(config=dict(config)), "causal_lm", quant=QuantSpec(format=fmt)).eval()
    loaded = time.perf_counter() - start
    result = {"model": config_name, "format": fmt, "baseline_mb": baseline / 2**20, "load_seconds": loaded,
              "after_load_rss_mb": psutil.Process().memory_info().rss / 2**20}
    if forward_tokens:
        ids = torch.randint(0, config["vocab_size"], (1, forward_tokens))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        result["forward_seconds"] = time.perf_counter() - start
        result["forward_finite"] = bool(torch.isfinite(logits).all())
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_above_imports_mb"] = result["peak_rss_mb"] - result["baseline_mb"]
    return result


def run_child(config_name: str, fmt: str, forward_tokens: int = 0) -> dict:
    command = [sys.executable, __file__, "--child", config_name, fmt, str(forward_tokens)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(rows: list[tuple[str, float]], title: str, reference: str = "fp32") -> str:
    base = rows[0][1]
    lines = [f"| {title} | ms | ratio to {reference} |", "| --- | --- | --- |"]
    lines += [f"| {label} | {1000 * t:.1f} | {t / base:.2f} |" for label, t in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--llama-7b", action="store_true", help="also load a LLaMA-2-7B shape into int4 (minutes)")
    parser.add_argument("--sections", default="bytes,linear,model,memory",
                        help="comma-separated subset of bytes,linear,gguf,model,memory")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the linear section's paths there")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(memory_child(args.child[0], args.child[1], int(args.child[2]))))
        return
    print(f"_Measured {utc_stamp()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, `python scripts/bench_quant.py {' '.join(sys.argv[1:])}`._\n")
    sections = set(args.sections.split(","))
    if "bytes" in sections:
        print("| MiniLM encoder linears | stored bytes per weight |\n| --- | --- |")
        for label, value in stored_bytes_minilm():
            print(f"| {label} | {value:.4f} |")
        print()
    if "linear" in sections:
        if device.type == "cuda":
            for rows in (16, 2048):
                title = f"4096x4096 layer on {torch.cuda.get_device_name()}, {rows} rows"
                print(table(bench_linear(args.repeats, device, rows), title, "bf16 dense") + "\n")
        else:
            print(table(bench_linear(args.repeats), "nn.Linear 4096x4096, batch 64") + "\n")
    if "gguf" in sections:
        for rows in (8, 128, 1024):
            title = f"{GGUF_SHAPE[0]}x{GGUF_SHAPE[1]} layer (SmolLM2's ffn_down), {rows} rows"
            print(table(bench_gguf(args.repeats, rows), title, "int4 group 64") + "\n")
    if "model" in sections:
        print(table(bench_model(max(3, args.repeats // 4)), "OPT-125m shape, 16 x 128 tokens") + "\n")
    if "memory" in sections:
        fp32, int4 = run_child("opt-125m", "none"), run_child("opt-125m", "int4")
        print("| OPT-125m shape, load | peak RSS MB | above imports MB |\n| --- | --- | --- |")
        for r in (fp32, int4):
            print(f"| {r['format']} | {r['peak_rss_mb']:.0f} | {r['peak_above_imports_mb']:.0f} |")
        ratio = int4["peak_above_imports_mb"] / fp32["peak_above_imports_mb"]
        print(f"\nint4 / fp32 load memory above imports: {ratio:.2f}\n")
    if args.llama_7b:
        r = run_child("llama-2-7b", "int4", forward_tokens=16)
        print(f"LLaMA-2-7B shape straight into int4: load {r['load_seconds']:.0f} s, peak RSS "
              f"{r['peak_rss_mb'] / 1024:.2f} GiB ({r['peak_above_imports_mb'] / 1024:.2f} GiB above imports), "
              f"one forward of 16 tokens "
              f"{r['forward_seconds']:.1f} s, logits finite: {r['forward_finite']}")


if __name__ == "__main__":
    main()
