"""Analysis scripts that read run directories: their figures are computed from the runs' files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import tiny_recipe
from safetensors.torch import load_file

import ftkit
from ftkit.quant.linear import QuantLinear
from ftkit.quant.packing import unpack_int4
from ftkit.recipe import recipe_from_dict
from ftkit.training import checkpoint as ckpt
from ftkit.training.setup import build_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import codes_moved  # noqa: E402
import make_gguf  # noqa: E402
import zo_race  # noqa: E402


def base_layers(recipe) -> dict:
    model = build_run(recipe, splits=("train",)).model
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_codes_moved_counts_the_codes_a_quzo_run_changed_and_none_under_nearest_rounding(tmp_path):
    counts, recipes = {}, {}
    for rounding in ("stochastic", "nearest"):
        run_dir = tmp_path / rounding
        recipes[rounding] = recipe_from_dict(tiny_recipe(
            quant={"format": "int4", "group_size": 16},
            method={"optimizer": "quzo", "zo": {"eps": 1e-3, "update_rounding": rounding}},
            train={"max_steps": 4, "lr": 1e-5, "eval_every": 0, "save_every": 4, "output_dir": str(run_dir)}))
        ftkit.train(recipes[rounding])
        counts[rounding] = codes_moved.moved(run_dir, "last")
    stochastic, nearest = counts["stochastic"], counts["nearest"]
    # The tiny BERT's quantized linears, two layers of 4 x [32, 32] (attention) + [64, 32] + [32, 64] (MLP).
    assert stochastic["codes"] == nearest["codes"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert nearest["changed"] == 0 and nearest["by_steps"] == {}  # updates under half a grid step round back
    assert stochastic["changed"] == sum(stochastic["by_steps"].values()) > 0

    # The same count from the checkpoint file itself: its packed bytes unpacked by hand, against the base's.
    step_dir = ckpt.resolve(tmp_path / "stochastic" / "checkpoints", "last")
    saved = load_file(str(step_dir / ckpt.WEIGHTS))
    base = base_layers(recipes["stochastic"])
    by_hand = sum(int((unpack_int4(saved[f"{name}.codes"], m.out_features, m.in_features)
                       != unpack_int4(m.codes, m.out_features, m.in_features)).sum()) for name, m in base.items())
    assert by_hand == stochastic["changed"]


def race_record(cell: str, seed: int, curve: list, test: float, budget: int = 1200, phase: int = 1) -> dict:
    return {"task": "sst2", "cell": cell, "seed": seed, "phase": phase, "budget": budget, "metric": "accuracy",
            "dev_curve": [point + [3.0 * point[0]] for point in curve], "test": {"accuracy": test},
            "forwards": curve[-1][0], "trainable_params": 35136, "elapsed_seconds": 3.0 * curve[-1][0],
            "seconds_per_step": 1.0, "peak_rss_mb": 2048.0}


def test_zo_race_counts_forwards_as_each_cell_declares_them_and_records_a_run(tmp_path):
    events = [{"step": 0, "split": "dev", "accuracy": 0.5}] + [
        {"step": s, "split": "train", "loss": 0.7, "elapsed": 3.0 * s} for s in (1, 2)] + [
        {"step": 2, "split": "dev", "accuracy": 0.6, "elapsed": 8.0}]
    assert zo_race.forwards_curve(events, 2, "accuracy") == ([[0, 0, 50.0, 0.0], [4, 2, 60.0, 8.0]], 4)
    assert zo_race.forwards_curve(events, 8, "accuracy")[0][-1] == [16, 2, 60.0, 8.0]  # 4 queries, central
    # ftkit's running total restarts when a run resumes from a checkpoint that did not count: it is not summed
    restarted = [dict(e, forwards=9 if e["step"] == 1 else 1) if e["split"] == "train" else e for e in events]
    assert zo_race.forwards_curve(restarted, 9, "accuracy") == ([[0, 0, 50.0, 0.0], [18, 2, 60.0, 8.0]], 18)

    (tmp_path / "metrics.jsonl").write_text("".join(f"{json.dumps(e)}\n" for e in events))
    (tmp_path / "summary.json").write_text(json.dumps({
        "steps": 2, "best_dev": 0.6, "best_step": 2, "test": {"accuracy": 0.55, "macro_f1": 0.5, "loss": 0.7},
        "trainable_params": 10, "seconds_per_step": 1.5, "wall_seconds": 9.0, "peak_rss_mb": 900.0}))
    record = zo_race.make_record(zo_race.BY_NAME["norms-gauss"], "sst2", 0, 1, 4, tmp_path, "start")
    assert (record["forwards"], record["dev_curve"][-1], record["test"]) == (4, [4, 2, 60.0, 8.0],
                                                                             {"accuracy": 55.0, "macro_f1": 50.0})
    assert (record["best_dev"], record["peak_rss_mb"], record["elapsed_seconds"]) == (60.0, 900.0, 8.0)
    # a resume that found training done writes no s/step: the run's elapsed time over its steps stands in
    assert zo_race.seconds_per_step({"seconds_per_step": None, "elapsed_seconds": 120.0, "steps": 60}) == 2.0


def test_zo_race_skips_cells_this_ftkit_does_not_know_and_takes_the_screens_leaders_on_three_seeds(tmp_path):
    unknown = zo_race.Cell("norms-new", "new estimator", "norm scales", zo_race.NORMS,
                           zo_race.zo(no_such_option=1))
    cells, skipped = zo_race.runnable([zo_race.BY_NAME["norms-gauss"], unknown], ["sst2", "cb"], tmp_path)
    assert [c.name for c in cells] == ["norms-gauss"]
    assert "method.zo.no_such_option: unknown key" in skipped["norms-new"]

    records = [race_record("norms-gauss", 0, [[0, 0, 66.0], [1200, 600, 78.0]], 77.0),
               race_record("norms-signs", 0, [[0, 0, 66.0], [1200, 600, 74.0]], 73.0),
               race_record("codes-signs", 0, [[0, 0, 66.0], [800, 400, 80.0], [1200, 600, 70.0]], 71.0),
               race_record("fo-ste", 0, [[0, 0, 66.0], [450, 150, 90.0]], 89.0)]
    assert zo_race.leaders(records, "sst2", 2, 1200) == ["codes-signs", "norms-gauss"]  # best dev in the budget
    jobs = zo_race.plan(2, ["sst2"], [zo_race.BY_NAME[n] for n in ("norms-gauss", "norms-signs", "codes-signs",
                                                                    "fo-ste")], records, 2)
    assert [(c.name, seed) for c, _, seed in jobs] == [(n, s) for n in ("norms-gauss", "codes-signs", "fo-ste")
                                                       for s in (0, 1, 2)]
    # A constant-rate cell continues its screen run to a larger budget; the linear-decay reference does not.
    assert zo_race.run_dir(tmp_path, "sst2", zo_race.BY_NAME["norms-gauss"], 1, 2400).name == "seed1"
    recipe = zo_race.cell_recipe(zo_race.BY_NAME["norms-gauss-q4"], "sst2", 0, 1200, tmp_path, 200, tmp_path)
    assert (recipe["train"]["max_steps"], recipe["train"]["eval_every"]) == (150, 25)  # 8 forwards a step


def test_zo_race_table_gives_the_seed_spread_and_the_forwards_to_the_target():
    records = [race_record("norms-gauss", 0, [[0, 0, 66.0], [800, 400, 79.4], [1200, 600, 80.0]], 78.0),
               race_record("norms-gauss", 1, [[0, 0, 66.0], [800, 400, 75.0], [1200, 600, 76.0]], 76.0),
               race_record("codes-signs", 0, [[0, 0, 66.0], [1200, 600, 70.0]], 71.0)]
    records.append(race_record("codes-signs", 0, [[0, 0, 66.0], [2400, 1200, 79.2]], 80.0, 2400, 2))
    lines = zo_race.table(records).splitlines()
    assert "| sst2 test accuracy, 1,200 F | sst2 test accuracy, 2,400 F |" in lines[0]
    rows = {line.split(" | ")[0]: line for line in lines[2:]}
    assert "| 77.0 +- 1.4 (2) |  | 800 (1/2 runs) | 60 | 1.00 | 2.0 |" in rows["| QuZO, Gaussian, central"]
    # The screen's run and the longer one: the costs and the forwards to the target of the longer.
    assert "| 71.0 (1) | 80.0 (1) | 2,400 (1/1 runs) | 120 |" in rows["| QuZO, random signs, central"]
    # A task raced at its own budget (`--forwards`) says so in its column's head, not in every cell of it.
    cb = [dict(race_record(cell, 0, [[0, 0, 30.0], [400, 200, 50.0]], 45.0, 400), task="cb", metric="macro_f1",
               test={"macro_f1": 45.0}) for cell in ("norms-gauss", "codes-signs")]
    lines = zo_race.table(records + cb).splitlines()
    assert "| sst2 test accuracy, 2,400 F | cb test macro_f1, 400 F |" in lines[0]
    assert "| 77.0 +- 1.4 (2) |  | 45.0 (1) |" in lines[2]
    # the report says how often dev was evaluated from the curves themselves, per task
    assert zo_race.eval_intervals(records + cb) == "800/1,200/2,400 F on sst2, 400 F on cb"


def test_make_gguf_expands_every_tensor_to_float32_and_counts_the_blocks_ftkit_quantizes_alike(tmp_path):
    """The float32 file holds each tensor's reference dequantization under its name, the metadata, file type ALL_F32;
    quantizing it again with ftkit gives the Q5_0 and Q8_0 tensors' own bytes (their grids hold their largest
    values exactly, so requantizing finds the same scales and codes)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    from ftkit.gguf.metadata import field_value

    rng, source = np.random.default_rng(0), tmp_path / "small.gguf"
    writer = GGUFWriter(str(source), "llama")
    writer.add_file_type(8)  # MOSTLY_Q5_0
    writer.add_block_count(1)
    for name, shape, kind in [("token_embd.weight", (100, 64), "Q8_0"), ("blk.0.attn_norm.weight", (64,), "F32"),
                              ("blk.0.ffn_up.weight", (96, 64), "Q5_0"), ("blk.0.ffn_down.weight", (64, 96), "Q5_0")]:
        values, ggml = rng.normal(0, 0.05, shape).astype(np.float32), GGMLQuantizationType[kind]
        writer.add_tensor(name, quants.quantize(values, ggml) if kind != "F32" else values, raw_dtype=ggml)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    make_gguf.write_f32(source, tmp_path / "small.f32.gguf")
    original, expanded = GGUFReader(source), GGUFReader(tmp_path / "small.f32.gguf")
    assert field_value(expanded, "general.file_type") == 0 and field_value(expanded, "llama.block_count") == 1
    assert [t.name for t in expanded.tensors] == [t.name for t in original.tensors]
    for ours, theirs in zip(expanded.tensors, original.tensors):
        assert ours.tensor_type == GGMLQuantizationType.F32
        assert np.array_equal(ours.data, quants.dequantize(np.asarray(theirs.data), theirs.tensor_type))
    assert make_gguf.compare(tmp_path / "small.f32.gguf", source) == {
        "Q5_0": {"tensors": 2, "identical_tensors": 2, "blocks": 384, "identical_blocks": 384},
        "Q8_0": {"tensors": 1, "identical_tensors": 1, "blocks": 200, "identical_blocks": 200}}
