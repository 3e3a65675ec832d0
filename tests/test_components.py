"""Adding an adapter or a weight format is one declaration and one registration: a toy adapter (per-channel output
scales with a recipe section of their own), a toy format (3-bit integer codes) and a toy codec of its own (4-bit
asymmetric codes with a per-group minimum, two per byte) defined in this file train, checkpoint, resume bit-exactly,
count and export through the package's own code, which knows none of them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from conftest import tiny_recipe
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftkit.adapters import ADAPTERS
from ftkit.adapters.export import unwrap_layers
from ftkit.adapters.targets import find_linears, freeze_all_but
from ftkit.cli import app
from ftkit.components import Adapter, Format, Section, option
from ftkit.errors import RecipeError
from ftkit.modules import replace_module
from ftkit.quant import FORMATS
from ftkit.quant.codecs import IntCodec, round_to_integers
from ftkit.quant.packing import BLOCK, pack_nibbles, padded_rows, unpack_codes
from ftkit.quant.scales import group_view
from ftkit.recipe import load_recipe
from ftkit.training import checkpoint as ckpt
from ftkit.training.loop import train

# --- the toy adapter: y = base(x) * s, one trained scale per output channel ---------------------------------------

@dataclass
class ScaleSpec:
    init: float = option(1.0, help="Starting value of every scale.")
    targets: list[str] = option(factory=lambda: ["query", "value"], help="Module-name suffixes to scale.")


def check_scales(spec: ScaleSpec, recipe, chosen, fail) -> None:
    if spec.init <= 0:
        fail("method.scales.init", f"must be positive, got {spec.init}")


class ScaledLinear(nn.Module):
    def __init__(self, base: nn.Module, init: float):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        device = next(base.parameters()).device
        self.toy_scale = nn.Parameter(torch.full((base.out_features,), init, device=device))

    def forward(self, x):
        return self.base(x) * self.toy_scale

    @torch.no_grad()
    def merge(self):
        self.base.weight.mul_(self.toy_scale.unsqueeze(1))
        if self.base.bias is not None:
            self.base.bias.mul_(self.toy_scale)


def inject_scales(model: nn.Module, spec: ScaleSpec) -> nn.Module:
    for name in find_linears(model.backbone, spec.targets):
        replace_module(model.backbone, name, ScaledLinear(model.backbone.get_submodule(name), spec.init))
    freeze_all_but(model, lambda n: "toy_scale" in n or n.startswith("head."))
    return model


def unwrap_scales(model: nn.Module, merge: bool) -> dict:
    def set_base(layer, base):
        layer.base = base

    return unwrap_layers(model, ScaledLinear, lambda layer: layer.base, set_base, lambda layer: layer.merge(), merge,
                         r"toy_scale")


TOY_ADAPTER = Adapter("scales", "per-channel output scales", section=Section("scales", ScaleSpec, check_scales),
                      inject=inject_scales, unwrap=unwrap_scales, mergeable=True, parameters=r"toy_scale")
TOY_FORMAT = Format("int3", "symmetric 3-bit codes, one per byte", codec=IntCodec("int3", 3))


@pytest.fixture
def toys():
    ADAPTERS.register(TOY_ADAPTER)
    FORMATS.register(TOY_FORMAT)
    yield
    ADAPTERS.unregister(TOY_ADAPTER.name)
    FORMATS.unregister(TOY_FORMAT.name)


def recipe_at(write_recipe, tmp_path, name: str, **sections):
    sections.setdefault("train", {}).update(output_dir=str(tmp_path / name), max_steps=6, eval_every=3, save_every=3)
    return write_recipe(tiny_recipe(**sections), f"{name}.yaml")


def weights(run_dir) -> dict:
    return load_file(str(ckpt.resolve(run_dir / "checkpoints") / ckpt.WEIGHTS))


def assert_resume_is_bit_exact(write_recipe, tmp_path, **sections):
    whole = recipe_at(write_recipe, tmp_path, "whole", **sections)
    train(load_recipe(whole))
    half = recipe_at(write_recipe, tmp_path, "half", **sections)
    train(load_recipe(half, ["train.max_steps=3"]))
    train(load_recipe(half), resume=True)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "half")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a


# --- the adapter ----------------------------------------------------------------------------------------------

def test_the_toy_adapter_options_are_a_recipe_section(toys, write_recipe, tmp_path):
    path = write_recipe(tiny_recipe(method={"adapter": "scales", "scales": {"init": 0.5}}))
    assert load_recipe(path).method.scales.init == 0.5
    with pytest.raises(RecipeError, match=r"method\.scales\.int: unknown key \(did you mean 'method\.scales\.init'"):
        load_recipe(write_recipe(tiny_recipe(method={"adapter": "scales", "scales": {"int": 0.5}})))
    with pytest.raises(RecipeError, match=r"method\.scales\.init: must be positive, got -1\.0"):
        load_recipe(write_recipe(tiny_recipe(method={"adapter": "scales", "scales": {"init": -1.0}})))
    with pytest.raises(RecipeError, match=r"method\.adapter: unknown choice 'scale' .*did you mean 'scales'"):
        load_recipe(write_recipe(tiny_recipe(method={"adapter": "scale"})))


def test_the_toy_adapter_trains_resumes_counts_and_exports(toys, write_recipe, tmp_path):
    sections = {"method": {"adapter": "scales", "scales": {"init": 1.0}}, "train": {"lr": 3e-2}}
    final = assert_resume_is_bit_exact(write_recipe, tmp_path, **sections)
    scales = {k: v for k, v in final.items() if "toy_scale" in k}
    assert len(scales) == 4 and all(not torch.equal(v, torch.ones_like(v)) for v in scales.values())  # trained
    assert set(final) - set(scales) == {"head.weight", "head.bias"}  # nothing else trains

    runner = CliRunner()
    counted = runner.invoke(app, ["count-params", str(tmp_path / "whole.yaml"), "--json"])
    assert counted.exit_code == 0, counted.output
    counts = json.loads(counted.output)
    assert counts["groups"]["adapters"]["trainable"] == 4 * 32 and counts["trainable"] == 4 * 32 + 33 * 2

    config = json.loads((ckpt.resolve(tmp_path / "whole" / "checkpoints") / "adapter_config.json").read_text())
    assert config["adapter"] == "scales" and config["options"] == {"init": 1.0, "targets": ["query", "value"]}

    kept = runner.invoke(app, ["export", str(tmp_path / "whole"), "-o", str(tmp_path / "kept")])
    assert kept.exit_code == 0, kept.output
    aside = load_file(str(tmp_path / "kept" / "ftkit_adapter.safetensors"))
    assert {k.removeprefix("encoder.") for k in scales} == set(aside)

    merged = runner.invoke(app, ["export", str(tmp_path / "whole"), "-o", str(tmp_path / "merged"), "--merge"])
    assert merged.exit_code == 0, merged.output
    assert_export_computes_the_trained_model(tmp_path / "whole", tmp_path / "merged")


def assert_export_computes_the_trained_model(run_dir, exported):
    """The exported plain Hugging Face encoder gives the trained model's pooled embeddings."""
    from transformers import AutoModel

    from ftkit.data.batches import collate, encode
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.heads import mean_pool
    from ftkit.models.load import load_tokenizer
    from ftkit.runs import load_run_recipe

    recipe = load_run_recipe(run_dir)
    task, tokenizer = load_task_data(recipe), load_tokenizer(recipe.model)
    model, kind, _ = build_model(recipe, task, tokenizer)
    ckpt.load_checkpoint(ckpt.resolve(run_dir / "checkpoints", "best"), model)
    batch = collate(encode(task.splits["dev"][:8], tokenizer, kind, task, 32), tokenizer.pad_token_id)
    plain = AutoModel.from_pretrained(exported).eval()
    assert not any("toy_scale" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        expected = model.eval().embed(batch)
        hidden = plain(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
        found = mean_pool(hidden, batch["attention_mask"])
    # two implementations of the whole network: equal to a relative 1e-4 of the embeddings' scale
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# --- the format -----------------------------------------------------------------------------------------------

def test_the_toy_format_trains_with_quzo_resumes_counts_and_exports(toys, write_recipe, tmp_path):
    sections = {"quant": {"format": "int3"}, "method": {"optimizer": "quzo"}, "train": {"lr": 1e-2}}
    final = assert_resume_is_bit_exact(write_recipe, tmp_path, **sections)
    codes = {k: v for k, v in final.items() if k.endswith(".codes")}
    assert codes and all(v.dtype == torch.int8 and v.min() >= -4 and v.max() <= 3 for v in codes.values())
    with safe_open(str(ckpt.resolve(tmp_path / "whole" / "checkpoints") / ckpt.WEIGHTS), "pt") as handle:
        layout = json.loads(handle.metadata()["ftkit.quant"])
    assert {entry["format"] for entry in layout.values()} == {"int3"}

    initial = load_recipe(recipe_at(write_recipe, tmp_path, "fresh", **sections))
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    model, _, _ = build_model(initial, load_task_data(initial), load_tokenizer(initial.model))
    start = dict(model.named_buffers())
    assert sum(int((start[k] != v).sum()) for k, v in codes.items()) > 0  # QuZO moved the stored 3-bit codes

    runner = CliRunner()
    count = lambda *overrides: json.loads(runner.invoke(app, ["count-params", str(tmp_path / "whole.yaml"),
                                                              *overrides, "--json"]).output)
    int3, fp32 = count(), count("quant.format=none", "method.optimizer=mezo")
    weights_per_layer = 4 * 32 * 32 + 2 * 32 * 64  # q, k, v, attention output, intermediate, output
    rows_per_layer = 4 * 32 + 64 + 32
    codes_bytes, scales_bytes = 2 * weights_per_layer, 2 * rows_per_layer * 2  # a byte per code, bf16 scales
    assert int3["total"] == fp32["total"] and int3["trainable"] == fp32["trainable"]  # codes count as weights
    assert int3["stored_bytes"] == fp32["stored_bytes"] - 4 * codes_bytes + codes_bytes + scales_bytes

    exported = runner.invoke(app, ["export", str(tmp_path / "whole"), "-o", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    assert_export_computes_the_trained_model(tmp_path / "whole", tmp_path / "hf")
    from transformers import AutoModel

    weight = AutoModel.from_pretrained(tmp_path / "hf").encoder.layer[0].attention.self.query.weight
    assert max(len(torch.unique(row)) for row in weight) <= 8  # dequantized 3-bit codes: 8 values per channel


# --- a codec of its own: 4-bit asymmetric codes, w = minimum + code * scale per group ------------------------------

@dataclass(frozen=True)
class ToyAsym4:
    """Codes 0..15 and, per group, a scale and a minimum: w = minimum + code * scale, so a group's 16 levels span
    exactly its range (no level wasted on a sign). Stored two codes per byte in the shared nibble layout."""

    name: str = "toy_asym4"
    bits = 4
    row_block = BLOCK  # the nibble layout interleaves rows in blocks of 64
    params = ("scales", "minimums")

    def round(self, x, mode="nearest", generator=None, noise=None):
        return round_to_integers(x, 0, 15, mode, generator, noise)

    def spacing(self, x):
        return torch.ones_like(x)

    def encode(self, weight, group_size, method="absmax", dtype=torch.bfloat16, rounding="nearest", generator=None):
        groups = group_view(weight.to(torch.float32), group_size)
        minimums = groups.amin(dim=-1).to(dtype)
        scales = ((groups.amax(dim=-1) - minimums.to(torch.float32)) / 15).to(dtype)
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: any scale, code 0
        x = (groups - minimums.to(torch.float32).unsqueeze(-1)) / scales.to(torch.float32).unsqueeze(-1)
        return self.round(x, rounding, generator).reshape(weight.shape), {"scales": scales, "minimums": minimums}

    def decode(self, x, params, group_size, into=None):
        groups = group_view(x, group_size)
        groups.mul_(params["scales"].to(torch.float32).unsqueeze(-1))
        groups.add_(params["minimums"].to(torch.float32).unsqueeze(-1))
        return x if into is None else into.add_(x)

    def empty(self, rows, cols, device=None):
        return torch.zeros(padded_rows(rows), cols // 2, dtype=torch.uint8, device=device)

    def pack(self, x, out):
        pack_nibbles(x, 0, out=out)  # nibble = code

    def unpack(self, stored, rows, cols):
        return unpack_codes(stored, rows, cols, 0, torch.float32)


TOY_ASYM4 = Format("toy_asym4", "asymmetric 4-bit codes with a per-group minimum, two per byte", codec=ToyAsym4())


@pytest.fixture
def toy_asym4():
    FORMATS.register(TOY_ASYM4)
    yield TOY_ASYM4.codec
    FORMATS.unregister(TOY_ASYM4.name)


def test_a_codec_of_its_own_stores_half_a_byte_per_weight_and_its_group_tensors(toy_asym4):
    """Half a byte per weight (rows padded to the nibble layout's 64), a bf16 scale and minimum per group of 16: the
    bytes of int4's codes and scales, and one more tensor per group."""
    from ftkit.models.load import load_backbone
    from ftkit.quant.linear import QuantLinear
    from ftkit.recipe.schema import ModelSpec, QuantSpec

    config = dict(tiny_recipe()["model"]["config"])
    stored = {}
    for fmt in ("toy_asym4", "int4"):
        backbone = load_backbone(ModelSpec(config=config), "encoder", quant=QuantSpec(format=fmt, group_size=16))
        layers = [m for m in backbone.modules() if isinstance(m, QuantLinear)]
        stored[fmt] = sum(m.stored_bytes for m in layers)
    shapes = [(m.out_features, m.in_features) for m in layers]
    assert len(shapes) == 12
    groups = sum(out * (k // 16) for out, k in shapes)
    assert stored["toy_asym4"] == sum(padded_rows(out) * k // 2 for out, k in shapes) + 2 * 2 * groups
    assert stored["toy_asym4"] == stored["int4"] + 2 * groups  # the minimums


def test_a_codec_of_its_own_trains_with_quzo_resumes_and_exports(toy_asym4, write_recipe, tmp_path):
    # `ftkit train` under QuZO; the run stopped halfway and resumed ends with the same bits
    sections = {"quant": {"format": "toy_asym4", "group_size": 16}, "method": {"optimizer": "quzo"},
                "train": {"lr": 1e-2}}
    runner = CliRunner()
    whole, half = (recipe_at(write_recipe, tmp_path, name, **sections) for name in ("whole", "half"))
    for args in ([str(whole)], [str(half), "train.max_steps=3"], [str(half), "--resume"]):
        result = runner.invoke(app, ["train", *args])
        assert result.exit_code == 0, result.output
    final, resumed = weights(tmp_path / "whole"), weights(tmp_path / "half")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))

    layer_names = sorted(k.removesuffix(".codes") for k in final if k.endswith(".codes"))
    assert len(layer_names) == 12 and all(f"{n}.minimums" in final for n in layer_names)
    initial = load_recipe(recipe_at(write_recipe, tmp_path, "fresh", **sections))
    from ftkit.data.dataset import load_task_data
    from ftkit.models.build import build_model
    from ftkit.models.load import load_tokenizer

    model, _, _ = build_model(initial, load_task_data(initial), load_tokenizer(initial.model))
    start = dict(model.named_buffers())
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in layer_names}
    codes = {n: toy_asym4.unpack(final[f"{n}.codes"], *shapes[n]) for n in layer_names}
    moved = sum(int((toy_asym4.unpack(start[f"{n}.codes"], *shapes[n]) != codes[n]).sum()) for n in layer_names)
    assert moved > 0  # QuZO moved the stored 4-bit codes

    # `ftkit export` writes, for each layer, the codec's decode of the trained codes
    last = ckpt.resolve(tmp_path / "whole" / "checkpoints")
    exported = runner.invoke(app, ["export", str(tmp_path / "whole"), "-o", str(tmp_path / "hf"),
                                   "--checkpoint", str(last)])
    assert exported.exit_code == 0, exported.output
    plain = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in layer_names:
        params = {p: final[f"{name}.{p}"] for p in toy_asym4.params}
        expected = toy_asym4.decode(codes[name].clone(), params, 16)
        assert torch.equal(plain[f"{name.removeprefix('encoder.')}.weight"], expected), name
