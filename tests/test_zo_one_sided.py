"""FZOO's batched one-sided estimator (method.zo.estimator: one_sided) and momentum on the projected gradient
(method.zo.momentum): the formula on a quadratic, the normalisation by the estimates' deviation, the forward passes
counted, resume and replay bit for bit, the library and the trainer with the loop's bits, two processes as one, and
the combinations validation refuses."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn as nn
import two_processes
from conftest import tiny_recipe
from safetensors.torch import load_file
from test_distributed import one_and_two_processes
from test_faults import one_error_line
from test_library import assert_same_bits, cli_recipe, cli_weights, setup, zo_options, zo_trainer

from ftkit.optim import MeZO, QuZO
from ftkit.optim.core import ZerothOrderError, zeroth_order_step
from ftkit.optim.estimators.central import CENTRAL
from ftkit.optim.estimators.one_sided import ONE_SIDED
from ftkit.optim.momentum import Momentum
from ftkit.optim.trace import read_trace
from ftkit.optim.zo import TRACE_FILE
from ftkit.optim.zo_streams import U, derive, gaussian
from ftkit.optim.zo_targets import Directions, FloatTarget
from ftkit.recipe import load_recipe
from ftkit.replay import replay
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train
from ftkit.training.metrics import read_events

MEZO_GAUSS = Directions(bits=0, independent=True, update_rounding="stochastic")


def quadratic_step(start: torch.Tensor, scale: float, estimator=ONE_SIDED, n: int = 3, lr: float = 0.1,
                   eps: float = 1e-2, momentum=None):
    """One step on L(w) = scale * sum(w^2) / 2 (evaluated in float64); the weights after it, the projected
    gradients and the points the loss was evaluated at."""
    w = nn.Parameter(start.clone())
    targets = [FloatTarget("w", w, 0, decay=False)]
    seen = []

    def evaluate(query):
        seen.append(w.detach().clone())
        return [scale * float((w.detach().double() ** 2).sum()) / 2]

    gradients, losses = zeroth_order_step(targets, MEZO_GAUSS, 7, lr, eps, n, 0.0, evaluate, list,
                                          estimator=estimator, momentum=momentum)
    return w.detach().clone(), gradients, losses, seen


def directions(n: int, numel: int) -> list[torch.Tensor]:
    return [gaussian(numel, derive(derive(7, i), 0, U)) for i in range(n)]


def test_one_sided_estimate_is_the_formula_on_a_quadratic():
    start = torch.linspace(-1.0, 1.0, 50)
    eps, lr, n = 1e-2, 0.1, 3
    after, gradients, losses, seen = quadratic_step(start, 1.0)
    u = directions(n, 50)
    loss = lambda w: float((w.double() ** 2).sum()) / 2  # noqa: E731
    # N + 1 forwards: the unperturbed weights first, then w + eps u_i, each query taken back before the next (in
    # float32: w + eps u - eps u is w to within rounding)
    assert len(seen) == n + 1 and torch.equal(seen[0], start)
    point = start.clone()
    for i in range(n):
        assert torch.equal(seen[1 + i], point.clone().add_(u[i], alpha=eps))
        point.add_(u[i], alpha=eps).add_(u[i], alpha=-eps)
    assert losses == [loss(start)]  # the step's loss is the unperturbed one
    assert gradients == [(loss(seen[1 + i]) - loss(start)) / eps for i in range(n)]
    # on the quadratic g_i = u_i . w + eps |u_i|^2 / 2 (to float32 rounding of the perturbed weights)
    for g, ui in zip(gradients, u):
        assert g == pytest.approx(float(ui @ start) + eps * float(ui @ ui) / 2, rel=1e-4, abs=1e-4)
    sigma = statistics.stdev(gradients)
    coefs = [-lr * (g / sigma) / n for g in gradients]
    expected = start.clone()
    for i in range(n - 1):
        expected.add_(u[i], alpha=eps).add_(u[i], alpha=-eps)
    expected.add_(u[-1], alpha=eps).add_(u[-1], alpha=-eps + coefs[-1])
    for i in range(n - 1):
        expected.add_(u[i], alpha=coefs[i])
    assert torch.equal(after, expected)


def test_the_step_is_normalised_by_the_deviation_of_the_estimates():
    """Scaling the loss by 2^10 scales every estimate and their deviation exactly: one_sided makes the same step, bit
    for bit, where central differences make a 1024 times larger one. A constant loss (deviation 0) moves nothing
    along the directions: the weights are left where the perturbations' round trips leave them."""
    start = torch.linspace(-1.0, 1.0, 50)
    assert torch.equal(quadratic_step(start, 1.0)[0], quadratic_step(start, 1024.0)[0])
    small, large = (quadratic_step(start, s, CENTRAL)[0] - start for s in (1.0, 1024.0))
    assert torch.allclose(large, 1024 * small, rtol=1e-3, atol=1e-6) and small.abs().max() > 1e-3

    w = nn.Parameter(start.clone())
    gradients, _ = zeroth_order_step([FloatTarget("w", w, 0, decay=False)], MEZO_GAUSS, 7, 0.1, 1e-2, 3, 0.0,
                                     lambda query: [2.5], list, estimator=ONE_SIDED)
    assert gradients == [0.0, 0.0, 0.0] and ONE_SIDED.coefficients(gradients, 0.1) == [0.0, 0.0, 0.0]
    assert (w.detach() - start).abs().max() < 1e-7  # float32 round trips of eps u only


def test_momentum_accumulates_the_coefficients_along_the_directions():
    start = torch.linspace(-1.0, 1.0, 50)
    eps, lr, n = 1e-2, 0.1, 3
    momentum = Momentum(0.5, [FloatTarget("w", nn.Parameter(start.clone()), 0, decay=False)])
    momentum.buffers[0].fill_(0.25)  # as a previous step left it
    after, gradients, _, _ = quadratic_step(start, 1.0, CENTRAL, momentum=momentum)
    u = directions(n, 50)
    coefs = [-g / n for g in gradients]  # central's coefficients at rate 1
    buffer = torch.full((50,), 0.25).mul_(0.5)
    for ui, c in zip(u, coefs):
        buffer.add_(ui, alpha=c)
    assert torch.equal(momentum.buffers[0], buffer)
    expected = start.clone()
    for ui in u:  # central differences: to +eps, to -eps, back (the last query's way back before the update)
        expected.add_(ui, alpha=eps).add_(ui, alpha=-2 * eps).add_(ui, alpha=eps)
    expected.add_(buffer, alpha=lr)
    assert torch.equal(after, expected)


def loop_recipe(write_recipe, tmp_path, name: str, steps: int, **sections):
    sections.setdefault("train", {}).update(output_dir=str(tmp_path / name), max_steps=steps, save_every=2,
                                            eval_every=0)
    return load_recipe(write_recipe(tiny_recipe(**sections), f"{name}.yaml"))


def weights(run_dir) -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints", "last") / ckpt.WEIGHTS))


CASES = {
    "mezo_one_sided_signs": ({"optimizer": "mezo", "zo": {"estimator": "one_sided", "n_queries": 3,
                                                          "direction": "rademacher"}}, {}, 4),
    "quzo_int4_one_sided": ({"optimizer": "quzo", "zo": {"estimator": "one_sided", "n_queries": 2}},
                            {"format": "int4"}, 3),
    "mezo_momentum": ({"optimizer": "mezo", "zo": {"momentum": 0.9, "n_queries": 2}}, {}, 4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loop_counts_forwards_resumes_and_replays_bit_for_bit(write_recipe, tmp_path, case):
    method, quant, per_step = CASES[case]
    sections = {"method": method, "quant": quant, "train": {"lr": 1e-3}}
    straight = loop_recipe(write_recipe, tmp_path, "straight", 4, **sections)
    train(straight)
    end = weights(tmp_path / "straight")
    events = [e for e in read_events(tmp_path / "straight" / "metrics.jsonl") if e["split"] == "train"]
    assert [e["forwards"] for e in events] == [per_step * s for s in range(1, 5)]
    if quant:
        start = loop_recipe(write_recipe, tmp_path, "start", 1, **{**sections, "train": {"lr": 0.0}})
        train(start)
        assert any(not torch.equal(end[k], v) for k, v in weights(tmp_path / "start").items() if k.endswith(".codes"))
    header, records = read_trace(tmp_path / "straight" / TRACE_FILE)
    assert header["estimator"] == method["zo"].get("estimator", "central") and len(records) == 4

    train(loop_recipe(write_recipe, tmp_path, "parts", 2, **sections))
    train(loop_recipe(write_recipe, tmp_path, "parts", 4, **sections), resume=True)
    assert_same_bits(end, weights(tmp_path / "parts"))
    resumed = [e for e in read_events(tmp_path / "parts" / "metrics.jsonl") if e["split"] == "train"]
    assert [e["forwards"] for e in resumed] == [e["forwards"] for e in events]

    replay(straight, tmp_path / "straight" / TRACE_FILE, tmp_path / "replayed")
    assert_same_bits(end, weights(tmp_path / "replayed"))


@pytest.mark.parametrize("optimizer, quant, zo", [
    ("mezo", {}, {"estimator": "one_sided", "n_queries": 3, "momentum": 0.5}),
    ("quzo", {"format": "int8"}, {"estimator": "one_sided", "n_queries": 2}),
])
def test_the_optimizer_and_the_trainer_compute_the_loops_bits(write_recipe, tmp_path, optimizer, quant, zo):
    recipe = cli_recipe(write_recipe, tmp_path, optimizer, steps=3, quant=quant, method={"zo": zo})
    expected = cli_weights(recipe)
    options = {**zo_options(recipe), "estimator": zo["estimator"], "momentum": zo.get("momentum", 0.0)}
    model, loss, batches = setup(recipe)
    chosen = (MeZO if optimizer == "mezo" else QuZO)(model, **options)
    model.eval()  # dropout off, as in the step (which gives the modules their modes back after it)
    for batch in batches:
        with torch.inference_mode():
            unperturbed = float(loss(model(batch), batch))
        assert chosen.step(lambda: loss(model(batch), batch)) == unperturbed  # one_sided reports L(w)
    assert_same_bits(expected, model)
    assert chosen.forwards == 3 * (zo["n_queries"] + 1)
    model, loss, batches = setup(recipe)
    trainer = zo_trainer(recipe, model, loss, batches, tmp_path / "hf")
    trainer.zo_options.update(estimator=options["estimator"], momentum=options["momentum"])  # read at train()
    trainer.train()
    assert_same_bits(expected, model)


def test_library_refusals():
    params = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ZerothOrderError, match="one_sided estimator needs n_queries >= 2"):
        MeZO(params, estimator="one_sided")
    with pytest.raises(ValueError, match="estimator must be one of central, one_sided"):
        MeZO(params, estimator="forward")
    with pytest.raises(ValueError, match="0 <= momentum < 1"):
        MeZO(params, momentum=1.0)


PARALLEL = {parallel: two_processes.run(f"one_sided {parallel}", method={"optimizer": "mezo", "zo": {
    "estimator": "one_sided", "n_queries": 2, "parallel": parallel, "momentum": 0.5 if parallel == "data" else 0}},
    train={"max_steps": 4, "eval_every": 0, "save_every": 2}) for parallel in ("data", "queries")}


@pytest.mark.parametrize("parallel", ["data", "queries"])
def test_two_processes_compute_what_one_computes(two_process_runs, tmp_path, parallel):
    two = one_and_two_processes(two_process_runs, tmp_path, PARALLEL[parallel])
    train_events = lambda d: [(e["loss"], e["forwards"]) for e in read_events(d / "metrics.jsonl")  # noqa: E731
                              if e["split"] == "train"]
    assert train_events(tmp_path / "one") == train_events(two)


@pytest.mark.parametrize("method, quant, expected", [
    ({"optimizer": "mezo", "zo": {"estimator": "one_sided"}}, {},
     "method.zo.n_queries: the one_sided estimator needs at least 2 queries"),
    ({"optimizer": "mezo", "zo": {"estimator": "forward"}}, {}, "method.zo.estimator: unknown estimator 'forward'"),
    ({"optimizer": "mezo", "zo": {"momentum": 1.0}}, {}, "method.zo.momentum: must be in [0, 1), got 1.0"),
    ({"optimizer": "quzo", "zo": {"momentum": 0.9}}, {"format": "int4"},
     "method.zo.momentum: keeps a float buffer per trained tensor, and the int4 codes quzo trains"),
])
def test_validate_refuses_impossible_combinations_in_one_line(write_recipe, method, quant, expected):
    one_error_line(["validate", write_recipe(tiny_recipe(method=method, quant=quant))], expected)
