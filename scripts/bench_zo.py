"""Cost of a zeroth-order step against what it cannot avoid (two forward passes), and its memory against
first-order training. MiniLM (or SmolLM2-135M) on SST-2 batches; every figure is measured side by side in one run.

    python scripts/bench_zo.py [--batch 32] [--repeats 15] [--sections time,memory]
    python scripts/bench_zo.py --model smollm2-135m --batch 16 --threads 1,2 --sections time
    python scripts/bench_zo.py --threads 1,2 --sections draws
    python scripts/bench_zo.py --model smollm2-135m --batch 16 --threads 2 --sections settings
    python scripts/bench_zo.py --model smollm2-135m --batch 16 --threads 2 --sections window --window 50
    python scripts/bench_zo.py --model smollm2-135m --batch 16 --threads 2 --profile "QuZO int4 g64, norms"
    python scripts/bench_zo.py --model smollm2-135m --batch 16 --threads 2 --sections time --cases "all weights"

time:   for each case, the median of a full ZO step and of two plain forward passes of the same model on the same
        batch, timed in turn (round robin) so machine noise falls on both alike; the ratio is what the
        perturbation, regeneration of directions and update cost on top of the forwards.
window: full-parameter MeZO and QuZO int4 (SmolLM2-135M) over the first --window batches training draws, each batch's
        two forwards then its step: the ratio training pays on average (the time section's batch is the shortest).
settings: the time section for full-parameter MeZO and QuZO int4, each in a fresh process under the process-wide
        settings the step cost depends on (OpenMP's spin count, glibc's malloc thresholds; SETTINGS).
draws:  the random numbers alone, per number.
--profile CASE: where one case's step goes: the functions that take most of it (their own time, cProfile, over a few
        steps after a warm-up), in ms per step and as a share of the step, beside two plain forwards.
memory: each case in a fresh process: RSS of the built model above the RSS after imports, then the peak RSS of
        three training steps (the high-water mark restarted after building, Linux /proc/self/clear_refs) above
        the same baseline, against first-order AdamW on fp32.
"""

from __future__ import annotations

# ruff: noqa: E402  (OpenMP is configured before torch is imported, as the ftkit command does)
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import utc_stamp

from ftkit.openmp import shorten_openmp_spin

shorten_openmp_spin()

import torch

from ftkit.data.batches import TrainStream, collate, encode
from ftkit.memory import (
    peak_rss_mb,
    return_freed_memory_to_the_system,
    reuse_freed_memory,
)
from ftkit.models.count import trainable_numel
from ftkit.optim.zo_streams import gaussian, signs
from ftkit.recipe import recipe_from_dict
from ftkit.training.setup import build_run

CASES = {
    "MeZO fp32, all weights but word embeddings": ({"optimizer": "mezo"}, {}, 1e-6),
    "MeZO fp32, all weights incl. word embeddings": ({"optimizer": "mezo", "zo": {"train_embeddings": True}}, {}, 1e-6),
    "QuZO int8, all weights (codes)": ({"optimizer": "quzo"}, {"format": "int8"}, 1e-6),
    "QuZO int4, all weights (codes)": ({"optimizer": "quzo"}, {"format": "int4"}, 1e-6),
    "QuZO fp8_e4m3, all weights (codes)": ({"optimizer": "quzo"}, {"format": "fp8_e4m3"}, 1e-6),
    "QuZO int4 base + LoRETTA_rep": ({"optimizer": "quzo", "adapter": "loretta_rep",
                                      "loretta": {"tensor_rank": 3, "init": "paper"}}, {"format": "int4"}, 1e-3),
}
MEMORY_CASES = {"AdamW fp32, all weights (first-order)": ({"optimizer": "adamw"}, {}, 5e-5), **CASES}
# SmolLM2-135M: every weight but the tied embeddings (106.2M elements), and the small trainable sets.
NORMS = [r"^(?!.*norm).*$"]  # freeze everything but the RMSNorm weights
SIGNS = {"zo": {"direction": "rademacher"}}
SMOLLM2_CASES = {
    "MeZO fp32, all weights but embeddings": ({"optimizer": "mezo"}, {}, 1e-6),
    "MeZO fp32, all weights but embeddings, random signs": ({"optimizer": "mezo", **SIGNS}, {}, 1e-6),
    "QuZO int4 g64, all weights but embeddings": ({"optimizer": "quzo"}, {"format": "int4", "group_size": 64}, 1e-6),
    "QuZO int4 g64, all weights but embeddings, random signs": ({"optimizer": "quzo", **SIGNS},
                                                                {"format": "int4", "group_size": 64}, 1e-6),
    **{f"QuZO int4 g64, all weights but embeddings, low rank {rank}": (
        {"optimizer": "quzo", "zo": {"direction": "lowrank", "rank": rank}}, {"format": "int4", "group_size": 64}, 1e-6)
       for rank in (1, 2, 4)},
    "QuZO int4 g64, norms": ({"optimizer": "quzo", "freeze": NORMS}, {"format": "int4", "group_size": 64}, 1e-4),
    "QuZO int4 g64 + LoRETTA_rep": ({"optimizer": "quzo", "adapter": "loretta_rep"},
                                    {"format": "int4", "group_size": 64}, 1e-3),
}


def build(case: str, table: dict, batch_size: int, model_name: str = "minilm", count: int = 1):
    """Model, method, the first batch of SST-2 training draws (length-grouped; the first `count` batches, a list,
    when count > 1), and the case's rate."""
    method, quant, lr = table[case]
    causal = model_name != "minilm"
    recipe = recipe_from_dict({"method": method, "quant": quant,
                               "model": {"name": model_name, "head_init": "prototype"},
                               "data": {"n_train": 1000 if causal else 512, "n_dev": None, "calibration_examples": 64,
                                        "max_seq_len": 128 if causal else 64},
                               "train": {"batch_size": batch_size}})
    run = build_run(recipe, splits=("train",), method=True)
    if causal:  # the batches training draws (length-grouped)
        stream = TrainStream(run.encoded("train"), batch_size, 0, run.pad_id, True)
        batches = [collate(stream.next_features(), run.pad_id) for _ in range(count)]
        batch = batches[0] if count == 1 else batches
    else:  # MiniLM: the first sentences, as the earlier figures in BENCHMARKS.md were measured
        batch = collate(encode(run.task.splits["train"][:batch_size], run.tokenizer, run.kind, run.task, 64),
                        run.pad_id)
    return run.model, run.method, batch, lr


# Process-wide settings a step's cost depends on, each timed in a fresh process (OpenMP reads its spin count when
# torch loads): libgomp's default spin with the loader's malloc thresholds (how ftkit trained before 82b86b1 and
# 41a08ee), the short spin alone, and both as the ftkit command trains now.
SETTINGS = {
    "spin 300,000 (libgomp's default), 128 KiB malloc thresholds": ("300000", "loading"),
    "spin 10,000, 128 KiB malloc thresholds": ("10000", "loading"),
    "spin 10,000, training malloc thresholds (ftkit now)": ("10000", "training"),
}
SETTINGS_CASES = ("MeZO fp32, all weights but embeddings", "QuZO int4 g64, all weights but embeddings")
MALLOC = {"loading": return_freed_memory_to_the_system, "training": reuse_freed_memory}


def bench_time(batch_size: int, repeats: int, model_name: str = "minilm", threads: tuple[int, ...] = (),
               cases: tuple[str, ...] = (), malloc: str = "training") -> list[dict]:
    """Each case's step and two plain forwards, timed in turn; at each thread count when `threads` is given (the
    random directions are the same numbers at every count). glibc's thresholds are set as `malloc` says (training:
    as ftkit trains) after the model is built."""
    rows = []
    table = SMOLLM2_CASES if model_name == "smollm2-135m" else CASES
    for case, count in [(case, count) for case in cases or table for count in (threads or (torch.get_num_threads(),))]:
        torch.set_num_threads(count)
        model, method, batch, lr = build(case, table, batch_size, model_name)
        MALLOC[malloc]()

        calls = {"step": lambda: method.step(batch, lr), "forwards": lambda: two_forwards(model, batch)}
        times = {name: [] for name in calls}
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        step, fwd = statistics.median(times["step"]), statistics.median(times["forwards"])
        elements = sum(t.numel for t in method.targets)
        start = time.perf_counter()
        for target in method.targets:  # the directions of one pass over every trained tensor
            gaussian((target.numel,), 7 + target.index)
        draw = time.perf_counter() - start
        rows.append({"case": case, "threads": count, "trained": elements, "step_ms": 1000 * step,
                     "two_forwards_ms": 1000 * fwd, "ratio": step / fwd,
                     "extra_ns_per_element": 1e9 * (step - fwd) / elements,
                     "gaussian_ns_per_element": 1e9 * draw / elements})
        print(json.dumps(rows[-1]), file=sys.stderr)

    return rows


# The cases timed over the batches training draws (--sections window).
WINDOW_CASES = ("MeZO fp32, all weights but embeddings, random signs",
                "QuZO int4 g64, all weights but embeddings, random signs", "QuZO int4 g64, all weights but embeddings")


def bench_window(batch_size: int, count: int, model_name: str, threads: tuple[int, ...] = ()) -> list[dict]:
    """Each case over the first `count` batches training draws (one length-grouping window is 50): for each batch in
    turn two plain forwards, then a step, so noise falls on both alike; the ratio of the totals is what training
    pays per step against its forwards. The first batch is the window's shortest (4 tokens a row on SST-2's
    template), where the forwards are cheapest and the ratio largest (the time section)."""
    rows = []
    for case, threads_now in [(case, n) for case in WINDOW_CASES for n in (threads or (torch.get_num_threads(),))]:
        torch.set_num_threads(threads_now)
        model, method, batches, lr = build(case, SMOLLM2_CASES, batch_size, model_name, count=count)
        MALLOC["training"]()

        two_forwards(model, batches[0])
        method.step(batches[0], lr)  # warm-up
        step_s = forward_s = 0.0
        for batch in batches:
            forward_s += _timed(lambda: two_forwards(model, batch))
            step_s += _timed(lambda: method.step(batch, lr))
        lengths = sorted(batch["input_ids"].shape[1] for batch in batches)
        rows.append({"case": case, "threads": threads_now, "batches": count, "tokens": (lengths[0],
                     lengths[len(lengths) // 2], lengths[-1]), "step_ms": 1000 * step_s / count,
                     "two_forwards_ms": 1000 * forward_s / count, "ratio": step_s / forward_s})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def bench_settings(batch_size: int, repeats: int, model_name: str, threads: tuple[int, ...]) -> list[dict]:
    """SETTINGS_CASES under each of SETTINGS, in child processes."""
    rows = []
    for setting, (spin, malloc) in SETTINGS.items():
        for case in SETTINGS_CASES:
            out = subprocess.run([sys.executable, __file__, "--time-child", case, "--malloc", malloc, "--model",
                                  model_name, "--batch", str(batch_size), "--repeats", str(repeats), "--threads",
                                  ",".join(map(str, threads or (torch.get_num_threads(),)))],
                                 env={**os.environ, "GOMP_SPINCOUNT": spin}, check=True, capture_output=True,
                                 text=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                rows.append({"setting": setting, **row})
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def bench_draws(threads: tuple[int, ...], numel: int = 40_000_000, repeats: int = 3) -> list[dict]:
    """The random numbers alone: ftkit's block-seeded Gaussian stream (a fresh tensor per call, as the step draws
    them) at each thread count, against torch.randn into a buffer that is reused (no new memory to fault in), and
    the random signs of `method.zo.direction: rademacher`."""
    rows, buffer = [], torch.empty(numel)
    for count in threads or (torch.get_num_threads(),):
        torch.set_num_threads(count)
        gaussian((numel,), 1)
        fresh = min(_timed(lambda: gaussian((numel,), 1)) for _ in range(repeats))
        reused = min(_timed(lambda: torch.randn(numel, generator=torch.Generator().manual_seed(1), out=buffer))
                     for _ in range(repeats))
        random_signs = min(_timed(lambda: signs((numel,), 1)) for _ in range(repeats))
        rows.append({"threads": count, "stream_ns": 1e9 * fresh / numel, "randn_reused_ns": 1e9 * reused / numel,
                     "signs_ns": 1e9 * random_signs / numel})
    return rows


def two_forwards(model, batch) -> None:
    """What a step cannot avoid: two plain forward passes on its batch (eval mode, no autograd)."""
    model.eval()
    with torch.inference_mode():
        model(batch)
        model(batch)


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def memory_child(case: str, batch_size: int) -> dict:
    baseline = psutil.Process().memory_info().rss / 2**20
    model, method, batch, lr = build(case, MEMORY_CASES, batch_size)
    MALLOC["training"]()
    built = psutil.Process().memory_info().rss / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # restart the high-water mark: measure the steps alone
        f.write("5")
    for _ in range(3):
        method.step(batch, lr)
    return {"case": case, "trainable": trainable_numel(model), "model_mb": built - baseline,
            "peak_above_imports_mb": peak_rss_mb() - baseline}


def bench_memory(batch_size: int) -> list[dict]:
    rows = []
    for case in MEMORY_CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--batch", str(batch_size)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def profile_step(case: str, batch_size: int, model_name: str, steps: int = 3, top: int = 12):
    """The `top` functions by own time over `steps` profiled steps of `case` (after one warm-up): [(name, ms per
    step)], the step's ms, and two plain forwards' ms (the median of `steps`)."""
    import cProfile
    import pstats

    table = SMOLLM2_CASES if model_name == "smollm2-135m" else CASES
    if case not in table:
        sys.exit(f"--profile: no case {case!r} for {model_name}; the cases: {'; '.join(table)}")
    model, method, batch, lr = build(case, table, batch_size, model_name)
    MALLOC["training"]()
    method.step(batch, lr)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        method.step(batch, lr)
    profiler.disable()
    step_ms = 1000 * (time.perf_counter() - start) / steps
    forwards = [_timed(lambda: two_forwards(model, batch)) for _ in range(steps)]
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own time, cumulative, ...)}
    own = sorted(((f"{Path(file).name}:{name}" if line else name, row[2]) for (file, line, name), row in stats.items()),
                 key=lambda item: -item[1])[:top]
    return [(name, 1000 * seconds / steps) for name, seconds in own], step_ms, 1000 * statistics.median(forwards)


def print_profile(args, threads: tuple[int, ...], stamp: str, command: str) -> None:
    torch.set_num_threads(threads[0] if threads else torch.get_num_threads())
    functions, step_ms, forwards_ms = profile_step(args.profile, args.batch, args.model)
    print(f"_Measured {stamp}, {torch.get_num_threads()} threads: `{command}`: step {step_ms:.0f} ms under the "
          f"profiler, two plain forwards {forwards_ms:.0f} ms._\n")
    print("| function (own time) | ms per step | share of the step |")
    print("| --- | ---: | ---: |")
    for name, ms in functions:
        print(f"| `{name}` | {ms:.0f} | {ms / step_ms:.0%} |")


def print_time(args, threads: tuple[int, ...]) -> None:
    table = SMOLLM2_CASES if args.model == "smollm2-135m" else CASES
    cases = tuple(case for case in table if not args.cases or any(part in case for part in args.cases.split(";")))
    print("| case | threads | trained elements | ZO step ms | 2 forwards ms | ratio | extra ns per element | "
          "Gaussian ns per element |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in bench_time(args.batch, args.repeats, args.model, threads, cases):
        print(f"| {r['case']} | {r['threads']} | {r['trained']:,} | {r['step_ms']:.0f} | "
              f"{r['two_forwards_ms']:.0f} | {r['ratio']:.2f} | {r['extra_ns_per_element']:.1f} | "
              f"{r['gaussian_ns_per_element']:.2f} |")


def print_window(args, threads: tuple[int, ...]) -> None:
    print("| case | threads | batches | tokens a row (shortest / median / longest) | ZO step ms | 2 forwards ms | "
          "ratio |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in bench_window(args.batch, args.window, args.model, threads):
        print(f"| {r['case']} | {r['threads']} | {r['batches']} | {' / '.join(map(str, r['tokens']))} | "
              f"{r['step_ms']:.0f} | {r['two_forwards_ms']:.0f} | {r['ratio']:.2f} |")


def print_settings(args, threads: tuple[int, ...]) -> None:
    print("| process settings | case | threads | ZO step ms | 2 forwards ms | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in bench_settings(args.batch, args.repeats, args.model, threads):
        print(f"| {r['setting']} | {r['case']} | {r['threads']} | {r['step_ms']:.0f} | "
              f"{r['two_forwards_ms']:.0f} | {r['ratio']:.2f} |")


def print_draws(args, threads: tuple[int, ...]) -> None:
    print("| threads | block-seeded Gaussian stream, fresh tensor, ns per number | torch.randn into a reused "
          "buffer | random signs (method.zo.direction: rademacher), fresh tensor |")
    print("| ---: | ---: | ---: | ---: |")
    for r in bench_draws(threads):
        print(f"| {r['threads']} | {r['stream_ns']:.2f} | {r['randn_reused_ns']:.2f} | {r['signs_ns']:.2f} |")


def print_memory(args, threads: tuple[int, ...]) -> None:
    rows = bench_memory(args.batch)
    base = rows[0]["peak_above_imports_mb"]
    print("| case | trainable | model MB | peak MB during steps (above imports) | ratio to AdamW fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['trainable']:,} | {r['model_mb']:.0f} | {r['peak_above_imports_mb']:.0f} | "
              f"{r['peak_above_imports_mb'] / base:.2f} |")


# The sections' tables, in the order they are printed.
SECTIONS = {"time": print_time, "window": print_window, "settings": print_settings, "draws": print_draws,
            "memory": print_memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sections", default="time,memory")
    parser.add_argument("--model", default="minilm", choices=("minilm", "smollm2-135m"))
    parser.add_argument("--threads", help="comma-separated thread counts to time each case at (default: as set)")
    parser.add_argument("--child")
    parser.add_argument("--time-child")
    parser.add_argument("--malloc", default="training", choices=tuple(MALLOC))
    parser.add_argument("--window", type=int, default=50, help="batches the window section times (smollm2-135m)")
    parser.add_argument("--profile", metavar="CASE", help="where one case's step goes (at the first of --threads)")
    parser.add_argument("--cases", help="the time section: only cases whose name contains one of these "
                                        "';'-separated parts")
    args = parser.parse_args()
    threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else ()
    if args.child:
        print(json.dumps(memory_child(args.child, args.batch)))
        return
    if args.time_child:
        print(json.dumps(bench_time(args.batch, args.repeats, args.model, threads, (args.time_child,), args.malloc)))
        return
    stamp = utc_stamp()
    command = shlex.join(["python", "scripts/bench_zo.py", *sys.argv[1:]])
    if args.profile:
        return print_profile(args, threads, stamp, command)
    sections = args.sections.split(",")
    workload = f" ({args.model}, batch of {args.batch} SST-2 sentences)" if set(sections) - {"draws"} else ""
    print(f"_Measured {stamp}, {torch.get_num_threads()} threads: `{command}`{workload}._\n")
    for name, printer in SECTIONS.items():
        if name in sections:
            printer(args, threads)
            if name != "memory":  # the last table
                print()


if __name__ == "__main__":
    main()
