"""The library API: the optimizers, the Trainer and the calls compute exactly what `ftkit train` computes, resume
exactly, and the examples run."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, REPO, TINY_LLAMA, tiny_recipe
from safetensors.torch import load_file
from torch.utils.data import SequentialSampler

import ftkit
from ftkit.data.batches import TrainStream, collate, encode
from ftkit.data.dataset import load_task_data, task_kind
from ftkit.errors import RecipeError, UserError
from ftkit.models.build import build_model
from ftkit.models.load import load_tokenizer
from ftkit.optim import MeZO, QuZO
from ftkit.recipe import load_recipe
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train


@pytest.fixture(autouse=True)
def one_thread():
    """The library runs at the caller's thread count; the CLI runs here at train.threads 1, and so do these."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- one recipe, run by the CLI and by the library ----------------------------------------------------------------


def cli_recipe(write_recipe, tmp_path, optimizer: str, steps: int = 8, **sections):
    test_file = tmp_path / "test.tsv"  # a short test split: the runs here are about weights, not accuracy
    test_file.write_text("".join((DATA_DIR / "sst2" / "dev.tsv").read_text().splitlines(keepends=True)[:9]))
    sections.setdefault("train", {}).update(output_dir=str(tmp_path / "cli"), max_steps=steps, lr=2e-3,
                                            eval_every=0, save_every=0, schedule="constant", eval_at_start=False)
    sections.setdefault("data", {}).update(test_file=str(test_file))
    sections.setdefault("method", {})["optimizer"] = optimizer
    return load_recipe(write_recipe(tiny_recipe(**sections)))


def setup(recipe):
    """The model, loss and global batches the CLI's loop builds from `recipe` (its own functions, in its order)."""
    task, tokenizer = load_task_data(recipe, splits=("train",)), load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    features = encode(task.splits["train"], tokenizer, kind, task, recipe.data.max_seq_len)
    stream = TrainStream(features, recipe.train.batch_size, recipe.train.seed, tokenizer.pad_token_id,
                         recipe.train.group_by_length)
    batches = [collate(stream.next_features(), tokenizer.pad_token_id) for _ in range(recipe.train.max_steps)]
    return model, task_kind(recipe).loss, batches


def zo_options(recipe) -> dict:
    zo = recipe.method.zo
    options = {"lr": recipe.train.lr, "eps": zo.eps, "n_queries": zo.n_queries, "weight_decay": zo.weight_decay,
               "seed": recipe.train.seed, "direction": zo.direction}
    options.update({key: getattr(zo, key) for key in ("rank", "refresh") if getattr(zo, key) is not None})
    if recipe.method.optimizer == "quzo":
        options.update(perturb_bits=zo.perturb_bits, independent_roundings=zo.independent_roundings,
                       update_rounding=zo.update_rounding)
    return options


def cli_weights(recipe) -> dict:
    train(recipe)
    return load_file(str(ckpt.resolve(Path(recipe.train.output_dir) / "checkpoints", "last") / ckpt.WEIGHTS))


def assert_same_bits(saved: dict, model: torch.nn.Module | dict) -> None:
    """Every tensor of the checkpoint equals the model's, bit for bit (FP8 and NaN payloads included)."""
    state = model if isinstance(model, dict) else model.state_dict()
    as_bytes = lambda t: t.detach().contiguous().view(torch.uint8)  # noqa: E731
    different = [k for k in saved if not torch.equal(as_bytes(saved[k]), as_bytes(state[k]))]
    assert not different, f"{len(different)} of {len(saved)} tensors differ, first {different[0]}"


def changed(before: dict, model: torch.nn.Module) -> int:
    return sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())


OPTIMIZERS = {"mezo": MeZO, "quzo": QuZO}


@pytest.mark.parametrize("optimizer, sections", [
    ("quzo", {"quant": {"format": "int4"}}),
    ("quzo", {"quant": {"format": "int4"}, "method": {"zo": {"direction": "rademacher"}}}),
    ("quzo", {"quant": {"format": "fp8_e4m3"}, "method": {"zo": {"n_queries": 2, "weight_decay": 0.01}}}),
    ("quzo", {"quant": {"format": "int8"}, "method": {"adapter": "loretta_rep", "loretta": {"init": "paper"}}}),
    ("mezo", {"method": {"adapter": "lora"}}),
    ("mezo", {"method": {"zo": {"direction": "rademacher", "weight_decay": 0.1}}}),
])
def test_optimizer_step_with_a_closure_trains_the_bits_the_cli_trains(write_recipe, tmp_path, optimizer, sections):
    recipe = cli_recipe(write_recipe, tmp_path, optimizer, **sections)
    model, loss, batches = setup(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zo = OPTIMIZERS[optimizer](model, **zo_options(recipe))
    for batch in batches:
        zo.step(lambda: loss(model(batch), batch))
    assert changed(before, model) >= 2  # the trained tensors moved (and the comparison below can fail)
    assert_same_bits(cli_weights(recipe), model)


def test_optimizer_state_dict_resumes_exactly(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"})
    straight, loss, batches = setup(recipe)
    zo = QuZO(straight, **zo_options(recipe))
    for i, batch in enumerate(batches):
        zo.step(lambda: loss(straight(batch), batch))
        if i == 3:
            saved_weights = {k: v.clone() for k, v in straight.state_dict().items()}
            saved_state = zo.state_dict()
    resumed, _, _ = setup(recipe)
    resumed.load_state_dict(saved_weights)
    zo = QuZO(resumed, **{**zo_options(recipe), "seed": 12345})  # the seed comes back with the state
    zo.load_state_dict(saved_state)
    for batch in batches[4:]:
        zo.step(lambda: loss(resumed(batch), batch))
    assert_same_bits(straight.state_dict(), resumed)


def test_optimizer_gives_every_module_its_mode_back_and_refuses_what_it_cannot_train(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"})
    model, loss, batches = setup(recipe)
    model.train()
    model.head.eval()
    seen = []
    QuZO(model, lr=1e-3).step(lambda: seen.append(model.training) or loss(model(batches[0]), batches[0]))
    assert seen == [False, False] and model.training and not model.head.training
    with pytest.raises(ValueError, match="closure"):
        QuZO(model, lr=1e-3).step(None)
    with pytest.raises(ValueError, match="mezo trains full-precision tensors, .* use quzo"):
        MeZO(model)  # its int4 codes are trainable
    with pytest.raises(ValueError, match="nothing to train"):
        MeZO([torch.zeros(3)])


# --- the Trainer ----------------------------------------------------------------------------------------------------


def zo_trainer(recipe, model, loss, batches, output_dir: Path, save_steps: int = 0):
    """A ZOTrainer fed the CLI's batches in order, with the CLI's loss (how a user brings their own loss)."""
    from transformers import TrainingArguments

    from ftkit.hf import ZOTrainer

    class SameBatches(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return loss(model(inputs), inputs)

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset)

    args = TrainingArguments(output_dir=str(output_dir), max_steps=len(batches), per_device_train_batch_size=1,
                             learning_rate=recipe.train.lr, lr_scheduler_type="constant", weight_decay=0.0,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             logging_steps=1, report_to=[], remove_unused_columns=False, seed=recipe.train.seed,
                             use_cpu=True, disable_tqdm=True)
    options = {k: v for k, v in zo_options(recipe).items() if k not in ("lr", "weight_decay", "seed")}
    return SameBatches(model=model, args=args, train_dataset=batches, data_collator=lambda items: items[0],
                       method=recipe.method.optimizer, **options)


def test_zo_trainer_trains_the_bits_the_cli_trains_and_logs_the_projected_gradient(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"})
    model, loss, batches = setup(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = zo_trainer(recipe, model, loss, batches, tmp_path / "hf")
    trainer.train()
    assert changed(before, model) >= 2
    assert_same_bits(cli_weights(recipe), model)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == len(batches) and all("projected_grad" in e and "grad_norm" not in e for e in logs)


def test_zo_trainer_resumes_from_its_checkpoint_bit_exactly(write_recipe, tmp_path):
    recipe = cli_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"})
    straight, loss, batches = setup(recipe)
    zo_trainer(recipe, straight, loss, batches, tmp_path / "hf", save_steps=4).train()
    resumed, _, _ = setup(recipe)
    trainer = zo_trainer(recipe, resumed, loss, batches, tmp_path / "hf")
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))
    assert trainer.zeroth_order.steps_done == len(batches)
    assert_same_bits(straight.state_dict(), resumed)


def test_zo_trainer_refuses_gradient_accumulation(write_recipe, tmp_path):
    from transformers import TrainingArguments

    from ftkit.hf import ZOTrainer

    model, _, _ = setup(cli_recipe(write_recipe, tmp_path, "quzo", quant={"format": "int4"}))
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        ZOTrainer(model=model, args=args, train_dataset=[{}])
    with pytest.raises(ValueError, match=r"method must be a zeroth-order optimizer \(mezo, quzo\), got 'adamw'"):
        ZOTrainer(model=model, args=args, train_dataset=[{}], method="adamw")


# --- conversion, adapters, counts, recipes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face checkpoint (safetensors), with MiniLM's tokenizer. Its layers'
    output widths are multiples of 64, the row tile of int4 storage, so that the bytes below have no padding."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = load_tokenizer(ftkit.recipe_from_dict({"model": {"name": "minilm"}}).model)
    options = {**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"},
               "hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True,
                                                         pad_token_id=tokenizer.pad_token_id, **options))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_quantize_converts_in_place_to_real_low_bit_storage_and_streaming_loads_the_same_codes(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        full = reference(input_ids=ids).logits
    fp32_bytes = ftkit.count_parameters(reference)["stored_bytes"]
    model = ftkit.quantize(reference, "int4", group_size=16)
    counts = ftkit.count_parameters(model)
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules() if hasattr(m, "codes"))
    # int4: half a byte per weight of the quantized layers, plus one bf16 scale per 16 weights
    assert fp32_bytes - counts["stored_bytes"] == pytest.approx(linear * (4 - 0.5 - 2 / 16), rel=1e-6)
    assert counts["trainable"] == counts["total"]  # QuZO trains the codes, and every other tensor requires grad
    with torch.no_grad():
        low_bit = model(input_ids=ids).logits
    assert (low_bit - full).abs().max() < 0.1 * full.abs().max()  # close, not equal: 16-level groups

    streamed = ftkit.load_quantized(str(tiny_llama_dir), "int4", group_size=16)
    assert_same_bits(model.state_dict(), streamed)
    frozen = ftkit.load_quantized(str(tiny_llama_dir), "int4", group_size=16, trainable=False)
    assert ftkit.count_parameters(frozen)["trainable"] == counts["trainable"] - linear


@pytest.mark.parametrize("call, message", [
    (lambda m: ftkit.quantize(m, "int5"), "quant.format: unknown choice 'int5' .*did you mean 'int8'"),
    (lambda m: ftkit.quantize(m, "int4", group_size=-3), "quant.group_size"),
    (lambda m: ftkit.add_adapter(m, "loretta_rep", rank=8), "method.loretta.rank: unknown key"),
    (lambda m: ftkit.add_adapter(m, "lora_rep"), "unknown choice 'lora_rep'"),
])
def test_library_calls_check_their_options_as_recipes_do(tiny_llama_dir, call, message):
    from transformers import AutoModelForCausalLM

    with pytest.raises(RecipeError, match=message):
        call(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))


def test_add_adapter_inserts_loretta_and_freezes_the_rest_like_the_cli(tiny_llama_dir, write_recipe):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    ftkit.add_adapter(model, "loretta_rep", r=4, tensor_rank=3, target_modules=["q_proj", "v_proj"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("loretta" in n for n in trained)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # identity init: the model is unchanged at first
    counted = ftkit.count_parameters(model)["trainable"]
    assert counted == sum(p.numel() for n, p in model.named_parameters() if n in trained)

    from ftkit.models.count import (
        count_parameters as count_recipe,  # what `ftkit count-params` reports
    )

    recipe = ftkit.recipe_from_dict({"model": {"name": str(tiny_llama_dir), "kind": "causal_lm"},
                                     "data": {"task": "copa"},
                                     "method": {"adapter": "loretta_rep", "optimizer": "mezo",
                                                "loretta": {"r": 4, "tensor_rank": 3,
                                                            "target_modules": ["q_proj", "v_proj"]}}})
    assert count_recipe(recipe)["groups"]["adapters"]["trainable"] == counted


def test_a_recipe_built_in_python_is_the_recipe_the_yaml_file_gives_and_trains_the_same(write_recipe, tmp_path):
    data = tiny_recipe(method={"optimizer": "quzo"}, quant={"format": "int4"},
                       train={"max_steps": 4, "eval_every": 0, "save_every": 0, "output_dir": str(tmp_path / "a")})
    from_file = ftkit.load_recipe(write_recipe(data), [f"train.output_dir={tmp_path / 'b'}"])
    in_python = ftkit.recipe_from_dict(data)
    assert ftkit.recipe_to_dict(in_python) == {**ftkit.recipe_to_dict(from_file),
                                               "train": {**ftkit.recipe_to_dict(from_file)["train"],
                                                         "output_dir": str(tmp_path / "a")}}
    first, second = ftkit.train(in_python), ftkit.train(from_file)
    assert first["steps"] == second["steps"] == 4 and first["best_dev"] == second["best_dev"]
    last = lambda run: load_file(str(ckpt.resolve(tmp_path / run / "checkpoints", "last") / ckpt.WEIGHTS))  # noqa
    assert_same_bits(last("a"), last("b"))


def test_train_continues_a_run_directory_as_ftkit_train_run_dir_resume_does(write_recipe, tmp_path):
    data = tiny_recipe(method={"optimizer": "quzo"}, quant={"format": "int4"},
                       train={"max_steps": 6, "eval_every": 0, "save_every": 3, "schedule": "constant",
                              "output_dir": str(tmp_path / "whole")})
    ftkit.train(ftkit.recipe_from_dict(data))
    ftkit.train(write_recipe(data), [f"train.output_dir={tmp_path / 'part'}", "train.max_steps=3"])
    with pytest.raises(UserError, match="--resume"):
        ftkit.train(tmp_path / "part", ["train.max_steps=6"])  # a finished run is not started over
    summary = ftkit.train(tmp_path / "part", ["train.max_steps=6"], resume=True)
    assert summary["steps"] == 6
    last = lambda run: load_file(str(ckpt.resolve(tmp_path / run / "checkpoints", "last") / ckpt.WEIGHTS))  # noqa
    assert_same_bits(last("whole"), last("part"))


def test_importing_ftkit_imports_no_torch_until_a_torch_name_is_touched():
    script = ("import sys, ftkit; ftkit.load_recipe; ftkit.recipe_from_dict; ftkit.components; "
              "assert 'torch' not in sys.modules, 'torch imported early'; ftkit.optim.QuZO; "
              "assert 'torch' in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_every_public_name_has_a_docstring():
    for name in ftkit.__all__:
        assert (getattr(ftkit, name).__doc__ or "").strip(), f"ftkit.{name} has no docstring"
    for name in ("MeZO", "QuZO"):
        assert getattr(ftkit.optim, name).__doc__.strip()
    assert ftkit.hf.ZOTrainer.__doc__.strip()


# --- the examples run, offline, on a tiny model --------------------------------------------------------------------


@pytest.mark.parametrize("script, extra", [
    ("quzo_loop.py", []),
    ("zo_trainer_int4.py", ["--output-dir", "{tmp}/trainer"]),
    ("loretta_peft.py", ["--output-dir", "{tmp}/peft"]),
])
def test_examples_run_offline_on_a_tiny_model(tiny_llama_dir, tmp_path, script, extra, monkeypatch, capsys):
    """Each script as `python examples/SCRIPT` runs it (its folder first on the path, run as __main__), in this
    process: a process of its own would spend most of the time importing what this one has imported."""
    args = ["--model", str(tiny_llama_dir), "--steps", "3", "--train-rows", "32", "--dev-rows", "8",
            *[a.format(tmp=tmp_path) for a in extra]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(REPO / "examples" / script), run_name="__main__")
    output = capsys.readouterr().out
    assert "dev accuracy before" in output and "dev accuracy after 3 steps" in output, output
