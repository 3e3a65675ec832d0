"""The zeroth-order estimator race: dev accuracy against forward passes (not steps) for each estimator x trainable set
on SmolLM2-135M-Instruct over its int4 g64 base, SST-2 in the model's chat prompt and CB, at equal forward budgets.

    python scripts/zo_race.py --list                   # the cells, and which ones this ftkit can run
    python scripts/zo_race.py --phase 1                # the screen: every cell, one seed, one forward budget
    python scripts/zo_race.py --phase 2                # the screen's leaders (and the reference) on three seeds
    python scripts/zo_race.py --report                 # table (BENCHMARKS.md) and figure from the results there are

A cell is a named set of recipe overrides on a recipe of recipes/smollm2/. Every cell's recipe is validated before
anything trains: a cell whose keys this ftkit does not know (an estimator not merged yet) is skipped with the
validation's one line, so the race runs with the estimators there are and takes in new ones by adding their cells.

Forward passes: a step of a cell costs the same number of forwards every time, which the cell declares: 2 x
n_queries for central differences, n_queries + 1 for the one-sided estimate, 3 forward-equivalents for a first-order
step (forward and backward). The running total ftkit logs ("forwards" in metrics.jsonl's train events) is not
summed: a run resumed from a checkpoint of an ftkit that did not count restarts it. Evaluations are not counted
(they cost every cell the same).

Each run is `ftkit train --resume auto` in RUNS/<task>/<cell>/seed<k>/, so an interrupted race continues where it
stopped; a constant-rate cell's larger budget continues its screen run (resuming is exact, and the rate does not
depend on train.max_steps). Each finished run appends a record to RESULTS/results.jsonl: timestamps, forwards, steps,
step time, peak RSS, the dev curve against forwards and the test figures. --report reads only those records.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from _common import REPO, SMOLLM2_TASKS, smollm2_test_subset, use_shared_data, write_section

RECIPES = REPO / "recipes" / "smollm2"
RUNS = REPO / "runs" / "zo_race"
RESULTS = REPO / "docs" / "study" / "zo_race"
FIGURE = REPO / "docs" / "study_zo_race.png"
TASKS = ("sst2", "cb")
TARGET = 79.2  # SST-2 test, QuZO on the norms over the int4 base at 1,200 steps (2,400 forwards), chat prompt
TARGET_FORWARDS = 2400
APPEND = threading.Lock()  # runs side by side (--jobs) append to one results file


@dataclass(frozen=True)
class Cell:
    """One row of the race: `overrides` (nested, merged into recipes/smollm2/<base>.yaml) make its recipe."""

    name: str
    estimator: str
    trained: str
    base: str
    overrides: dict = field(default_factory=dict)
    forwards_per_step: int = 2  # what one step costs (the module's docstring)
    paper: str = ""  # a key of CLAIMS
    steps: int | None = None  # fixed steps instead of the budget's (the first-order reference)
    eval_forwards: int | None = None  # dev every this many forwards instead of the phase's
    reference: bool = False  # runs in every phase, not ranked among the leaders


def zo(lr: float | None = None, freeze: list | None = None, **options) -> dict:
    """Overrides of `method.zo` (and the rate, and what is frozen)."""
    method = {"zo": options} if options else {}
    if freeze is not None:
        method["freeze"] = freeze
    return {"method": method, **({"train": {"lr": lr}} if lr is not None else {})}


NORMS, LORETTA = "quzo_int4_norms_chat", "quzo_int4_loretta_rep"
# The race's SST-2 prompt, pinned: the chat recipes now render theirs through the tokenizer's chat template, which
# adds SmolLM2's default system message; every cell of the race reads this one.
SST2_CHAT_TEMPLATE = ("<|im_start|>user\nIs the sentiment of this movie review positive or negative?\n{sentence}"
                      "<|im_end|>\n<|im_start|>assistant\n")
CODES = {"freeze": [], "lr": 1e-6}  # every int4 weight (and the norms) at quzo_int4.yaml's rate
SCALES = {"freeze": [], "lr": 1e-6, "low_bit": "scales", "clip_gradient": 100.0}  # starting points: tune on merge
ONE_SIDED = {"estimator": "one_sided", "n_queries": 8}  # 8 signs + the unperturbed loss: 9 forwards
STE = {"quant": {"format": "int4", "engine": "straight_through", "group_size": 64},
       "train": {"schedule": "linear", "warmup_steps": 20}}
CELLS = [
    Cell("norms-gauss", "QuZO, Gaussian, central", "norm scales", NORMS, paper="QuZO"),
    Cell("norms-signs", "QuZO, random signs, central", "norm scales", NORMS, zo(direction="rademacher"), paper="SPSA"),
    Cell("norms-gauss-q4", "QuZO, Gaussian, 4 queries", "norm scales", NORMS, zo(n_queries=4), 8, paper="QuZO"),
    Cell("codes-signs", "QuZO, random signs, central", "int4 codes", NORMS, zo(direction="rademacher", **CODES),
         paper="QuZO"),
    Cell("codes-gauss", "QuZO, Gaussian, central", "int4 codes", NORMS, zo(**CODES), paper="QuZO"),
    Cell("loretta-gauss", "QuZO, Gaussian, central", "LoRETTA_rep over int4", LORETTA, paper="LoRETTA"),
    Cell("fo-ste", "first-order AdamW, straight-through", "all int4 weights", "ft_full_chat", STE, 3, "STE",
         steps=150, eval_forwards=75, reference=True),
    # Estimators on their way (skipped, with the validation's line, until this ftkit knows their keys).
    Cell("codes-lowrank", "QuZO, low-rank r 4, refresh 50", "int4 codes", NORMS,
         zo(direction="lowrank", rank=4, refresh=50, **CODES), paper="LOZO"),
    Cell("scales-signs", "QuZO, random signs, central, clipped", "int4 scales", NORMS,
         zo(direction="rademacher", **SCALES), paper="QZO"),
    Cell("scales-gauss", "QuZO, Gaussian, central, clipped", "int4 scales", NORMS, zo(**SCALES), paper="QZO"),
    # a low-rank kind leaves the scales full Gaussian directions (few numbers), so scales-lowrank would be this cell
    Cell("scales-gauss-hi", "QuZO, Gaussian, central, clipped, lr 1e-5", "int4 scales", NORMS,
         zo(**{**SCALES, "lr": 1e-5}), paper="QZO"),
    # the norms at three times their rate, for the target of 79.2% in a third of its 2,400 forwards
    Cell("norms-gauss-3x", "QuZO, Gaussian, central, lr 1.5e-4", "norm scales", NORMS, zo(lr=1.5e-4), paper="QuZO"),
    # rate screens where the screen's first rates were not chosen for the trained set: the scales learn faster at
    # 1e-5 than at 1e-6 (dev 70.2% against 66.4% at 400 forwards); the codes drift at 1e-6
    Cell("scales-gauss-3e5", "QuZO, Gaussian, central, clipped, lr 3e-5", "int4 scales", NORMS,
         zo(**{**SCALES, "lr": 3e-5}), paper="QZO"),
    Cell("codes-signs-2e7", "QuZO, random signs, central, lr 2e-7", "int4 codes", NORMS,
         zo(direction="rademacher", **{**CODES, "lr": 2e-7}), paper="QuZO"),
    Cell("norms-fzoo", "one-sided, 8 random signs", "norm scales", NORMS,
         zo(direction="rademacher", **ONE_SIDED), 9, paper="FZOO"),
    Cell("norms-fzoo-m", "one-sided, 8 random signs, momentum 0.9", "norm scales", NORMS,
         zo(direction="rademacher", momentum=0.9, **ONE_SIDED), 9, paper="FZOO"),
    Cell("norms-signs-m", "QuZO, random signs, central, momentum 0.9", "norm scales", NORMS,
         zo(direction="rademacher", momentum=0.9), paper="ZO-AdaMU"),
    # momentum 0.9 sums up to ten steps into one: at a tenth of the rate its steady step is the plain cell's
    Cell("norms-signs-m-lo", "QuZO, random signs, central, momentum 0.9, lr / 10", "norm scales", NORMS,
         zo(lr=5e-6, direction="rademacher", momentum=0.9), paper="ZO-AdaMU"),
    Cell("codes-fzoo", "one-sided, 8 random signs", "int4 codes", NORMS,
         zo(direction="rademacher", **ONE_SIDED, **CODES), 9, paper="FZOO"),
]
BY_NAME = {c.name: c for c in CELLS}
# What each method's paper claims (/work/shared/reference/zo_estimators.md, quzo.md, loretta.md; the authors'
# figures, on their models), shown beside what the race measured.
CLAIMS = {
    "QuZO": "QuZO: INT4 accuracy above first-order training of the quantized model; 2.94-5.47x less memory than "
            "quantized first-order (LLaMA-2-7B)",
    "SPSA": "SPSA: random-sign directions are unbiased with lower variance than Gaussian ones",
    "LoRETTA": "LoRETTA: matches LoRA with far fewer parameters (first-order; zeroth-order LoRETTA not claimed)",
    "LOZO": "LOZO: closer to first-order than MeZO at the same forward budget (OPT, LLaMA; SuperGLUE)",
    "QZO": "QZO: >18x less memory than bf16 fine-tuning; Llama-2-13B in 24 GB",
    "FZOO": "FZOO: about 3x fewer forwards than MeZO for the same accuracy, +3 points (18x on RoBERTa-large)",
    "ZO-AdaMU": "ZO-AdaMU / LOZO-M: momentum on the zeroth-order estimate speeds convergence over MeZO",
    "STE": "the line to beat: 83.9% SST-2 test in 150 steps, MeZO's template (2.1 s a step, 4.4 GB)",
}


@dataclass(frozen=True)
class Phase:
    forwards: int  # the training budget of every cell, in forward passes
    seeds: tuple[int, ...]
    eval_forwards: int  # dev every this many forwards


# The screen at 1,200 forwards: half the 2,400 of the target row, past the third (800) that the target allows, and
# about 30 min a cell on one thread for the norms. Phase 2: the target row's 2,400 forwards on three seeds.
PHASES = {1: Phase(1200, (0,), 200), 2: Phase(2400, (0, 1, 2), 200)}


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def task_data(task: str, runs: Path) -> dict:
    """The task's data section: SST-2 in the hand-written chat prompt the race started with (no system turn); other
    tasks' own prompts."""
    data = {**SMOLLM2_TASKS[task]["data"], "data_seed": 0}
    if task == "sst2":
        data.update(template=SST2_CHAT_TEMPLATE, label_words={0: "negative", 1: "positive"})
    if SMOLLM2_TASKS[task].get("test_rows"):
        data["dev_file"] = str(smollm2_test_subset(task, runs))
    return data


def steps_for(cell: Cell, forwards: int) -> int:
    return cell.steps or max(1, forwards // cell.forwards_per_step)


def run_dir(runs: Path, task: str, cell: Cell, seed: int, forwards: int) -> Path:
    """Constant-rate cells keep one directory per seed (a larger budget continues the run); others one per budget."""
    recipe = merge(yaml.safe_load((RECIPES / f"{cell.base}.yaml").read_text()), cell.overrides)
    constant = recipe.get("train", {}).get("schedule") == "constant"
    return runs / task / cell.name / (f"seed{seed}" if constant or cell.steps else f"seed{seed}-f{forwards}")


def cell_recipe(cell: Cell, task: str, seed: int, forwards: int, out: Path, eval_forwards: int, runs: Path) -> dict:
    recipe = yaml.safe_load((RECIPES / f"{cell.base}.yaml").read_text())
    recipe["data"] = task_data(task, runs)
    recipe = merge(recipe, cell.overrides)
    every = max(1, (cell.eval_forwards or eval_forwards) // cell.forwards_per_step)
    recipe["train"].update(seed=seed, output_dir=str(out), max_steps=steps_for(cell, forwards), eval_every=every,
                           log_every=25, save_every=every, keep_last=1, eval_batch_size=32)
    recipe["description"] = f"zo_race: {cell.name} ({cell.estimator}; {cell.trained}), {task}, seed {seed}"
    return recipe


def validate(cell: Cell, task: str, runs: Path) -> str | None:
    """None if this ftkit accepts the cell's recipe, else the validation's one line (which names the key)."""
    from ftkit.errors import RecipeError
    from ftkit.recipe import recipe_from_dict
    from ftkit.recipe.load import check_recipe

    try:
        check_recipe(recipe_from_dict(cell_recipe(cell, task, 0, 1200, Path("."), 200, runs), cell.name), cell.name)
    except RecipeError as error:  # "<cell>: <key>: <what>": the cell is named beside it
        return str(error).splitlines()[0].removeprefix(f"{cell.name}: ").split(" (valid keys")[0]
    return None


# --- records -----------------------------------------------------------------------------------------------


def load_records(results: Path) -> list[dict]:
    path = results / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def find(records: list[dict], task: str, cell: str, seed: int, forwards: int) -> dict | None:
    return next((r for r in records if (r["task"], r["cell"], r["seed"], r["budget"]) == (task, cell, seed, forwards)
                 ), None)


def forwards_curve(events: list[dict], per_step: int, metric: str) -> tuple[list[list[float]], int]:
    """Dev [forwards, step, metric %, seconds since the start] at each evaluation, and the forwards of the whole
    run: `per_step` a step (see the module's docstring)."""
    done, total, curve = 0, 0, []
    for event in events:
        if event["split"] == "train":
            total += per_step * (event["step"] - done)
            done = event["step"]
        elif event["split"] == "dev" and metric in event:
            curve.append([total + per_step * (event["step"] - done), event["step"], round(100 * event[metric], 2),
                          round(event.get("elapsed", 0.0), 1)])
    return curve, total


def make_record(cell: Cell, task: str, seed: int, phase: int, budget: int, out: Path, started: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metric = SMOLLM2_TASKS[task]["metric"]
    curve, forwards = forwards_curve(events, cell.forwards_per_step, metric)
    test = summary.get("test") or {}
    return {
        "task": task, "cell": cell.name, "estimator": cell.estimator, "trained": cell.trained, "seed": seed,
        "phase": phase, "budget": budget, "steps": summary["steps"], "forwards": forwards,
        "forward_unit": "forward+backward = 3" if cell.forwards_per_step == 3 and cell.reference else "forward",
        "metric": metric, "dev_curve": curve, "best_dev": round(100 * (summary.get("best_dev") or 0), 2),
        "best_step": summary.get("best_step"), "test": {k: round(100 * v, 2) for k, v in test.items()
                                                         if k in ("accuracy", "macro_f1", "f1")},
        "trainable_params": summary.get("trainable_params"), "seconds_per_step": summary.get("seconds_per_step"),
        "wall_seconds": summary.get("wall_seconds"), "peak_rss_mb": summary.get("peak_rss_mb"),
        "elapsed_seconds": max((e.get("elapsed", 0.0) for e in events), default=0.0),  # across resumes
        "threads": (summary.get("environment") or {}).get("threads"), "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_dir": str(out),
    }


def train_cell(cell: Cell, task: str, seed: int, phase: int, ctx: argparse.Namespace) -> dict | None:
    """Train (or continue) one run unless its record exists; its record, appended to the results."""
    budget = ctx.forwards or PHASES[phase].forwards
    if cell.steps:
        budget = cell.steps * cell.forwards_per_step
    done = find(load_records(ctx.results), task, cell.name, seed, budget)
    if done:
        return done
    out = run_dir(ctx.runs, task, cell, seed, budget)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out.parent / f"{out.name}.yaml"
    recipe = cell_recipe(cell, task, seed, budget, out, ctx.eval_forwards or PHASES[phase].eval_forwards, ctx.runs)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary = out / "summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["steps"] >= recipe["train"]["max_steps"]):
        command = [sys.executable, "-m", "ftkit", "train", str(recipe_path), f"train.threads={ctx.threads}",
                   "--resume", "auto"]
        env = {**os.environ, "OMP_NUM_THREADS": str(ctx.threads)}
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        print(f"[{datetime.now():%H:%M:%S}] {task} / {cell.name} / seed {seed}: {budget:,} forwards, "
              f"{recipe['train']['max_steps']} steps -> {out}", flush=True)
        with open(out.parent / f"{out.name}.log", "a") as log:
            status = subprocess.run(command, cwd=REPO, stdout=log, stderr=log, env=env).returncode
        if status != 0:
            print(f"  failed (status {status}): {out.parent / f'{out.name}.log'}", flush=True)
            return None
    else:
        started = datetime.fromtimestamp(summary.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    record = make_record(cell, task, seed, phase, budget, out, started)
    with APPEND:
        ctx.results.mkdir(parents=True, exist_ok=True)
        with open(ctx.results / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"  dev {record['best_dev']} (best), test {record['test']}, {record['forwards']:,} forwards, "
          f"{record['elapsed_seconds'] / 60:.1f} min", flush=True)
    return record


# --- the plan ----------------------------------------------------------------------------------------------


def leaders(records: list[dict], task: str, count: int, forwards: int) -> list[str]:
    """The screen's best zeroth-order cells on `task`: highest best dev accuracy within `forwards`."""
    scores = {}
    for r in records:
        cell = BY_NAME.get(r["cell"])
        if r["task"] == task and r["phase"] == 1 and cell and not cell.reference:
            within = [point[2] for point in r["dev_curve"] if point[0] <= forwards]
            scores[r["cell"]] = max(scores.get(r["cell"], 0.0), max(within, default=0.0))
    return sorted(scores, key=lambda name: -scores[name])[:count]


def plan(phase: int, tasks: list[str], cells: list[Cell], records: list[dict], count: int,
         seeds: tuple[int, ...] | None = None) -> list[tuple]:
    """(cell, task, seed) in order: phase 1 every cell on seed 0; phase 2 the leaders and the reference."""
    jobs, seeds = [], seeds or PHASES[phase].seeds
    for task in tasks:
        chosen = cells
        if phase == 2:
            top = set(leaders(records, task, count, PHASES[1].forwards))
            chosen = [c for c in cells if c.name in top or c.reference]
        jobs += [(cell, task, seed) for cell in chosen for seed in seeds]
    return jobs


def runnable(cells: list[Cell], tasks: list[str], runs: Path) -> tuple[list[Cell], dict]:
    """The cells this ftkit accepts on every task, and why the others are skipped."""
    skipped = {}
    for cell in cells:
        for task in tasks:
            problem = validate(cell, task, runs)
            if problem:
                skipped[cell.name] = problem
                break
    return [c for c in cells if c.name not in skipped], skipped


# --- the report --------------------------------------------------------------------------------------------


def column_runs(records: list[dict], cell: str, task: str, phase: int) -> list[dict]:
    """A cell's runs in one column: the phase's largest budget, one run per seed (the latest)."""
    mine = [r for r in records if (r["cell"], r["task"], r["phase"]) == (cell, task, phase)]
    budget = max((r["budget"] for r in mine), default=None)
    return list({r["seed"]: r for r in mine if r["budget"] == budget}.values())


def column_budget(records: list[dict], task: str, phase: int) -> int:
    """The budget most of a column's runs trained for (a task may run at its own, `--forwards`)."""
    budgets = [r["budget"] for r in records
               if (r["task"], r["phase"]) == (task, phase) and not BY_NAME[r["cell"]].steps]
    return statistics.mode(budgets) if budgets else PHASES[phase].forwards


def test_value(record: dict) -> float | None:
    return record["test"].get(record["metric"])


def mean_spread(runs: list[dict], budget: int) -> str:
    """Test metric, mean +- std over seeds (their count; the budget where it is not the column's)."""
    values = [v for v in map(test_value, runs) if v is not None]
    if not values:
        return ""
    spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    own = f", {runs[0]['budget']:,} F" if runs[0]["budget"] != budget else ""
    return f"{statistics.mean(values):.1f}{spread} ({len(values)}{own})"


def forwards_to(record: dict, target: float) -> int | None:
    """Forwards at the first dev evaluation at or above `target` (dev: 500 held-out training sentences)."""
    return next((int(point[0]) for point in record["dev_curve"] if point[2] >= target), None)


def reach(runs: list[dict]) -> str:
    """SST-2 forwards to the target on dev, per run that reached it, and how many runs did."""
    if not runs:
        return ""
    reached = sorted(f for f in (forwards_to(r, TARGET) for r in runs) if f is not None)
    if not reached:
        return f"not in {max(r['forwards'] for r in runs):,}"
    return f"{', '.join(f'{f:,}' for f in reached)} ({len(reached)}/{len(runs)} runs)"


def table(records: list[dict]) -> str:
    """Rows estimator x trained set, columns task x phase (test, mean +- std over seeds), then the costs."""
    columns = sorted({(r["task"], r["phase"]) for r in records}, key=lambda c: (TASKS.index(c[0]), c[1]))
    budgets = {column: column_budget(records, *column) for column in columns}
    head = [f"{t} test {SMOLLM2_TASKS[t]['metric']}, {budgets[t, p]:,} F" for t, p in columns]
    lines = ["| estimator | trained set | trainable | " + " | ".join(head) + " | SST-2 forwards to dev >= "
             f"{TARGET} | min per run | s/step | peak RSS GB | paper claims |",
             "| --- | --- | ---: |" + " ---: |" * (len(columns) + 4) + " --- |"]
    for cell in CELLS:
        mine = [r for r in records if r["cell"] == cell.name]
        if not mine:
            continue
        texts = [mean_spread(column_runs(records, cell.name, t, p), budgets[t, p]) for t, p in columns]
        longest = [r for r in mine if r["budget"] == max(r["budget"] for r in mine)]  # the costs of the largest
        minutes = statistics.mean((r.get("elapsed_seconds") or r.get("wall_seconds") or 0) / 60 for r in longest)
        step = statistics.mean(seconds_per_step(r) for r in longest)
        peak = max(r["peak_rss_mb"] or 0 for r in mine) / 1024
        trainable = f"{mine[0]['trainable_params']:,}" if mine[0].get("trainable_params") else ""
        sst2 = [r for r in longest if r["task"] == "sst2"]
        lines.append(f"| {cell.estimator} | {cell.trained} | {trainable} | " + " | ".join(texts) +
                     f" | {reach(sst2)} | {minutes:.0f} | {step:.2f} | {peak:.1f} | {CLAIMS.get(cell.paper, '')} |")
    return "\n".join(lines)


def seconds_per_step(record: dict) -> float:
    """The run's own figure, or its elapsed time over its steps where the last session only evaluated (a resume
    that found training done writes none)."""
    return record.get("seconds_per_step") or (record.get("elapsed_seconds") or 0.0) / (record.get("steps") or 1)


def mean_curve(runs: list[dict], x: int) -> tuple[list[float], list[float]]:
    """The seeds' mean dev metric at the points they all evaluated, against forwards (x 0) or minutes (x 3; the
    first seed's)."""
    curves = [{point[0]: point for point in r["dev_curve"]} for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    xs = [curves[0][f][x] / (60 if x == 3 else 1) if len(curves[0][f]) > x else 0.0 for f in common]
    return xs, [statistics.mean(c[f][2] for c in curves) for f in common]


def figure(records: list[dict], out: Path, title: str) -> bool:
    """Dev metric against forward passes (top) and minutes (bottom), a column per task: each cell's longest runs,
    mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftkit.plot import save_png

    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    if not tasks:
        return False
    fig, axes = plt.subplots(2, len(tasks), figsize=(8 * len(tasks), 10), squeeze=False)
    for column, task in enumerate(tasks):
        for cell in CELLS:
            runs = [r for r in records if r["task"] == task and r["cell"] == cell.name]
            if not runs:
                continue
            longest = [r for r in runs if r["budget"] == max(r["budget"] for r in runs)]
            for row, x in enumerate((0, 3)):
                axes[row][column].plot(*mean_curve(longest, x), "--" if cell.reference else "-", marker="o",
                                       markersize=3, label=f"{cell.estimator}; {cell.trained} ({len(longest)})")
        metric = SMOLLM2_TASKS[task]["metric"]
        for ax, xlabel in zip((axes[0][column], axes[1][column]), ("forward passes (first-order: 3 per step)",
                                                                   "minutes (1 thread, shared machine)")):
            if task == "sst2":
                ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle=":")
            ax.set(xlabel=xlabel, ylabel=f"{task} dev {metric}, %", title=task)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        if task == "sst2":
            axes[0][column].axvline(TARGET_FORWARDS / 3, color="grey", linewidth=0.8, linestyle=":")
    fig.suptitle(title)
    save_png(fig, out)
    return True


def eval_intervals(records: list[dict]) -> str:
    """How often each task's zeroth-order runs evaluated dev, in forwards, as their curves show (e.g. "200 F on
    sst2, 100 F on cb")."""
    gaps = {}
    for r in records:
        if not BY_NAME[r["cell"]].reference and len(r["dev_curve"]) > 1:
            gaps.setdefault(r["task"], set()).add(int(r["dev_curve"][1][0] - r["dev_curve"][0][0]))
    return ", ".join(f"{'/'.join(f'{g:,}' for g in sorted(found))} F on {task}" for task, found in gaps.items())


def report(records: list[dict], skipped: dict, command: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    body = (f"_`{command}`, {stamp}; SmolLM2-135M-Instruct over its int4 g64 base, SST-2 in the chat prompt (MeZO's "
            f"1,000 / 500 draw; test: the 872 validation sentences on the best dev checkpoint), CB in its own "
            f"prompt (150 training examples, 100 held out for dev, test: the 56 validation examples, macro-F1). F: "
            f"training forward passes (2 per query and step for central estimates, a method's own count where it "
            f"logs one, 3 forward-equivalents per first-order step); dev every {eval_intervals(records)} (the "
            f"first-order line: every 25 steps, 75 F); s/step and minutes include the evaluations. One thread a run "
            f"on a shared 2-core machine: minutes and s/step rank rows within this table only._\n\n" + table(records))
    if skipped:
        body += "\n\nCells not run (this ftkit does not accept their recipes yet):\n\n" + "\n".join(
            f"- `{name}`: {problem}" for name, problem in skipped.items())
    if figure(records, FIGURE, f"SmolLM2-135M int4, zeroth-order race ({stamp})"):
        body += f"\n\n![dev accuracy against forward passes]({FIGURE.relative_to(REPO)})"
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=int, choices=sorted(PHASES), default=1)
    parser.add_argument("--tasks", default="sst2", help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--cells", help="comma-separated cell names (default: every cell this ftkit accepts)")
    parser.add_argument("--forwards", type=int, help="the phase's forward budget instead of its default")
    parser.add_argument("--eval-forwards", type=int, help="dev every this many forwards instead of the phase's")
    parser.add_argument("--leaders", type=int, default=2, help="phase 2: how many of the screen's best cells")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the phase's")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (a resumed run keeps its count)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the run directories live")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where results.jsonl lives")
    parser.add_argument("--report", action="store_true", help="write the table and figure, train nothing")
    parser.add_argument("--list", action="store_true", help="the cells and whether this ftkit accepts them")
    args = parser.parse_args()
    use_shared_data()
    tasks = args.tasks.split(",")
    names = args.cells.split(",") if args.cells else list(BY_NAME)
    unknown = [n for n in tasks if n not in TASKS] + [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown task or cell {unknown[0]!r}")
    cells, skipped = runnable([BY_NAME[n] for n in names], tasks, args.runs)
    if args.list:
        for cell in CELLS:
            print(f"{cell.name:16} {cell.estimator}; {cell.trained}: {skipped.get(cell.name, 'ok')}")
        return
    for name, problem in skipped.items():
        print(f"skipped {name}: {problem}", flush=True)
    if not args.report:
        seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
        jobs = plan(args.phase, tasks, cells, load_records(args.results), args.leaders, seeds)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train_cell(*job, args.phase, args), jobs))
    records = load_records(args.results)
    if not args.report:
        print(table(records))
        return
    command = "python scripts/zo_race.py --report" + (f" --results {args.results}" if args.results != RESULTS else "")
    body = report(records, skipped, command)
    write_section(REPO / "BENCHMARKS.md", "zo-race", body)
    print(body)


if __name__ == "__main__":
    main()
