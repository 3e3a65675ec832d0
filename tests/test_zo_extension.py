"""A zeroth-order estimator added from outside the package: a kind of direction defined here, one module's worth of
code and one registration, trains through the loop, resumes bit-exactly, replays from its trace, and runs through
`ftkit.optim.QuZO.step` and `ZOTrainer` with the bits the loop computes (docs/components.md, "Adding a zeroth-order
estimator")."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DATA_DIR, tiny_recipe
from safetensors.torch import load_file
from test_library import assert_same_bits, cli_recipe, cli_weights, setup, zo_options, zo_trainer

from ftkit.optim import DIRECTIONS, QuZO
from ftkit.optim.config import Direction
from ftkit.optim.directions import DirectionKind
from ftkit.optim.trace import read_trace
from ftkit.optim.zo import TRACE_FILE
from ftkit.optim.zo_streams import gaussian
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train

KEPT = 0.25  # of each tensor's elements


@functools.lru_cache(maxsize=None)
def mask(numel: int) -> torch.Tensor:
    """The fixed quarter of a tensor's flat positions its directions live on, chosen by a fixed seed."""
    return torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < KEPT


class FixedSparseGaussian(DirectionKind):
    """Gaussian directions on a fixed quarter of each tensor's elements, zero elsewhere: only those elements
    train (a sparse fine-tuning), and the zeros stay zero through QuZO's rounding."""

    name = "fixed_sparse"

    def draw(self, shape, seed: int, device="cpu") -> torch.Tensor:
        u = gaussian(shape, seed, device)
        return torch.where(mask(u.numel()).to(u.device).view(u.shape), u, 0.0)

    def trace_fields(self) -> dict:
        return {"kept_fraction": KEPT}


@pytest.fixture(autouse=True)
def fixed_sparse():
    DIRECTIONS.register(Direction("fixed_sparse", "Gaussian on a fixed quarter of the elements",
                                  FixedSparseGaussian()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loop runs at train.threads 1
    yield
    torch.set_num_threads(threads)
    DIRECTIONS.unregister("fixed_sparse")


def toy_recipe(write_recipe, tmp_path, name: str, steps: int, lr: float = 1e-2):
    """Full-parameter QuZO on int8 codes along the toy directions, through the loop (a short test split)."""
    test_file = tmp_path / "test.tsv"
    test_file.write_text("".join((DATA_DIR / "sst2" / "dev.tsv").read_text().splitlines(keepends=True)[:9]))
    data = tiny_recipe(quant={"format": "int8"}, method={"optimizer": "quzo", "zo": {"direction": "fixed_sparse"}},
                       data={"test_file": str(test_file)},
                       train={"output_dir": str(tmp_path / name), "max_steps": steps, "lr": lr, "save_every": 2,
                              "eval_every": 0})
    return load_recipe(write_recipe(data, f"{name}.yaml"))


def weights(run_dir) -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints", "last") / ckpt.WEIGHTS))


def test_the_toy_direction_trains_only_its_elements_resumes_and_replays_bit_for_bit(write_recipe, tmp_path):
    train(toy_recipe(write_recipe, tmp_path, "start", steps=1, lr=0.0))
    start = weights(tmp_path / "start")
    straight = toy_recipe(write_recipe, tmp_path, "straight", steps=4)
    train(straight)
    end = weights(tmp_path / "straight")
    moved = 0
    for key, tensor in end.items():
        changed = (tensor != start[key]).view(-1)
        assert not (changed & ~mask(tensor.numel())).any(), key  # nothing moves off the fixed elements
        moved += int(changed.sum())
    assert moved and any((end[k] != start[k]).any() for k in end if k.endswith(".codes"))  # int8 codes too
    header, records = read_trace(tmp_path / "straight" / TRACE_FILE)
    assert header["direction"] == "fixed_sparse" and header["kept_fraction"] == KEPT and len(records) == 4

    train(toy_recipe(write_recipe, tmp_path, "parts", steps=2))
    train(toy_recipe(write_recipe, tmp_path, "parts", steps=4), resume=True)
    assert_same_bits(end, weights(tmp_path / "parts"))

    replay(straight, tmp_path / "straight" / TRACE_FILE, tmp_path / "replayed")
    assert_same_bits(end, weights(tmp_path / "replayed"))


def test_the_toy_direction_runs_through_the_optimizer_and_the_trainer_with_the_loops_bits(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", steps=4, quant={"format": "int8"},
                        method={"zo": {"direction": "fixed_sparse"}})
    expected = cli_weights(recipe)
    model, loss, batches = setup(recipe)
    optimizer = QuZO(model, **zo_options(recipe))
    for batch in batches:
        optimizer.step(lambda: loss(model(batch), batch))
    assert_same_bits(expected, model)
    model, loss, batches = setup(recipe)
    zo_trainer(recipe, model, loss, batches, tmp_path / "hf").train()
    assert_same_bits(expected, model)
