"""scripts/study.py, study_memory.py and study_smollm2.py: the grid's recipes are valid, and the tables are computed from the
runs' files (means, spreads, ratios, the process's peak), never typed in."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import study  # noqa: E402
import study_memory  # noqa: E402
import study_smollm2  # noqa: E402

from ftkit.recipe import recipe_from_dict  # noqa: E402


@pytest.mark.parametrize("name", list(study.ROWS))
def test_every_row_of_the_grid_is_a_valid_recipe(name, tmp_path):
    recipe = recipe_from_dict(study.recipe_for(study.ROWS[name], 2, study.MODES["full"], tmp_path / "run"))
    assert recipe.train.seed == 2 and recipe.train.max_steps == study.MODES["full"]["steps"]
    assert recipe.data.task == "sst2" and recipe.train.batch_size == 16


@pytest.mark.parametrize("task,row,steps", sorted({(t, r, n) for t, r, _, n in study_smollm2.PLAN}))
def test_every_run_of_the_smollm2_plan_is_a_valid_recipe(task, row, steps, tmp_path, monkeypatch):
    monkeypatch.setattr(study_smollm2, "ROOT", tmp_path)  # BoolQ's and SQuAD's test subsets are written there
    recipe = recipe_from_dict(study_smollm2.recipe_for(task, row, 1, steps))
    assert recipe.model.name == "smollm2-135m" and recipe.data.task == task and recipe.train.seed == 1
    assert (recipe.train.max_steps == steps) if steps else row.startswith("zero_shot")
    assert recipe.train.output_dir == str(tmp_path / task / row / "seed1")


def test_quick_grid_is_a_subset_of_the_tables():
    for key, names in study.QUICK.items():
        assert set(names) <= set(study.TABLES[key][1])


def summary(accuracy: float, trainable: int = 100, peak: float = 900.0, start: float = 300.0, speed: float = 0.5):
    return {"dev": {"accuracy": accuracy}, "best_dev": accuracy + 0.01, "dev_at_start": {"accuracy": 0.7},
            "trainable_params": trainable, "peak_rss_mb": peak, "rss_at_start_mb": start, "seconds_per_step": speed}


def test_table_gives_mean_and_spread_over_seeds_and_marks_rows_not_run():
    results = {"MeZO fp32": [summary(0.70, speed=0.4), summary(0.72, speed=0.6), summary(0.74, speed=0.5)]}
    lines = study.table(["MeZO fp32", "QuZO int4"], results).splitlines()
    assert lines[2] == "| MeZO fp32 | 100 | 70.0 | 72.0 +- 2.0 (3) | 73.0 | 600 | 0.500 |"
    assert lines[3].startswith("| QuZO int4 | not run |")
    on_gpu = {name: [{**r, "peak_gpu_allocated_mb": 900.0 + i, "peak_gpu_reserved_mb": 1024.0} for i, r in
                     enumerate(runs)] for name, runs in results.items()}
    lines = study.table(["MeZO fp32"], on_gpu).splitlines()
    assert lines[0].endswith("| peak GPU MiB, allocated / reserved |")
    assert lines[2] == "| MeZO fp32 | 100 | 70.0 | 72.0 +- 2.0 (3) | 73.0 | 600 | 0.500 | 901 / 1,024 |"


def write_run(root: Path, name: str, seed: int, dev: dict[int, float]) -> None:
    run_dir = root / study.ROWS[name].slug / f"seed{seed}"
    run_dir.mkdir(parents=True)
    events = [{"step": step, "split": "dev", "accuracy": acc} for step, acc in dev.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_agreement_reads_the_study_side_from_the_runs(tmp_path):
    results = {}
    for seed, (end, rep_end) in enumerate([(0.70, 0.66), (0.72, 0.69)]):
        write_run(tmp_path, "QuZO int4", seed, {0: 0.688, 100: 0.69, 200: end})
        results.setdefault("QuZO int4", []).append({**summary(end, peak=500, speed=1.2), "seed": seed})
        write_run(tmp_path, "MeZO fp32", seed, {0: 0.712, 200: 0.71})
        results.setdefault("MeZO fp32", []).append({**summary(0.71, speed=0.4), "seed": seed})
        results.setdefault("FO LoRA", []).append({**summary(end + 0.1), "seed": seed})
        results.setdefault("FO LoRETTA_rep", []).append({**summary(rep_end + 0.1), "seed": seed})
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in study.agreement(results, tmp_path)
            .splitlines()[2:]}
    assert rows["Full-parameter QuZO int4 (10.8M codes), lr 1e-6: dev % at steps 0 / 100 / 200"] == "68.8 / 69.0 / 71.0"
    assert rows["Step time: QuZO int4 / MeZO fp32"] == "3.00 (1.200 s / 0.400 s)"
    assert rows["FO LoRA minus FO LoRETTA_rep, final dev %"] == "+3.5 (per seed: +4.0, +3.0)"
    assert rows["QuZO + LoRETTA_rep (identity init) over int4, lr 1e-2: dev % at steps 0 / 200"] == "- / -"
    assert rows["MeZO fp32 (word embeddings frozen), lr 1e-6: dev % at steps 0 / 200"] == "71.2 / 71.0"
    assert "Peak memory above imports: QuZO int4 / FO AdamW fp32" not in rows  # no FO fp32 run: no ratio


def test_write_section_replaces_between_markers_and_appends_when_absent(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written text\n")
    study.write_section(path, "study:quick", "first")
    study.write_section(path, "study:quick", "second")
    text = path.read_text()
    assert text.count("<!-- study:quick:begin -->") == 1 and "first" not in text
    assert text.startswith("# Benchmarks\n\nhand-written text\n") and "second\n<!-- study:quick:end -->" in text


def test_memory_table_takes_the_larger_peak_and_ratios_of_it():
    rows = [
        {"shape": "S", "case": "FO AdamW fp32", "skipped": "too large", "estimate_mb": 4000.0},
        {"shape": "S", "case": "FO nf4 + LoRA (QLoRA)", "trainable": 10, "state_mb": 300.0, "build_peak_mb": 800.0,
         "step_peak_mb": 500.0, "peak_above_imports_mb": 800.0, "step_seconds": 1.0, "build_seconds": 2.0},
        {"shape": "S", "case": "QuZO int4", "trainable": 1000, "state_mb": 200.0, "build_peak_mb": 300.0,
         "step_peak_mb": 400.0, "peak_above_imports_mb": 400.0, "step_seconds": 3.0, "build_seconds": 4.0},
    ]
    lines = study_memory.table(rows).splitlines()
    assert lines[2].startswith("| S | FO AdamW fp32 | | | not run: too large |")
    assert lines[3] == "| S | FO nf4 + LoRA (QLoRA) | 10 | 300 | 800 | 500 | 0.20* | 1.00 | 1.0 | 2.0 |"
    assert lines[4] == "| S | QuZO int4 | 1,000 | 200 | 300 | **400** | 0.10* | 0.50 | 3.0 | 4.0 |"


def test_the_int4_zero_shot_row_quantizes_as_the_quzo_rows_it_is_the_start_of():
    """Its test figure is the baseline of the QuZO int4 rows' gains: the same base, untrained."""
    start = recipe_from_dict(study_smollm2.recipe_for("cb", "zero_shot_int4", 0, 0))
    for row in ("quzo_int4_norms", "quzo_int4_norms_one_rounding", "quzo_int4_norms_signs", "quzo_int4"):
        trained = recipe_from_dict(study_smollm2.recipe_for("cb", row, 0, 100))
        assert trained.quant == start.quant and trained.data == start.data, row
    assert start.quant.format == "int4" and start.quant.group_size == 64
