"""The seeds' experiments on a real pretrained causal LM: SmolLM2-135M-Instruct (LLaMA architecture; the 4-bit Q4_1
copy of the Instruct model expanded to float, see ftkit/models/packaged.py) scored by prompts, on SST-2, CB, COPA,
BoolQ and SQuAD under MeZO's data protocol. Rows are the recipes of recipes/smollm2/; the plan runs them in order
of what the figures need first, several seeds where the budget allows.

    python scripts/study_smollm2.py --jobs 2     # the plan (hours here; resumable: done runs are skipped)
    python scripts/study_smollm2.py --report     # tables and figure from the runs there are, train nothing
    python scripts/study_smollm2.py --tasks sst2 --rows quzo_int4_norms,mezo_norms

Each run is `ftkit train` of the row's recipe with the task's data section and the plan's steps and seed (test:
the task's validation file, evaluated on the best dev checkpoint); zero-shot rows are `ftkit eval --split test` of
the untrained model. Runs live in runs/study-smollm2/<task>/<row>/seed<k>/; the tables go into BENCHMARKS.md
between markers, in the QuZO and LoRETTA papers' layout (rows methods x formats, columns tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml
from _common import REPO, SMOLLM2_TASKS, smollm2_test_subset, use_shared_data, write_section

RECIPES = REPO / "recipes" / "smollm2"
ROOT = REPO / "runs" / "study-smollm2"
TASKS = SMOLLM2_TASKS  # per task: data section, metric, test rows (scripts/_common.py)
# The rows, in the tables' order: (recipe, label).
ROWS = [
    ("zero_shot", "zero-shot"),
    ("zero_shot_int4", "zero-shot, int4 g64 base (the QuZO rows' start)"),
    ("zero_shot_chat", "zero-shot, SST-2 prompt in the chat format"),
    ("ft_full", "FO AdamW, fp32, all weights"),
    ("ft_full_chat", "FO AdamW, fp32, all weights, SST-2 prompt in the chat format"),
    ("lora", "FO LoRA, fp32"),
    ("loretta_adp", "FO LoRETTA_adp, fp32"),
    ("loretta_rep", "FO LoRETTA_rep, fp32"),
    ("mezo", "MeZO, fp32, all weights"),
    ("quzo_fp8_e4m3", "QuZO, fp8_e4m3, all weights"),
    ("quzo_int8", "QuZO, int8, all weights"),
    ("quzo_int4", "QuZO, int4, all weights"),
    ("quzo_int4_one_rounding", "QuZO, int4, all weights, one rounding for both"),
    ("quzo_int4_nearest", "QuZO, int4, all weights, nearest updates"),
    ("quzo_int4_loretta_rep", "QuZO + LoRETTA_rep, int4 base"),
    ("quzo_nf4_lora", "QuZO + LoRA, nf4 base"),
    ("mezo_norms", "MeZO, fp32, norms"),
    ("quzo_int4_norms", "QuZO, int4 base, norms"),
    ("quzo_int4_norms_one_rounding", "QuZO, int4 base, norms, one rounding for both"),
    ("quzo_int4_norms_signs", "QuZO, int4 base, norms, random-sign directions"),
    ("zero_shot_int4_chat", "zero-shot, int4 g64 base, SST-2 prompt in the chat format"),
    ("quzo_int4_norms_chat", "QuZO, int4 base, norms, SST-2 prompt in the chat format"),
]
LABELS = dict(ROWS)
# The plan, in order: (task, recipe, seeds, steps). What the targets need first: the best zeroth-order row on three
# seeds against MeZO at the same budget and its ablation, first-order references, then the rest and other tasks.
PLAN = [
    ("sst2", "zero_shot", [0], 0),
    ("sst2", "quzo_int4_norms", [0, 1, 2], 600),
    ("sst2", "mezo_norms", [0, 1, 2], 600),
    ("sst2", "quzo_int4_norms_one_rounding", [0, 1, 2], 600),
    ("sst2", "quzo_int4_norms_signs", [0], 600),
    ("sst2", "ft_full", [0], 300),
    ("sst2", "quzo_int4_loretta_rep", [0], 300),
    ("sst2", "lora", [0], 200),
    ("sst2", "loretta_rep", [0], 200),
    ("sst2", "loretta_adp", [0], 200),
    ("sst2", "quzo_nf4_lora", [0], 300),
    ("sst2", "mezo", [0], 100),
    ("sst2", "quzo_int4", [0], 100),
    ("sst2", "quzo_int4_nearest", [0], 100),
    ("sst2", "quzo_int4_one_rounding", [0], 100),
    ("sst2", "quzo_int8", [0], 100),
    ("sst2", "quzo_fp8_e4m3", [0], 100),
    *[(task, "zero_shot", [0], 0) for task in ("copa", "cb", "boolq", "squad")],
    # Where the QuZO rows over the int4 base start: its untrained test figure, the baseline of their gains.
    *[(task, "zero_shot_int4", [0], 0) for task in ("sst2", "copa", "cb", "boolq")],
    # COPA at the recipe's 600 steps (300 examples); CB (150 examples) and BoolQ (passages of ~200 tokens, 4x an SST-2
    # step here) at 300.
    ("copa", "quzo_int4_norms", [0], 600),
    *[(task, "quzo_int4_norms", [0], 300) for task in ("cb", "boolq")],
    *[(task, "lora", [0], 300) for task in ("copa", "cb", "boolq")],
    ("squad", "lora", [0], 200),
    # COPA (short rows, 300 examples: the cheapest task here) across the remaining families: LoRETTA beside LoRA at
    # LoRA's 300 steps, MeZO beside QuZO on the norms at QuZO's 600, first-order full and QuZO over LoRETTA_rep at
    # 300.
    *[("copa", row, [0], 300) for row in ("loretta_rep", "loretta_adp")],
    ("copa", "mezo_norms", [0], 600),
    *[("copa", row, [0], 300) for row in ("ft_full", "quzo_int4_loretta_rep")],
    # First-order full fine-tuning's seed spread, against the 88% target (seed 0 above).
    ("sst2", "ft_full", [1, 2], 300),
    # The Instruct model's chat format for the SST-2 prompt instead of MeZO's template (data.template): its untrained
    # score and first-order full fine-tuning on three seeds, the same data, steps and rate as ft_full.
    ("sst2", "zero_shot_chat", [0], 0),
    ("sst2", "ft_full_chat", [0, 1, 2], 300),
    # QuZO's best row (the norms over the int4 base) from the chat-format prompt: its base and three seeds.
    ("sst2", "zero_shot_int4_chat", [0], 0),
    ("sst2", "quzo_int4_norms_chat", [0, 1, 2], 600),
]
EVAL_EVERY = 100


def run_dir(task: str, row: str, seed: int) -> Path:
    return ROOT / task / row / f"seed{seed}"


def recipe_for(task: str, row: str, seed: int, steps: int) -> dict:
    recipe = yaml.safe_load((RECIPES / f"{row}.yaml").read_text())
    data = {**recipe.get("data", {}), **TASKS[task]["data"], "data_seed": 0}
    if TASKS[task].get("test_rows"):
        data["dev_file"] = str(smollm2_test_subset(task, ROOT))
    recipe["data"] = data
    recipe.setdefault("train", {}).update(seed=seed, output_dir=str(run_dir(task, row, seed)), log_every=25,
                                          eval_every=EVAL_EVERY, save_every=0, keep_last=1, eval_batch_size=32,
                                          **({"max_steps": steps} if steps else {}))
    recipe["description"] = f"study-smollm2: {LABELS[row]}, {task}, seed {seed}"
    return recipe


def run(task: str, row: str, seed: int, steps: int, threads: int) -> dict | None:
    """Train (or, for zero-shot, evaluate) one (task, row, seed) unless done; its summary."""
    out = run_dir(task, row, seed)
    untrained = row.startswith("zero_shot")
    summary = out / ("zero_shot.json" if untrained else "summary.json")
    if summary.is_file():
        finished = json.loads(summary.read_text())
        if untrained or finished.get("steps", 0) >= steps:
            return finished
        # A shorter run of this row (the plan's budget grew): continue it. Resuming is exact and train.max_steps does
        # not change the computation, so the result is the run the longer plan would have made from scratch.
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out.parent / f"seed{seed}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(task, row, seed, steps), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    overrides = [f"train.threads={threads}"]
    if untrained:
        command = [sys.executable, "-m", "ftkit", "eval", str(recipe_path), *overrides, "--split", "test", "--json"]
    else:
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        command = [sys.executable, "-m", "ftkit", "train", str(recipe_path), *overrides, *resume]
    print(f"[{datetime.now():%H:%M:%S}] {task} / {row} / seed {seed}", flush=True)
    with open(out.parent / f"seed{seed}.log", "a") as log:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE if untrained else log,
                              stderr=log, env=env, text=True)
    if done.returncode != 0:
        print(f"  failed (status {done.returncode}): {out.parent / f'seed{seed}.log'}", flush=True)
        return None
    if untrained:
        summary.write_text(json.dumps(json.loads(done.stdout.strip().splitlines()[-1]), indent=2))
    return json.loads(summary.read_text())


def test_metric(task: str, summary: dict) -> float | None:
    figures = summary.get("test", summary) if "test" in summary or "n" in summary else None
    return 100 * figures[TASKS[task]["metric"]] if figures and TASKS[task]["metric"] in figures else None


def results() -> dict:
    """(task, row) -> list of finished summaries, across seeds."""
    found = {}
    for task in TASKS:
        for row, _ in ROWS:
            for path in sorted((ROOT / task / row).glob("seed*/summary.json")) + sorted(
                    (ROOT / task / row).glob("seed*/zero_shot.json")):
                found.setdefault((task, row), []).append(json.loads(path.read_text()))
    return found


def trainable(found: dict, row: str) -> str:
    counts = {s.get("trainable_params") for runs in (v for (t, r), v in found.items() if r == row) for s in runs}
    counts.discard(None)
    return f"{counts.pop():,}" if len(counts) == 1 else ("0" if row.startswith("zero_shot") else "")


def main_table(found: dict) -> str:
    """Rows methods x formats, columns tasks: test metric, mean +- std over seeds (their count), steps."""
    lines = ["| method | trainable | " + " | ".join(f"{t} test {TASKS[t]['metric']}" for t in TASKS) + " |",
             "| --- | ---: |" + " ---: |" * len(TASKS)]
    for row, label in ROWS:
        cells = []
        for task in TASKS:
            values = [v for v in (test_metric(task, s) for s in found.get((task, row), [])) if v is not None]
            steps = {s.get("steps") for s in found.get((task, row), [])} - {None}
            if not values:
                cells.append("")
                continue
            spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            budget = f", {steps.pop()} steps" if len(steps) == 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread} ({len(values)}{budget})")
        lines.append(f"| {label} | {trainable(found, row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sst2_detail(found: dict) -> str:
    """SST-2 per run: dev at each evaluation, test, time per step, memory."""
    lines = ["| method | seed | steps | dev accuracy by step | best dev | test acc | test macro-F1 | s/step | "
             "peak RSS MiB |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row, label in ROWS:
        for path in sorted((ROOT / "sst2" / row).glob("seed*/summary.json")):
            summary = json.loads(path.read_text())
            events = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
            curve = ", ".join(f"{e['step']}: {100 * e['accuracy']:.1f}" for e in events if e["split"] == "dev")
            test = summary.get("test", {})
            lines.append(f"| {label} | {path.parent.name[4:]} | {summary['steps']} | {curve} | "
                         f"{100 * (summary.get('best_dev') or 0):.1f} | {100 * test.get('accuracy', 0):.1f} | "
                         f"{100 * test.get('macro_f1', 0):.1f} | {summary['seconds_per_step'] or 0:.2f} | "
                         f"{summary['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def figure(found: dict, out: Path, title: str) -> bool:
    """SST-2 dev accuracy against step, mean of each row's seeds (a band of +-1 std where there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftkit.plot import save_png

    curves = {}
    for row, label in ROWS:
        runs = sorted((ROOT / "sst2" / row).glob("seed*/summary.json"))
        per_seed = [{e["step"]: 100 * e["accuracy"] for e in map(json.loads, (p.parent / "metrics.jsonl").read_text()
                     .splitlines()) if e["split"] == "dev"} for p in runs]
        if per_seed:
            steps = sorted(set.intersection(*(set(c) for c in per_seed)))
            curves[label] = (steps, [[c[s] for c in per_seed] for s in steps])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(11, 6))
    for label, (steps, values) in curves.items():
        mean = [statistics.mean(v) for v in values]
        style = "--" if label.startswith("FO") else "-"
        ax.plot(steps, mean, style, marker="o", markersize=3, label=f"{label} ({len(values[0])})")
        if len(values[0]) > 1:
            spread = [statistics.stdev(v) for v in values]
            ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            alpha=0.15)
    ax.set(xlabel="step (batch 16)", ylabel="SST-2 dev accuracy, % (500 held-out training sentences)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_png(fig, out)
    return True


def report(command: str) -> None:
    found = results()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    body = (f"_`{command}`, {stamp}; SmolLM2-135M-Instruct from its Q4_1 GGUF file (4-bit weights expanded to "
            f"float, not the original bf16 checkpoint); test = the task's validation file (BoolQ: its first "
            f"{TASKS['boolq']['test_rows']} rows, SQuAD: first {TASKS['squad']['test_rows']}), on the best dev "
            f"checkpoint; 1 thread per run, 2 runs at a time on 2 cores._\n\n" + main_table(found) +
            "\n\nSST-2, each run:\n\n" + sst2_detail(found))
    if figure(found, REPO / "docs" / "study_smollm2_sst2.png", f"SmolLM2-135M, SST-2: {command} ({stamp})"):
        body += "\n\n![SST-2 dev accuracy against step](docs/study_smollm2_sst2.png)"
    write_section(REPO / "BENCHMARKS.md", "study-smollm2", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (their threads share the cores)")
    parser.add_argument("--report", action="store_true", help="write the tables from the runs there are")
    parser.add_argument("--tasks", help=f"comma-separated subset of {', '.join(TASKS)}")
    parser.add_argument("--rows", help="comma-separated recipe names of recipes/smollm2 to run")
    parser.add_argument("--threads", type=int, help="threads per run (default: the cores shared by the jobs)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    command = "python scripts/study_smollm2.py " + " ".join(sys.argv[1:])
    use_shared_data()
    if not args.report:
        tasks = set(args.tasks.split(",")) if args.tasks else set(TASKS)
        rows = set(args.rows.split(",")) if args.rows else {r for r, _ in ROWS}
        unknown = (tasks - set(TASKS)) | (rows - {r for r, _ in ROWS})
        if unknown:
            parser.error(f"unknown task or row {sorted(unknown)[0]!r}")
        jobs = [(t, r, s, n) for t, r, seeds, n in PLAN if t in tasks and r in rows for s in seeds]
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            for finished in pool.map(lambda job: run(*job, threads), jobs):
                if finished is not None:
                    report(command)
    report(command)


if __name__ == "__main__":
    main()
