"""Candidates of several tokens: one pass over the shared prompt (the default layout) against one full row per
candidate, on SmolLM2-135M, side by side in one process.

    python scripts/bench_candidates.py [--examples 100] [--eval-repeats 2] [--repeats 3] [--threads 2]

eval:  `ftkit eval`'s evaluation (ftkit.eval.evaluate, eval_batch_size 64) of COPA's 100 validation examples (two
       sentence candidates each), and of the first --examples SST-2 validation sentences scored on six label words of
       one to three tokens (TREC's question types: a speed measurement, the accuracy means nothing); both layouts
       warmed up, then timed in turn (median of --eval-repeats), with their accuracy and loss (equal to float rounding).
step:  a QuZO step on the RMSNorm weights over the int4 base (recipes/smollm2/quzo_int4_norms.yaml) on a batch of 16
       COPA training examples, median of --repeats steps per layout, timed in turn.
"""

from __future__ import annotations

# ruff: noqa: E402  (OpenMP is configured before torch is imported, as the ftkit command does)
import argparse
import dataclasses
import time

from _common import REPO, round_robin_medians, use_shared_data, utc_stamp

from ftkit.openmp import shorten_openmp_spin

shorten_openmp_spin()
use_shared_data()

import torch

from ftkit.data.batches import collate, encode
from ftkit.data.dataset import load_task_data
from ftkit.eval import evaluate
from ftkit.recipe import load_recipe
from ftkit.training.setup import build_run

RECIPE = REPO / "recipes" / "smollm2" / "quzo_int4_norms.yaml"
SIX_WORDS = ["description", "entity", "abbreviation", "person", "location", "number"]
LAYOUTS = {"shared prompt": False, "row per candidate": True}


def six_candidate_task(recipe, examples: int):
    """SST-2's first validation sentences, labelled by six words of different lengths."""
    sst2 = load_task_data(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, task="sst2")),
                          splits=("train", "test"))
    labels = [str(i) for i in range(6)]
    spec = dataclasses.replace(sst2.spec, label_words=dict(zip(labels, SIX_WORDS)))
    return dataclasses.replace(sst2, spec=spec, labels=labels, splits={"test": sst2.splits["test"][:examples]})


def timed_eval(run, task, examples, batch_size: int, repeats: int) -> dict:
    """Each layout's evaluation, warmed up on a few examples, then timed in turn (median of `repeats`)."""
    kind = task.spec.kind
    features = {name: encode(examples, run.tokenizer, run.kind, task, run.recipe.data.max_seq_len, one_row)
                for name, one_row in LAYOUTS.items()}
    metrics = {}
    for name, f in features.items():  # warm-up: lazily built kernel tables, allocator, threads
        evaluate(run.model, f[:8], kind, batch_size, run.pad_id, len(task.labels), run.tokenizer)

    def call(name):
        metrics[name] = evaluate(run.model, features[name], kind, batch_size, run.pad_id, len(task.labels),
                                 run.tokenizer)

    medians = round_robin_medians([(name, lambda n=name: call(n)) for name in features], repeats, warmup=0)
    return {name: {"seconds": t, "accuracy": metrics[name]["accuracy"], "loss": metrics[name]["loss"]}
            for name, t in medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE, ["data.task=copa", "data.n_train=300", "data.n_dev=100", "data.max_seq_len=64",
                                  f"train.device={args.device}"])
    run = build_run(recipe, torch.device(args.device), method=True)
    print(f"_Measured {utc_stamp()}, {args.device}, {args.threads} threads, torch {torch.__version__}_")
    copa = run.task
    six = six_candidate_task(recipe, args.examples)
    for label, task, examples in (("COPA validation (100 x 2)", copa, copa.splits["test"]),
                                  (f"SST-2 x six words ({args.examples} x 6)", six, six.splits["test"])):
        result = timed_eval(run, task, examples, 64, args.eval_repeats)
        (a, fa), (b, fb) = result.items()
        print(f"eval {label}: " + "; ".join(f"{k} {v['seconds']:.2f} s (accuracy {v['accuracy']:.4f}, loss "
                                               f"{v['loss']:.6f})" for k, v in result.items())
              + f"; ratio {fb['seconds'] / fa['seconds']:.2f}x")
    batches = {name: collate(encode(copa.splits["train"][:16], run.tokenizer, run.kind, copa,
                                    recipe.data.max_seq_len, one_row), run.pad_id) for name, one_row in LAYOUTS.items()}
    lr = recipe.train.lr
    medians = round_robin_medians([(name, lambda b=batch: run.method.step(b, lr)) for name, batch in batches.items()],
                                  args.repeats, warmup=1, device=torch.device(args.device))
    (a, ta), (b, tb) = medians
    print(f"QuZO norms step, COPA batch 16: {a} {ta:.3f} s; {b} {tb:.3f} s; ratio {tb / ta:.2f}x")


if __name__ == "__main__":
    main()
