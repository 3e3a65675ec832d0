"""Fingerprint the training arithmetic: train a grid of tiny recipes (every optimizer, adapter, weight format and
task kind) and record each run's exact train losses, dev figures and a digest of its final checkpoint tensors.

Two code versions that compute the same thing print the same fingerprint, bit for bit; a refactor is checked by
running this before and after and comparing the files:

    python scripts/fingerprint.py -o before.json     # on the old commit
    python scripts/fingerprint.py -o after.json      # on the new one
    python scripts/fingerprint.py --compare before.json after.json

Runs on the CPU with one thread (sums in a fixed order), offline, on FTKIT_DATA_DIR's SST-2 and the test fixtures;
about two minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import REPO, use_shared_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
use_shared_data()

FIXTURES = REPO / "tests" / "fixtures"
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128}
CHOICE = {"kind": "multiple_choice", "train": str(FIXTURES / "choice.jsonl"), "dev": str(FIXTURES / "choice.jsonl"),
          "text_columns": ["premise"], "candidates_column": "choices", "label_column": "label",
          "template": "{premise}"}
QA = {"kind": "generation", "train": str(FIXTURES / "qa.jsonl"), "dev": str(FIXTURES / "qa.jsonl"),
      "text_columns": ["question"], "answer_column": "answers", "template": "{question}", "metric": "f1",
      "max_new_tokens": 3}


def base(**sections) -> dict:
    recipe = {
        "model": {"name": "minilm", "config": dict(TINY_BERT), "head_init": "random"},
        "method": {"optimizer": "adamw"},
        "data": {"task": "sst2", "max_seq_len": 32, "n_train": 64, "n_dev": 32, "calibration_examples": 16},
        "train": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "eval_every": 4, "save_every": 4, "log_every": 4,
                  "threads": 1, "eval_at_start": True},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def llama(task: dict, **sections) -> dict:
    recipe = base(**sections)
    recipe["model"] = {"name": "minilm", "config": dict(TINY_LLAMA), "head_init": "random"}
    recipe["data"] = {"task": "mine", "tasks": {"mine": task}, "max_seq_len": 32}
    return recipe


ZO = {"lr": 1e-2}
GRID = {
    "adamw_full": base(),
    "sgd_full": base(method={"optimizer": "sgd", "sgd": {"momentum": 0.9}}),
    "adamw_lora": base(method={"adapter": "lora"}),
    "adamw_loretta_adp": base(method={"adapter": "loretta_adp", "loretta": {"bottleneck": 8, "tt_head": True}}),
    "adamw_loretta_rep": base(method={"adapter": "loretta_rep", "loretta": {"r": 4, "init": "paper"}}),
    "adamw_straight_through_int4": base(quant={"format": "int4", "engine": "straight_through"}),
    "adamw_int8_frozen_base": base(quant={"format": "int8"}),
    "adamw_micro_batches": base(train={"micro_batch_size": 3}),
    "prototype_head": base(model={"head_init": "prototype"}),
    "mezo_full": base(method={"optimizer": "mezo"}, train=ZO),
    "mezo_queries": base(method={"optimizer": "mezo", "zo": {"n_queries": 2, "weight_decay": 0.1}}, train=ZO),
    "quzo_int4": base(quant={"format": "int4"}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_int4_group": base(quant={"format": "int4", "group_size": 16}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_int8": base(quant={"format": "int8"}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_fp8_e4m3": base(quant={"format": "fp8_e4m3"}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_fp8_e5m2": base(quant={"format": "fp8_e5m2", "rounding": "stochastic"}, method={"optimizer": "quzo"},
                          train=ZO),
    # random signs at a rate where every update of the codes is drawn as its moves (ftkit.optim.sparse_update)
    "quzo_int4_signs": base(quant={"format": "int4"}, train={**ZO, "lr": 1e-5},
                            method={"optimizer": "quzo", "zo": {"direction": "rademacher"}}),
    # low-rank directions (LOZO), V kept for 3 steps; at this rate the codes' updates are drawn as their moves
    "quzo_int4_lowrank": base(quant={"format": "int4"}, train={**ZO, "lr": 1e-5},
                              method={"optimizer": "quzo", "zo": {"direction": "lowrank", "rank": 2, "refresh": 3}}),
    "mezo_lowrank": base(method={"optimizer": "mezo", "zo": {"direction": "lowrank", "rank": 2, "refresh": 3}},
                         train=ZO),
    "quzo_one_rounding": base(quant={"format": "int4"}, train=ZO,
                              method={"optimizer": "quzo", "zo": {"independent_roundings": False}}),
    "quzo_nearest_update": base(quant={"format": "int4"}, train=ZO,
                                method={"optimizer": "quzo", "zo": {"update_rounding": "nearest"}}),
    "quzo_int4_loretta_rep": base(quant={"format": "int4"}, method={"optimizer": "quzo", "adapter": "loretta_rep"},
                                  train=ZO),
    # bitsandbytes' CPU kernels need 64 input features or more
    "quzo_nf4_lora": base(model={"config": {**TINY_BERT, "hidden_size": 64, "intermediate_size": 128}},
                          quant={"format": "int4", "engine": "bitsandbytes"},
                          method={"optimizer": "quzo", "adapter": "lora"}, train=ZO),
    "quzo_head_only": base(quant={"format": "int4"}, method={"optimizer": "quzo", "freeze": ["^encoder\\."]},
                           train=ZO),
    # the int4 layers' scales, codes frozen (QZO); clipping the projected gradient, with MeZO on fp32 scales
    "quzo_int4_scales": base(quant={"format": "int4", "group_size": 16}, train=ZO,
                             method={"optimizer": "quzo", "zo": {"low_bit": "scales"}}),
    "mezo_int4_scales_clipped": base(quant={"format": "int4", "group_size": 16, "scale_dtype": "float32"}, train=ZO,
                                     method={"optimizer": "mezo", "zo": {"low_bit": "scales", "clip_gradient": 2.0}}),
    "llama_sst2_quzo_int4": {**base(quant={"format": "int4"}, method={"optimizer": "quzo"}, train=ZO),
                             "model": {"name": "minilm", "config": dict(TINY_LLAMA), "head_init": "random"}},
    "llama_choice_adamw": llama(CHOICE),
    "llama_choice_mezo": llama(CHOICE, method={"optimizer": "mezo"}, train=ZO),
    "llama_qa_adamw_loretta_adp": llama(QA, method={"adapter": "loretta_adp", "loretta": {"bottleneck": 8}}),
    "llama_qa_quzo_int8": llama(QA, quant={"format": "int8"}, method={"optimizer": "quzo"}, train=ZO),
    # FZOO's one-sided estimate (normalised steps: a rate in weight units) and momentum on the projected gradient
    "mezo_one_sided": base(method={"optimizer": "mezo", "zo": {"estimator": "one_sided", "n_queries": 3}},
                           train={"lr": 1e-3}),
    "quzo_int4_one_sided": base(quant={"format": "int4"}, train={"lr": 1e-3}, method={
        "optimizer": "quzo", "zo": {"estimator": "one_sided", "n_queries": 2, "direction": "rademacher"}}),
    "mezo_momentum": base(method={"optimizer": "mezo", "zo": {"momentum": 0.9}}, train={"lr": 1e-3}),
    # GGUF's block formats; Q4_0's negative scales through the random-sign moves
    "quzo_q4_0": base(quant={"format": "q4_0"}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_q4_1": base(quant={"format": "q4_1"}, method={"optimizer": "quzo"}, train=ZO),
    "quzo_q4_0_signs": base(quant={"format": "q4_0"}, train={**ZO, "lr": 1e-5},
                            method={"optimizer": "quzo", "zo": {"direction": "rademacher"}}),
    "quzo_q5_0": base(quant={"format": "q5_0"}, method={"optimizer": "quzo"}, train=ZO),
    # GGUF's Q4_K: super-blocks of 256 along each row, so a BERT with rows of 256
    "quzo_q4_k": {**base(quant={"format": "q4_k"}, method={"optimizer": "quzo"}, train={**ZO, "lr": 1e-3}),
                  "model": {"name": "minilm", "config": {**TINY_BERT, "hidden_size": 256, "intermediate_size": 256,
                                                          "num_hidden_layers": 1}, "head_init": "random"}},
}


def fingerprint(name: str, recipe_data: dict, work: Path) -> dict:
    import torch
    import yaml
    from safetensors.torch import load_file

    from ftkit.recipe import load_recipe
    from ftkit.training.loop import train

    recipe_data = json.loads(json.dumps(recipe_data))
    recipe_data["train"]["output_dir"] = str(work / name)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_data, sort_keys=False))
    summary = train(load_recipe(path))
    run_dir = work / name
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # "forwards" (zeroth-order forward passes so far) is a count, not arithmetic: added after the first fingerprints;
    # so were a causal LM's accuracies under each scoring (accuracy_mean, ...), read from the same scores as the rest
    figures = [{k: v for k, v in e.items() if k not in ("elapsed", "lr", "forwards") and not k.startswith("accuracy_")}
               for e in events]
    last = run_dir / "checkpoints" / "last"
    weights = load_file(str(last / "weights.safetensors"))
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"events": figures, "weights_sha256": digest.hexdigest(), "tensors": len(weights),
            "trainable_params": summary["trainable_params"]}


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    differing = 0
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            print(f"{name}: only in {'after' if name in new else 'before'}")
            differing += 1
        elif old[name] != new[name]:
            keys = [k for k in old[name] if old[name][k] != new[name].get(k)]
            print(f"{name}: differs in {', '.join(keys)}")
            differing += 1
    total = len(set(old) | set(new))
    print(f"{differing} of {total} runs differ" if differing else f"all {total} runs identical, bit for bit")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, help="write the fingerprint here (JSON)")
    parser.add_argument("--only", nargs="*", help="names of grid runs to fingerprint (default: all)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    import torch

    torch.set_num_threads(1)
    names = args.only or list(GRID)
    unknown = [n for n in names if n not in GRID]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r} (choices: {', '.join(GRID)})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = fingerprint(name, GRID[name], Path(tmp))
            print(f"{name}: {results[name]['weights_sha256'][:16]}", flush=True)
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
