"""Forward-time overhead of each adapter over the plain model, side by side in one run (MiniLM, SST-2 batches).

    python scripts/bench_adapters.py [--batch 32] [--repeats 30]

Each configuration runs the same dev batch in turn (round robin), in eval mode under inference_mode; the table
gives median times and ratios to the model without adapters. LoRETTA_rep is timed unmerged and merged.
"""

from __future__ import annotations

import argparse

import torch
from _common import round_robin_medians, utc_stamp

from ftkit.adapters.loretta_rep.layer import LorettaRepLinear
from ftkit.data.batches import collate, encode
from ftkit.recipe import recipe_from_dict
from ftkit.training.setup import build_run

CASES = [("MiniLM, no adapter", "none", {}), ("LoRETTA_adp (bottleneck 64, rank 5)", "loretta_adp", {}),
         ("LoRETTA_rep (r 8, rank 3), unmerged", "loretta_rep", {"tensor_rank": 3}),
         ("LoRETTA_rep (r 8, rank 3), merged", "loretta_rep", {"tensor_rank": 3, "merge": True}),
         ("LoRA r 8 (PEFT), unmerged", "lora", {})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    models, batch = [], None
    for label, adapter, options in CASES:
        merge = options.pop("merge", False)
        recipe = recipe_from_dict({"method": {"adapter": adapter, "loretta": {"init": "paper", **options}},
                                   "data": {"n_train": 600, "n_dev": None, "calibration_examples": 64}})
        run = build_run(recipe, splits=("train", "dev"))
        if merge:
            for module in run.model.modules():
                if isinstance(module, LorettaRepLinear):
                    module.merge()
        if batch is None:
            dev = run.task.splits["dev"][: args.batch]
            batch = collate(encode(dev, run.tokenizer, run.kind, run.task, 64), run.pad_id)
        models.append((label, run.model.eval()))
    medians = round_robin_medians([(label, lambda model=model: model(batch)) for label, model in models],
                                  args.repeats, warmup=3)
    base = medians[0][1]
    print(f"_Measured {utc_stamp()}, {torch.get_num_threads()} threads: "
          f"`python scripts/bench_adapters.py --batch {args.batch} --repeats {args.repeats}` "
          f"(batch of {tuple(batch['input_ids'].shape)} tokens)._\n")
    print("| model | forward ms (median) | ratio to no adapter |\n| --- | --- | --- |")
    for label, median in medians:
        print(f"| {label} | {1000 * median:.1f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
