"""Analysis scripts that read run directories: their figures are computed from the runs' files."""

from __future__ import annotations

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
