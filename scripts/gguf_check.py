"""Run a GGUF file in llama.cpp beside ftkit's model on a single-token candidate task (SST-2 by default: MeZO's
template "{sentence} It was", label words " terrible" / " great"): the same token ids go to both, and the next-token
log-probabilities of the label words are compared, then each side's test accuracy is scored.

    python scripts/gguf_check.py model.gguf RUN_DIR                      # an export against the run it came from
    python scripts/gguf_check.py FILE.gguf recipes/smollm2/zero_shot.yaml quant.format=none --n 200

The second argument is a run directory (its best checkpoint, else its last) or a recipe with overrides: what
`ftkit eval` would evaluate, and as it computes it: ftkit's side runs one example at a time, where the CPU int4
kernel (taken below 512 tokens) would round activations and scales to bfloat16, so it dequantizes
(`quant.kernel=dequantize`, as an evaluation batch does) unless an override names a kernel. Needs llama-cpp-python (`pip install llama-cpp-python`, built from source: cmake and a
C++ compiler); docs/runs.md has the figures on the packaged SmolLM2 file. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import use_shared_data


def ftkit_run(target: Path, overrides: list[str]):
    """ftkit's run for `target` with its test split, built as `ftkit eval` builds it, trained weights loaded."""
    from ftkit.recipe import load_recipe
    from ftkit.runs import checkpoint_to_use, load_run_recipe, recorded_data
    from ftkit.training import checkpoint as ckpt
    from ftkit.training.setup import build_run

    if target.is_dir():
        recipe = load_run_recipe(target, overrides)
        run = build_run(recipe, splits=("test",), recorded=recorded_data(target, recipe, overrides))
        ckpt.load_checkpoint(checkpoint_to_use(target, warn=print), run.model)
    else:
        run = build_run(load_recipe(target, overrides), splits=("test",))
    return run.model.eval(), run


def prompts(run, n: int | None) -> list[tuple[list[int], list[int], int]]:
    """(prompt token ids, each candidate's one token, label) per test example, as ftkit encodes them."""
    from ftkit.data.batches import left_truncated, prompt_text
    from ftkit.task_kinds import TASK_KINDS

    task, tokenizer = run.task, run.tokenizer
    candidates_of = TASK_KINDS[task.spec.kind].candidates(task, tokenizer)
    rows = []
    for example in task.splits["test"][:n]:
        ids = tokenizer(prompt_text(task, example, tokenizer), add_special_tokens=not task.chat)["input_ids"]
        candidates = candidates_of(example)
        if any(len(c) != 1 for c in candidates):
            sys.exit(f"{task.name}: candidates of several tokens; this check compares single-token label words")
        rows.append((left_truncated(ids, 1, run.recipe.data.max_seq_len, tokenizer.bos_token_id),
                     [c[0] for c in candidates], example.label))
    return rows


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def ftkit_log_probs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        logits = model.backbone(input_ids=torch.tensor([ids])).logits[0, -1]
    return log_softmax(logits.float().numpy())


def llama_log_probs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return log_softmax(np.asarray(llm.scores[len(ids) - 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="The .gguf file llama.cpp runs")
    parser.add_argument("target", type=Path, help="A run directory or a recipe: ftkit's side")
    parser.add_argument("overrides", nargs="*", help="Recipe overrides, e.g. quant.format=none")
    parser.add_argument("--n", type=int, default=None, help="The first N test examples (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's and torch's threads")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python")
    import torch

    use_shared_data()
    torch.set_num_threads(args.threads)
    model, run = ftkit_run(args.target, ["quant.kernel=dequantize", *args.overrides])  # a later override wins
    rows = prompts(run, args.n)
    llm = Llama(model_path=str(args.gguf), logits_all=True, n_ctx=max(len(r[0]) for r in rows) + 8,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=512, verbose=False)
    if llm.n_vocab() != len(run.tokenizer):
        sys.exit(f"{args.gguf} has {llm.n_vocab()} tokens, ftkit's tokenizer {len(run.tokenizer)}: not the same model")
    label_diffs, logit_diffs, correct = [], [], {"ftkit": 0, "llama.cpp": 0}
    split_margins = []  # ftkit's margin between its top two label words where the two sides' predictions differ
    seconds = {"ftkit": 0.0, "llama.cpp": 0.0}
    for index, (ids, candidates, label) in enumerate(rows):
        start = time.perf_counter()
        ours = ftkit_log_probs(model, ids)
        seconds["ftkit"] += time.perf_counter() - start
        start = time.perf_counter()
        theirs = llama_log_probs(llm, ids)
        seconds["llama.cpp"] += time.perf_counter() - start
        label_diffs.append(np.abs(ours[candidates] - theirs[candidates]))
        logit_diffs.append(np.abs(ours - theirs).mean())
        ours_pick, theirs_pick = np.argmax(ours[candidates]), np.argmax(theirs[candidates])
        correct["ftkit"] += int(ours_pick == label)
        correct["llama.cpp"] += int(theirs_pick == label)
        if ours_pick != theirs_pick:
            top = np.sort(ours[candidates])
            split_margins.append(top[-1] - top[-2])
        if (index + 1) % 100 == 0:
            print(f"{index + 1} / {len(rows)}", file=sys.stderr, flush=True)
    label_diffs = np.concatenate(label_diffs)
    print(f"{len(rows)} {run.task.name} test examples; forward passes: ftkit {seconds['ftkit']:.0f} s, llama.cpp "
          f"{seconds['llama.cpp']:.0f} s")
    print(f"label words' log-probabilities, |ftkit - llama.cpp|: mean {label_diffs.mean():.4f}, "
          f"max {label_diffs.max():.4f}")
    print(f"all {llm.n_vocab()} log-probabilities at the prompt's end: mean |difference| {np.mean(logit_diffs):.4f}")
    if split_margins:
        print(f"predictions differ on {len(split_margins)} examples, where ftkit's two label words are "
              f"{', '.join(f'{m:.4f}' for m in sorted(split_margins))} apart in log-probability")
    for side, hits in correct.items():
        print(f"accuracy {side}: {hits / len(rows):.4f} ({hits}/{len(rows)})")


if __name__ == "__main__":
    main()
