"""Writing GGUF: a tiny LLaMA file read into ftkit's layers (its blocks as they are) comes back byte for byte when
nothing trained; after training, every written tensor dequantizes (gguf.quants, bit-exact with llama.cpp) to ftkit's
weight exactly and transformers loads the file; what GGUF cannot hold exactly is refused by one line, nothing
written."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants
from gguf_files import BLOCKS, FFN, HEADS, KV_HEADS, WIDTH, tiny_llama_gguf

from ftkit.errors import UserError
from ftkit.gguf.layout import BY_TYPE, layer_from_file
from ftkit.gguf.metadata import field_value
from ftkit.gguf.names import hf_name, permuted_heads, to_file_rows, to_hf_rows
from ftkit.gguf.write import write_gguf
from ftkit.modules import replace_module
from ftkit.quant.linear import QuantLinear

MIXED = {"attn_v": T.Q4_0, "ffn_down": T.Q8_0}  # the others Q4_1: three block types in one file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny LLaMA GGUF files by kind, their readers and ftkit's model of them (a copy each time), built once per
    module (seconds each)."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def get(kind: str):
        if kind not in made:
            path = tiny_llama_gguf(root / f"{kind}.gguf", MIXED if kind == "mixed" else T[kind.upper()])
            reader = GGUFReader(path)
            made[kind] = path, reader, ftkit_model(reader)
        path, reader, model = made[kind]
        return path, reader, copy.deepcopy(model)
    return get


def heads_of(reader: GGUFReader) -> tuple[int, int]:
    return field_value(reader, "llama.attention.head_count"), field_value(reader, "llama.attention.head_count_kv")


def ftkit_model(reader: GGUFReader):
    """The file's model as ftkit holds it: each linear layer the file's own blocks as a QuantLinear (computing through
    its dequantized weight: the int4 kernels round activations to bfloat16), the other tensors gguf.quants'
    dequantization, q/k rows un-permuted. (transformers' own GGUF loader gives the same model, in seconds more.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=field_value(reader, "llama.vocab_size"), hidden_size=WIDTH, intermediate_size=FFN,
                         num_hidden_layers=BLOCKS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         rms_norm_eps=field_value(reader, "llama.attention.layer_norm_rms_epsilon"),
                         rope_theta=field_value(reader, "llama.rope.freq_base"), tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    for tensor in reader.tensors:
        name, permuted = hf_name(tensor.name), permuted_heads(tensor.name, *heads_of(reader))
        raw = torch.from_numpy(np.array(tensor.data))
        raw = to_hf_rows(raw, permuted) if permuted else raw
        fmt = BY_TYPE.get(tensor.tensor_type)
        if fmt is not None and name.endswith("_proj.weight"):
            layer = layer_from_file(fmt, raw.numpy(), int(tensor.shape[0]), kernel="dequantize")
            replace_module(model, name.removesuffix(".weight"), layer)
        else:
            values = quants.dequantize(raw.numpy(), tensor.tensor_type)
            model.get_parameter(name).data.copy_(torch.from_numpy(values).reshape(model.get_parameter(name).shape))
    return model


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "mixed"])  # mixed: Q4_0, Q4_1 and Q8_0 tensors
def test_an_untrained_model_writes_its_file_back_byte_for_byte(files, kind, tmp_path):
    source, reader, model = files(kind)
    out = write_gguf(model, source, tmp_path / "out.gguf", note=pytest.fail, reader=reader)
    # The whole file: metadata with its stored types (file_type too), tensor names, order, types, bytes, alignment.
    assert out.read_bytes() == source.read_bytes()


def ftkit_weight(model, name: str, reader: GGUFReader) -> np.ndarray:
    """ftkit's weight of the file's tensor `name`, in the file's row order."""
    module_name = hf_name(name).removesuffix(".weight")
    module = model.get_submodule(module_name)
    weight = module.dequantize() if isinstance(module, QuantLinear) else model.get_parameter(hf_name(name)).detach()
    permuted = permuted_heads(name, *heads_of(reader))
    return (to_file_rows(weight, permuted) if permuted else weight).numpy()


def test_trained_codes_and_norms_are_written_exactly_and_transformers_loads_the_file(files, tmp_path):
    source, reader, model = files("mixed")
    generator = torch.Generator().manual_seed(0)
    for layer in [m for m in model.modules() if isinstance(m, QuantLinear)]:  # some codes of every layer move
        positions = torch.randint(0, layer.in_features * layer.out_features, (40,), generator=generator)
        layer.step_codes(positions, torch.randint(0, 2, (40,), generator=generator) * 2 - 1)
    model.model.layers[1].input_layernorm.weight.data.add_(0.125)
    out = write_gguf(model, source, tmp_path / "trained.gguf", note=pytest.fail, reader=reader)
    original = {t.name: t for t in reader.tensors}
    reader = GGUFReader(out)
    for tensor in reader.tensors:
        assert tensor.tensor_type == original[tensor.name].tensor_type, tensor.name
        written = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(
            [int(n) for n in reversed(tensor.shape)])
        assert np.array_equal(written, ftkit_weight(model, tensor.name, reader)), tensor.name
    assert np.asarray(reader.tensors[0].data).tobytes() == np.asarray(original["token_embd.weight"].data).tobytes()

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 42, 420, 700, 1000]])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    # The same weights in float32 computed by two modules: a relative 1e-5 of the logits' scale.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_a_trained_quantized_embedding_is_quantized_again_with_a_note(files, tmp_path):
    source, reader, model = files("q4_1")
    model.model.embed_tokens.weight.data[7] += 0.01
    notes = []
    out = write_gguf(model, source, tmp_path / "out.gguf", note=notes.append, reader=reader)
    assert len(notes) == 1 and "token_embd.weight" in notes[0] and "quantized" in notes[0]
    written = next(t for t in GGUFReader(out).tensors if t.name == "token_embd.weight")
    assert written.tensor_type == T.Q8_0
    expected = quants.quantize(model.model.embed_tokens.weight.detach().numpy(), T.Q8_0)
    assert np.array_equal(np.asarray(written.data), expected)
    assert "output.weight" not in {t.name for t in GGUFReader(out).tensors}  # still tied


def refused(model, source, out, message: str, **options) -> None:
    with pytest.raises(UserError, match=message):
        write_gguf(model, source, out, note=pytest.fail, **options)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_what_gguf_cannot_hold_is_refused_by_name_and_nothing_is_written(files, tmp_path):
    source, reader, model = files("q4_1")
    out = tmp_path / "out.gguf"
    down = model.model.layers[0].mlp.down_proj
    replace_module(model, "model.layers.0.mlp.down_proj", QuantLinear.from_linear(_linear(down.dequantize()), "int4"))
    refused(model, source, out, r"blk.0.ffn_down.weight: format int4 has no GGUF block type; train with a GGUF format",
            reader=reader)
    _, _, model = files("q4_1")
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=False)
    refused(model, source, out, r"lm_head.weight: the model's tensor is tied to the token embedding in", reader=reader)
    _, _, model = files("q4_1")
    other, other_reader, _ = files("q4_0")
    refused(model, other, out, r"tensor blk.0.attn_q.weight is Q4_0 where the run trained it as Q4_1; the file has "
            r"changed since training", types_from_file=True, reader=other_reader)
    refused(model, source, out, r"has changed since the run was trained",
            recorded={"size": source.stat().st_size, "sha256": "0" * 64})
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[:5000])
    refused(model, truncated, out, rf"{truncated} is truncated or damaged")
    foreign = tmp_path / "foreign.gguf"
    writer = GGUFWriter(str(foreign), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    refused(model, foreign, out, rf"{foreign} holds a 'gpt2' model; ftkit reads GGUF files of the LLaMA architecture")
    out.write_bytes(b"mine")
    with pytest.raises(UserError, match="exists; choose another -o"):
        write_gguf(model, source, out, reader=reader)
    assert out.read_bytes() == b"mine"


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def test_a_shape_that_changed_is_named(files, tmp_path):
    source, reader, model = files("q4_1")
    model.model.norm.weight = torch.nn.Parameter(torch.ones(65))
    refused(model, source, tmp_path / "out.gguf", r"tensor output_norm.weight is \[64\] where the model's "
            r"model.norm.weight is \[65\]; the file has changed since training", reader=reader)


@pytest.mark.parametrize("sections, merge, message", [
    ({"model": {"name": "minilm"}}, False, r"model.name minilm is not read from a GGUF file .*; export --format hf"),
    ({"model": {"name": "smollm2-135m"}, "quant": {"format": "int4"}}, False,
     r"quant.format int4 \(engine native\) has no GGUF block type; train with a GGUF format \(q4_0, q4_1, q5_0"),
    ({"quant": {"format": "q4_1"}, "method": {"adapter": "loretta_rep"}}, True,
     r"a loretta_rep update cannot be merged into q4_1 codes exactly; export --format hf --merge"),
    ({"method": {"adapter": "lora"}}, False, r"a GGUF file has no place for lora tensors; add --merge"),
    ({"method": {"adapter": "loretta_adp"}}, True, r"loretta_adp adapters are not a weight update GGUF can hold"),
])
def test_export_refuses_what_gguf_cannot_hold_before_loading_anything(tmp_path, sections, merge, message):
    import re

    import yaml
    from typer.testing import CliRunner

    from ftkit.cli import app

    recipe = {"model": {"name": str(tmp_path / "model.gguf")}, "data": {"task": "sst2"}}  # no such file: not read
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "model.out.gguf"
    result = CliRunner().invoke(app, ["export", str(run), "--format", "gguf", "-o", str(out)]
                                + (["--merge"] if merge else []))
    assert result.exit_code == 2, result.output
    assert re.search(rf"^error: {run} cannot be exported as GGUF: {message}", result.output), result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_changed_tensor_whose_source_type_gguf_cannot_quantize_is_refused_in_one_line():
    """gguf.quants dequantizes Q4_K but quantizes only the simple types: a full-precision tensor stored as Q4_K in the
    source, changed by training, cannot be written back in its type; untouched, its own bytes go back."""
    from types import SimpleNamespace

    from ftkit.gguf.write import _floats

    zeros = np.zeros((1, 144), dtype=np.uint8)  # one Q4_K block of 256 zeros
    source = SimpleNamespace(tensor_type=T.Q4_K, data=zeros)
    raw, ggml = _floats("model.embed_tokens.weight", np.zeros((1, 256), dtype=np.float32), source, [])
    assert ggml == T.Q4_K and np.array_equal(raw, zeros)  # untouched: the source's own bytes
    with pytest.raises(UserError, match=r"model.embed_tokens.weight: the source's type Q4_K for this full-precision "
                                        r"tensor has no gguf.quants codec here; export --format hf"):
        _floats("model.embed_tokens.weight", np.ones((1, 256), dtype=np.float32), source, [])
