"""`ftkit plot`: curves of several runs in one PNG, against step and wall time."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.plot import read_curves, smooth
from ftkit.recipe import load_recipe
from ftkit.training.loop import train


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert smooth([2.0, 4.0], 1) == [2.0, 4.0]


def test_plot_overlays_runs_against_step_and_wall_time(write_recipe, tmp_path):
    for name, optimizer in (("adamw_run", "adamw"), ("mezo_run", "mezo")):
        recipe = tiny_recipe(method={"optimizer": optimizer},
                             train={"output_dir": str(tmp_path / name), "max_steps": 12, "eval_every": 4,
                                    "lr": 2e-3})
        train(load_recipe(write_recipe(recipe, f"{name}.yaml")))
    curves = read_curves(tmp_path / "mezo_run")
    assert curves.label == "mezo_run" and curves.metric == "accuracy"
    assert curves.train_steps == list(range(1, 13)) and curves.dev_steps == [0, 4, 8, 12]
    assert curves.train_time == sorted(curves.train_time) and curves.train_time[0] > 0  # cumulative seconds

    out = tmp_path / "plots" / "runs.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "adamw_run"), str(tmp_path / "mezo_run"), "-o", str(out),
                                      "--title", "tiny BERT, SST-2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (2 runs)" in result.output
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[:2] == (924, 1320)  # 2 x 2 panels
    assert image[..., :3].std() > 0.05  # something was drawn


@pytest.mark.parametrize("args, message", [
    (["{tmp}"], "is not a run directory (no metrics.jsonl)"),
    (["{tmp}", "--label", "a", "--label", "b"], "--label given 2 times for 1 run directories"),
])
def test_plot_mistakes_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["plot", *[a.format(tmp=tmp_path) for a in args], "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
