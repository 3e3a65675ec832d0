"""The papers' tables in miniature: every method and format on MiniLM + SST-2, same data and budget, several
seeds; writes the tables into BENCHMARKS.md, the figures under docs/, and every run's summary under docs/study/.

    python scripts/study.py --quick      # reduced grid: 1 seed, 100 steps, 8 runs (under 20 minutes here)
    python scripts/study.py              # full grid: 3 seeds, 200 steps (about two hours here)
    python scripts/study.py --report     # rewrite tables and figures from the runs there are, train nothing
    python scripts/study.py --sections memory   # run only some tables (all are written from what exists)
    python scripts/study.py --jobs 2     # two training runs at a time, the cores shared between them

Resumable: a run whose summary.json exists is skipped, a run with a checkpoint but no summary is resumed
(`ftkit train --resume auto`), so an interrupted study continues where it stopped. Runs live in runs/study-<mode>/.
Each run is a plain `ftkit train` of a recipe written next to it (runs/study-<mode>/<row>/seed<k>.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from _common import REPO, write_section

FO = {"optimizer": "adamw"}
FO_TRAIN = {"lr": 5e-5, "warmup_steps": 10, "weight_decay": 0.01}
# The adapters' settings of recipes/{lora,loretta_adp,loretta_rep}_sst2.yaml, so the counts match BENCHMARKS.md.
LORA = {"r": 8, "alpha": 16}
ADP = {"bottleneck": 64, "tensor_rank": 5, "train_norms": True}
REP = {"r": 8, "alpha": 16, "tensor_rank": 3}


@dataclass
class Row:
    name: str
    sections: dict = field(default_factory=dict)  # recipe sections over BASE

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


def quzo(fmt: str, lr: float = 1e-6, **zo) -> dict:
    return {"quant": {"format": fmt}, "method": {"optimizer": "quzo", "zo": zo}, "train": {"lr": lr}}


ROWS = {row.name: row for row in [
    Row("FO AdamW fp32", {"method": FO, "train": FO_TRAIN}),
    Row("FO straight-through int8", {"quant": {"format": "int8", "engine": "straight_through"}, "method": FO,
                                     "train": FO_TRAIN}),
    Row("FO straight-through int4", {"quant": {"format": "int4", "engine": "straight_through"}, "method": FO,
                                     "train": FO_TRAIN}),
    Row("MeZO fp32", {"method": {"optimizer": "mezo"}, "train": {"lr": 1e-6}}),
    Row("QuZO fp8_e4m3", quzo("fp8_e4m3")),
    Row("QuZO fp8_e5m2", quzo("fp8_e5m2")),
    Row("QuZO int8", quzo("int8")),
    Row("QuZO int4", quzo("int4")),
    Row("QuZO int4, one rounding for both", quzo("int4", independent_roundings=False)),
    Row("QuZO int4, nearest updates", quzo("int4", update_rounding="nearest")),
    Row("QuZO + LoRETTA_rep, int4 base", {"quant": {"format": "int4"}, "method": {
        "optimizer": "quzo", "adapter": "loretta_rep", "loretta": {**REP, "init": "identity"}}, "train": {"lr": 1e-2}}),
    Row("QuZO + LoRA, bitsandbytes nf4 base", {"quant": {"format": "int4", "engine": "bitsandbytes"}, "method": {
        "optimizer": "quzo", "adapter": "lora", "lora": LORA}, "train": {"lr": 1e-3}}),
    Row("FO LoRA", {"method": {**FO, "adapter": "lora", "lora": LORA}, "train": {**FO_TRAIN, "lr": 1e-3}}),
    Row("FO LoRETTA_adp", {"method": {**FO, "adapter": "loretta_adp", "loretta": ADP},
                           "train": {**FO_TRAIN, "lr": 2e-3}}),
    Row("FO LoRETTA_rep", {"method": {**FO, "adapter": "loretta_rep", "loretta": {**REP, "init": "paper"}},
                           "train": {**FO_TRAIN, "lr": 5e-3}}),
    Row("MeZO LoRA", {"method": {"optimizer": "mezo", "adapter": "lora", "lora": LORA}, "train": {"lr": 1e-3}}),
    Row("MeZO LoRETTA_adp", {"method": {"optimizer": "mezo", "adapter": "loretta_adp", "loretta": ADP},
                             "train": {"lr": 1e-3}}),
    Row("MeZO LoRETTA_rep", {"method": {"optimizer": "mezo", "adapter": "loretta_rep",
                                        "loretta": {**REP, "init": "identity"}}, "train": {"lr": 1e-2}}),
]}

TABLES = {
    "precision": ("Precision x method", ["FO AdamW fp32", "FO straight-through int8", "FO straight-through int4",
                                         "MeZO fp32", "QuZO fp8_e4m3", "QuZO fp8_e5m2", "QuZO int8", "QuZO int4",
                                         "QuZO int4, one rounding for both", "QuZO int4, nearest updates",
                                         "QuZO + LoRETTA_rep, int4 base", "QuZO + LoRA, bitsandbytes nf4 base"]),
    "efficiency": ("Parameter efficiency", ["FO AdamW fp32", "FO LoRA", "FO LoRETTA_adp", "FO LoRETTA_rep",
                                            "MeZO fp32", "MeZO LoRA", "MeZO LoRETTA_adp", "MeZO LoRETTA_rep"]),
}
QUICK = {"precision": ["FO AdamW fp32", "FO straight-through int4", "MeZO fp32", "QuZO int8", "QuZO int4",
                       "QuZO + LoRETTA_rep, int4 base"],
         "efficiency": ["FO AdamW fp32", "FO LoRA", "FO LoRETTA_rep"]}
MODES = {"quick": {"seeds": [0], "steps": 100, "eval_every": 50, "memory_shapes": ["OPT-125m"]},
         "full": {"seeds": [0, 1, 2], "steps": 200, "eval_every": 50,
                  "memory_shapes": ["OPT-125m", "OPT-350m", "OPT-1.3B", "LLaMA-2-7B"]}}
BASE = {"model": {"name": "minilm", "head_init": "prototype"},
        "data": {"task": "sst2", "max_seq_len": 64},
        "train": {"batch_size": 16, "schedule": "linear", "eval_batch_size": 256, "save_every": 0, "log_every": 50}}


def recipe_for(row: Row, seed: int, mode: dict, run_dir: Path) -> dict:
    recipe = json.loads(json.dumps(BASE))
    for section, values in row.sections.items():
        recipe.setdefault(section, {}).update(json.loads(json.dumps(values)))
    recipe["train"].update(max_steps=mode["steps"], eval_every=mode["eval_every"], save_every=mode["eval_every"],
                           keep_last=1, seed=seed, output_dir=str(run_dir))
    recipe["description"] = f"study: {row.name}, seed {seed}"
    return recipe


def run(row: Row, seed: int, mode: dict, root: Path, threads: int = 0) -> dict:
    """Train one (row, seed) unless done; its summary. threads: the run's thread count (0: torch's default)."""
    run_dir = root / row.slug / f"seed{seed}"
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = root / row.slug / f"seed{seed}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(row, seed, mode, run_dir), sort_keys=False))
    resuming = (run_dir / "checkpoints").is_dir()
    print(f"[{datetime.now():%H:%M:%S}] {row.name}, seed {seed}" + (" (resuming)" if resuming else ""), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(root / row.slug / f"seed{seed}.log", "a") as log:
        done = subprocess.run([sys.executable, "-m", "ftkit", "train", str(recipe_path), "--resume", "auto"], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{row.name}, seed {seed} failed (status {done.returncode}); see {log.name}")
    return json.loads(summary.read_text())


def dev_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dev = [e for e in events if e["split"] == "dev"]
    return [e["step"] for e in dev], [e["accuracy"] for e in dev]


def table(names: list[str], results: dict) -> str:
    """One row per method; runs on a GPU add its peak memory (allocated / reserved by the caching allocator)."""
    gpu = any("peak_gpu_allocated_mb" in r for name in names for r in results.get(name) or [])
    extra = (" peak GPU MiB, allocated / reserved |", " ---: |") if gpu else ("", "")
    lines = ["| method | trainable | dev acc, step 0 | dev acc, end: mean +- std (seeds) | best (mean) | "
             f"peak RSS above start, MiB | s/step |{extra[0]}",
             f"| --- | ---: | ---: | ---: | ---: | ---: | ---: |{extra[1]}"]
    for name in names:
        runs = results.get(name) or []
        if not runs:
            lines.append(f"| {name} | not run | | | | | |" + (" |" if gpu else ""))
            continue
        final = [100 * r["dev"]["accuracy"] for r in runs]
        best = [100 * r["best_dev"] for r in runs]
        start = 100 * runs[0]["dev_at_start"]["accuracy"]
        spread = f" +- {statistics.stdev(final):.1f}" if len(final) > 1 else ""
        memory = statistics.median(r["peak_rss_mb"] - r.get("rss_at_start_mb", 0.0) for r in runs)
        speed = statistics.median(r["seconds_per_step"] for r in runs)
        on_gpu = [r for r in runs if "peak_gpu_allocated_mb" in r]
        gpu_cell = (f" {statistics.median(r['peak_gpu_allocated_mb'] for r in on_gpu):,.0f} / "
                    f"{statistics.median(r['peak_gpu_reserved_mb'] for r in on_gpu):,.0f} |" if on_gpu else " |")
        lines.append(f"| {name} | {runs[0]['trainable_params']:,} | {start:.1f} | "
                     f"{statistics.mean(final):.1f}{spread} ({len(runs)}) | {statistics.mean(best):.1f} | "
                     f"{memory:,.0f} | {speed:.3f} |" + (gpu_cell if gpu else ""))
    return "\n".join(lines)


def figure(names: list[str], root: Path, seeds: list[int], out: Path, title: str) -> bool:
    """Mean dev accuracy against step per row, all rows on the left and the zeroth-order ones on the right (their
    differences are a point or two, invisible beside first-order gains); False (nothing written) when no row has a
    finished run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ftkit.plot import save_png

    finished = {name: [s for s in seeds if (root / ROWS[name].slug / f"seed{s}" / "summary.json").is_file()]
                for name in names}
    if not any(finished.values()):
        return False
    counts = sorted({len(v) for v in finished.values() if v})
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), width_ratios=[1, 1.25])
    colors = plt.get_cmap("tab20").colors
    for index, name in enumerate(names):
        curves = [dev_curve(root / ROWS[name].slug / f"seed{s}") for s in finished[name]]
        if not curves:
            continue
        steps = curves[0][0]
        mean = [100 * statistics.mean(c[1][i] for c in curves) for i in range(len(steps))]
        style = "-" if name.startswith("FO") else "--" if name.startswith("MeZO") else "-."
        color = colors[(2 * index) % 20 + (2 * index) // 20]  # the dark shades first
        for ax in axes if not name.startswith("FO") else axes[:1]:
            ax.plot(steps, mean, style, marker="o", markersize=3, color=color, label=name)
            if len(curves) > 1:  # one standard deviation across seeds
                std = [100 * statistics.stdev(c[1][i] for c in curves) for i in range(len(steps))]
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.12, linewidth=0)
    seeds_text = "/".join(map(str, counts))
    axes[0].set(xlabel="step", ylabel=f"SST-2 dev accuracy, % (mean of {seeds_text} seed(s), band: +-1 std)",
                title="all methods")
    axes[1].set(xlabel="step", title="zeroth-order methods (zoomed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title)
    save_png(fig, out, dpi=100)
    return True


# Earlier benchmarks (sections of BENCHMARKS.md, each with its command and date) the study should agree with:
# what is compared, the earlier figure as published there, and how the study's figure is read from its runs:
# ("dev", row, steps): mean dev accuracy at those steps; ("ratio", key, row, row): ratio of the rows' medians.
EARLIER = [
    ("Full-parameter QuZO int4 (10.8M codes), lr 1e-6: dev % at steps 0 / 100 / 200",
     "68.8 / 68.5 / 68.7 (batch 32, one seed; Which trainable set learns)", ("dev", "QuZO int4", (0, 100, 200))),
    ("QuZO + LoRETTA_rep (identity init) over int4, lr 1e-2: dev % at steps 0 / 200",
     "68.8 / 72.1 (batch 32, 600-step schedule, one seed; same section)",
     ("dev", "QuZO + LoRETTA_rep, int4 base", (0, 200))),
    ("MeZO fp32 (word embeddings frozen), lr 1e-6: dev % at steps 0 / 200",
     "71.2 / no gain in 300 steps at any lr from 1e-6 to 1e-4 (same section)", ("dev", "MeZO fp32", (0, 200))),
    ("FO AdamW fp32: dev % at step 0", "71.2 (the prototype head; Full fine-tuning)", ("dev", "FO AdamW fp32", (0,))),
    ("Peak memory above imports: QuZO int4 / FO AdamW fp32", "0.26 (232 / 897 MB, batch 32; Step time against two "
     "forward passes)", ("ratio", "memory", "QuZO int4", "FO AdamW fp32")),
    ("Step time: QuZO int4 / MeZO fp32", "1.90 (908 / 479 ms, batch 32; same section)",
     ("ratio", "speed", "QuZO int4", "MeZO fp32")),
    ("Step time: FO LoRA / FO AdamW fp32", "0.43 (0.167 / 0.388 s, batch 32; Parameter efficiency)",
     ("ratio", "speed", "FO LoRA", "FO AdamW fp32")),
    ("FO LoRA minus FO LoRETTA_rep, final dev %", "+1.2, rerun +3.3 points (2,000 steps, one seed each; Parameter "
     "efficiency)", ("gap", "FO LoRA", "FO LoRETTA_rep")),
]
MEASURES = {"memory": (lambda r: r["peak_rss_mb"] - r.get("rss_at_start_mb", 0.0), "{:,.0f} MiB"),
            "speed": (lambda r: r["seconds_per_step"], "{:.3f} s")}


def agreement(results: dict, root: Path) -> str:
    """The EARLIER table with the study's figures beside the published ones."""
    lines = ["| compared | earlier benchmark | this study (mean of seeds) |", "| --- | --- | --- |"]
    for what, earlier, (kind, *how) in EARLIER:
        if kind == "dev":
            name, steps = how
            curves = [dict(zip(*dev_curve(root / ROWS[name].slug / f"seed{r['seed']}"))) for r in results.get(name, [])]
            cells = [statistics.mean(c[s] for c in curves) * 100 if curves and all(s in c for c in curves) else None
                     for s in steps]
            study = " / ".join("-" if c is None else f"{c:.1f}" for c in cells)
        elif kind == "ratio":
            measure, top, bottom = how
            if not (results.get(top) and results.get(bottom)):
                continue
            read, unit = MEASURES[measure]
            medians = [statistics.median(read(r) for r in results[n]) for n in (top, bottom)]
            study = f"{medians[0] / medians[1]:.2f} ({unit.format(medians[0])} / {unit.format(medians[1])})"
        else:  # gap
            if not (results.get(how[0]) and results.get(how[1])):
                continue
            final = [[100 * r["dev"]["accuracy"] for r in results[n]] for n in how]
            diffs = [a - b for a, b in zip(*final)]
            spread = f" (per seed: {', '.join(f'{d:+.1f}' for d in diffs)})" if len(diffs) > 1 else ""
            study = f"{statistics.mean(diffs):+.1f}{spread}"
        lines.append(f"| {what} | {earlier} | {study} |")
    return "\n".join(lines)


def memory_section(mode: dict, root: Path, report_only: bool) -> str:
    """One training step per method and format at larger shapes, each in a fresh process (scripts/study_memory.py);
    results cached in runs/study-<mode>/memory.jsonl so a rerun measures only what is missing."""
    import study_memory

    cache = root / "memory.jsonl"
    # Measurements from before build and step were told apart (no "step_peak_mb") are measured again.
    done = {(r["shape"], r["case"]): r for r in map(json.loads, cache.read_text().splitlines())
            if "step_peak_mb" in r or "skipped" in r} if cache.is_file() else {}
    results = []
    for shape in mode["memory_shapes"]:
        for case in study_memory.CASES:
            if (shape, case) not in done and not report_only:
                print(f"[{datetime.now():%H:%M:%S}] memory: {shape}, {case}", flush=True)
                done[(shape, case)] = study_memory.run_case(shape, case)
                root.mkdir(parents=True, exist_ok=True)
                with open(cache, "a") as f:
                    f.write(json.dumps(done[(shape, case)]) + "\n")
            if (shape, case) in done:
                results.append(done[(shape, case)])
    return ("\n#### Memory scaling: one training step, random weights\n\n"
            "Each case in a fresh process (`scripts/study_memory.py SHAPE CASE`): batch 2 SST-2 prompts scored as "
            "causal-LM classification (2 candidates each), 32 tokens at most (16 for LLaMA-2-7B). Memory is RSS "
            "above the RSS after imports: once the model and method are built (after build), its high-water mark "
            "while building (random weights initialised one layer at a time, then quantized), and its high-water "
            "mark during the step (reset after building); the larger of the two peaks, in bold where the step sets "
            "it, is the process's peak, and the ratios are of that peak: to first-order fp32 (AdamW, all weights) "
            "and to first-order LoRA over a bitsandbytes nf4 base (QLoRA); * marks a ratio to the arithmetic lower "
            "bound of a case too large to run here (its weights and optimizer state alone). Step seconds are the "
            "one step's, first-call overheads included.\n\n"
            + study_memory.table(results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced grid")
    parser.add_argument("--report", action="store_true", help="only rewrite tables and figures")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (they share the cores)")
    parser.add_argument("--sections", default="precision,efficiency,memory",
                        help="which tables to run (all are written from what exists)")
    args = parser.parse_args()
    args.sections = set(args.sections.split(","))
    known = {*TABLES, "memory"}
    if args.sections - known:
        unknown = ", ".join(sorted(args.sections - known))
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(sorted(known))}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def train_grid(args: argparse.Namespace, grid: dict, names: list[str], mode: dict, root: Path) -> dict:
    """Each row's summaries, seed by seed over the whole grid, so a study stopped early has every row with fewer
    seeds, not some rows with none. With --jobs N, N runs at a time share the cores (one thread each on a 2-core
    machine: two single-threaded runs get more done than one run on two threads)."""
    pending = [(name, seed) for seed in mode["seeds"] for name in names
               if (root / ROWS[name].slug / f"seed{seed}" / "summary.json").is_file()
               or (not args.report and any(name in grid[key] for key in args.sections if key in grid))]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = {key: pool.submit(run, ROWS[key[0]], key[1], mode, root, threads) for key in pending}
        by_seed = {key: {**future.result(), "seed": key[1]} for key, future in futures.items()}
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, start nothing new
    return {name: [by_seed[name, s] for s in mode["seeds"] if (name, s) in by_seed] for name in names}


def report_parts(args: argparse.Namespace, grid: dict, results: dict, mode_name: str) -> list[str]:
    """The BENCHMARKS.md section: a heading, the tables with their figures, the comparison, the memory table."""
    mode, root = MODES[mode_name], REPO / "runs" / f"study-{mode_name}"
    command = f"python scripts/study.py{' --quick' if args.quick else ''}"
    today = f"{datetime.now(timezone.utc):%Y-%m-%d}"
    parts = [f"### Study ({mode_name} grid): `{command}`, {today}\n",
             f"MiniLM + SST-2 (67,349 training sentences, 872 dev), batch 16, max 64 tokens, linear decay, "
             f"{mode['steps']} steps, seeds {', '.join(map(str, mode['seeds']))}, dev evaluated every "
             f"{mode['eval_every']} steps. Peak RSS is the training process's high-water mark above its RSS after "
             f"imports (data and model included); s/step includes the evaluations. Every run's summary: "
             f"`docs/study/{mode_name}/summaries.jsonl`; runs and logs under `runs/study-{mode_name}/`."]
    for key, section_names in grid.items():
        if not any(results.get(name) for name in section_names):
            continue  # not run yet: no table rather than a table of blanks
        title = TABLES[key][0]
        image = REPO / "docs" / f"study_{mode_name}_{key}.png"
        drawn = figure(section_names, root, mode["seeds"], image, f"{title}: {command}, {today}")
        parts.append(f"\n#### {title}\n\n{table(section_names, results)}"
                     + (f"\n\n![{title}: dev accuracy against step](docs/{image.name})" if drawn else ""))
    if len(parts) > 2:
        parts.append("\n#### Against the earlier benchmarks\n\nThe same quantities as in the sections above that "
                     "measured them first (their settings differ where stated: batch 32 there, 16 here).\n\n"
                     + agreement(results, root))
    if len(parts) == 2:
        parts.append("\nNo accuracy run of this grid has finished yet; its tables appear as runs finish "
                     f"(`{command}` is resumable).")
    parts.append(memory_section(mode, root, args.report or "memory" not in args.sections))
    return parts


def main() -> None:
    args = parse_args()
    mode_name = "quick" if args.quick else "full"
    mode, root = MODES[mode_name], REPO / "runs" / f"study-{mode_name}"
    grid = QUICK if args.quick else {key: names for key, (_, names) in TABLES.items()}
    names = list(dict.fromkeys(n for section in grid.values() for n in section))
    results = train_grid(args, grid, names, mode, root)
    parts = report_parts(args, grid, results, mode_name)
    write_section(REPO / "BENCHMARKS.md", f"study:{mode_name}", "\n".join(parts))
    summaries = REPO / "docs" / "study" / mode_name / "summaries.jsonl"
    summaries.parent.mkdir(parents=True, exist_ok=True)
    summaries.write_text("".join(json.dumps({"row": name, **r}) + "\n" for name, runs in results.items() for r in runs))
    print(f"wrote BENCHMARKS.md (study:{mode_name}), {summaries.relative_to(REPO)} and docs/study_{mode_name}_*.png")


if __name__ == "__main__":
    main()
