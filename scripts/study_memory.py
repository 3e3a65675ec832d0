"""Memory scaling for scripts/study.py: one training step of each method and format at OPT-125m, OPT-350m,
OPT-1.3B and LLaMA-2-7B shapes (random weights, SST-2 prompts as causal-LM classification), each in a fresh
process: peak RSS above the RSS after imports while building the model and during the step (the high-water mark
is reset between the two), against first-order fp32 and first-order LoRA over a bitsandbytes nf4 base (QLoRA).

    python scripts/study_memory.py SHAPE CASE     # one measurement, printed as JSON (what study.py runs)

Cases whose state would not fit this machine are not run; their row gives the arithmetic instead
(first-order AdamW fp32: 16 bytes per parameter before activations; MeZO fp32: 4).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from _common import LLAMA_2_7B, OPT_1_3B, OPT_125M, OPT_350M

SHAPES = {"OPT-125m": OPT_125M, "OPT-350m": OPT_350M, "OPT-1.3B": OPT_1_3B, "LLaMA-2-7B": LLAMA_2_7B}
# Parameters of each shape (from `ftkit count-params`), for the rows that are computed rather than run.
PARAMS = {"OPT-125m": 125_239_296, "OPT-350m": 331_196_416, "OPT-1.3B": 1_315_758_080, "LLaMA-2-7B": 6_738_415_616}
FO = {"optimizer": "adamw"}
CASES = {
    "FO AdamW fp32": ({}, FO),
    "FO nf4 + LoRA (QLoRA)": ({"format": "int4", "engine": "bitsandbytes"},
                              {**FO, "adapter": "lora", "lora": {"r": 8, "alpha": 16}}),
    "MeZO fp32": ({}, {"optimizer": "mezo"}),
    "QuZO fp8_e4m3": ({"format": "fp8_e4m3"}, {"optimizer": "quzo"}),
    "QuZO int8": ({"format": "int8"}, {"optimizer": "quzo"}),
    "QuZO int4": ({"format": "int4"}, {"optimizer": "quzo"}),
}
# Bytes per parameter of the state a case keeps (weights + optimizer), to skip what cannot fit 24 GiB.
STATE_BYTES = {"FO AdamW fp32": 16, "MeZO fp32": 4}
FITS_BYTES = 18 * 2**30


def measure(shape: str, case: str) -> dict:
    from ftkit.data.batches import collate, encode
    from ftkit.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
    from ftkit.models.count import trainable_numel
    from ftkit.recipe import recipe_from_dict
    from ftkit.training.setup import build_run

    # One thread: the study runs these beside its accuracy grid on a small machine; memory does not depend on it.
    torch.set_num_threads(1)
    baseline = current_rss_mb()

    quant, method = CASES[case]
    seq = 16 if shape == "LLaMA-2-7B" else 32
    recipe = recipe_from_dict({
        "model": {"name": "minilm", "config": dict(SHAPES[shape]), "weights": "random", "head_init": "random"},
        "quant": quant, "method": method,
        "data": {"task": "sst2", "max_seq_len": seq, "n_train": 8, "n_dev": 8, "calibration_examples": 8},
        "train": {"batch_size": 2, "lr": 1e-6}})
    started = time.perf_counter()
    run = build_run(recipe, splits=("train",), method=True)
    built = time.perf_counter()
    build_peak = peak_rss_mb() - baseline
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): build and step cannot be told apart")
    state = current_rss_mb() - baseline
    batch = collate(encode(run.task.splits["train"][:2], run.tokenizer, run.kind, run.task, seq), run.pad_id)
    metrics = run.method.step(batch, 1e-6)
    step_peak = peak_rss_mb() - baseline
    return {"shape": shape, "case": case, "trainable": trainable_numel(run.model), "build_seconds": built - started,
            "step_seconds": time.perf_counter() - built, "loss": metrics["loss"], "baseline_mb": baseline,
            "build_peak_mb": build_peak, "state_mb": state, "step_peak_mb": step_peak,
            "peak_above_imports_mb": max(build_peak, step_peak)}


def run_case(shape: str, case: str) -> dict:
    """One measurement in a fresh process; or, for a state too large for this machine, the arithmetic."""
    state = STATE_BYTES.get(case, 0) * PARAMS[shape]
    if state > FITS_BYTES:
        return {"shape": shape, "case": case, "skipped": f"needs {state / 2**30:.0f} GiB of weights and optimizer "
                f"state alone ({STATE_BYTES[case]} bytes per parameter)", "estimate_mb": state / 2**20}
    done = subprocess.run([sys.executable, __file__, shape, case], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"memory case {shape} / {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| shape | method | trainable | after build, MiB | build peak, MiB | step peak, MiB | vs FO fp32 | "
             "vs FO nf4 + LoRA | step s | build s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["shape"], r["case"]): r for r in results}
    for r in results:
        fp32, qlora = by.get((r["shape"], "FO AdamW fp32")), by.get((r["shape"], "FO nf4 + LoRA (QLoRA)"))
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['case']} | | | not run: {r['skipped']} | | | | | |")
            continue
        peak = r["peak_above_imports_mb"]
        fp32_peak = fp32.get("peak_above_imports_mb", fp32.get("estimate_mb")) if fp32 else None
        ratio_fp32 = f"{peak / fp32_peak:.2f}" + ("*" if fp32 and "skipped" in fp32 else "") if fp32_peak else ""
        ratio_qlora = f"{peak / qlora['peak_above_imports_mb']:.2f}" if qlora and "skipped" not in qlora else ""
        bold = "**" if peak == r["step_peak_mb"] else ""
        lines.append(f"| {r['shape']} | {r['case']} | {r['trainable']:,} | {r['state_mb']:,.0f} | "
                     f"{r['build_peak_mb']:,.0f} | {bold}{r['step_peak_mb']:,.0f}{bold} | {ratio_fp32} | "
                     f"{ratio_qlora} | {r['step_seconds']:.1f} | {r['build_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
