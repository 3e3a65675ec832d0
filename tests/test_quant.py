"""Weight formats: rounding (nearest within half a step; stochastic unbiased with bounded variance, independent
streams), packing, kernels, real storage, streaming load, bit-exact save/load, and the bitsandbytes engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_LLAMA, assert_sums_close, tiny_recipe
from safetensors.torch import load_file, save_file

from ftkit import quant
from ftkit.quant.convert import quantize_model
from ftkit.quant.linear import QuantLinear
from ftkit.quant.packing import pack_int4, step_int4, unpack_int4
from ftkit.recipe import recipe_from_dict
from ftkit.recipe.schema import QuantSpec

CODECS = {fmt.name: fmt.grid() for fmt in quant.FORMATS if fmt.codec}  # the built-in codecs, by format
FORMATS = list(CODECS)


def probe_points(codec) -> torch.Tensor:
    """Values across the grid: zero, tiny (FP8 subnormals), ordinary, and near or beyond saturation."""
    top = codec.max_value
    points = [0.0, 0.3, -0.7, 1.5, -2.5, 3.49, top * 0.51, -top * 0.77, top * 0.98, top]
    if codec.name.startswith("fp8"):
        tiny = 2.0 ** codec.min_normal_exponent
        points += [tiny * 0.37, -tiny * 0.81, tiny * 1.3, tiny * 17.2]
    return on_grid_range(codec, torch.tensor(points, dtype=torch.float32))


def on_grid_range(codec, x: torch.Tensor) -> torch.Tensor:
    """Values of a symmetric grid's range moved into an unsigned grid's 0..qmax (Q4_1's codes)."""
    return x if getattr(codec, "signed", True) else x.abs()


@pytest.mark.parametrize("fmt", FORMATS)
def test_nearest_is_within_half_a_step(fmt):
    codec = CODECS[fmt]
    generator = torch.Generator().manual_seed(0)
    x = on_grid_range(codec, (torch.rand(20000, generator=generator) * 2 - 1) * codec.max_value)
    x = torch.cat([x, probe_points(codec), x / 1000])
    error = (codec.round(x, "nearest") - x).abs()
    assert torch.all(error <= codec.spacing(x) / 2 + 1e-6 * x.abs())


def stored_and_read(codec, grid_values: torch.Tensor) -> torch.Tensor:
    """Grid values [n, K] packed into the codec's storage and unpacked again."""
    stored = codec.empty(*grid_values.shape)
    codec.pack(grid_values, out=stored)
    return codec.unpack(stored, *grid_values.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rounding_saturates_and_stays_on_the_grid(fmt):
    codec = CODECS[fmt]
    generator = torch.Generator().manual_seed(1)
    beyond = torch.tensor([codec.max_value * 3, -codec.max_value * 5])
    lowest = -codec.max_value if fmt.startswith("fp8") else codec.qmin
    for mode in ("nearest", "stochastic"):
        rounded = codec.round(beyond, mode, generator)
        assert rounded.tolist() == [codec.max_value, lowest]
        values = (torch.rand(5000, generator=generator) * 2 - 1) * codec.max_value
        values = torch.cat([values, values / 1e4])
        rounded = codec.round(values, mode, generator)
        assert torch.all(torch.isfinite(rounded))
        assert torch.equal(stored_and_read(codec, rounded.view(-1, 2)), rounded.view(-1, 2))  # exact in storage


@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased_with_bounded_variance(fmt):
    codec = CODECS[fmt]
    draws = 40000
    points = probe_points(codec)
    x = points.repeat(draws, 1)
    rounded = codec.round(x, "stochastic", torch.Generator().manual_seed(2))
    spacing = codec.spacing(points)
    mean_error = (rounded.mean(0) - points).abs()
    # Each draw errs by less than one spacing, so the mean of n draws has std <= spacing / (2 sqrt n); 5 sigma.
    assert torch.all(mean_error <= 5 * spacing / (2 * draws**0.5) + 1e-7 * points.abs()), (points, mean_error)
    variance = rounded.var(0)
    assert torch.all(variance <= spacing**2 / 4 * 1.05 + 1e-12)
    # Points on the grid never move.
    on_grid = codec.round(points, "nearest")
    assert torch.equal(codec.round(on_grid.repeat(100, 1), "stochastic", torch.Generator().manual_seed(3)),
                       on_grid.repeat(100, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_generators_give_replayable_independent_roundings(fmt):
    codec = CODECS[fmt]
    x = on_grid_range(codec, (torch.rand(50000, generator=torch.Generator().manual_seed(4)) * 2 - 1) * codec.max_value / 3)
    first = codec.round(x, "stochastic", torch.Generator().manual_seed(10)) - x
    replay = codec.round(x, "stochastic", torch.Generator().manual_seed(10)) - x
    other = codec.round(x, "stochastic", torch.Generator().manual_seed(11)) - x
    assert torch.equal(first, replay)
    correlation = torch.corrcoef(torch.stack([first, other]))[0, 1].item()
    assert abs(correlation) < 0.02  # independent: |r| ~ 1/sqrt(50000) = 0.0045


@pytest.mark.parametrize("rows, cols", [(64, 8), (384, 1536), (100, 6), (1, 2)])
def test_int4_packing_round_trip_and_layout(rows, cols):
    codes = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-rows // 64) * 64 * cols // 2
    assert torch.equal(unpack_int4(packed, rows, cols), codes)
    assert torch.equal(unpack_int4(packed, rows, cols, torch.float32), codes.to(torch.float32))
    into = torch.full((packed.shape[0] + 2, cols // 2), 255, dtype=torch.uint8)  # float grid values, into a buffer
    assert pack_int4(codes.to(torch.float32), out=into[1:-1]).data_ptr() == into[1].data_ptr()
    assert torch.equal(into[1:-1], packed) and (into[0] == 255).all() and (into[-1] == 255).all()
    assert torch.equal(codes, unpack_int4(packed, rows, cols))  # the codes given are left as they were
    if rows % 64 == 0:  # exactly the layout PyTorch's CPU kernel packs
        expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
        assert torch.equal(packed, expected)



@pytest.mark.parametrize("rows, cols", [(64, 8), (200, 128), (1, 2)])
def test_int4_codes_step_in_place_as_unpacked_arithmetic_does(rows, cols):
    """Moving a few codes by whole steps reads and writes only their bytes: the result is unpack, add, clamp to
    -8..7, pack; with both nibbles of some bytes moving at once (rows r and r + 32) and codes pushed past the ends."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (rows, cols), dtype=torch.int8, generator=gen)
    codes[0, 0], codes[-1, -1] = 7, -8
    inner = torch.randperm(rows * cols - 2, generator=gen)[: rows * cols // 3] + 1
    positions = torch.cat([torch.tensor([0, rows * cols - 1]), inner])  # distinct; up from 7, down from -8: clamped
    steps = torch.randint(0, 2, (positions.numel(),), generator=gen) * 2 - 1
    steps[:2] = torch.tensor([1, -1])
    packed = pack_int4(codes)
    step_int4(packed, positions, steps, cols)
    expected = codes.view(-1).to(torch.int16).clone()
    expected[positions] += steps.to(torch.int16)
    assert torch.equal(unpack_int4(packed, rows, cols), expected.clamp(-8, 7).to(torch.int8).view(rows, cols))
    if rows >= 64:
        rows_moved = positions // cols
        same_byte = set((positions[rows_moved % 64 < 32] + 32 * cols).tolist()) & set(positions.tolist())
        assert same_byte, "no byte had both of its codes moved"


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3"])
def test_a_layer_steps_its_codes_in_place_on_integer_grids_only(fmt):
    layer = QuantLinear.from_linear(linear(rows=64, cols=32), fmt, group_size=16)
    before = layer.code_values()
    positions, steps = torch.tensor([0, 5, 2047]), torch.tensor([1, -1, 1])
    if fmt == "fp8_e4m3":
        with pytest.raises(ValueError, match="fp8_e4m3 codes are not on a uniform grid"):
            layer.step_codes(positions, steps)
        return
    layer.step_codes(positions, steps)
    expected = before.view(-1).clone()
    expected[positions] = (expected[positions] + steps).clamp(layer.codec.qmin, layer.codec.qmax)
    assert torch.equal(layer.code_values().view(-1), expected)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8_e4m3"])
def test_a_perturbation_takes_the_dequantized_weight_in_one_pass_bit_for_bit(fmt):
    layer = QuantLinear.from_linear(linear(rows=128, cols=128), fmt, group_size=32)
    delta = torch.randn(128, 128, generator=torch.Generator().manual_seed(1)) * 1e-3
    into = delta.clone()
    layer.add_dequantized(into[64:], slice(64, 128))
    assert torch.equal(into[64:], delta[64:] + layer.dequantize(slice(64, 128))) and torch.equal(into[:64], delta[:64])

def linear(rows=96, cols=256, seed=6):
    torch.manual_seed(seed)
    layer = nn.Linear(cols, rows)
    layer.weight.data[3] *= 20  # an outlier row
    return layer


# The K-quants' fitted scales bound no single weight's error: tests/test_kquants.py checks them against gguf.quants.
@pytest.mark.parametrize("fmt", [f for f in FORMATS if not hasattr(CODECS[f], "derive")])
@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_quant_linear_storage_and_dequantization(fmt, group_size):
    source, block = linear(), getattr(CODECS[fmt], "block", 0)
    if block and group_size not in (0, block):  # GGUF's formats fix their blocks
        with pytest.raises(ValueError, match=f"{fmt} stores blocks of 32 weights; quant.group_size must be 32"):
            QuantLinear.from_linear(source, fmt, group_size=group_size)
        return
    layer = QuantLinear.from_linear(source, fmt, group_size=group_size, scale_dtype=torch.float32)
    expected_dtype = {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn,
                      "fp8_e5m2": torch.float8_e5m2, "q4_0": torch.uint8, "q4_1": torch.uint8, "q5_0": torch.uint8,
                      "q8_0": torch.int8}[fmt]
    assert layer.codes.dtype == expected_dtype
    assert not any(t.dtype == torch.float32 and t.numel() >= source.weight.numel() for t in layer.state_dict().values())
    weight = source.weight.detach()
    group_size = block or group_size
    scales = layer.scales.float().repeat_interleave(group_size or weight.shape[1], dim=1).abs()
    # GGUF's quantizers choose d in float32 and round it to float16 after: up to 2^-9 of a row's largest weight more
    slack = 2**-9 * weight.abs().amax(dim=1, keepdim=True) if block else 1e-6
    # Q4_0 (Q5_0) maps the signed largest value to -8 (-16), so values beyond +7 (+15) steps of the opposite sign
    # clamp: a whole step
    steps = 1.0 if fmt in ("q4_0", "q5_0") else 0.5
    error = (layer.dequantize() - weight).abs()
    assert torch.all(error <= CODECS[fmt].spacing(weight / scales) * scales * steps + slack)


@pytest.mark.parametrize("fmt, group_size, kernel", [("int4", 0, "int4pack"), ("int4", 64, "int4pack"),
                                                     ("int8", 0, "int8pack"), ("int8", 0, "int_mm"),
                                                     ("fp8_e4m3", 0, "scaled_mm"), ("fp8_e5m2", 0, "scaled_mm"),
                                                     ("q4_0", 32, "int4pack"), ("q4_1", 32, "int4pack")])
def test_fast_kernels_match_dequantize(fmt, group_size, kernel):
    layer = QuantLinear.from_linear(linear(rows=100, cols=256), fmt, group_size=group_size, kernel=kernel)
    x = torch.randn(3, 5, 256)
    assert layer.kernel_for(x) == kernel
    reference = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    out = layer(x)
    assert out.shape == (3, 5, 100) and out.dtype == torch.float32
    # Quantized activations: bf16 (int4pack), int8 (int_mm) or FP8 (scaled_mm, the GPU path; it also runs on CPU).
    tolerance = {"int4pack": 0.03, "int_mm": 0.03, "scaled_mm": 0.08}.get(kernel, 1e-6) * reference.abs().max().item()
    assert (out - reference).abs().max().item() <= tolerance


def test_perturbation_hook_is_applied_while_dequantizing():
    layer = QuantLinear.from_linear(linear(), "int4")
    codes = layer.codes.clone()
    delta = torch.randn(96, 256) * 1e-3
    layer.perturbation = lambda _: delta.clone()  # the hook hands the layer a tensor it owns
    x = torch.randn(4, 256)
    weight = layer.dequantize()
    expected = torch.nn.functional.linear(x, weight + delta, layer.bias)
    magnitude = x.abs() @ (weight.abs() + delta.abs()).T + layer.bias.abs()
    assert_sums_close(layer(x).detach(), expected.detach(), magnitude, 256 + 2, "perturbed forward")
    assert torch.equal(layer.codes, codes)  # the stored codes did not change


def test_save_load_is_bit_exact(tmp_path):
    for fmt in FORMATS:
        group_size = getattr(CODECS[fmt], "block", 0) or 32
        layer = QuantLinear.from_linear(linear(), fmt, group_size=group_size, rounding="stochastic",
                                        generator=torch.Generator().manual_seed(7))
        save_file(layer.state_dict(), str(tmp_path / f"{fmt}.safetensors"))
        again = QuantLinear(256, 96, fmt, group_size=group_size)
        again.load_state_dict(load_file(str(tmp_path / f"{fmt}.safetensors")))
        for key, value in layer.state_dict().items():
            assert torch.equal(again.state_dict()[key].view(torch.uint8), value.view(torch.uint8)), (fmt, key)


def test_quantize_model_skips_heads_and_keeps_one_copy():
    from ftkit.models.build import wrap_backbone
    from ftkit.models.load import load_backbone, load_tokenizer

    recipe = recipe_from_dict(tiny_recipe())
    backbone = load_backbone(recipe.model, "encoder", vocab_size=len(load_tokenizer(recipe.model)))
    model = quantize_model(wrap_backbone(backbone, "encoder", 2), QuantSpec(format="int4"))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert type(model.head) is nn.Linear and type(model.encoder.pooler.dense) is nn.Linear


def test_streaming_load_equals_quantizing_the_loaded_model():
    """MiniLM read module by module into int4 gives the same codes as loading it in fp32 and converting."""
    from ftkit.models.load import load_backbone
    from ftkit.recipe.schema import ModelSpec

    spec = QuantSpec(format="int4", group_size=128, skip=["pooler"])
    streamed = load_backbone(ModelSpec(), "encoder", quant=spec)
    converted = quantize_model(load_backbone(ModelSpec(), "encoder"), spec)
    streamed_layers = {n: m for n, m in streamed.named_modules() if isinstance(m, QuantLinear)}
    converted_layers = {n: m for n, m in converted.named_modules() if isinstance(m, QuantLinear)}
    assert streamed_layers.keys() == converted_layers.keys() and len(streamed_layers) == 36
    for name, layer in streamed_layers.items():
        assert torch.equal(layer.codes, converted_layers[name].codes), name
        assert torch.equal(layer.scales, converted_layers[name].scales), name
    for (name, a), (_, b) in zip(streamed.named_parameters(), converted.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt, limit", [("int4", 0.53), ("int8", 1.03), ("fp8_e4m3", 1.03), ("fp8_e5m2", 1.03)])
@pytest.mark.parametrize("group_size", [0, 128])
def test_minilm_encoder_linears_stored_bytes_per_weight(fmt, limit, group_size):
    from ftkit.models.load import load_backbone
    from ftkit.recipe.schema import ModelSpec

    model = load_backbone(ModelSpec(), "encoder", quant=QuantSpec(format=fmt, group_size=group_size))
    layers = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and "encoder.layer" in n]
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(m.stored_bytes for m in layers)
    assert len(layers) == 36 and stored / weights <= limit


def test_causal_lm_from_config_streams_into_int4_and_runs():
    from ftkit.models.load import load_backbone
    from ftkit.recipe.schema import ModelSpec

    config = dict(TINY_LLAMA, vocab_size=1000, hidden_size=64, intermediate_size=128)
    model = load_backbone(ModelSpec(config=config), "causal_lm", quant=QuantSpec(format="int4"))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert type(model.lm_head) is nn.Linear
    logits = model(input_ids=torch.randint(0, 1000, (2, 7))).logits
    assert logits.shape == (2, 7, 1000) and torch.isfinite(logits).all()


def _bnb_real_bytes(module) -> int:
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the fp32 offset
    else:  # LLM.int8: one fp32 scale per row, on the weight or (after a forward) on the layer's state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        total += scales.numel() * scales.element_size()
    return total


@pytest.mark.parametrize("fmt, kind, double", [("int4", "nf4", False), ("int4", "fp4", False), ("int4", "nf4", True),
                                               ("int8", "nf4", False)])
def test_bitsandbytes_engine_runs_frozen_and_counts_its_bytes(fmt, kind, double):
    import bitsandbytes as bnb

    from ftkit.models.count import count_model
    from ftkit.quant.bnb import bnb_counts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 64))
    x = torch.randn(5, 256)
    reference = model(x)
    spec = QuantSpec(format=fmt, engine="bitsandbytes", skip=[])
    spec.bitsandbytes.int4_type, spec.bitsandbytes.double_quant = kind, double
    quantize_model(model, spec)
    expected_type = bnb.nn.Linear4bit if fmt == "int4" else bnb.nn.Linear8bitLt
    assert all(isinstance(model[i], expected_type) for i in (0, 2))
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    out = model(x)
    assert out.shape == reference.shape
    relative_error = ((out - reference).norm() / reference.norm()).item()
    assert relative_error < (0.25 if fmt == "int4" else 0.05)  # 4-bit codes: about 10% error per layer
    for layer in (model[0], model[2]):
        counted = bnb_counts(layer)
        assert counted["stored_bytes"] == _bnb_real_bytes(layer)
        assert counted["weight_params"] == layer.in_features * layer.out_features
    assert count_model(model)["total"] == 256 * 96 + 96 + 96 * 64 + 64


@pytest.mark.parametrize("fmt", ["int4", "q4_0", "q4_1", "q5_0", "q8_0"])
def test_count_params_reports_int4_storage_with_logical_counts(write_recipe, fmt):
    from ftkit.models.count import count_parameters
    from ftkit.recipe import load_recipe

    fp32 = count_parameters(load_recipe(write_recipe({"model": {"name": "minilm"}}, "fp32.yaml")))
    int4 = count_parameters(load_recipe(write_recipe({"quant": {"format": fmt}}, "int4.yaml")))
    assert int4["total"] == fp32["total"] == 22_713_216 + 770
    linear_weights = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    # int4: half a byte a weight and a bf16 scale a row; GGUF's: the file's bytes per block of 32 weights (Q5_0's
    # codes five bits each: 22)
    stored = {"int4": linear_weights // 2 + 2 * 6 * (4 * 384 + 1536 + 384), "q4_0": linear_weights // 32 * 18,
              "q4_1": linear_weights // 32 * 20, "q5_0": linear_weights // 32 * 22,
              "q8_0": linear_weights // 32 * 34}[fmt]
    saved = fp32["stored_bytes"] - int4["stored_bytes"]
    assert saved == linear_weights * 4 - stored
    # Quantized codes are not trained by first-order methods: only full-precision parameters remain trainable.
    assert int4["trainable"] == fp32["trainable"] - linear_weights


def test_quantized_run_checkpoints_codes_evaluates_and_exports(write_recipe, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel
    from typer.testing import CliRunner

    from ftkit.cli import app
    from ftkit.recipe import load_recipe
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(quant={"format": "int4", "group_size": 32},
                                                  train={"max_steps": 4, "output_dir": str(tmp_path / "run")})))
    train(recipe)
    step = tmp_path / "run" / "checkpoints" / "last"
    with safe_open(str(step / "weights.safetensors"), "pt") as handle:
        assert "encoder.encoder.layer.0.attention.self.query.codes" in handle.keys()
        assert '"format": "int4"' in handle.metadata()["ftkit.quant"]
    runner = CliRunner()
    evaluated = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    import json

    from ftkit.training.metrics import read_events

    logged = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["split"] == "dev"][-1]
    assert json.loads(evaluated.output)["accuracy"] == logged["accuracy"]
    exported = runner.invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    model = AutoModel.from_pretrained(tmp_path / "hf")
    assert type(model.encoder.layer[0].attention.self.query) is nn.Linear
    assert (tmp_path / "hf" / "ftkit_head.safetensors").is_file()


def test_eval_applies_post_training_quantization_to_a_full_precision_run(write_recipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from ftkit.cli import app
    from ftkit.recipe import load_recipe
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(train={"max_steps": 4, "output_dir": str(tmp_path / "run")})))
    train(recipe)
    runner = CliRunner()
    full = json.loads(runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"]).output)
    ptq = runner.invoke(app, ["eval", str(tmp_path / "run"), "quant.format=int4", "--json"])
    assert ptq.exit_code == 0, ptq.output
    result = json.loads(ptq.output)
    assert result["source"].endswith("int4 post-training quantization") and result["n"] == full["n"]
    assert result["loss"] != full["loss"]
    bad = runner.invoke(app, ["eval", str(tmp_path / "run"), "train.lr=1"])
    assert bad.exit_code == 2 and "only be re-evaluated under quant.* overrides" in bad.output


def test_auto_kernel_choice_on_cpu():
    x32, x16 = torch.randn(2, 256), torch.randn(2, 256, dtype=torch.bfloat16)
    int4 = QuantLinear.from_linear(linear(rows=64), "int4")
    int8 = QuantLinear.from_linear(linear(rows=64), "int8")
    fp8 = QuantLinear.from_linear(linear(rows=64), "fp8_e4m3")
    assert int4.kernel_for(x32) == "int4pack" and int4.kernel_for(torch.randn(4, 128, 256)) == "dequantize"
    assert int8.kernel_for(x32) == "dequantize" and int8.kernel_for(x16) == "int8pack"
    assert fp8.kernel_for(x32) == "dequantize"  # no FP8 arithmetic on this CPU; _scaled_mm on CUDA
    assert int4.kernel_for(x32.requires_grad_()) == "dequantize"  # backprop needs the input gradient


def test_streaming_load_frees_each_full_precision_layer(monkeypatch):
    """Once a linear layer is quantized, nothing keeps its fp32 weight alive: peak memory stays near one layer."""
    import gc
    import weakref

    from ftkit.models.load import load_backbone
    from ftkit.quant import convert
    from ftkit.recipe.schema import ModelSpec

    converted, alive_before_each = [], []
    real = convert.convert_linear

    def tracking(linear, *args, **kwargs):
        gc.collect()
        alive_before_each.append(sum(ref() is not None for ref in converted))
        converted.append(weakref.ref(linear.weight))
        return real(linear, *args, **kwargs)

    monkeypatch.setattr(convert, "convert_linear", tracking)
    model = load_backbone(ModelSpec(config=dict(TINY_LLAMA, vocab_size=1000)), "causal_lm",
                          quant=QuantSpec(format="int4"))
    gc.collect()
    assert len(converted) == 2 * 7 and max(alive_before_each) == 0
    assert all(ref() is None for ref in converted) and model is not None


def test_streaming_reads_sharded_checkpoints(tmp_path):
    """A checkpoint saved in several safetensors shards streams into int8 exactly like the in-memory model."""
    from transformers import AutoModelForCausalLM

    from ftkit.models.load import load_backbone, load_config
    from ftkit.recipe.schema import ModelSpec

    config = load_config(ModelSpec(config=dict(TINY_LLAMA, vocab_size=1000)))
    torch.manual_seed(3)
    original = AutoModelForCausalLM.from_config(config)
    original.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    spec = QuantSpec(format="int8")
    streamed = load_backbone(ModelSpec(name=str(tmp_path / "sharded")), "causal_lm", quant=spec)
    expected = quantize_model(original, spec)
    for (name, a), (_, b) in zip(streamed.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def test_count_params_of_a_bitsandbytes_recipe_on_meta(write_recipe):
    from ftkit.models.count import count_parameters
    from ftkit.recipe import load_recipe

    nf4 = count_parameters(load_recipe(write_recipe({"quant": {"format": "int4", "engine": "bitsandbytes"}})))
    assert nf4["total"] == 22_713_216 + 770
    linear_weights = 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert nf4["trainable"] == 22_566_146 - linear_weights
    fp32_linear_bytes = 4 * linear_weights
    # 4 bits per weight plus one fp32 absmax per 64 weights, in place of 32 bits.
    assert 90_855_944 - nf4["stored_bytes"] == fp32_linear_bytes - (linear_weights // 2 + 4 * linear_weights // 64)


# --- straight-through first-order training (quant.engine: straight_through) -------------------------------------


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 32), ("fp8_e4m3", 0)])
def test_straight_through_forward_is_the_quantlinear_forward_and_its_gradient_passes_through(fmt, group_size):
    from ftkit.quant.straight_through import StraightThroughLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    spec = QuantSpec(format=fmt, engine="straight_through", group_size=group_size)
    layer = StraightThroughLinear.from_linear(linear, spec)
    stored = QuantLinear.from_linear(linear, fmt, group_size, kernel="dequantize")
    x = torch.randn(5, 64)
    weight = stored.dequantize()
    magnitude = (x.abs() @ weight.abs().T + stored.bias.abs()).detach()
    assert_sums_close(layer(x).detach(), stored(x).detach(), magnitude, 64 + 2, "forward")  # same codes and scales
    assert not torch.equal(layer.quantized_weight(), linear.weight.detach())  # the forward really is quantized

    # d loss / d master weight == d loss / d quantized weight (the rounding is passed straight through)
    loss = layer(x).square().sum()
    loss.backward()
    q = stored.dequantize().requires_grad_(True)
    torch.nn.functional.linear(x, q, stored.bias).square().sum().backward()
    # grad = 2 y^T x over 5 rows, with y itself a 65-term sum
    assert_sums_close(layer.weight.grad, q.grad, 2 * magnitude.T @ x.abs(), 5 + 66 + 2, "gradient")


def test_straight_through_int4_training_learns_and_exports_the_quantized_weights(write_recipe, tmp_path):
    from typer.testing import CliRunner

    from ftkit.cli import app
    from ftkit.recipe import load_recipe
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(
        quant={"format": "int4", "engine": "straight_through"},
        train={"max_steps": 40, "eval_every": 0, "lr": 3e-3, "output_dir": str(tmp_path / "run")})))
    summary = train(recipe)
    assert summary["trainable_params"] > 20_000  # the master weights of every linear layer train
    from ftkit.training.metrics import read_events

    losses = [e["loss"] for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["split"] == "train"]
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8])
    exported = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "hf")])
    assert exported.exit_code == 0, exported.output
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    query = next(v for k, v in weights.items() if k.endswith("attention.self.query.weight"))
    assert max(len(torch.unique(row)) for row in query) <= 16  # int4 per channel: at most 16 levels per row


@pytest.mark.parametrize("sections, message", [
    ({"quant": {"engine": "straight_through"}}, "quant.engine: straight_through simulates a low-bit format"),
    ({"quant": {"engine": "straight_through", "format": "int8"}, "method": {"optimizer": "quzo"}},
     "straight_through is the first-order baseline"),
    ({"quant": {"engine": "straight_through", "format": "int8"}, "method": {"adapter": "lora"}},
     "straight_through trains the quantized weights themselves"),
    ({"quant": {"format": "int4"}, "method": {"adapter": "lora"}}, "lora wraps the layer types PEFT knows"),
])
def test_engine_and_adapter_mistakes_are_named(write_recipe, sections, message):
    from ftkit.errors import RecipeError
    from ftkit.recipe import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tiny_recipe(**sections)))


def test_a_runs_summary_counts_parameters_as_count_params_does(write_recipe, tmp_path):
    """The codes of an int4 layer are its parameters: summary.json's totals are count-params' totals, not only the
    float tensors that torch lists as parameters."""
    from ftkit.models.count import count_parameters
    from ftkit.recipe import load_recipe
    from ftkit.training.loop import train

    recipe = load_recipe(write_recipe(tiny_recipe(
        method={"optimizer": "quzo"}, quant={"format": "int4"},
        train={"max_steps": 2, "eval_every": 0, "output_dir": str(tmp_path / "run")})))
    summary = train(recipe)
    counted = count_parameters(recipe)
    assert summary["total_params"] == counted["total"] > 0
    assert summary["trainable_params"] == counted["trainable"] > 0


# --- GGUF's block formats -------------------------------------------------------------------------------------

GGUF_TYPES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q8_0": "Q8_0"}


def gguf_reference_matrix() -> torch.Tensor:
    """Random rows, plus rows whose scaled values fall exactly on rounding ties (d = 1) and blocks of one value."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(8)) * 0.05
    halves = torch.arange(-16, 16).float() / 2  # x.5 ties at d = 1 for every block format
    weight[0, :32], weight[1, :32], weight[2, :32] = halves.clamp(-8, 7.5), halves.abs().clamp(0, 15), halves
    weight[0, 0], weight[1, 31], weight[2, 5] = -8.0, 15.0, 127.0  # pins d to 1 (Q4_0, Q4_1, Q8_0)
    weight[1, 0] = 0.0
    weight[3, :64], weight[4, 32:64] = 0.0, 0.25  # d = 0 in the file
    weight[5] *= 1e4  # large blocks: float16 scales near their range
    weight[6, :32] = halves
    weight[6, 0] = 16.0  # pins Q5_0's d to -1: its ties
    return weight


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_gguf_block_codes_dequantize_to_what_gguf_quants_gives_for_its_own_bytes(fmt):
    """The same float matrix quantized by ftkit and by gguf.quants (bit-exact with llama.cpp's quantizer): equal
    weights to the bit, and true bytes: 18 (Q4_0), 20 (Q4_1), 22 (Q5_0) or 34 (Q8_0) per block of 32, the file's."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    weight = gguf_reference_matrix()
    kind = GGMLQuantizationType[GGUF_TYPES[fmt]]
    expected = quants.dequantize(quants.quantize(weight.numpy(), kind), kind)
    source = nn.Linear(256, 96, bias=False)
    source.weight.data.copy_(weight)
    layer = QuantLinear.from_linear(source, fmt)
    assert layer.group_size == 32 and layer.scales.dtype == torch.float16
    assert torch.equal(layer.dequantize(), torch.from_numpy(np.ascontiguousarray(expected)))
    per_block = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q8_0": 34}[fmt]
    padded = 128 if fmt in ("q4_0", "q4_1") else 96  # 4-bit codes: rows in blocks of 64
    blocks = 96 * 256 // 32
    assert layer.stored_bytes == blocks * per_block + (padded - 96) * 256 // 2


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_gguf_formats_refuse_other_groups_and_scale_options_in_one_line(fmt, write_recipe):
    from ftkit.recipe import load_recipe
    from ftkit.errors import RecipeError

    for quant, message in [({"group_size": 64}, "quant.group_size: {} stores blocks of 32 weights; set quant.group"),
                           ({"scale_method": "mse"}, "quant.scale_method: {} scales are llama.cpp's"),
                           ({"scale_dtype": "float32"}, "quant.scale_dtype: {} stores float16 scales")]:
        with pytest.raises(RecipeError, match=message.format(fmt)) as refused:
            load_recipe(write_recipe(tiny_recipe(quant={"format": fmt, **quant})))
        assert "\n" not in str(refused.value)
    assert load_recipe(write_recipe(tiny_recipe(quant={"format": fmt, "group_size": 32}))).quant.group_size == 32


def test_a_formats_declared_block_is_its_codecs():
    """`Format.block` (read by validate, which imports no torch) and the codec's `block` (read by the layers) say the
    same group size for every format."""
    for fmt in quant.FORMATS:
        codec = fmt.grid() if fmt.low_bit else None
        assert fmt.block == getattr(codec, "block", 0), fmt.name
    assert [f.name for f in quant.FORMATS if f.block] == ["q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k"]


@pytest.mark.parametrize("fmt", list(GGUF_TYPES))
def test_the_straight_through_baseline_computes_with_the_gguf_layers_weights(fmt):
    from ftkit.quant.straight_through import StraightThroughLinear

    source = linear(rows=48, cols=64)
    baseline = StraightThroughLinear.from_linear(source, QuantSpec(format=fmt, engine="straight_through"))
    assert baseline.group_size == 32
    assert torch.equal(baseline.quantized_weight(), QuantLinear.from_linear(source, fmt).dequantize())
