"""What several processes exchange per training step, and what they buy in step time on this machine.

    python scripts/bench_distributed.py [--steps 5] [--repeats 3] [--cases minilm,opt-125m] [--json out.json]

For each case (a model shape x method) three set-ups run the same global batches:
  1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread (torchrun --standalone, gloo).
Reported per step: seconds, the median over repeats (set-ups in turn, so machine noise falls on all alike) of the
median over the timed steps (one warm-up step first); and
  seconds; bytes each process puts into all-reduces: ftkit's own collectives for zeroth-order methods (the chunks'
  losses) and DDP's gradient buckets for first-order ones (counted by a DDP communication hook around the default
  all-reduce); the same arithmetic gives the number for any model size (docs/scaling.md).
The model shapes: MiniLM (the packaged pretrained model) and OPT-125m (its architecture, random weights), both on
SST-2 sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import OPT_125M
from torch.nn.parallel import DistributedDataParallel

from ftkit.data.batches import encode, shard
from ftkit.distributed import close_world, init_world
from ftkit.models.count import trainable_numel
from ftkit.recipe import recipe_from_dict
from ftkit.training.loop import chunk_size_for
from ftkit.training.setup import build_run

MINILM = {"head_init": "prototype"}
OPT = {"name": "minilm", "config": dict(OPT_125M), "weights": "random", "head_init": "random"}
# name -> (model, method, quant, batch size, max sequence length)
CASES = {
    "minilm": {
        "AdamW fp32, all weights (DDP)": (MINILM, {"optimizer": "adamw"}, {}, 16, 64),
        "AdamW, LoRA r 8 (DDP)": (MINILM, {"optimizer": "adamw", "adapter": "lora"}, {}, 16, 64),
        "MeZO fp32, all weights": (MINILM, {"optimizer": "mezo"}, {}, 16, 64),
        "QuZO int4, all weights": (MINILM, {"optimizer": "quzo"}, {"format": "int4"}, 16, 64),
        "QuZO int4, 2 queries, query parallel": (MINILM, {"optimizer": "quzo", "zo": {"n_queries": 2,
                                                 "parallel": "queries"}}, {"format": "int4"}, 16, 64),
    },
    "opt-125m": {
        "AdamW fp32, all weights (DDP)": (OPT, {"optimizer": "adamw"}, {}, 4, 32),
        "QuZO int4, all weights": (OPT, {"optimizer": "quzo"}, {"format": "int4"}, 4, 32),
    },
}
SETUPS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]


def worker(shape: str, case: str, steps: int, threads: int, out: Path) -> None:
    """One set-up of one case, in this process (one of torchrun's, or alone)."""
    world = init_world()
    torch.set_num_threads(threads)
    model_spec, method_spec, quant, batch_size, seq_len = CASES[shape][case]
    recipe = recipe_from_dict({"model": model_spec, "method": method_spec, "quant": quant,
                               "data": {"n_train": 512, "n_dev": None, "calibration_examples": 64},
                               "train": {"batch_size": batch_size, "lr": 1e-6}})
    run = build_run(recipe, splits=("train",), method=True, world=world)
    model, method, task, tokenizer = run.model, run.method, run.task, run.tokenizer
    ddp = {"bytes": 0}
    if isinstance(getattr(method, "forward", None), DistributedDataParallel):
        method.forward.register_comm_hook(ddp, _counting_allreduce)
    features = encode(task.splits["train"][: batch_size * (steps + 1)], tokenizer, run.kind, task, seq_len)
    chunk_size = chunk_size_for(recipe, world, method.shards_data)
    times, counted = [], None
    for s in range(steps + 1):
        batch = shard(features[s * batch_size : (s + 1) * batch_size], chunk_size, tokenizer.pad_token_id,
                      world if method.shards_data else None, s)
        world.barrier()
        started = time.perf_counter()
        method.step(batch, 1e-6)
        times.append(time.perf_counter() - started)
        if s == 0:  # after the warm-up step
            counted = (world.traffic["bytes"], ddp["bytes"])
    if world.is_main:
        out.write_text(json.dumps({
            "seconds": statistics.median(times[1:]), "trainable": trainable_numel(model),
            "zo_bytes": (world.traffic["bytes"] - counted[0]) / steps, "ddp_bytes": (ddp["bytes"] - counted[1]) / steps,
        }))
    close_world(world)


def _counting_allreduce(state: dict, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(None, bucket)


def run_setup(shape: str, case: str, steps: int, nproc: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [__file__, "--worker", shape, case, "--steps", str(steps), "--threads", str(threads), "--out", str(out)]
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{shape} / {case} / {nproc} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="minilm,opt-125m")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "CASE"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.steps, args.threads, args.out)

    print(f"# bench_distributed, {datetime.now(timezone.utc):%Y-%m-%d}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, gloo; `python scripts/bench_distributed.py --steps {args.steps} "
          f"--repeats {args.repeats}`\n")
    print("| shape | method | trainable | bytes all-reduced per step and process (2 processes) | "
          + " | ".join(f"s/step, {name}" for name, _, _ in SETUPS) + " | 2 processes / 1 process x 1 thread |")
    print("|---|---|---:|---:|" + "---:|" * (len(SETUPS) + 1))
    rows = []
    for shape in args.cases.split(","):
        for case in CASES[shape]:
            runs = [[run_setup(shape, case, args.steps, nproc, threads) for _, nproc, threads in SETUPS]
                    for _ in range(args.repeats)]
            results = [{**runs[-1][i], "seconds": statistics.median(r[i]["seconds"] for r in runs),
                        "all_seconds": [r[i]["seconds"] for r in runs]} for i in range(len(SETUPS))]
            two = results[-1]
            sent = two["zo_bytes"] + two["ddp_bytes"]
            rows.append({"shape": shape, "case": case, "setups": dict(zip([s[0] for s in SETUPS], results))})
            print(f"| {shape} | {case} | {two['trainable']:,} | {sent:,.0f} | "
                  + " | ".join(f"{r['seconds']:.3f}" for r in results)
                  + f" | {two['seconds'] / results[0]['seconds']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
